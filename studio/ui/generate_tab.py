"""The Generate tab: prompt, settings, adapters from the library and a control image in; images and the settings
that made them out."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from pipelines import SCHEDULERS, ControlSpec, InputError, LoadedModel, generate, prepare_hint, save_images
from pipelines.control import controller_condition, is_controller
from studio.library import AdapterLibrary

from .common import MODEL_QUEUE, OnShow, handler

TITLE = "Generate"


def adapter_rows(current: list[list] | None = None) -> list[list]:
    """One [name, scale] row per library adapter (scale 0: not used), keeping the scales already set."""
    scales = {name: scale for name, scale in current or []}
    return [[entry.name, scales.get(entry.name, 0)] for entry in AdapterLibrary().list()]


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


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""

    @handler
    def run(prompt: str, negative: str, seed: float | None, steps: float, guidance: float, width: float, height: float,
            scheduler: str, n: float, adapter_scales: list[list] | None = None, controller: str | None = None,
            control_image: dict | None = None, ready_hint: bool = False, control_scale: float = 1.0,
            progress: gr.Progress = gr.Progress()) -> tuple[list, str]:
        library = AdapterLibrary()
        result = generate(
            model, prompt, negative_prompt=negative, seed=None if seed is None or seed < 0 else int(seed),
            num_inference_steps=int(steps), guidance_scale=guidance, width=int(width), height=int(height),
            scheduler=scheduler, num_images_per_prompt=int(n),
            adapters=[(library.get(name).path, float(scale)) for name, scale in adapter_scales or [] if scale],
            control=control_of(controller, control_image, ready_hint, control_scale),
            callback=lambda step, total: progress((step, total), desc="denoising", unit="steps"),
        )
        paths = save_images(result, out_dir)
        infotexts = [s.infotext() for s in result.settings]
        return [(str(p), text) for p, text in zip(paths, infotexts)], "\n\n".join(infotexts)

    @handler
    def preview(controller: str | None, control_image: dict | None, ready_hint: bool, width: float,
                height: float) -> Image.Image | None:
        """The condition map the controller will see, at the image size."""
        image = editor_image(control_image)
        if not controller or image is None:
            return None
        spec = control_of(controller, image, ready_hint, 1.0)[0]
        hint = prepare_hint(spec.image, spec.condition, (int(width), int(height)), annotate=spec.annotate)
        return Image.fromarray((hint[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

    def refresh_lists(scales: list[list] | None, controller: str | None) -> tuple[list[list], gr.Dropdown]:
        choices = controller_choices()
        return adapter_rows(scales), gr.Dropdown(choices=[("none", "")] + [(c, c) for c in choices],
                                                 value=controller if controller in choices else "")

    pipe = model.pipe
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size_step = max(8, pipe.vae_scale_factor)
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on the left", elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value="DDIM", label="Sampler", elem_id="gen-scheduler")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="gen-seed")
            steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="gen-steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale", elem_id="gen-guidance")
            with gr.Row():
                width = gr.Slider(size_step, max(1024, native * 2), value=native, step=size_step, label="Width",
                                  elem_id="gen-width")
                height = gr.Slider(size_step, max(1024, native * 2), value=native, step=size_step, label="Height",
                                   elem_id="gen-height")
            n = gr.Slider(1, 8, value=1, step=1, label="Number of images", elem_id="gen-n")
            with gr.Accordion("Adapters (from the library; scale 0: not used)", open=False):
                adapters = gr.Dataframe(adapter_rows(), headers=["Adapter", "Scale"], datatype=["str", "number"],
                                        type="array", static_columns=[0], show_label=False, elem_id="gen-adapters")
                refresh = gr.Button("Refresh the list", size="sm", elem_id="gen-adapters-refresh")
            with gr.Accordion("Control (a CSC-Tuner from the library steered by an image)", open=False):
                controller = gr.Dropdown([("none", "")] + [(c, c) for c in controller_choices()], value="",
                                         label="Controller", allow_custom_value=True, elem_id="gen-controller")
                with gr.Row():
                    control_image = gr.ImageEditor(label="Control image (upload, or draw on the canvas)", type="pil",
                                                   canvas_size=(native, native), elem_id="gen-control-image")
                    condition_map = gr.Image(label="Condition map (what the controller sees)", type="pil",
                                             format="png", interactive=False, elem_id="gen-condition-map")
                ready_hint = gr.Checkbox(False, label="The image already is the condition map (skip the annotator)",
                                         elem_id="gen-control-ready")
                control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale",
                                          elem_id="gen-control-scale")
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gen-gallery")
            settings = gr.Textbox(label="Settings (A1111 parameters)", lines=4, interactive=False,
                                  elem_id="gen-settings")
    gr.on([button.click, prompt.submit], run,
          inputs=[prompt, negative, seed, steps, guidance, width, height, scheduler, n, adapters, controller,
                  control_image, ready_hint, control_scale],
          outputs=[gallery, settings], api_name="generate", concurrency_id=MODEL_QUEUE)
    gr.on([controller.change, control_image.change, ready_hint.change, width.release, height.release], preview,
          inputs=[controller, control_image, ready_hint, width, height], outputs=condition_map,
          api_name="control_preview")
    refresh.click(refresh_lists, [adapters, controller], [adapters, controller], api_visibility="private")
    return OnShow(refresh_lists, [adapters, controller], [adapters, controller])
