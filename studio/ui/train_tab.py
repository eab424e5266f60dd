"""The Train tab: images (uploaded, or a folder), a trigger word and a method in; samples streamed while
pipelines.train runs, and the finished adapter in the library (the Generate tab lists it)."""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from adapters import REGISTRY
from adapters.lora import LoRAConfig
from adapters.sara import SaRAConfig, auto_learning_rate, count_selected
from pipelines import ANNOTATORS, InputError, LoadedModel
from pipelines.train import TrainConfig, TrainProgress, TrainResult, train
from studio.library import AdapterLibrary, LibraryError

from .common import MODEL_QUEUE, handler

TITLE = "Train"
# SaRA's thresholds in the paper (sara.md): about 5 M / 20 M / 50 M trainable entries on SD 1.5.
SARA_THRESHOLDS = (2e-4, 8e-4, 2e-3)
LORA_TARGETS = [("attention (q, k, v, out)", "attn"), ("attention + feed-forward", "attn_ff"),
                ("attention + resnet convolutions (LoCon)", "attn_conv")]


def sara_presets(unet) -> list[tuple[str, float]]:
    """(label, θ) per preset, labelled by the trainable-parameter count it gives on this model."""
    default = SaRAConfig().threshold
    return [(f"θ = {t:g}: {count / 1e6:.2f} M trainable, lr {auto_learning_rate(t):.2g}"
             + (" (default)" if t == default else ""), t) for t, count in count_selected(unet, SARA_THRESHOLDS).items()]


def method_options(method: str, condition: str, threshold: float, lora_target: str = LoRAConfig.target) -> dict:
    """The options the tab sets for `method`: a controller's condition, SaRA's threshold, LoRA's layers."""
    if method == "csc_tuner":
        return {"condition": condition}
    if method == "sara":
        return {"threshold": float(threshold)}
    if method == "lora":
        return {"target": lora_target}
    return {}


def build(model: LoadedModel, out_dir: Path) -> None:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""
    # Set by Cancel, cleared when a run starts; one run at a time (the model queue), so one flag serves.
    stop = threading.Event()

    @handler
    def run(files: list[str] | None, folder: str, trigger: str, method: str, steps: float,
            learning_rate: float | None, name: str, sample_prompt: str, sample_every: float,
            condition: str = "canny", threshold: float = SaRAConfig().threshold,
            lora_target: str = LoRAConfig.target, progress: gr.Progress = gr.Progress()) -> Iterator[tuple[list, str]]:
        run_dir = Path(tempfile.mkdtemp(prefix="train-", dir=out_dir))
        prompts = [p for p in [sample_prompt.strip() or trigger.strip()] if p]  # blank: the trigger word alone
        config = TrainConfig(
            data_dir=_data_dir(files, folder, run_dir), output_dir=run_dir, method=method,
            method_options=method_options(method, condition, threshold, lora_target),
            caption_dropout=0.5 if method == "csc_tuner" else 0.0,  # a controller must learn to read the hint
            trigger=trigger.strip() or None, name=name.strip() or None, steps=int(steps),
            learning_rate=learning_rate or None,  # blank (or 0): the method's default
            sample_prompts=prompts, sample_every=int(sample_every) if prompts else 0,
        )
        library = AdapterLibrary()
        if config.adapter_name in library:  # refused now, not after the training
            raise LibraryError(f"the adapter library already holds {config.adapter_name!r}: set another name, "
                               "or rename or delete that one in the Adapters tab")

        # train() reports through a callback while this handler must yield: it runs in a thread that
        # posts its progress, then its result (or error), to a queue.
        events: queue.Queue[TrainProgress | TrainResult | BaseException] = queue.Queue()

        def work() -> None:
            try:
                events.put(train(model.pipe, config, progress=events.put, should_stop=stop.is_set))
            except BaseException as e:  # re-raised by the handler, where Gradio reports it
                events.put(e)

        stop.clear()
        worker = threading.Thread(target=work, name="studio-train", daemon=True)
        worker.start()
        samples: list[tuple[str, str]] = []
        try:
            while isinstance(event := events.get(), TrainProgress):
                samples += [(str(path), f"step {event.step}") for path in event.samples]
                progress((event.step, event.total_steps), desc="training", unit="steps")
                loss = "" if event.loss is None else f", loss {event.loss:.4f}"
                yield samples, f"step {event.step}/{event.total_steps}{loss}"
        finally:  # the client went away (the generator is closed): stop the run cleanly, with a checkpoint
            stop.set()
            worker.join()
        if isinstance(event, BaseException):
            raise event
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
            method = gr.Dropdown(sorted(REGISTRY), value="sc_tuner", label="Method", elem_id="train-method")
            condition = gr.Dropdown(list(ANNOTATORS), value="canny", visible=False, elem_id="train-condition",
                                    label="Controller: the condition drawn from each image (csc_tuner)")
            threshold = gr.Dropdown(sara_presets(model.pipe.unet), value=SaRAConfig().threshold, visible=False,
                                    label="SaRA threshold: weights below it train", elem_id="train-threshold")
            lora_target = gr.Dropdown(LORA_TARGETS, value=LoRAConfig.target, visible=False, elem_id="train-lora-target",
                                      label="LoRA layers (convolutions: for shapes the base model never drew)")
            steps = gr.Slider(1, 2000, value=200, step=1, label="Steps", elem_id="train-steps")
            learning_rate = gr.Number(None, label="Learning rate (blank: the method's default)", minimum=0,
                                      elem_id="train-lr")
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
    method.change(lambda m: tuple(gr.Dropdown(visible=m == shown) for shown in ("csc_tuner", "sara", "lora")), method,
                  [condition, threshold, lora_target], api_visibility="private")
    button.click(run, inputs=[files, folder, trigger, method, steps, learning_rate, name, sample_prompt, sample_every,
                              condition, threshold, lora_target],
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
