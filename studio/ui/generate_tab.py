"""The Generate tab: prompt, settings, adapters from the library and a control image in; images and the settings
that made them out, with the history of past images, seed buttons, and send-to-Edit and send-to-Control.

Sizes follow the loaded model: its native size (`unet.config.sample_size * vae_scale_factor`) is the default, the
sliders run from a quarter of it to twice it, and the presets are relative to it. A typed value beyond a slider's
range is clamped in its box, and that is what runs; an API call beyond it is refused by the slider itself
("Value 4096 is greater than maximum value 128")."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from pipelines import (
    SCHEDULERS,
    ControlSpec,
    InputError,
    LoadedModel,
    generate,
    parse_infotext,
    prepare_hint,
    save_images,
)
from pipelines.control import controller_condition, is_controller
from pipelines.generate import MAX_SEED, SIZE_MULTIPLE
from studio.library import AdapterLibrary

from .common import (
    ADAPTER_COLUMNS,
    MODEL_QUEUE,
    OnShow,
    adapter_files,
    adapter_picker,
    adapter_rows,
    adapter_scales,
    display_size,
    handler,
    refreshed_dropdown,
    refuse_unreadable,
    share,
    stop_button,
    until_stopped,
)

TITLE = "Generate"
MAX_STEPS = 150  # the Steps slider's end
MAX_IMAGES = 8  # the Number of images slider's end
HISTORY_LIMIT = 100  # newest images shown in the History gallery
PROMPT_HINT = "Describe the picture, e.g. “a red circle on the left” (Enter generates)"


def size_limits(pipe) -> tuple[int, int, int]:
    """(native, smallest, largest) image side for the model, in steps of SIZE_MULTIPLE: a quarter of the native
    size to twice it (SD 1.5: 128..1024; SDXL: 256..2048; the 64-px Shapes model: 16..128)."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    low = max(SIZE_MULTIPLE, native // 4 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return native, low, native * 2


def size_presets(native: int) -> list[tuple[str, int, int]]:
    """(label, width, height) of the size buttons: square, 3:2 landscape and portrait at the native size, and half."""
    long_side = round(native * 1.5 / SIZE_MULTIPLE) * SIZE_MULTIPLE
    half = max(SIZE_MULTIPLE, native // 2 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return [(f"{native}×{native}", native, native), (f"{long_side}×{native}", long_side, native),
            (f"{native}×{long_side}", native, long_side), (f"{half}×{half}", half, half)]


def controller_choices() -> list[str]:
    """The library's CSC-Tuners, the adapters a control image drives."""
    return [entry.name for entry in AdapterLibrary().list() if is_controller(entry.method)]


def editor_image(value: dict | Image.Image | None) -> Image.Image | None:
    """What an ImageEditor holds: its composite, or (the API sends none) the background with the layers over it."""
    if not isinstance(value, dict):
        return value
    if value.get("composite") is not None:
        return value["composite"]
    if value.get("background") is None:
        return None
    image = value["background"].convert("RGBA")
    for layer in value.get("layers") or []:
        image.alpha_composite(layer.convert("RGBA").resize(image.size))
    return image


def control_of(controller: str | None, drawing: dict | Image.Image | None, ready: bool,
               scale: float) -> list[ControlSpec]:
    """The generation's control: [] without a controller; the image is what was uploaded or drawn, and
    the controller's annotator draws its condition map from it unless it `ready` is one already."""
    if not controller:
        return []
    image = editor_image(drawing)
    if image is None:
        raise InputError(f"controller {controller!r} is chosen but there is no control image; upload or draw one, "
                         "or set the controller to none")
    path = AdapterLibrary().get(controller).path
    return [ControlSpec(controller_condition(path), image, float(scale), adapter=path, annotate=not ready)]


def infotext_of(path: str | Path | None) -> str:
    """The A1111 `parameters` text a PNG carries ("" for none, or a file that is not a readable PNG)."""
    if not path:
        return ""
    try:
        with Image.open(path) as image:
            return image.text.get("parameters", "") if hasattr(image, "text") else ""
    except (OSError, SyntaxError, ValueError):
        return ""


