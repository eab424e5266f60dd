"""The Compose tab: several library concepts in one image (pipelines/compose.py). The artist lists the concepts in
a table (adapter, weight, region prompt, box), draws one box per concept on a canvas (layer k is concept k), and
gets the same seed composed twice, side by side: by LoRA-Composer's regions and by merged weights."""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw, ImageFont

from adapters import REGISTRY
from pipelines import InputError, LoadedModel, save_images
from pipelines.attach import AdapterUse
from pipelines.compose import ComposeRegion, ComposerLossWeights, ComposerSettings, compose
from pipelines.generate import MAX_SEED
from studio.library import AdapterLibrary, LibraryError

from .common import MODEL_QUEUE, OnShow, handler, refreshed_dropdown, stop_button, until_stopped
from .generate_tab import editor_image

TITLE = "Compose"
COLUMNS = ("Adapter", "Weight", "Region prompt", "x0", "y0", "x1", "y1")
BOX_COLUMNS = COLUMNS[3:]
# Concept k's colour in the preview; the brush offers the same ones so a layer can be drawn in its concept's colour.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")
LAYERS = 4  # layers the canvas starts with (the artist can add more)
PANEL = 360  # px: the canvas's and the box preview's height on the page, side by side
PREVIEW_MIN = 256  # px: a 64-px model's boxes and labels are unreadable at their own size
# The two results, in the order they are computed and shown: (compose mode, gallery label).
RESULTS = (("composer", "LoRA-Composer (by region)"), ("merge", "Merged weights"))

Box = tuple[int, int, int, int]
Size = tuple[int, int]  # (width, height) in pixels


# -- the concept table --------------------------------------------------------------------------------------------


def concept_choices() -> list[tuple[str, str]]:
    """(label, name) of the library's adapters that can be composed: those that change the weights."""
    return [(f"{e.name} ({e.method})", e.name) for e in AdapterLibrary().list()
            if e.method in REGISTRY and REGISTRY[e.method].is_weight_delta]


def table_rows(value: Any) -> list[list]:
    """The table's concept rows, each padded to the columns; blank rows dropped (a cleared gr.Dataframe still
    shows, and sends back, one empty row)."""
    if isinstance(value, dict):  # the API's {"headers", "data"} form
        value = value.get("data")
    rows = [list(row) + [""] * (len(COLUMNS) - len(row)) for row in value or []]
    return [row[:len(COLUMNS)] for row in rows if not all(_blank(cell) for cell in row)]


def default_box(k: int, n: int, size: Size) -> Box:
    """Concept k's box until the artist draws or types one: the k-th of n equal vertical strips of the canvas, inset
    by an eighth of its width at each side and a quarter of the height at top and bottom. The global prompt keeps
    the rest: boxes that tile the canvas leave it no cell, and regional prompting then draws one object where these
    draw both (docs/benchmarks.md, bench/fusion_quality.py, session 22)."""
    width, height = size
    x0, x1 = k * width / n, (k + 1) * width / n
    inset = (x1 - x0) / 8
    return round(x0 + inset), round(height / 4), round(x1 - inset), round(3 * height / 4)


def where(box: Box, size: Size) -> str:
    """Where a box sits on the canvas, as a prompt says it: " on the left" (right, top, bottom), by the direction in
    which its centre is furthest off the middle; "" when its centre is within a sixth of the canvas of the middle."""
    (x0, y0, x1, y1), (width, height) = box, size
    dx, dy = (x0 + x1) / (2 * width) - 0.5, (y0 + y1) / (2 * height) - 0.5
    if max(abs(dx), abs(dy)) < 1 / 6:
        return ""
    if abs(dx) >= abs(dy):
        return " on the left" if dx < 0 else " on the right"
    return " on the top" if dy < 0 else " on the bottom"


def region_prompt(word: str, box: Box, size: Size) -> str:
    """A new concept's region prompt: "a <word>" and where its box is ("a sks on the left"), as a global prompt
    places it. A bare "a <word>" tells the embedded model the object is in the middle, where its captions name every
    other place: with bare region prompts the composer draws both subjects in 4 of 32 images at this tab's
    defaults, against 21 of 32 with their places (docs/benchmarks.md, fusion, session 25)."""
    return f"a {word}{where(box, size)}"


