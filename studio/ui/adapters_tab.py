"""The Adapters tab: the adapter library (studio.library) with each adapter's method, base model and trigger
words; rename, delete after a confirmation, export as a kohya LoRA file for A1111 and ComfyUI, and "Export
checkpoint": the loaded model (SD 1.x, SD 2.x or SDXL) with the chosen adapter merged at a scale, as one
original-layout single-file checkpoint (pipelines.export), like A1111's checkpoint merger."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import gradio as gr

from pipelines import InputError, LoadedModel, StudioError
from pipelines.export import export_checkpoint
from pipelines.interop import export_lora
from studio.library import AdapterEntry, AdapterLibrary

from .common import MODEL_QUEUE, OnShow, handler, refreshed_dropdown

TITLE = "Adapters"


@handler
def list_adapters() -> list[list[str]]:
    return [entry.row() for entry in AdapterLibrary().list()]


@handler
def rename(old: str | None, new: str) -> list[list[str]]:
    name = _chosen(old)
    if not (new or "").strip():
        raise InputError(f"no new name for {name!r}: type one in New name first")
    AdapterLibrary().rename(name, new.strip())
    return list_adapters()


@handler
def delete(name: str | None) -> list[list[str]]:
    AdapterLibrary().delete(_chosen(name))
    return list_adapters()


def _chosen(name: str | None) -> str:
    if not name:
        raise InputError("no adapter chosen: pick one in the list first")
    return name


def checkpoint_path(folder: Path, name: str | None, default: str) -> Path:
    """Where "Export checkpoint" writes: `folder/<name>.safetensors` (`default` for an empty name). Refused: a path
    rather than a name, and an existing file (a click never replaces an earlier export)."""
    name = (name or "").strip() or default
    if Path(name).name != name or name.startswith(".") or "\\" in name:
        raise InputError(f"checkpoint name {name!r} is a path: type a plain file name such as {default!r}")
    path = folder / (name if name.lower().endswith(".safetensors") else f"{name}.safetensors")
    if path.exists():
        raise InputError(f"{path.name} exists in {folder}: type another checkpoint name")
    return path


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks (the library needs neither the model nor out_dir)."""

    @handler
    def export(name: str | None) -> str:
        """The chosen adapter as a kohya LoRA file (A1111, ComfyUI, diffusers' load_lora_weights), to download."""
        entry = AdapterLibrary().get(_chosen(name))
        out_dir.mkdir(parents=True, exist_ok=True)  # the studio's output folder is made by its first output
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=out_dir))
        return str(export_lora(entry.path, folder / f"{entry.name}-kohya.safetensors", format="kohya"))

    @handler
    def export_merged(name: str | None, scale: float | None, file_name: str | None) -> tuple[str | None, str]:
        """The loaded model with the chosen adapter merged at `scale`, written to the output folder's checkpoints/ as
        one original-layout .safetensors: (the file to download, a status line). Refused input returns no file and
        the reason as the status line (and a toast): the status then never shows a bare "Error" badge."""
        try:
            entry = AdapterLibrary().get(_chosen(name))
            if scale is None or not math.isfinite(scale):
                raise InputError(f"scale {scale!r} is not a number: set the Scale slider (1 = full strength)")
            path = checkpoint_path(out_dir / "checkpoints", file_name, f"{model.name}-{entry.name}")
            try:
                path = export_checkpoint(model, path, [(entry.path, float(scale))])
            except StudioError as e:  # the export names its one adapter "adapters[0]"; here it has a name
                raise InputError(str(e).replace("adapters[0]", f"adapter {entry.name!r}", 1)) from e
        except StudioError as e:
            gr.Warning(str(e))
            return None, f"Not exported: {e}"
        size = path.stat().st_size / 2**20
        dtype = str(model.dtype).removeprefix("torch.")
        return str(path), (f"Wrote {path.name} ({size:.1f} MiB, {dtype}): {model.name} ({model.family}) with "
                           f"{entry.name} merged at {scale:g}, in the original single-file layout for A1111, ComfyUI "
                           f"and diffusers' from_single_file. Saved in {path.parent}")

    @handler
    def ask(name: str | None) -> tuple[gr.Group, str]:
        return gr.Group(visible=True), f"Delete **{_chosen(name)}**? Its file is removed from the library."

    def names(rows: list[list[str]], current: str | None) -> gr.Dropdown:
        choices = [row[0] for row in rows]
        return refreshed_dropdown(choices, current)

    def pick(event: gr.SelectData) -> str:  # a click on a row chooses its adapter
        return event.row_value[0]

    rows = list_adapters()
    table = gr.Dataframe(rows, headers=list(AdapterEntry.COLUMNS), type="array", interactive=False,
                         label="Adapter library", elem_id="adapters-table")
    with gr.Row():
        chosen = gr.Dropdown([row[0] for row in rows], value=None, label="Adapter (or click its row)",
                             allow_custom_value=True, elem_id="adapters-chosen")
        new_name = gr.Textbox(label="New name", elem_id="adapters-new-name")
    with gr.Row():
        rename_button = gr.Button("Rename", elem_id="adapters-rename")
        delete_button = gr.Button("Delete...", variant="stop", elem_id="adapters-delete")
        refresh = gr.Button("Refresh", elem_id="adapters-refresh")
        export_button = gr.Button("Export for A1111 / ComfyUI (kohya)", elem_id="adapters-export")
    exported = gr.File(label="Exported file", interactive=False, height=90, elem_id="adapters-exported",
                       elem_classes="studio-download")
    with gr.Group():
        gr.Markdown(f"**Export checkpoint**: {model.name} ({model.family}) with the chosen adapter merged in, as one "
                    ".safetensors for A1111, ComfyUI and diffusers (weight-delta adapters: LoRAs, SaRA)",
                    padding=True)
        with gr.Row(equal_height=True):
            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Scale (1 = full strength)",
                              elem_id="adapters-ckpt-scale")
            file_name = gr.Textbox(label="Checkpoint name", placeholder=f"{model.name}-<adapter>",
                                   elem_id="adapters-ckpt-name")
            ckpt_button = gr.Button("Export checkpoint", variant="primary", elem_id="adapters-ckpt-export")
        checkpoint = gr.File(label="Checkpoint", interactive=False, height=90, elem_id="adapters-ckpt-file",
                             elem_classes="studio-download")
        status = gr.Textbox(label="Status", interactive=False, elem_id="adapters-ckpt-status")
    with gr.Group(visible=False) as confirm:
        question = gr.Markdown()
        with gr.Row():
            yes = gr.Button("Yes, delete", variant="stop", elem_id="adapters-delete-yes")
            no = gr.Button("Keep it", elem_id="adapters-delete-no")

    # show_progress hidden: these are quick, and a refusal (its reason in a toast) then leaves no "Error" badge over
    # the table, which keeps its rows.
    refresh.click(list_adapters, outputs=table, api_name="adapters_list", show_progress="hidden")
    rename_button.click(rename, [chosen, new_name], table, api_name="adapters_rename", show_progress="hidden")
    export_button.click(export, chosen, exported, api_name="adapters_export", show_progress="hidden")
    # Model work: the merge changes the UNet's weights for a moment, so it queues with generation.
    ckpt_button.click(export_merged, [chosen, scale, file_name], [checkpoint, status],
                      api_name="adapters_export_checkpoint", concurrency_id=MODEL_QUEUE, show_progress_on=[status])
    delete_button.click(ask, chosen, [confirm, question], api_visibility="private", show_progress="hidden")
    yes.click(delete, chosen, table, api_name="adapters_delete", show_progress="hidden").then(
        lambda: gr.Group(visible=False), outputs=confirm, api_visibility="private")
    no.click(lambda: gr.Group(visible=False), outputs=confirm, api_visibility="private")
    table.change(names, [table, chosen], chosen, api_visibility="private")
    table.select(pick, outputs=chosen, api_visibility="private")
    return OnShow(list_adapters, [], [table])
