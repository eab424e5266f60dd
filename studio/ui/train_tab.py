"""The Train tab: images (uploaded, or a folder), a trigger word and a method in; samples streamed while
pipelines.train runs, and the finished adapter in the library (the Generate tab lists it).

Every method's options are built from its config dataclass (the fields marked `ui` in their metadata:
help, choices, range) and its defaults come from its class: adding a method adds its options here without
touching this file. The kind of concept picked (subject, style, control) chooses the method measured to
meet the customization targets on it, and says why."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from adapters import REGISTRY, Adapter, Recommendation
from pipelines import InputError, LoadedModel
from pipelines.train import TrainConfig, TrainResult, image_methods
from studio.library import AdapterLibrary, LibraryError

from .common import MODEL_QUEUE, handler, stream_training

TITLE = "Train"
CONCEPTS = ("subject", "style", "control")


def ui_fields(cls: type[Adapter]) -> list[dataclasses.Field]:
    """The config fields of a method that the tab shows."""
    return [f for f in dataclasses.fields(cls.config_class) if f.metadata.get("ui")]


def option_inputs() -> list[tuple[str, dataclasses.Field]]:
    """(method, field) of every option component, in the order the /train API takes their values: every
    registered method's (read when the tab is built, so a method registered before that appears)."""
    return [(method, field) for method in sorted(REGISTRY) for field in ui_fields(REGISTRY[method])]


def option_component(method: str, field: dataclasses.Field, unet, shown: bool, value: Any) -> gr.Component:
    """The input for one option, from its metadata: a dropdown of its choices (labelled for the loaded model
    where the method knows how), a checkbox, a number in its range, or a text box; `value` at start."""
    meta, default = field.metadata, value
    label, elem_id = f"{REGISTRY[method].label}: {meta['help']}", f"train-{method}-{field.name}"
    if meta.get("labels_for_model") is not None:
        choices = meta["labels_for_model"](unet)
    else:
        choices = [c if isinstance(c, tuple) else (str(c), c) for c in meta["choices"]]
    if choices:
        return gr.Dropdown(choices, value=default, label=label, elem_id=elem_id, visible=shown)
    if isinstance(default, bool):
        return gr.Checkbox(default, label=label, elem_id=elem_id, visible=shown)
    if isinstance(default, (int, float)) or default is None:
        return gr.Number(default, label=label, minimum=meta["minimum"], maximum=meta["maximum"], elem_id=elem_id,
                         precision=0 if isinstance(default, int) else None, visible=shown)
    return gr.Textbox(default, label=label, elem_id=elem_id, visible=shown)


def method_options(inputs: list[tuple[str, dataclasses.Field]], method: str, values: list) -> dict[str, Any]:
    """The chosen method's options from the values of every option component (blank ones left to the default)."""
    return {field.name: value for (m, field), value in zip(inputs, values) if m == method and value is not None}


DEFAULT_STEPS = 200


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
                             + ([f"learning rate {found.learning_rate:g}"] if found.learning_rate else []))
        advice = (f"Recommended for a {concept}: **{REGISTRY[chosen].label}**"
                  f"{f' ({settings})' if settings else ''}: {found.reason}.")
    return f"**{cls.label}**: {cls.summary}\n\n{advice}"