def move_box(row: list, box: Box, size: Size) -> None:
    """Set row's box. A region prompt of `region_prompt`'s form for the old box ("a <words>" and its place) takes
    the new box's place; any other prompt is the artist's and stays."""
    old = _box_or_none(row)
    if old is not None:
        prompt, suffix = ("" if _blank(row[2]) else str(row[2])), where(old, size)
        word = prompt[2:len(prompt) - len(suffix)] if prompt.startswith("a ") and prompt.endswith(suffix) else ""
        if word and word.strip() == word and " on the " not in word:
            row[2] = region_prompt(word, box, size)
    row[3:7] = box


def add_concept(rows: Any, name: str, trigger_words: Sequence[str], size: Size) -> list[list]:
    """The table with a row for adapter `name`: prompt `region_prompt` of its first trigger word (its name without
    one), weight blank (the method's default), box the default of the last of n+1 strips (`default_box`). Earlier
    rows whose box is still their default of n move to their default of n+1 (so default boxes never overlap), their
    prompts' places with them; boxes the artist drew or typed stay."""
    rows = table_rows(rows)
    n = len(rows)
    for k, row in enumerate(rows):
        if _box_or_none(row) == default_box(k, n, size):
            move_box(row, default_box(k, n + 1, size), size)
    word = trigger_words[0] if trigger_words else name
    box = default_box(n, n + 1, size)
    return [*rows, [name, "", region_prompt(word, box, size), *box]]


def concepts_from_rows(rows: Any, library: AdapterLibrary) -> tuple[list[AdapterUse], list[ComposeRegion]]:
    """The table as `compose`'s adapters and regions (row k: adapter k in region k), or an InputError naming the
    row (from 1, as shown) and the column of the first bad cell. Checks only what the table alone can tell; the
    boxes' geometry (inside the canvas, large enough, disjoint) is `compose`'s to check."""
    rows = table_rows(rows)
    if not rows:
        raise InputError("the concept table is empty: pick an adapter under 'Add concept' and press Add")
    adapters, regions = [], []
    for i, row in enumerate(rows, start=1):
        adapters.append((_adapter_path(i, row[0], library), _weight(i, row[1])))
        regions.append(ComposeRegion(_box(i, row), _prompt(i, row[2])))
    return adapters, regions


def _adapter_path(i: int, name: Any, library: AdapterLibrary) -> Path:
    name = "" if _blank(name) else str(name).strip()
    if not name:
        raise InputError(f"row {i}, column Adapter is empty: pick the concept's adapter from the library")
    try:
        entry = library.get(name)
    except LibraryError as e:
        raise InputError(f"row {i}, column Adapter: {e}") from e
    if entry.method not in REGISTRY or not REGISTRY[entry.method].is_weight_delta:
        raise InputError(f"row {i}, column Adapter: {name!r} is a {entry.method} adapter, which does not change the "
                         "weights and cannot be composed; use a LoRA, orthogonal LoRA or SaRA concept")
    return entry.path


def _weight(i: int, value: Any) -> float | None:
    if _blank(value):
        return None
    try:
        weight = float(str(value).strip())
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise InputError(f"row {i}, column Weight: {value!r} is not a number; type one such as 0.8, or leave it "
                         "blank for the method's default")
    return weight


def _box(i: int, row: list) -> Box:
    values = []
    for column, value in zip(BOX_COLUMNS, row[3:7]):
        whole = _whole(value)
        if whole is None:
            what = "is empty" if _blank(value) else f"is {value!r}, not a whole number"
            raise InputError(f"row {i}, column {column} {what}: give the box in whole pixels, or draw it on "
                             f"layer {i} of the canvas")
        values.append(whole)
    return tuple(values)


def _prompt(i: int, value: Any) -> str:
    prompt = "" if _blank(value) else str(value).strip()
    if not prompt:
        raise InputError(f"row {i}, column Region prompt is empty: say what goes in the box, with the concept's "
                         "trigger word")
    return prompt


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _whole(value: Any) -> int | None:
    """An integer cell as int (2, 2.0 and "2" alike); None for anything else."""
    if isinstance(value, bool) or _blank(value):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def _box_or_none(row: list) -> Box | None:
    values = [_whole(v) for v in row[3:7]]
    return None if None in values else tuple(values)


def in_table_terms(message: str) -> str:
    """`compose`'s message about regions[k] / adapters[k] in the table's words: row k+1, as the table numbers it."""
    def row(match: re.Match) -> str:
        what = {".box=": "'s box ", ".prompt": "'s region prompt"}.get(match.group(3) or "", "")
        return f"row {int(match.group(2)) + 1}{what}"

    return re.sub(r"\b(regions|adapters)\[(\d+)\](\.box=|\.prompt)?", row, message)


