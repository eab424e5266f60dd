"""The PNG Info tab: drop a PNG, read the settings that made it (A1111's `parameters` text, which every image the
studio saves carries), and send them to the Generate tab."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from pipelines import SCHEDULERS, InputError, LoadedModel, parse_infotext
from pipelines.attach import ON_UNCOND_PARAM
from pipelines.generate import MAX_SEED

from .common import handler, refuse_unreadable, share

TITLE = "PNG Info"


@handler
def read_settings(path: str | None) -> tuple[str, list[list[str]]]:
    """The image's `parameters` text and its fields as [name, value] rows ("" and [] without an image)."""
    if not path:
        return "", []
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters", "")
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{Path(path).name} is not a readable image ({e}); drop a PNG") from e
    if not text:
        gr.Warning(f"{Path(path).name} carries no generation settings (no `parameters` text): it was not saved by "
                   "the studio or A1111, or the metadata was stripped")
        return "", []
    return text, [[name, value] for name, value in parse_infotext(text).items()]


def with_adapters(table: list[list] | None, listed: str) -> tuple[list[list], list[str]]:
    """The Generate tab's adapter table with the scales of an infotext's "Adapters" entry ("name:scale, ...") and
    every other adapter at 0 (not used), and the names it lists that the library lacks."""
    wanted = {}
    for item in filter(None, (part.strip() for part in listed.split(","))):
        name, _, scale = item.rpartition(":")
        try:
            wanted[name or item] = float(scale)
        except ValueError:
            wanted[item] = 1.0
    rows = [[*row[:-1], wanted.get(row[0], 0)] for row in table or []]
    return rows, [name for name in wanted if name not in {row[0] for row in rows}]


def build(model: LoadedModel, out_dir: Path) -> None:
    """Lay out the tab inside the current gr.Blocks (reading a PNG needs neither the model nor out_dir)."""
    with gr.Row():
        with gr.Column(scale=1):
            # type "filepath", image_mode None: the uploaded file itself, with its text chunks (a converted copy
            # would lose them).
            image = refuse_unreadable(gr.Image(label="PNG (drop one here)", type="filepath", image_mode=None,
                                               sources=["upload", "clipboard"], height=360,
                                               elem_id="png-info-image"), "PNG Info")
        with gr.Column(scale=1):
            text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="png-info-text")
            fields = gr.Dataframe(headers=["Field", "Value"], type="array", interactive=False, wrap=True,
                                  label="Fields", elem_id="png-info-fields")
            send = gr.Button("Send to Generate", variant="primary", elem_id="png-info-send")
    # A failure leaves the last reading in place, with its reason in a toast (no badge over the outputs).
    image.change(read_settings, image, [text, fields], api_name="png_info", show_progress="hidden")
    share(png_info_text=text, png_info_send=send)


def link(shared: dict, tabs: gr.Tabs) -> None:
    """"Send to Generate": the prompt, negative prompt, seed, steps, CFG scale, size, sampler, adapter scales and
    whether the adapters acted on the negative prompt, of the text read, into the Generate tab, which is then shown.
    A value the Generate tab cannot take is left as it was, and said."""
    # The ranges the Generate tab's sliders take (the model's sizes).
    width, steps, guidance = shared["generate_width"], shared["generate_steps"], shared["generate_guidance"]

    @handler
    def to_generate(text: str, table: list[list] | None) -> tuple:
        if not text:
            raise InputError("no settings to send: drop a PNG that carries them first")
        fields, skipped = parse_infotext(text), []  # skipped: "field value (why)" not sent

        def number(key: str, kind: type, low: float, high: float):
            try:
                value = kind(fields[key])
            except (KeyError, ValueError):
                return gr.skip()
            if not low <= value <= high:
                skipped.append(f"{key} {fields[key]} (this model takes {low:g}..{high:g})")
                return gr.skip()
            return value

        size = fields.get("Size", "").split("x")
        w = h = gr.skip()
        if len(size) == 2 and all(s.isdigit() for s in size):
            if all(width.minimum <= int(s) <= width.maximum for s in size):
                w, h = int(size[0]), int(size[1])
            else:
                skipped.append(f"Size {fields['Size']} (this model takes {width.minimum:g}..{width.maximum:g} a side)")
        sampler = fields.get("Sampler")
        if sampler is not None and sampler not in SCHEDULERS:
            skipped.append(f"Sampler {sampler} (the studio has {', '.join(SCHEDULERS)})")
        rows, missing = with_adapters(table, fields.get("Adapters", ""))
        if missing:
            skipped.append(f"Adapters {', '.join(missing)} (not in the adapter library)")
        if skipped:
            gr.Warning("Kept the Generate tab's own value for: " + "; ".join(skipped))
        return (fields.get("Prompt", ""), fields.get("Negative prompt", ""), number("Seed", int, -1, MAX_SEED),
                number("Steps", int, steps.minimum, steps.maximum),
                number("CFG scale", float, guidance.minimum, guidance.maximum), w, h,
                sampler if sampler in SCHEDULERS else gr.skip(), rows, fields.get(ON_UNCOND_PARAM) != "False")

    outputs = [shared[f"generate_{name}"] for name in ("prompt", "negative", "seed", "steps", "guidance", "width",
                                                       "height", "scheduler", "adapters", "on_uncond")]
    shared["png_info_send"].click(to_generate, [shared["png_info_text"], shared["generate_adapters"]], outputs,
                                  api_visibility="private",
                                  show_progress="hidden").success(
        lambda: gr.Tabs(selected="generate"), outputs=tabs, api_visibility="private", show_progress="hidden")
