"""The Train tab: images (uploaded, or a folder), a trigger word and a method in; samples streamed while
pipelines.train runs, and the finished adapter in the library (the Generate tab lists it).

Every method's options are built from its config dataclass (the fields marked `ui` in their metadata:
help, choices, range) and its defaults come from its class: adding a method adds its options here without
touching this file. The kind of concept picked (subject, style, control) chooses the method measured to
meet the customization targets on it, and says why.

While it trains: the status line (step k/N, loss, ETA), the loss curve and the samples as a grid, one row per
sampled step. A cancelled run can be resumed from its checkpoint, or its adapter kept as it is."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from adapters import REGISTRY, Adapter, Recommendation
from pipelines import InputError, LoadedModel
from pipelines.filetypes import IMAGE_EXTENSIONS
from pipelines.train import TrainConfig, TrainResult, image_methods, training_refusal
from studio.library import AdapterLibrary, LibraryError

from .common import MODEL_QUEUE, handler, option_component, optional_number, stream_training

TITLE = "Train"


def unavailable(model: LoadedModel) -> str | None:
    """Why this tab cannot train `model` (the training loop's own refusal, e.g. of an inpainting model), or None."""
    return training_refusal(model.pipe)
CONCEPTS = ("subject", "style", "control")


def ui_fields(cls: type[Adapter]) -> list[dataclasses.Field]:
    """The config fields of a method that the tab shows."""
    return [f for f in dataclasses.fields(cls.config_class) if f.metadata.get("ui")]


def option_inputs() -> list[tuple[str, dataclasses.Field]]:
    """(method, field) of every option component, in the order the /train API takes their values: every
    registered method's (read when the tab is built, so a method registered before that appears)."""
    return [(method, field) for method in sorted(REGISTRY) for field in ui_fields(REGISTRY[method])]


def method_options(inputs: list[tuple[str, dataclasses.Field]], method: str, values: list) -> dict[str, Any]:
    """The chosen method's options from the values of every option component (blank ones left to the default;
    an option whose default is None comes as text, read as a number)."""
    options = {}
    for (m, field), value in zip(inputs, values):
        if m != method:
            continue
        if field.default is None:
            value = optional_number(value, f"{REGISTRY[m].label}: {field.metadata['help']}")
        if value is not None:
            options[field.name] = value
    return options


def text(value: str | None) -> str:
    """A text box's value, stripped; None (a box in a section never opened sends none) is blank."""
    return (value or "").strip()


def learning_rate_of(value: str | float | None) -> float | None:
    """The learning rate box: blank is the method's default; 0 (or below) is refused, as it would not train."""
    rate = optional_number(value, "Learning rate")
    if rate is not None and not rate > 0:
        raise InputError(f"Learning rate {rate:g}: the adapter would not learn; type a rate > 0 (e.g. 1e-4), or "
                         "leave it blank for the method's default")
    return rate


def status_line(step: int, total: int, loss: float | None, seconds_per_step: float | None) -> str:
    """"step k/N, loss x, s/step, ETA": the ETA from the mean step time of this run so far."""
    line = f"step {step}/{total}" + ("" if loss is None else f", loss {loss:.4f}")
    if seconds_per_step is not None:
        left = round(seconds_per_step * (total - step))
        eta = f"{left // 60} min {left % 60:02d} s" if left >= 60 else f"{left} s"
        line += f", {seconds_per_step:.2f} s/step, ETA {eta}"
    return line


def loss_frame(losses: list | None) -> pd.DataFrame:
    """The loss curve's data: a row per optimizer step for the loss as measured (one batch: noisy) and one for its
    exponential moving average ("smoothed"). Typed even when empty: the plot keeps the axis types of its first
    data, and an empty frame's are text (the axes would then list every value)."""
    rows, average = [], None
    for step, loss in losses or []:
        average = loss if average is None else SMOOTHING * average + (1 - SMOOTHING) * loss
        rows += [(step, loss, "loss"), (step, average, "smoothed")]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype(
        {"step": "int64", "loss": "float64", "curve": "str"})


GRID_ROWS = 12  # sampled steps shown in the grid (the first, the last and evenly between): a long run stays legible
GRID_GAP = 4  # pixels of gray between the cells: samples on white would otherwise run together
SMOOTHING = 0.9  # of the smoothed loss curve (an exponential moving average, as TensorBoard draws it)


def sample_grid(samples: list | None, min_cell: int = 128) -> Image.Image | None:
    """The samples as one image: a row per sampled step ("step N" on its left), a column per (prompt, seed), each
    image scaled up by a whole factor to at least `min_cell` pixels with nearest-neighbour; None without samples.
    `samples` are the gallery's (path, "step N") pairs, in the order the run wrote them."""
    rows: dict[str, list[str]] = {}
    for path, caption in samples or []:
        rows.setdefault(caption, []).append(path)
    if not rows:
        return None
    labels = list(rows)
    if len(labels) > GRID_ROWS:
        labels = [labels[round(i * (len(labels) - 1) / (GRID_ROWS - 1))] for i in range(GRID_ROWS)]
    with Image.open(rows[labels[0]][0]) as first:
        width, height = first.size
    scale = max(1, -(-min_cell // min(width, height)))  # whole factors keep small renders sharp
    cell = (width * scale, height * scale)
    label_width, columns = 80, max(len(rows[label]) for label in labels)
    pitch = (cell[0] + GRID_GAP, cell[1] + GRID_GAP)
    grid = Image.new("RGB", (label_width + columns * pitch[0], GRID_GAP + len(labels) * pitch[1]), (225, 225, 225))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=16)
    for r, label in enumerate(labels):
        top = GRID_GAP + r * pitch[1]
        draw.text((8, top + cell[1] // 2), label, fill="black", font=font, anchor="lm")
        for c, path in enumerate(rows[label]):
            with Image.open(path) as image:
                shown = image.convert("RGB").resize(cell, Image.Resampling.NEAREST)
            grid.paste(shown, (label_width + c * pitch[0], top))
    return grid


DEFAULT_STEPS = 200
DEFAULT_SAMPLE_EVERY = 50  # steps between samples (the Samples section's slider)


def recommendation(concept: str) -> tuple[str, Recommendation | None]:
    """The method whose class records that it meets the targets on this kind of concept, with its settings."""
    for method in sorted(REGISTRY):
        found = REGISTRY[method].recommended_for.get(concept)
        if found is not None:
            return method, found
    return "sc_tuner", None


def method_help(method: str, concept: str) -> str:
    cls = REGISTRY[method]
    chosen, found = recommendation(concept)
    if found is None:
        advice = f"No method records a measurement that meets the targets on a {concept}."
    else:
        settings = ", ".join([f"{k} {v}" for k, v in found.options.items()]
                             + ([f"{found.steps} steps"] if found.steps else [])
                             + ([f"learning rate {found.learning_rate:g}"] if found.learning_rate else [])
                             + ([f"trigger alone {found.instance_prompt_share:.0%} of steps"]
                                if found.instance_prompt_share else []))
        advice = (f"Recommended for a {concept}: **{REGISTRY[chosen].label}**"
                  f"{f' ({settings})' if settings else ''}: {found.reason}.")
    return f"**{cls.label}**: {cls.summary}\n\n{advice}"


def build(model: LoadedModel, out_dir: Path) -> None:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""
    # Set by Cancel, cleared when a run starts; one run at a time (the model queue), so one flag serves.
    stop = threading.Event()
    inputs = option_inputs()

    def follow(config: TrainConfig, library: AdapterLibrary, samples: list, losses: list) -> Iterator[tuple]:
        """Train `config` (a new run, or a cancelled one resumed), yielding (gallery, status, curve, stopped) at each
        step: the samples so far, "step k/N, loss, ETA", the loss history and, when the run is cancelled, what
        Resume and "Keep" need (else None)."""
        if config.adapter_name in library:  # refused now, not after the training
            raise LibraryError(f"the adapter library already holds {config.adapter_name!r}: set another name, "
                               "or rename or delete that one in the Adapters tab")
        first: tuple[float, int] | None = None  # (time, step) of the first report: the ETA's origin
        with contextlib.closing(stream_training(model.pipe, config, stop)) as events:
            for event in events:
                if isinstance(event, TrainResult):
                    break
                samples = samples + [(str(path), f"step {event.step}") for path in event.samples]
                if event.loss is not None:
                    losses = losses + [[event.step, event.loss]]
                now = time.monotonic()
                first = first or (now, event.step)
                per_step = (now - first[0]) / (event.step - first[1]) if event.step > first[1] else None
                curve = {"losses": losses, "samples": samples}
                yield samples, status_line(event.step, event.total_steps, event.loss, per_step), curve, None
        curve = {"losses": losses, "samples": samples}
        if event.cancelled:
            stopped = {"config": dataclasses.asdict(config), "checkpoint": str(event.checkpoint), "step": event.step,
                       "samples": samples, "losses": losses}
            yield samples, (f"Stopped at step {event.step}; checkpoint {event.checkpoint}. To continue, press Resume "
                            f"(or run the same settings with `studio train --data {config.data_dir} --out "
                            f"{config.output_dir} --resume latest`); 'Keep the adapter as it is' adds it to the "
                            "library as it is now."), curve, stopped
            return
        entry = library.add(event.adapter_path, config.adapter_name)
        yield samples, f"Done: {entry.name!r} is in the adapter library; use it in the Generate tab.", curve, None

    @handler
    def run(files: list[str] | None, folder: str | None, trigger: str | None, method: str, steps: float,
            learning_rate: str | float | None, name: str | None, sample_prompt: str | None,
            sample_every: float | None, trigger_share: float | None, masked: bool | None,
            *options: Any) -> Iterator[tuple]:
        # No gr.Progress parameter: Gradio finds it only among positional parameters, and the options are
        # variadic. The status line reports each step instead.
        # A section never opened (Samples) sends None for its boxes: every text is read through text().
        prompts = [p for p in [text(sample_prompt) or text(trigger)] if p]  # blank: the trigger word alone
        every = DEFAULT_SAMPLE_EVERY if sample_every is None else int(sample_every)
        rate = learning_rate_of(learning_rate)  # before any folder is made
        if trigger_share and not text(trigger):
            raise InputError("The share of steps on the trigger word alone needs a trigger word: fill in the "
                             "trigger word, or set the share to 0")
        options_chosen = method_options(inputs, method, list(options))
        out_dir.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="train-", dir=out_dir))
        config = TrainConfig(  # the method's own defaults for what is not set here (caption dropout, ...)
            data_dir=_data_dir(files, text(folder), run_dir), output_dir=run_dir, method=method,
            method_options=options_chosen, trigger=text(trigger) or None, name=text(name) or None, steps=int(steps),
            learning_rate=rate,  # None (blank): the method's default
            instance_prompt_share=float(trigger_share or 0),  # the instance prompt: the trigger word alone
            masked_loss=bool(masked),  # the masks: the uploads' transparency
            sample_prompts=prompts, sample_every=every if prompts else 0,
        )
        yield from follow(config, AdapterLibrary(), [], [])

    @handler
    def resume(stopped: dict | None) -> Iterator[tuple]:
        """Continue this session's cancelled run from its last checkpoint (the same settings and data)."""
        if stopped is None:
            raise InputError("nothing to resume: Resume continues the run last cancelled in this browser session")
        config = TrainConfig(**{**stopped["config"], "resume": "latest"})
        yield from follow(config, AdapterLibrary(), stopped["samples"], stopped["losses"])

    @handler
    def keep(stopped: dict | None) -> tuple[str, None]:
        """Add the cancelled run's adapter, as its last checkpoint holds it, to the library (the run then ends)."""
        if stopped is None:
            raise InputError("nothing to keep: this keeps the adapter of the run last cancelled in this browser "
                             "session")
        config = TrainConfig(**stopped["config"])
        entry = AdapterLibrary().add(Path(stopped["checkpoint"]) / "adapter.safetensors", config.adapter_name)
        return (f"Kept: {entry.name!r}, trained {stopped['step']} of {config.steps} steps, is in the adapter "
                "library; use it in the Generate tab."), None

    def cancel() -> str:
        stop.set()
        return "Stopping after this step, with a checkpoint..."

    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(label="Training images (and .txt captions)", file_count="multiple", type="filepath",
                            elem_id="train-files")
            folder = gr.Textbox(label="...or a folder of images on the server",
                                placeholder="the folder's path on the server (e.g. data/stars)", elem_id="train-folder")
            trigger = gr.Textbox(label="Trigger word (the caption of images without one)",
                                 placeholder="a rare word to call the concept by (e.g. sks)", elem_id="train-trigger")
            concept = gr.Radio(list(CONCEPTS), value=CONCEPTS[0], label="What are you teaching?",
                               elem_id="train-concept")
            first, advised = recommendation(CONCEPTS[0])
            first_options = advised.options if advised else {}
            method = gr.Dropdown([(REGISTRY[m].label, m) for m in image_methods()], value=first, label="Method",
                                 elem_id="train-method")
            about = gr.Markdown(method_help(first, CONCEPTS[0]), elem_id="train-method-help")
            options = [option_component(m, field, model.pipe.unet, shown=m == first,
                                        value=(first_options if m == first else {}).get(field.name, field.default))
                       for m, field in inputs]
            steps = gr.Slider(1, 2000, value=advised.steps if advised and advised.steps else DEFAULT_STEPS, step=1,
                              label="Steps", elem_id="train-steps")
            # A text box, not a gr.Number: that shows (and sends) a blank as 0.
            learning_rate = gr.Textbox(_number_text(advised.learning_rate if advised else None), elem_id="train-lr",
                                       label="Learning rate (blank: the method's default)",
                                       placeholder="blank: the method's default")
            name = gr.Textbox(label="Adapter name (blank: the trigger word)", elem_id="train-name")
            trigger_share = gr.Slider(0, 1, value=advised.instance_prompt_share if advised else 0, step=0.05,
                                      label="Share of steps on the trigger word alone, for captioned images (the "
                                            "trigger then draws the concept without its captions' context)",
                                      elem_id="train-trigger-share")
            masked = gr.Checkbox(False, label="Learn only the opaque part of each image (masked loss: what is "
                                 "transparent in a PNG, such as the background, is not learnt)",
                                 elem_id="train-masked-loss")
            with gr.Accordion("Samples", open=False):
                sample_prompt = gr.Textbox(label="Sample prompt (blank: the trigger word)",
                                           elem_id="train-sample-prompt")
                sample_every = gr.Slider(0, 500, value=DEFAULT_SAMPLE_EVERY, step=1,
                                         label="Sample every N steps (0: start and end)", elem_id="train-sample-every")
            with gr.Row():
                button = gr.Button("Train", variant="primary", elem_id="train-button")
                stop_button = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            with gr.Row():  # shown once a run of this session is cancelled
                resume_button = gr.Button("Resume", visible=False, elem_id="train-resume")
                keep_button = gr.Button("Keep the adapter as it is", visible=False, elem_id="train-keep")
        with gr.Column(scale=1):
            status = gr.Textbox(label="Status", interactive=False, elem_id="train-status")
            plot = gr.LinePlot(x="step", y="loss", color="curve", label="Loss", x_title="step", y_title="loss",
                               color_map={"loss": "#f5a06a", "smoothed": "#c2410c"}, color_title="", height=280,
                               elem_id="train-loss")
            grid = gr.Image(label="Samples by step", type="pil", format="png", interactive=False,
                            elem_id="train-grid")
            gallery = gr.Gallery(label="Samples (click one to see it alone)", columns=4, height=200, format="png",
                                 object_fit="contain", elem_id="train-samples")
    # This session's run: the losses and samples so far (plotted, gridded), and a cancelled run's settings and
    # checkpoint (Resume, Keep). States, so the /train API still answers (samples, status).
    curve = gr.State(None)
    stopped = gr.State(None)
    def show_curve(run: dict | None) -> tuple[pd.DataFrame | None, Image.Image | None]:
        """The loss plot and the sample grid of the run so far. No frame before the first loss: the plot would
        keep an empty frame's (lack of) series."""
        losses, samples = (run["losses"], run["samples"]) if run else ([], [])
        return (loss_frame(losses) if losses else None), sample_grid(samples)

    def show_method(chosen: str, kind: str) -> list:
        """The chosen method's options shown, the others hidden; its description and the advice."""
        return [gr.update(visible=m == chosen) for m, _ in inputs] + [method_help(chosen, kind)]

    def follow_concept(kind: str) -> list:
        """The method recommended for this kind of concept, with its recommended options, steps and rate, and the
        advice (set here too: when the method stays the same, its change event does not fire)."""
        chosen, found = recommendation(kind)
        options = found.options if found else {}
        values = [gr.update(value=options.get(field.name, field.default)) if m == chosen else gr.update()
                  for m, field in inputs]
        return [gr.update(value=chosen), gr.update(value=found.steps if found and found.steps else DEFAULT_STEPS),
                gr.update(value=_number_text(found.learning_rate if found else None)),
                gr.update(value=found.instance_prompt_share if found else 0), method_help(chosen, kind), *values]

    method.change(show_method, [method, concept], [*options, about], api_visibility="private")
    concept.change(follow_concept, concept, [method, steps, learning_rate, trigger_share, about, *options],
                   api_visibility="private")
    # Progress and errors show on the status line only: a refused run leaves the last samples and curve in place.
    outputs = [gallery, status, curve, stopped]
    button.click(run, inputs=[files, folder, trigger, method, steps, learning_rate, name, sample_prompt, sample_every,
                              trigger_share, masked, *options],
                 outputs=outputs, api_name="train", concurrency_id=MODEL_QUEUE, show_progress_on=[status])
    resume_button.click(resume, stopped, outputs, api_name="train_resume", concurrency_id=MODEL_QUEUE,
                        show_progress_on=[status])
    keep_button.click(keep, stopped, [status, stopped], api_name="train_keep", show_progress_on=[status])
    curve.change(show_curve, curve, [plot, grid], queue=False, show_progress="hidden", api_visibility="private")
    stopped.change(lambda run: [gr.update(visible=run is not None)] * 2, stopped, [resume_button, keep_button],
                   queue=False, show_progress="hidden", api_visibility="private")
    # Not through the model queue (the run holds it), and not `cancels=[train event]`: cancelling the event
    # would free the queue while the training thread still holds the pipeline for its last step. The run
    # notices the flag before its next step, checkpoints and ends its event itself.
    stop_button.click(cancel, outputs=status, api_name="train_cancel", concurrency_limit=None)


def _number_text(value: float | None) -> str | None:
    """A number as a "blank: the default" box shows it (None: blank)."""
    return None if value is None else f"{value:g}"


def _data_dir(files: list[str] | None, folder: str, run_dir: Path) -> Path:
    """The training folder: the uploads copied into run_dir/data (kept with the run), or the folder given. An
    upload that is not a readable image is refused by its name before anything is copied."""
    for file in files or []:
        if Path(file).suffix.lower() in IMAGE_EXTENSIONS:
            try:
                with Image.open(file) as image:
                    image.load()
            except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unknown, truncated or corrupt files
                raise InputError(f"the uploaded {Path(file).name} is not a readable image ({e}); re-save it as PNG "
                                 "or JPEG, or remove it from the uploads") from e
    if files and folder.strip():
        raise InputError("give either uploaded images or a folder, not both; clear one of them")
    if not files:
        if not folder.strip():
            raise InputError("no training images: upload some, or give the folder that holds them")
        return Path(folder.strip())
    data = run_dir / "data"
    data.mkdir()
    for file in files:
        shutil.copy(file, data / Path(file).name)  # names kept: captions pair with images by file stem
    return data