def history(out_dir: Path) -> list[str]:
    """The images saved under out_dir by this tab (and the CLI), newest first."""
    paths = sorted(out_dir.glob("*.png"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return [str(p) for p in paths[:HISTORY_LIMIT]]


def gallery_path(item) -> str | None:
    """The file of one gallery value item: (path, caption), or the frontend's {"image": {"path": ...}, ...}."""
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = (item.get("image") or item).get("path")
    return None if item is None else str(item)


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""
    native, low, high = size_limits(model.pipe)

    def warn_if_empty(prompt: str) -> None:
        if not (prompt or "").strip():
            gr.Warning("Empty prompt: generating unconditionally (the model draws whatever it likes).")

    @handler
    def run(prompt: str, negative: str, seed: float | None, steps: float, guidance: float, width: float, height: float,
            scheduler: str, n: float, adapter_table: list[list] | None = None, controller: str | None = None,
            control_image: dict | None = None, ready_hint: bool = False, control_scale: float = 1.0,
            on_uncond: bool = True, request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> tuple:
        warn_if_empty(prompt)
        adapters = adapter_files(adapter_table)
        control = control_of(controller, control_image, ready_hint, control_scale)
        result = until_stopped(lambda callback: generate(
            model, prompt or "", negative_prompt=negative or "",
            seed=None if seed is None or seed < 0 else int(seed), num_inference_steps=int(steps),
            guidance_scale=guidance, width=int(width), height=int(height), scheduler=scheduler,
            num_images_per_prompt=int(n), adapters=adapters, adapters_on_uncond=bool(on_uncond), control=control,
            callback=callback,
        ), request, progress, "denoising")
        if result is None:  # stopped: the previous images and settings stay
            return gr.skip(), gr.skip()
        paths = save_images(result, out_dir)
        infotexts = [s.infotext() for s in result.settings]
        return [(str(p), text) for p, text in zip(paths, infotexts)], "\n\n".join(infotexts)

    @handler
    def preview(controller: str | None, control_image: dict | None, ready_hint: bool, width: float,
                height: float) -> Image.Image | None:
        """The condition map the controller will see, at the image size (shown enlarged when small)."""
        image = editor_image(control_image)
        if image is None:
            return None
        size = (int(width), int(height))
        if image.width > size[0] or image.height > size[1]:
            gr.Info(f"The control image ({image.width}×{image.height}) is scaled down and center-cropped to the "
                    f"image size {size[0]}×{size[1]}.")
        if not controller:
            return None
        spec = control_of(controller, image, ready_hint, 1.0)[0]
        hint = prepare_hint(spec.image, spec.condition, size, annotate=spec.annotate)
        return display_size(Image.fromarray((hint[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")))

    def refresh_lists(table: list[list] | None, controller: str | None) -> tuple[list[list], gr.Dropdown, list[str]]:
        choices = [("none", "")] + [(c, c) for c in controller_choices()]
        return adapter_rows(table), refreshed_dropdown(choices, controller, cleared=""), history(out_dir)

    def show_image(images: list | None, event: gr.SelectData) -> tuple[str, str | None]:
        """A click on an image: its own settings (from its file) in the settings box, and it becomes the selected
        image (for reuse-seed and the send-to buttons)."""
        path = gallery_path((images or [])[event.index]) if images and event.index < len(images) else None
        return infotext_of(path), path

    @handler
    def reuse_seed(path: str | None) -> float:
        """The seed of the selected image (the first of the last run unless another was clicked)."""
        seed = parse_infotext(infotext_of(path)).get("Seed") if path else None
        if seed is None:
            raise InputError("no image with a seed is selected: generate one, or click one in the gallery or History")
        return int(seed)

    def use_adapter(table: list[list] | None, prompt: str, event: gr.SelectData) -> tuple:
        """A click on an adapter's name or trigger words adds its trigger to the prompt and uses it (scale 1 if it
        was 0); a click on the scale only edits the scale."""
        if not table or event.index[1] == len(ADAPTER_COLUMNS) - 1:
            return gr.skip(), gr.skip()
        rows = [list(row) for row in table]
        row = rows[event.index[0]]
        name, triggers = row[0], [t.strip() for t in str(row[1] or "").split(",") if t.strip()]
        if not adapter_scales([row]):
            row[-1] = 1
        text = prompt or ""
        for trigger in triggers:
            if trigger not in text:
                text = f"{text.rstrip().rstrip(',')}, {trigger}" if text.strip() else trigger
        if not triggers:
            gr.Info(f"{name} has no trigger word; its scale is set, the prompt is unchanged.")
        return text, rows

    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder=PROMPT_HINT, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="What to keep out (optional)",
                                  elem_id="gen-negative")
            with gr.Row(equal_height=True):
                scheduler = gr.Dropdown(list(SCHEDULERS), value="DDIM", label="Sampler", elem_id="gen-scheduler",
                                        scale=3)
                seed = gr.Number(value=-1, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)",
                                 elem_id="gen-seed", scale=3)
                with gr.Column(scale=1, min_width=90):
                    random_seed = gr.Button("Random", size="sm", elem_id="gen-seed-random")
                    reuse_button = gr.Button("Reuse", size="sm", elem_id="gen-seed-reuse")
            steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps", elem_id="gen-steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale", elem_id="gen-guidance")
            with gr.Row():
                width = gr.Slider(low, high, value=native, step=SIZE_MULTIPLE, label="Width", elem_id="gen-width")
                height = gr.Slider(low, high, value=native, step=SIZE_MULTIPLE, label="Height", elem_id="gen-height")
            with gr.Row(equal_height=True):
                gr.Markdown("Size:", min_width=40)
                presets = [(gr.Button(label, size="sm", min_width=60, elem_id=f"gen-size-{w}x{h}"), w, h)
                           for label, w, h in size_presets(native)]
            n = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images", elem_id="gen-n")
            with gr.Accordion("Adapters (from the library; click a name to use it and add its trigger word)",
                              open=False):
                adapters = adapter_picker("gen-adapters")
                on_uncond = gr.Checkbox(True, label="Adapters on the negative prompt too (untick to leave guidance's "
                                        "unconditional branch to the base model: CFG then amplifies all they add)",
                                        elem_id="gen-adapters-uncond")
                refresh = gr.Button("Refresh the list", size="sm", elem_id="gen-adapters-refresh")
            with gr.Accordion("Control (a CSC-Tuner from the library steered by an image)", open=False) as control_box:
                controller = gr.Dropdown([("none", "")] + [(c, c) for c in controller_choices()], value="",
                                         label="Controller", allow_custom_value=True, elem_id="gen-controller")
                with gr.Row():
                    # The canvas is at least 512 px, so one can draw finer than a small model's images; the image is
                    # scaled to the generation size (and the tab says so).
                    control_image = refuse_unreadable(gr.ImageEditor(
                        label="Control image (upload, or draw on the canvas)", type="pil",
                        canvas_size=(max(512, high), max(512, high)), elem_id="gen-control-image"), "control image")
                    condition_map = gr.Image(label="Condition map (what the controller sees)", type="pil",
                                             format="png", interactive=False, elem_id="gen-condition-map")
                ready_hint = gr.Checkbox(False, label="The image already is the condition map (skip the annotator)",
                                         elem_id="gen-control-ready")
                control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale",
                                          elem_id="gen-control-scale")
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="gen-button", scale=3)
                stop_button("Stop", elem_id="gen-stop")
        with gr.Column(scale=1):
            # Progress (with its ETA) and a failure's badge show here, so the images and settings stay in view.
            status = gr.Markdown(elem_id="gen-status", min_height=72)
            gallery = gr.Gallery(label="Images (click one for its settings)", columns=4, format="png",
                                 object_fit="contain", interactive=False, elem_id="gen-gallery")
            settings = gr.Textbox(label="Settings (A1111 parameters; click an image for its own)", lines=4,
                                  interactive=False, elem_id="gen-settings")
            selected = gr.State(None)  # the selected image's file
            with gr.Row():
                send_edit = gr.Button("Send to Edit", size="sm", elem_id="gen-send-edit")
                send_control = gr.Button("Send to Control", size="sm", elem_id="gen-send-control")
            with gr.Accordion("History (images saved in the output folder, newest first)", open=False):
                past = gr.Gallery(history(out_dir), label="History", columns=6, format="png", object_fit="contain",
                                  height=320, interactive=False, elem_id="gen-history")

    event = gr.on([button.click, prompt.submit], run,
                  inputs=[prompt, negative, seed, steps, guidance, width, height, scheduler, n, adapters, controller,
                          control_image, ready_hint, control_scale, on_uncond],
                  outputs=[gallery, settings], api_name="generate", concurrency_id=MODEL_QUEUE,
                  show_progress_on=[status])
    # The first new image is the selected one; the History gains the new images.
    event.success(lambda images: gallery_path(images[0]) if images else None, gallery, selected,
                  api_visibility="private", show_progress="hidden").then(
        lambda: history(out_dir), outputs=past, api_visibility="private", show_progress="hidden")
    # The editor reports an upload and a finished stroke ("apply") rather than a change.
    gr.on([controller.change, control_image.change, control_image.upload, control_image.apply, ready_hint.change,
           width.release, height.release], preview,
          inputs=[controller, control_image, ready_hint, width, height], outputs=condition_map,
          api_name="control_preview", show_progress_on=[status])
    refresh.click(refresh_lists, [adapters, controller], [adapters, controller, past], api_visibility="private")
    random_seed.click(lambda: -1, outputs=seed, api_visibility="private", queue=False, show_progress="hidden")
    reuse_button.click(reuse_seed, selected, seed, api_visibility="private", show_progress="hidden")
    for preset, w, h in presets:
        preset.click(lambda w=w, h=h: (w, h), outputs=[width, height], api_visibility="private", queue=False,
                     show_progress="hidden")
    gallery.select(show_image, gallery, [settings, selected], api_visibility="private", show_progress="hidden")
    past.select(show_image, past, [settings, selected], api_visibility="private", show_progress="hidden")
    adapters.select(use_adapter, [adapters, prompt], [prompt, adapters], api_visibility="private",
                    show_progress="hidden")
    share(generate_prompt=prompt, generate_negative=negative, generate_seed=seed, generate_steps=steps,
          generate_adapters=adapters, generate_on_uncond=on_uncond,
          generate_guidance=guidance, generate_width=width, generate_height=height, generate_scheduler=scheduler,
          generate_control_image=control_image, generate_control_box=control_box, generate_selected=selected,
          generate_send_edit=send_edit, generate_send_control=send_control)
    return OnShow(refresh_lists, [adapters, controller], [adapters, controller, past])


def link(shared: dict, tabs: gr.Tabs) -> None:
    """Send the selected image to the Edit tab's image, or to this tab's control image (after every tab is built)."""
    selected = shared["generate_selected"]

    @handler
    def picked(path: str | None) -> str:
        if not path:
            raise InputError("no image selected: generate one, or click one in the gallery or History")
        return path

    if "edit_image" in shared:
        shared["generate_send_edit"].click(picked, selected, shared["edit_image"], api_visibility="private",
                                           show_progress="hidden").success(
            lambda: gr.Tabs(selected="edit"), outputs=tabs, api_visibility="private", show_progress="hidden")
    shared["generate_send_control"].click(
        picked, selected, shared["generate_control_image"], api_visibility="private", show_progress="hidden").success(
        lambda: gr.Accordion(open=True), outputs=shared["generate_control_box"], api_visibility="private",
        show_progress="hidden")
