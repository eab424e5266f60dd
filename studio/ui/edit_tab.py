"""The Edit tab: a real image, a source and a target prompt (and optionally a painted region) in; the edit
as a before/after slider, the uniform-attention reconstruction and the edit mask out (pipelines/edit.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pipelines import InputError, LoadedModel, edit, save_edit

from .common import MODEL_QUEUE, handler

TITLE = "Edit"
# The drawing surface (gradio#10298: a larger image comes back shrunk to it). Masks are resized to the
# image server-side, so this only sets how finely one can paint.
CANVAS = (512, 512)


def painted_mask(value: dict | None) -> Image.Image | None:
    """The painted region of a gr.ImageMask value: the layers' alpha (their union) as an "L" image at the
    canvas's size, or None when there are no layers. `edit` resizes it to the image with nearest-neighbour and
    binarises it (pipelines.images.load_mask), where nothing painted means no limit."""
    layers = (value or {}).get("layers") or []  # None before anything is uploaded, [] before any painting
    if not layers:
        return None
    # The editor exports every layer at the canvas size, so the alphas stack.
    alpha = np.max([np.asarray(layer.convert("RGBA").getchannel("A")) for layer in layers], axis=0)
    return Image.fromarray(alpha, "L")


def build(model: LoadedModel, out_dir: Path) -> None:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""

    @handler
    def run(image: Image.Image | None, source: str, target: str, painted: dict | None, steps: float,
            guidance: float, mask_start: float, quantile: float, dilation: float, threshold_mode: str,
            source_blend: bool, progress: gr.Progress = gr.Progress()) -> tuple[tuple, str, str, str]:
        if image is None:
            raise InputError("no image to edit: upload one first")
        result = edit(
            model, image, source, target, num_inference_steps=int(steps), guidance_scale=guidance,
            mask_start_t=int(mask_start), quantile=quantile, dilation=int(dilation), threshold_mode=threshold_mode,
            source_blend=source_blend, user_mask=painted_mask(painted),
            callback=lambda step, total: progress((step, total), desc="inverting and editing", unit="steps"),
        )
        # One new folder per edit, as save_edit writes fixed names (edited.png, reconstruction.png, mask.png).
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = save_edit(result, tempfile.mkdtemp(prefix="edit-", dir=out_dir))
        before_after = (result.inversion.image, str(paths["edited"]))
        return before_after, str(paths["reconstruction"]), str(paths["mask"]), result.settings.infotext()

    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(label="Image to edit", type="pil", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="edit-image")  # image_mode None: edit() itself flattens alpha on white
            source = gr.Textbox(label="Source prompt (the image as it is)", lines=1,
                                placeholder="a red circle on the left", elem_id="edit-source")
            target = gr.Textbox(label="Target prompt (what it should become)", lines=1,
                                placeholder="a blue circle on the left", elem_id="edit-target")
            painted = gr.ImageMask(label="Region to edit (optional: paint over it; nothing painted = no limit)",
                                   type="pil", sources=[], canvas_size=CANVAS, elem_id="edit-mask")
            steps = gr.Slider(1, 150, value=50, step=1, label="Steps (inversion and editing each)",
                              elem_id="edit-steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale", elem_id="edit-guidance")
            with gr.Accordion("Advanced", open=False):
                mask_start = gr.Slider(0, 1000, value=200, step=10, elem_id="edit-mask-start",
                                       label="Mask start T_mask (blend below it; 0: never)")
                quantile = gr.Slider(0, 1, value=0.5, step=0.05, label="Mask quantile q", elem_id="edit-quantile")
                dilation = gr.Slider(0, 4, value=1, step=1, label="Mask dilation radius", elem_id="edit-dilation")
                threshold_mode = gr.Radio(["reference", "paper"], value="reference",
                                          label="Threshold (reference: |Δ| > 2λ; paper: |Δ| > λ)",
                                          elem_id="edit-threshold")
                source_blend = gr.Checkbox(value=True, label="Also blend the source branch", elem_id="edit-blend")
            button = gr.Button("Edit", variant="primary", elem_id="edit-button")
        with gr.Column(scale=1):
            result = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="edit-result")
            with gr.Row():
                reconstruction = gr.Image(label="Reconstruction (no edit)", format="png", elem_id="edit-reconstruction")
                mask = gr.Image(label="Edit mask", format="png", elem_id="edit-mask-out")
            settings = gr.Textbox(label="Settings (A1111 parameters)", lines=4, interactive=False,
                                  elem_id="edit-settings")
    # Paint on the uploaded image itself; no model work, so it skips the queue and stays out of the API.
    image.change(lambda picture: picture, image, painted, queue=False, show_progress="hidden",
                 api_visibility="private")
    gr.on([button.click, target.submit], run,
          inputs=[image, source, target, painted, steps, guidance, mask_start, quantile, dilation, threshold_mode,
                  source_blend],
          outputs=[result, reconstruction, mask, settings], api_name="edit", concurrency_id=MODEL_QUEUE)
