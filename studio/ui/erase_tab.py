"""The Erase tab: concepts in, an SPM membrane out (pipelines/erase.py), added to the adapter library; then a
before/after grid over a set of prompts, each with the permeability gamma the membrane opens for it (1 for a
prompt naming an erased concept, lower for others: there the membrane acts only in part)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from adapters import REGISTRY, SPM, SPMConfig
from pipelines import InputError, LoadedModel, generate, membrane_gammas, save_images
from pipelines.erase import DEFAULT_STEPS, erase_config
from pipelines.train import TrainResult, training_refusal
from studio.library import AdapterLibrary, LibraryError

from .common import MODEL_QUEUE, OnShow, handler, option_component, refreshed_dropdown, stream_training

TITLE = "Erase"
# The membrane's options under "Membrane options" (the CLI's flags of the same names): the balance of its losses,
# and how strongly it opens per prompt (docs/benchmarks.md: the triangle and yellow erased at 98.2 % and 92.9 %, other
# concepts kept, with the squared, padding-free transport at factor 1.4). A closed accordion sends the defaults.
OPTIONS = ("eta", "anchor_weight", "transport", "similarity", "facilitate_factor")


def unavailable(model: LoadedModel) -> str | None:
    """Why this tab cannot erase concepts from `model` (the training loop's own refusal, e.g. an inpainting UNet),
    or None."""
    return training_refusal(model.pipe, "erase")


def lines(text: str | None) -> list[str]:
    """The non-blank lines of a text box, stripped (one concept or prompt per line: a concept may hold commas)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def membrane_choices() -> list[str]:
    """The library's membranes."""
    return [entry.name for entry in AdapterLibrary().list() if issubclass(REGISTRY.get(entry.method, object), SPM)]


def compare(model: LoadedModel, membrane: str | None, prompts: list[str], strength: float, seed: int, steps: int,
            out_dir: Path) -> tuple[list[tuple[str, str]], list[list]]:
    """Each prompt at `seed` without and with the library's `membrane` at `strength`: the gallery's (image,
    caption) pairs, before then after per prompt, and a [prompt, gamma] row per prompt."""
    if not membrane:
        raise InputError("no membrane chosen: erase a concept first, or pick a membrane of the library")
    if not prompts:
        raise InputError("no prompts to compare: write one per line")
    path = AdapterLibrary().get(membrane).path
    gammas = membrane_gammas(model, path, prompts)
    gallery = []
    for prompt, gamma in zip(prompts, gammas):
        for label, adapters in (("before", []), (f"after, gamma {gamma:.3f}", [(path, strength)])):
            result = generate(model, prompt, seed=seed, num_inference_steps=steps, adapters=adapters)
            gallery.append((str(save_images(result, out_dir)[0]), f"{prompt}: {label}"))
    return gallery, [[prompt, round(gamma, 3)] for prompt, gamma in zip(prompts, gammas)]


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""
    stop = threading.Event()  # set by Cancel; one run at a time (the model queue)

    @handler
    def run(concepts: str, surrogate: str, steps: float, name: str, prompts: str, strength: float, seed: float,
            sample_steps: float, *options: Any) -> Iterator[tuple]:
        """Train the membrane (status per step), add it to the library, then the grid over the prompts (blank:
        the concepts); `options`: the values of OPTIONS."""
        names = lines(concepts)
        if not names:
            raise InputError("no concept to erase: write one per line")
        run_dir = Path(tempfile.mkdtemp(prefix="erase-", dir=out_dir))
        config = erase_config(names, surrogate=surrogate.strip(), steps=int(steps), name=name.strip() or None,
                              output_dir=run_dir, **dict(zip(OPTIONS, options)))
        library = AdapterLibrary()
        if config.adapter_name in library:  # refused now, not after the training
            raise LibraryError(f"the adapter library already holds {config.adapter_name!r}: set another name, "
                               "or rename or delete that one in the Adapters tab")
        keep = gr.update()
        with contextlib.closing(stream_training(model.pipe, config, stop)) as events:
            for event in events:
                if isinstance(event, TrainResult):
                    break
                loss = "" if event.loss is None else f", loss {event.loss:.4f}"
                yield keep, keep, f"step {event.step}/{event.total_steps}{loss}", keep
        if event.cancelled:
            yield keep, keep, (f"Stopped at step {event.step}; checkpoint {event.checkpoint}. To continue: `studio "
                               f"erase ... --out {run_dir} --resume latest` with the same settings"), keep
            return
        entry = library.add(event.adapter_path, config.adapter_name)
        chosen = gr.Dropdown(choices=membrane_choices(), value=entry.name)
        done = f"Done: {entry.name!r} is in the adapter library (the Generate tab lists it)."
        yield keep, keep, f"{done} Generating the comparison...", chosen
        gallery, table = compare(model, entry.name, lines(prompts) or names, strength, int(seed), int(sample_steps),
                                 out_dir)
        yield gallery, table, done, chosen

    @handler
    def run_compare(membrane: str | None, prompts: str, strength: float, seed: float,
                    sample_steps: float) -> tuple[list, list[list]]:
        return compare(model, membrane, lines(prompts), strength, int(seed), int(sample_steps), out_dir)

    def cancel() -> str:
        stop.set()
        return "Stopping after this step, with a checkpoint..."

    def refresh(current: str | None) -> gr.Dropdown:
        return refreshed_dropdown(membrane_choices(), current)

    with gr.Row():
        with gr.Column(scale=1):
            concepts = gr.Textbox(label="Concepts to erase (one per line)", lines=2,
                                  placeholder="what should no longer appear (e.g. triangle)", elem_id="erase-concepts")
            surrogate = gr.Textbox(label="Surrogate (what they turn into; blank: erased)", elem_id="erase-surrogate")
            steps = gr.Slider(1, 5000, value=DEFAULT_STEPS, step=1, label="Training steps", elem_id="erase-steps")
            name = gr.Textbox(label="Membrane name (blank: erase-<concepts>)", elem_id="erase-name")
            with gr.Row():
                button = gr.Button("Erase", variant="primary", elem_id="erase-button")
                stop_button = gr.Button("Cancel", variant="stop", elem_id="erase-cancel")
            with gr.Accordion("Membrane options", open=False):
                fields = {field.name: field for field in dataclasses.fields(SPMConfig)}
                options = [option_component(SPM.method, fields[name], model.pipe.unet, shown=True,
                                            value=fields[name].default, tab="erase") for name in OPTIONS]
            status = gr.Textbox(label="Status", interactive=False, elem_id="erase-status")
        with gr.Column(scale=1):
            membrane = gr.Dropdown(membrane_choices(), value=None, label="Membrane (from the library)",
                                   allow_custom_value=True, elem_id="erase-membrane")
            prompts = gr.Textbox(label="Prompts to compare (one per line; blank after erasing: the concepts)",
                                 lines=3, placeholder="one prompt per line (e.g. a red triangle)",
                                 elem_id="erase-prompts")
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Membrane strength", elem_id="erase-strength")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="erase-seed")
                sample_steps = gr.Slider(1, 150, value=25, step=1, label="Sampling steps",
                                         elem_id="erase-sample-steps")
            compare_button = gr.Button("Compare before / after", elem_id="erase-compare")
    gallery = gr.Gallery(label="Before / after", columns=4, format="png", elem_id="erase-gallery")
    gammas = gr.Dataframe(headers=["Prompt", "gamma"], datatype=["str", "number"], type="array", interactive=False,
                          label="Permeability gamma per prompt", elem_id="erase-gammas")
    button.click(run, inputs=[concepts, surrogate, steps, name, prompts, strength, seed, sample_steps, *options],
                 outputs=[gallery, gammas, status, membrane], api_name="erase", concurrency_id=MODEL_QUEUE)
    compare_button.click(run_compare, inputs=[membrane, prompts, strength, seed, sample_steps],
                         outputs=[gallery, gammas], api_name="erase_compare", concurrency_id=MODEL_QUEUE)
    stop_button.click(cancel, outputs=status, api_name="erase_cancel", concurrency_limit=None)
    return OnShow(refresh, [membrane], [membrane])