# -- the canvas ---------------------------------------------------------------------------------------------------


def layer_box(layer: Image.Image, size: Size) -> Box | None:
    """The bounding box of a layer's painted pixels in canvas pixels (x0, y0, x1, y1, exclusive ends, as
    ComposeRegion's), or None when nothing is painted. Pixels under half opacity are the brush's soft edge, left
    out so a box ends where the stroke visibly does."""
    painted = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a >= 128 else 0)
    bbox = painted.getbbox()
    if bbox is None:
        return None
    sx, sy = size[0] / layer.width, size[1] / layer.height  # a layer comes back at the canvas's size; be sure
    x0, y0, x1, y1 = bbox
    return math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy)


def boxes_from_layers(rows: Any, layers: Sequence[Image.Image], size: Size) -> list[list]:
    """The table with row k's box set to what layer k has painted (`move_box`: a default prompt's place follows);
    rows with an empty layer (or none) keep theirs, and layers beyond the rows are ignored."""
    rows = table_rows(rows)
    for row, layer in zip(rows, layers):
        box = layer_box(layer, size)
        if box is not None:
            move_box(row, box, size)
    return rows


def blank_canvas(size: Size) -> dict:
    """The editor's value: a white background of the model's native size and no strokes."""
    return {"background": Image.new("RGB", size, "white"), "layers": [], "composite": None}


