"""The Adapters tab: the adapter library (studio.library) with each adapter's method, base model and trigger
words; rename, delete after a confirmation, and export as a kohya LoRA file for A1111 and ComfyUI."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from pipelines import InputError, LoadedModel
from pipelines.interop import export_lora
from studio.library import AdapterEntry, AdapterLibrary

from .common import OnShow, handler

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
    def ask(name: str | None) -> tuple[gr.Group, str]:
        return gr.Group(visible=True), f"Delete **{_chosen(name)}**? Its file is removed from the library."

    def names(rows: list[list[str]], current: str | None) -> gr.Dropdown:
        choices = [row[0] for row in rows]
        return gr.Dropdown(choices=choices, value=current if current in choices else None)

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
    exported = gr.File(label="Exported file", interactive=False, elem_id="adapters-exported")
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
    delete_button.click(ask, chosen, [confirm, question], api_visibility="private", show_progress="hidden")
    yes.click(delete, chosen, table, api_name="adapters_delete", show_progress="hidden").then(
        lambda: gr.Group(visible=False), outputs=confirm, api_visibility="private")
    no.click(lambda: gr.Group(visible=False), outputs=confirm, api_visibility="private")
    table.change(names, [table, chosen], chosen, api_visibility="private")
    table.select(pick, outputs=chosen, api_visibility="private")
    return OnShow(list_adapters, [], [table])