def build(model: LoadedModel, out_dir: Path) -> None:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""
    # Set by Cancel, cleared when a run starts; one run at a time (the model queue), so one flag serves.
    stop = threading.Event()
    inputs = option_inputs()

    @handler
    def run(files: list[str] | None, folder: str, trigger: str, method: str, steps: float,
            learning_rate: float | None, name: str, sample_prompt: str, sample_every: float,
            *options: Any) -> Iterator[tuple[list, str]]:
        # No gr.Progress parameter: Gradio finds it only among positional parameters, and the options are
        # variadic. The status line reports each step instead.
        run_dir = Path(tempfile.mkdtemp(prefix="train-", dir=out_dir))
        prompts = [p for p in [sample_prompt.strip() or trigger.strip()] if p]  # blank: the trigger word alone
        config = TrainConfig(  # the method's own defaults for what is not set here (caption dropout, ...)
            data_dir=_data_dir(files, folder, run_dir), output_dir=run_dir, method=method,
            method_options=method_options(inputs, method, list(options)),
            trigger=trigger.strip() or None, name=name.strip() or None, steps=int(steps),
            learning_rate=learning_rate or None,  # blank (or 0): the method's default
            sample_prompts=prompts, sample_every=int(sample_every) if prompts else 0,
        )
        library = AdapterLibrary()
        if config.adapter_name in library:  # refused now, not after the training
            raise LibraryError(f"the adapter library already holds {config.adapter_name!r}: set another name, "
                               "or rename or delete that one in the Adapters tab")

        samples: list[tuple[str, str]] = []
        with contextlib.closing(stream_training(model.pipe, config, stop)) as events:
            for event in events:
                if isinstance(event, TrainResult):
                    break
                samples += [(str(path), f"step {event.step}") for path in event.samples]
                loss = "" if event.loss is None else f", loss {event.loss:.4f}"
                yield samples, f"step {event.step}/{event.total_steps}{loss}"
        if event.cancelled:
            yield samples, (f"Stopped at step {event.step}; checkpoint {event.checkpoint}. To continue, run the same "
                            f"settings with `studio train --data {config.data_dir} --out {run_dir} --resume latest`")
            return
        entry = library.add(event.adapter_path, config.adapter_name)
        yield samples, f"Done: {entry.name!r} is in the adapter library; use it in the Generate tab."

    def cancel() -> str:
        stop.set()
        return "Stopping after this step, with a checkpoint..."

    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(label="Training images (and .txt captions)", file_count="multiple", type="filepath",
                            elem_id="train-files")
            folder = gr.Textbox(label="...or a folder of images on the server", placeholder="data/stars",
                                elem_id="train-folder")
            trigger = gr.Textbox(label="Trigger word (the caption of images without one)", placeholder="sks",
                                 elem_id="train-trigger")
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
            learning_rate = gr.Number(advised.learning_rate if advised else None, minimum=0, elem_id="train-lr",
                                      label="Learning rate (blank: the method's default)")
            name = gr.Textbox(label="Adapter name (blank: the trigger word)", elem_id="train-name")
            with gr.Accordion("Samples", open=False):
                sample_prompt = gr.Textbox(label="Sample prompt (blank: the trigger word)",
                                           elem_id="train-sample-prompt")
                sample_every = gr.Slider(0, 500, value=50, step=1, label="Sample every N steps (0: start and end)",
                                         elem_id="train-sample-every")
            with gr.Row():
                button = gr.Button("Train", variant="primary", elem_id="train-button")
                stop_button = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        with gr.Column(scale=1):
            status = gr.Textbox(label="Status", interactive=False, elem_id="train-status")
            gallery = gr.Gallery(label="Samples", columns=4, format="png", elem_id="train-samples")
    def show_method(chosen: str, kind: str) -> list:
        """The chosen method's options shown, the others hidden; its description and the advice."""
        return [gr.update(visible=m == chosen) for m, _ in inputs] + [method_help(chosen, kind)]

    def follow_concept(kind: str) -> list:
        """The method recommended for this kind of concept, with its recommended options, steps and rate."""
        chosen, found = recommendation(kind)
        options = found.options if found else {}
        values = [gr.update(value=options.get(field.name, field.default)) if m == chosen else gr.update()
                  for m, field in inputs]
        return [gr.update(value=chosen), gr.update(value=found.steps if found and found.steps else DEFAULT_STEPS),
                gr.update(value=found.learning_rate if found else None), *values]

    method.change(show_method, [method, concept], [*options, about], api_visibility="private")
    concept.change(follow_concept, concept, [method, steps, learning_rate, *options], api_visibility="private")
    button.click(run, inputs=[files, folder, trigger, method, steps, learning_rate, name, sample_prompt, sample_every,
                              *options],
                 outputs=[gallery, status], api_name="train", concurrency_id=MODEL_QUEUE)
    # Not through the model queue (the run holds it), and not `cancels=[train event]`: cancelling the event
    # would free the queue while the training thread still holds the pipeline for its last step. The run
    # notices the flag before its next step, checkpoints and ends its event itself.
    stop_button.click(cancel, outputs=status, api_name="train_cancel", concurrency_limit=None)


def _data_dir(files: list[str] | None, folder: str, run_dir: Path) -> Path:
    """The training folder: the uploads copied into run_dir/data (kept with the run), or the folder given."""
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