def draw_preview(rows: Any, size: Size, background: Image.Image | None = None) -> Image.Image:
    """The boxes of the table over the canvas (or `background`, the editor's drawing), each outlined in its
    concept's colour and labelled "k: prompt"; scaled up by a whole factor (nearest-neighbour) to at least
    PREVIEW_MIN px so labels are readable. Rows whose box is not four whole numbers are skipped (the table
    is being typed in; Compose names the bad cell)."""
    scale = max(1, math.ceil(PREVIEW_MIN / max(size)))
    base = Image.new("RGB", size, "white")
    if background is not None:  # the strokes faded, so the outlines and labels stand out over them
        base = Image.blend(base, background.convert("RGB").resize(size), 0.35)
    image = base.resize((size[0] * scale, size[1] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width - 1, image.height - 1), outline="#b0b0b0")  # the canvas's edge, on a white page
    font = _font(max(12, image.width // 18))
    for k, row in enumerate(table_rows(rows)):
        box = _box_or_none(row)
        if box is None or not (box[0] < box[2] and box[1] < box[3]):
            continue
        x0, y0, x1, y1 = (v * scale for v in box)
        color = PALETTE[k % len(PALETTE)]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=max(2, scale // 2))
        label = _fit(draw, f"{k + 1}: {'' if _blank(row[2]) else row[2]}", font, x1 - x0 - 6)
        left, top, right, bottom = draw.textbbox((x0 + 4, y0 + 4), label, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=color)
        draw.text((x0 + 4, y0 + 4), label, fill="white", font=font)
    return image


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text` cut (with "...") to fit `width` px, so a label stays inside its box and off its neighbour's."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# -- the run ------------------------------------------------------------------------------------------------------


def composer_settings(concept: float | None, fill: float | None, region: float | None, step_size: float | None,
                      refine_until: float | None, early_stop_from: float | None, reinitialise: bool, isolation: bool,
                      every_delta: bool = False, cells: str = "inside") -> ComposerSettings:
    """The accordion's knobs as ComposerSettings; an InputError naming a knob left empty or out of range."""
    for label, value in (("Concept loss weight", concept), ("Fill loss weight", fill),
                         ("Region loss weight", region), ("Step size", step_size), ("Refine until step", refine_until),
                         ("Early stop from step", early_stop_from)):
        if value is None or not math.isfinite(value) or value < 0:
            raise InputError(f"Composer settings: {label} is {value!r}; give a number >= 0")
    return ComposerSettings(ComposerLossWeights(float(concept), float(fill), float(region)),
                            step_size=float(step_size), refine_until=int(refine_until),
                            min_refine_steps=int(early_stop_from),
                            reinitialise=bool(reinitialise), isolation=bool(isolation),
                            every_delta=bool(every_delta), cells=cells)


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""
    pipe = model.pipe
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = (native, native)

    @handler
    def run(rows: Any, prompt: str, negative: str, seed: float | None, steps: float, guidance: float,
            concept: float, fill: float, region: float, step_size: float, refine_until: float,
            early_stop_from: float, reinitialise: bool, isolation: bool, every_delta: bool, cells: str,
            on_uncond: bool, request: gr.Request = None,
            progress: gr.Progress = gr.Progress()) -> tuple:
        # Everything the table and the knobs can get wrong is refused here, before any model work.
        adapters, regions = concepts_from_rows(rows, AdapterLibrary())
        settings = composer_settings(concept, fill, region, step_size, refine_until, early_stop_from, reinitialise,
                                     isolation, every_delta, cells)
        # One seed for both results, so they differ only by how the concepts are combined.
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None or seed < 0 else int(seed)

        def both(callback: Callable[[int, int], bool]) -> list:
            results = []
            for i, (mode, _) in enumerate(RESULTS):
                def report(step: int, total: int, offset: int = i) -> bool:  # one bar over both results
                    return callback(offset * total + step, len(RESULTS) * total)

                try:
                    results.append(compose(
                        model, prompt, adapters=adapters, regions=regions, mode=mode, negative_prompt=negative,
                        num_inference_steps=int(steps), guidance_scale=guidance, seed=seed, height=native,
                        width=native, composer=settings, adapters_on_uncond=bool(on_uncond), callback=report))
                except InputError as e:
                    raise InputError(in_table_terms(str(e))) from e
            return results

        results = until_stopped(both, request, progress, " then ".join(label for _, label in RESULTS))
        if results is None:  # stopped: the previous results stay
            return gr.skip(), gr.skip(), gr.skip()
        galleries, texts = [], []
        for result, (_, label) in zip(results, RESULTS):
            infotexts = [s.infotext() for s in result.settings]
            galleries.append([(str(p), text) for p, text in zip(save_images(result, out_dir), infotexts)])
            texts.append(f"{label}:\n" + "\n\n".join(infotexts))
        return galleries[0], galleries[1], "\n\n".join(texts)

    @handler
    def add(rows: Any, name: str | None) -> list[list]:
        if not name:
            raise InputError("no adapter chosen: pick one under 'Add concept' first")
        entry = AdapterLibrary().get(name)
        return add_concept(rows, entry.name, entry.trigger_words, size)

    def drawn(value: dict | None, rows: Any) -> tuple[list[list], Image.Image | None, Image.Image]:
        rows, strokes = boxes_from_layers(rows, (value or {}).get("layers") or [], size), editor_image(value)
        return rows, strokes, draw_preview(rows, size, strokes)

    def refresh(current: str | None) -> gr.Dropdown:
        return refreshed_dropdown(concept_choices(), current)

    with gr.Row():
        with gr.Column(scale=1):
            table = gr.Dataframe([], headers=list(COLUMNS), datatype=["str", "str", "str", *["number"] * 4],
                                 type="array", label="Concepts (row k goes in the box of layer k; Weight blank: "
                                 "the method's default)", column_widths=["16%", "13%", "35%", *["9%"] * 4],
                                 elem_id="compose-table")
            with gr.Row():
                choice = gr.Dropdown(concept_choices(), value=None, label="Add concept (LoRA, orthogonal LoRA, SaRA)",
                                     allow_custom_value=True, scale=3, elem_id="compose-add-choice")
                with gr.Column(scale=1, min_width=100):
                    add_button = gr.Button("Add concept", size="sm", elem_id="compose-add")
                    clear_button = gr.Button("Clear", size="sm", elem_id="compose-clear")
            gr.Markdown("Draw concept k's box on the canvas's layer k (the layer menu is at its bottom right): the "
                        "painted area's bounding box fills row k. Or type the box in the table. Box where each "
                        "concept goes and leave part of the canvas outside every box, to the global prompt: boxes "
                        "that tile the whole canvas tend to give one object instead of one per box.")
            strokes = gr.State(None)  # the canvas's last drawing (a PIL image), for the preview
            with gr.Row():
                canvas = gr.ImageEditor(
                    blank_canvas(size), label=f"Canvas ({native}x{native})", height=PANEL,
                    type="pil", sources=[], transforms=[], canvas_size=size, fixed_canvas=True,
                    layers=gr.LayerOptions(layers=[f"Concept {k}" for k in range(1, LAYERS + 1)]),
                    brush=gr.Brush(max(2, native // 16), list(PALETTE), PALETTE[0], color_mode="defaults"),
                    elem_id="compose-canvas")
                boxes = gr.Image(draw_preview([], size), label="Boxes", type="pil", height=PANEL,
                                 format="png", interactive=False, elem_id="compose-preview")
            prompt = gr.Textbox(label="Prompt (the whole scene)", lines=2, elem_id="compose-prompt",
                                placeholder="the whole scene, naming each concept's trigger "
                                            "(e.g. a sks on the left and a zkz on the right)")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="compose-negative")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random; the same for both)",
                                 elem_id="compose-seed")
                steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="compose-steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale", elem_id="compose-guidance")
            with gr.Accordion("Composer settings", open=False):
                with gr.Row():
                    concept = gr.Number(8.0, label="Concept loss weight", elem_id="compose-concept-weight")
                    fill = gr.Number(2.0, label="Fill loss weight", elem_id="compose-fill-weight")
                    region = gr.Number(10.0, label="Region loss weight", elem_id="compose-region-weight")
                with gr.Row():
                    step_size = gr.Number(20.0, label="Step size", elem_id="compose-step-size")
                    refine_until = gr.Number(25, precision=0, label="Refine until step (0: never)",
                                             elem_id="compose-refine-until")
                    early_stop_from = gr.Number(5, precision=0, label="Early stop from step",
                                                elem_id="compose-early-stop-from")
                with gr.Row():
                    reinitialise = gr.Checkbox(True, label="Re-initialise the latent (concepts start in their box)",
                                               elem_id="compose-reinit")
                    isolation = gr.Checkbox(True, label="Isolation (boxes do not attend to each other)",
                                            elem_id="compose-isolation")
                gr.Markdown("Beyond the paper, on by default here: this studio's concepts are trained on the UNet "
                            "alone, so their identity is not all in cross-attention. Published (cross-attention "
                            "only, cells wholly inside): untick and pick 'wholly inside'. On the embedded model two "
                            "subjects both appear in 82 % of 256 images with these defaults when each was trained on "
                            "its captions (the Train tab's share of steps on the trigger alone at 0), and in 40 % when "
                            "trained with the trigger alone on half its steps (in none of those with the published "
                            "settings). Step size: how hard each step pushes a concept into its box (20, as "
                            "published); from the early stop's step on, an image's updates end once its loss "
                            "rises (5, as published). Subjects trained with the trigger alone did better at step "
                            "40 with the early stop from step 10 (65 %); past a step of about 100 images break "
                            "(docs/benchmarks.md, fusion).")
                with gr.Row():
                    every_delta = gr.Checkbox(True, label="Every delta in its box (self-attention, feed-forward, "
                                              "convolutions too)", elem_id="compose-every-delta")
                    cells = gr.Radio([("wholly inside the box (as published)", "inside"),
                                      ("every cell the box touches", "touched")], value="touched",
                                     label="Attention cells of a box", elem_id="compose-cells")
            on_uncond = gr.Checkbox(False, label="Adapters on the negative prompt too (off: guidance's unconditional "
                                    "branch stays the base model's, as docs/methods.md advises for subjects)",
                                    elem_id="compose-adapters-uncond")
            with gr.Row():
                button = gr.Button("Compose", variant="primary", elem_id="compose-button")
                stop_button("Stop", elem_id="compose-stop")
        with gr.Column(scale=1):
            with gr.Row():
                by_region = gr.Gallery(label=RESULTS[0][1], columns=1, format="png", elem_id="compose-composer")
                merged = gr.Gallery(label=RESULTS[1][1], columns=1, format="png", elem_id="compose-merge")
            settings = gr.Textbox(label="Settings (A1111 parameters)", lines=6, interactive=False,
                                  elem_id="compose-settings")

    button.click(run, inputs=[table, prompt, negative, seed, steps, guidance, concept, fill, region, step_size,
                              refine_until, early_stop_from, reinitialise, isolation, every_delta, cells, on_uncond],
                 outputs=[by_region, merged, settings], api_name="compose", concurrency_id=MODEL_QUEUE)
    # Table and canvas edits are quick, model-free bookkeeping: off the model queue and out of the API.
    private = dict(queue=False, show_progress="hidden", api_visibility="private")
    add_button.click(add, [table, choice], table, api_visibility="private")  # queued: its gr.Error needs the queue
    clear_button.click(lambda: [], outputs=table, **private)
    # The preview follows the canvas (drawn boxes) and the table (typed ones). The table's event reads the
    # strokes from a State: taking the editor as an input would upload its layers again on every keystroke.
    canvas.change(drawn, [canvas, table], [table, strokes, boxes], **private)
    table.change(lambda rows, drawing: draw_preview(rows, size, drawing), [table, strokes], boxes, **private)
    return OnShow(refresh, [choice], [choice])
