"""The Edit tab: a real image, a source and a target prompt (and optionally a painted region and adapters from the
library, as in Generate) in; the edit as a before/after slider, the uniform-attention reconstruction and the edit
mask out (pipelines/edit.py).

The region is painted over the uploaded image in translucent paint, with a brush sized to the image; clearing
the paint keeps the image. Small results (a 64-px model's) are shown enlarged, pixel for pixel; the files and
the /edit API keep their true size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pipelines import InputError, LoadedModel, edit, save_edit
from pipelines.edit import check_edit_adapters

from .common import (
    MODEL_QUEUE,
    OnShow,
    adapter_files,
    adapter_picker,
    adapter_rows,
    display_size,
    handler,
    refuse_unreadable,
    share,
    stop_button,
    until_stopped,
)

TITLE = "Edit"
# The drawing surface (gradio#10298: a larger image comes back shrunk to it). Masks are resized to the
# image server-side, so this only sets how finely one can paint.
CANVAS = (512, 512)
# The paint: half-transparent, so the image stays visible under it, and a colour that rarely occurs in images.
MASK_COLOR = "#ff00ff80"


def mask_brush(image_size: tuple[int, int]) -> gr.Brush:
    """The brush for an image of `image_size`: one colour, and a dab about 1/16 of the longer side across (the
    size is the brush's radius, in image pixels) so one dab marks a detail, not a quarter of the image."""
    return gr.Brush(colors=[MASK_COLOR], default_color=MASK_COLOR, color_mode="fixed",
                    default_size=max(2, round(max(image_size) / 32)))


def readable(image: Image.Image | None) -> Image.Image | None:
    """`image` with its pixels decoded, or an InputError naming the file when they cannot be (a truncated or
    corrupt upload: Gradio opens only its header)."""
    if image is None:
        return None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for truncated or corrupt files
        name = Path(getattr(image, "filename", "") or "the image").name
        raise InputError(f"the uploaded {name} is not a readable image ({e}); re-save it as PNG or JPEG") from e
    return image


def painted_mask(value: dict | None) -> Image.Image | None:
    """The painted region of a gr.ImageMask value: the layers' alpha (their union) as an "L" image at the
    canvas's size, or None when there are no layers. `edit` resizes it to the image with nearest-neighbour and
    binarises it (pipelines.images.load_mask), where nothing painted means no limit."""
    layers = (value or {}).get("layers") or []  # None before anything is uploaded, [] before any painting
    if not layers:
        return None
    # The editor exports every layer at the canvas size, so the alphas stack. The paint is half-transparent
    # (MASK_COLOR), and its edges fainter still: any paint at all marks the pixel.
    alpha = np.max([np.asarray(layer.convert("RGBA").getchannel("A")) for layer in layers], axis=0)
    return Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L")


def edit_adapters(rows: list[list] | None) -> list[tuple[Path, float]]:
    """The Adapters table's choice as (file, scale) pairs for `edit`, checked before any work (a CSC-Tuner is
    refused by name: it needs a control image, which an edit does not take)."""
    adapters = adapter_files(rows)
    check_edit_adapters(adapters)
    return adapters


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""

    @handler
    def run(image: Image.Image | None, source: str, target: str, painted: dict | None, steps: float,
            guidance: float, mask_start: float, quantile: float, dilation: float, threshold_mode: str,
            mask_floor: float, source_blend: bool, adapter_table: list[list] | None = None, request: gr.Request = None,
            progress: gr.Progress = gr.Progress()) -> tuple[tuple, str, str, str]:
        if image is None:
            raise InputError("no image to edit: upload one first")
        if not (target or "").strip():
            raise InputError("the target prompt is empty: describe what the image should become (the source "
                             "prompt with the words to change changed)")
        if not (source or "").strip():
            gr.Warning("No source prompt: the image is inverted with the empty prompt. Describing the image as it "
                       "is (the target prompt before the change) usually keeps more of it.")
        readable(image)
        adapters = edit_adapters(adapter_table)
        if image.size != native:
            gr.Info(f"The image ({image.width}x{image.height}) is scaled and center-cropped to {native[0]}x"
                    f"{native[1]}, the size the model works at.")
        result = until_stopped(lambda callback: edit(
            model, image, source, target, num_inference_steps=int(steps), guidance_scale=guidance,
            mask_start_t=int(mask_start), quantile=quantile, dilation=int(dilation), threshold_mode=threshold_mode,
            mask_floor=mask_floor, source_blend=source_blend, user_mask=painted_mask(painted), adapters=adapters,
            callback=callback,
        ), request, progress, "inverting and editing")
        if result is None:  # stopped: the previous results stay
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        # One new folder per edit, as save_edit writes fixed names (edited.png, reconstruction.png, mask.png).
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = save_edit(result, tempfile.mkdtemp(prefix="edit-", dir=out_dir))
        before_after = (result.inversion.image, str(paths["edited"]))
        return before_after, str(paths["reconstruction"]), str(paths["mask"]), result.settings.infotext()

    @handler
    def show_on_canvas(picture: Image.Image | None) -> gr.ImageMask:
        """The uploaded image as the canvas's background (the paint goes in a layer above it), with a brush sized
        to it; also after "Clear canvas", which would otherwise remove the image too."""
        if readable(picture) is None:
            return gr.ImageMask(value=None)
        return gr.ImageMask(value={"background": picture, "layers": [], "composite": None},
                            brush=mask_brush(picture.size))

    def enlarge(before_after: tuple | None, reconstruction: str | None, mask: str | None) -> tuple:
        """The results as shown: small ones scaled up by a whole factor, nearest-neighbour (display only)."""
        def shown(path: str | None) -> Image.Image | None:
            if path is None:
                return None
            with Image.open(path) as opened:
                return display_size(opened.copy())
        pair = None if before_after is None else tuple(shown(path) for path in before_after)
        return pair, shown(reconstruction), shown(mask)

    unet = model.pipe.unet
    native = (unet.config.sample_size * model.pipe.vae_scale_factor,) * 2  # what edit() scales the image to
    with gr.Row():
        with gr.Column(scale=1):
            image = refuse_unreadable(gr.Image(
                label="Image to edit", type="pil", image_mode=None, sources=["upload", "clipboard"],
                elem_id="edit-image"), "Image to edit")  # image_mode None: edit() itself flattens alpha on white
            source = gr.Textbox(label="Source prompt (the image as it is)", lines=1,
                                placeholder="describe the image as it is", elem_id="edit-source")
            target = gr.Textbox(label="Target prompt (what it should become)", lines=1,
                                placeholder="the source prompt, with the words to change changed",
                                elem_id="edit-target")
            painted = gr.ImageMask(label="Region to edit (optional: paint over it; nothing painted = no limit)",
                                   type="pil", sources=[], canvas_size=CANVAS, brush=mask_brush(native),
                                   layers=False, elem_id="edit-mask")
            steps = gr.Slider(1, 150, value=50, step=1, label="Steps (inversion and editing each)",
                              elem_id="edit-steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale", elem_id="edit-guidance")
            with gr.Accordion("Adapters (from the library; set a scale to use one, 0: not used)", open=False,
                              elem_id="edit-adapters-box"):
                adapters = adapter_picker("edit-adapters")
            with gr.Accordion("Advanced", open=False):
                mask_start = gr.Slider(0, 1000, value=200, step=10, elem_id="edit-mask-start",
                                       label="Mask start T_mask (blend below it; 0: never)")
                quantile = gr.Slider(0, 1, value=0.25, step=0.05, elem_id="edit-quantile",
                                     label="Mask quantile q (higher: a smaller edit region)")
                dilation = gr.Slider(0, 4, value=1, step=1, label="Mask dilation radius", elem_id="edit-dilation")
                threshold_mode = gr.Radio(["reference", "paper"], value="reference",
                                          label="Threshold (reference: |Δ| > 2λ; paper: |Δ| > λ)",
                                          elem_id="edit-threshold")
                mask_floor = gr.Slider(0, 2, value=0.8, step=0.1, elem_id="edit-mask-floor",
                                       label="Mask floor (a latent change up to it is never an edit; 0: none)")
                source_blend = gr.Checkbox(value=True, label="Also blend the source branch", elem_id="edit-blend")
            with gr.Row():
                button = gr.Button("Edit", variant="primary", elem_id="edit-button", scale=3)
                stop_button("Stop", elem_id="edit-stop")
        with gr.Column(scale=1):
            # Progress and errors show here, so a refused edit leaves the last results in place.
            status = gr.Textbox(label="Status", interactive=False, elem_id="edit-status")
            # interactive=False: outputs, though `enlarge` also reads them (which would make them upload boxes).
            result = gr.ImageSlider(label="Before / after", type="filepath", format="png", interactive=False,
                                    elem_id="edit-result")
            with gr.Row():
                reconstruction = gr.Image(label="Reconstruction (no edit)", type="filepath", format="png",
                                          interactive=False, elem_id="edit-reconstruction")
                mask = gr.Image(label="Edit mask", type="filepath", format="png", interactive=False,
                                elem_id="edit-mask-out")
            settings = gr.Textbox(label="Settings (A1111 parameters)", lines=4, interactive=False,
                                  elem_id="edit-settings")
    # Paint on the uploaded image itself; no model work, so not in the model queue, and out of the API. Queued all
    # the same (not queue=False): only a queued event's error shows its message (an unreadable upload).
    image.change(show_on_canvas, image, painted, show_progress="hidden", api_visibility="private")
    painted.clear(show_on_canvas, image, painted, show_progress="hidden", api_visibility="private")
    gr.on([button.click, target.submit], run,
          inputs=[image, source, target, painted, steps, guidance, mask_start, quantile, dilation, threshold_mode,
                  mask_floor, source_blend, adapters],
          outputs=[result, reconstruction, mask, settings], api_name="edit", concurrency_id=MODEL_QUEUE,
          show_progress_on=[status],
          ).success(enlarge, [result, reconstruction, mask], [result, reconstruction, mask], queue=False,
                    show_progress="hidden", api_visibility="private")
    share(edit_image=image)  # the Generate tab's "Send to Edit" fills it
    return OnShow(adapter_rows, [adapters], [adapters])  # training adds adapters: the table follows the library
