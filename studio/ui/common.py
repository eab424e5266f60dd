"""What every tab shares: the one queue for model work, the one place errors become alerts, how a tab
re-reads what other tabs change, the Stop switch of the running model event, the components a tab lends
to others (send-to buttons), the adapter table of the Generate and Edit tabs, and the input of a method's option
(from its config's metadata)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import gradio as gr
from PIL import Image

from adapters import REGISTRY
from pipelines import GenerationInterrupted, InputError, LoadedModel, StudioError
from pipelines.train import TrainConfig, TrainingDiverged, TrainProgress, TrainResult, train
from studio.jobs import ModelGate
from studio.library import AdapterLibrary

# Every event that runs the model joins this queue (limit 1): tabs never fight over GPU memory.
MODEL_QUEUE = "model"
# The Jobs tab's background jobs use the same model outside Gradio's queue: they and the queue's events take turns
# through this gate (app.py gates every MODEL_QUEUE event), and a job gives way to a waiting event at its next step.
MODEL_GATE = ModelGate()
# Errors shown as alerts: refused input, and a diverged training run (its message names the fix).
USER_ERRORS = (StudioError, TrainingDiverged)


T = TypeVar("T")

# Small outputs (a 64-px model's images, masks, condition maps) are shown at least this large (longer side).
DISPLAY_MIN = 256


def display_size(image: Image.Image | None, minimum: int = DISPLAY_MIN) -> Image.Image | None:
    """`image` for display only: upscaled by the smallest integer factor that makes its longer side at least
    `minimum` pixels, with nearest-neighbour so every pixel stays a sharp square (saved files keep their size).
    An image already that large, or None, comes back as it is."""
    if image is None or max(image.size) >= minimum:
        return image
    factor = -(-minimum // max(image.size))  # ceil
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class OnShow(NamedTuple):
    """What a tab re-reads when it is shown (`build` returns it; app.py binds it to the tab's select event):
    state that other tabs change, such as the adapter library that training adds to."""

    fn: Callable[..., Any]
    inputs: list[gr.components.Component]
    outputs: list[gr.components.Component]


def handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tab's event handler (a function, or a generator that streams updates): refused input
    becomes a gr.Error alert, and our warnings (a truncated prompt...) become gr.Warning toasts;
    anything else is a bug and propagates."""
    if inspect.isgeneratorfunction(fn):  # Gradio streams only from a generator function: wrap it as one

        @functools.wraps(fn)
        def streamed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with _alerts():
                yield from fn(*args, **kwargs)

        return streamed

    @functools.wraps(fn)  # keeps the signature, so Gradio still injects gr.Progress
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _alerts():
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _alerts() -> Iterator[None]:
    try:
        # Recording warnings is process-wide; fine because model work runs one event at a time (a quick
        # library event overlapping it may, at worst, lose a warning or show it in the other's toasts).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            yield
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from e
    for w in caught:
        if issubclass(w.category, UserWarning):
            gr.Warning(str(w.message))


def gate_model_events(demo: gr.Blocks) -> None:
    """Make every event of the model queue hold MODEL_GATE while it runs, whichever tab registered it (done once
    here rather than in each tab's handlers, so a new tab's events are covered too)."""
    for block_fn in demo.fns.values():
        if block_fn.concurrency_id == MODEL_QUEUE and block_fn.fn is not None:
            block_fn.fn = _gated(block_fn.fn)


def _gated(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(fn):  # a streaming event holds the model until its last update

        @functools.wraps(fn)
        def streamed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with MODEL_GATE.interactive():
                yield from fn(*args, **kwargs)

        return streamed

    @functools.wraps(fn)  # keeps the signature, so Gradio still injects gr.Progress
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with MODEL_GATE.interactive():
            return fn(*args, **kwargs)

    return wrapped


def stream_training(pipe, config: TrainConfig, stop: threading.Event) -> Iterator[TrainProgress | TrainResult]:
    """`train` for a tab's handler, which must yield while train() reports through a callback: the run goes in a
    thread that posts its progress, then its result (or error, raised here), to a queue. `stop` is cleared first
    and is the run's should_stop; closing the generator (the client went away) stops the run cleanly, with a
    checkpoint."""
    events: queue.Queue[TrainProgress | TrainResult | BaseException] = queue.Queue()

    def work() -> None:
        try:
            events.put(train(pipe, config, progress=events.put, should_stop=stop.is_set))
        except BaseException as e:  # re-raised by the handler, where Gradio reports it
            events.put(e)

    stop.clear()
    worker = threading.Thread(target=work, name="studio-train", daemon=True)
    worker.start()
    try:
        while isinstance(event := events.get(), TrainProgress):
            yield event
    finally:
        stop.set()
        worker.join()
    if isinstance(event, BaseException):
        raise event
    yield event


class StopSwitch:
    """Stop for the model queue's running event: the Stop buttons set it, and so does closing the browser tab that
    started the run; the run's per-step callback reads it (`until_stopped`). The queue runs one model event at a
    time, so one switch serves every tab. Training keeps its own Event (train_tab.py), which it checkpoints on."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._session: str | None = None  # the browser session of the running event (None: the API, or idle)

    def start(self, session: str | None) -> None:
        self._stop.clear()
        self._session = session

    def finish(self) -> None:
        self._session = None

    def stop(self) -> None:
        self._stop.set()

    def stop_session(self, session: str | None) -> None:
        """Stop the running event if `session` started it (its browser tab was closed)."""
        if session is not None and session == self._session:
            self._stop.set()

    def is_set(self) -> bool:
        return self._stop.is_set()


STOP = StopSwitch()


def until_stopped(work: Callable[[Callable[[int, int], bool]], T], request: gr.Request | None,
                  progress: gr.Progress, desc: str) -> T | None:
    """Run `work(callback)`, a pipeline call taking diffusers-style callback(step, total) that stops when it returns
    True (GenerationInterrupted). The callback reports each step to `progress` (Gradio shows it with an ETA) and
    asks STOP; a stopped run returns None after an info toast "Stopped at step k/N", so the handler can leave the
    previous results in place (gr.skip())."""
    reached = (0, 0)

    def callback(step: int, total: int) -> bool:
        nonlocal reached
        reached = (step, total)
        progress((step, total), desc=desc, unit="steps")
        return STOP.is_set()

    STOP.start(getattr(request, "session_hash", None))
    try:
        return work(callback)
    except GenerationInterrupted:
        gr.Info(f"Stopped at step {reached[0]}/{reached[1]}; the previous results are kept.")
        return None
    finally:
        STOP.finish()


def stop_button(label: str = "Stop", elem_id: str | None = None) -> gr.Button:
    """A Stop button for the model event of its tab: it skips the model queue (the run holds it) and sets STOP, which
    the run notices after its current step."""
    button = gr.Button(label, variant="stop", elem_id=elem_id)
    button.click(STOP.stop, api_name=f"{elem_id or 'stop'}".replace("-", "_"), concurrency_limit=None,
                 queue=False, show_progress="hidden")
    return button


def stop_on_close(request: gr.Request) -> None:
    """demo.unload: the browser tab of a session was closed (or reloaded): stop the run it started, if running."""
    STOP.stop_session(request.session_hash)


def refreshed_dropdown(choices: list[str] | list[tuple[str, str]], current: str | None,
                       cleared: str | None = None) -> gr.Dropdown:
    """A dropdown's update to new `choices` ((label, value) pairs or values). Its value is sent only to clear a
    choice that left the list (to `cleared`): the refresh carries the value as it was when the event fired, and
    sending that back would undo a pick the artist made while the refresh ran (tab shown, then an adapter picked)."""
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    if current and current not in values:
        return gr.Dropdown(choices=choices, value=cleared)
    return gr.Dropdown(choices=choices)


def refuse_unreadable(component: T, what: str) -> T:
    """`component`, an image input, with its upload refused by name and reason when the file is not a readable image
    (Gradio's own preprocess would fail with a bare "Error"). Returns the component."""
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises on bad files
            raise gr.Error(f"{what}: the uploaded file is not a readable image ({e}); upload a PNG or JPEG") from e

    component.preprocess = checked
    return component


# --- Components a tab lends to others ---------------------------------------------------------------------------

_shared: dict[str, gr.components.Component] | None = None


@contextlib.contextmanager
def sharing() -> Iterator[dict[str, gr.components.Component]]:
    """While app.py builds the tabs: `share(...)` puts a tab's components in the dict yielded here, which app.py then
    hands to each tab's `link` (the send-to buttons), after every tab is built."""
    global _shared
    _shared = shared = {}
    try:
        yield shared
    finally:
        _shared = None


def share(**components: gr.components.Component) -> None:
    """Lend components to other tabs, by name ("edit_image", "generate_prompt", ...); outside `sharing()`, nothing."""
    if _shared is not None:
        _shared.update(components)


def unavailable_reason(tab: ModuleType, model: LoadedModel) -> str | None:
    """Why `tab` cannot serve `model` (e.g. training an inpainting model), from the tab module's optional
    `unavailable(model)`, or None when it can. app.py shows the reason in the tab's place: a family the pipelines
    would refuse is explained when the studio opens, not at the first click. The reason comes from the pipelines'
    own checks, so the UI never keeps a second list of what each family supports."""
    check: Callable[[LoadedModel], str | None] | None = getattr(tab, "unavailable", None)
    return check(model) if check is not None else None


# --- The adapter table (the Generate and Edit tabs) -------------------------------------------------------------

ADAPTER_COLUMNS = ["Adapter", "Trigger words", "Scale"]


def adapter_picker(elem_id: str) -> gr.Dataframe:
    """The library's adapters, one row each, with a Scale column to fill in (0: not used); `adapter_files` reads
    its value. A tab that shows it refreshes it with `adapter_rows` (OnShow), since training adds adapters."""
    return gr.Dataframe(adapter_rows(), headers=ADAPTER_COLUMNS, datatype=["str", "str", "number"], type="array",
                        static_columns=[0, 1], show_label=False, elem_id=elem_id)


def adapter_rows(current: list[list] | None = None) -> list[list]:
    """One [name, trigger words, scale] row per library adapter (scale 0: not used), keeping the scales already set."""
    scales = {row[0]: row[-1] for row in current or [] if row}
    return [[entry.name, ", ".join(entry.trigger_words), scales.get(entry.name, 0)]
            for entry in AdapterLibrary().usable()]


def adapter_scales(rows: list[list] | None) -> list[tuple[str, float]]:
    """(name, scale) of the table's adapters in use (scale not 0). A row is [name, ..., scale] (the API may send
    [name, scale]); a scale that is not a finite number is refused by the adapter's name."""
    used = []
    for row in rows or []:
        if not row or not row[0]:
            continue
        name, scale = row[0], row[-1]
        if scale is None or (isinstance(scale, str) and not scale.strip()):
            continue  # a cleared cell: not used
        try:
            value = float(scale)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"adapter {name!r}: scale {scale!r} is not a number; type one such as 0.8 (0: not used)")
        if value:
            used.append((name, value))
    return used


def adapter_files(rows: list[list] | None) -> list[tuple[Path, float]]:
    """The table's adapters in use as (file, scale) pairs, what `generate` and `edit` take; a name the library
    does not hold (any more) is refused by name, with what it holds."""
    library = AdapterLibrary()
    return [(library.get(name).path, scale) for name, scale in adapter_scales(rows)]


def optional_number(value: str | float | None, label: str, example: str = "1e-4") -> float | None:
    """A number typed in a "blank: the default" box: None when blank, else the number (refused by name when it is
    not one, with `example` as one to type). A 0 is passed on as typed: the method refuses it when 0 makes no sense
    there."""
    if value is None or isinstance(value, (int, float)):
        return value
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{label}: {value.strip()!r} is not a number; type one (e.g. {example}), or leave it "
                         "blank for the default") from None


def option_component(method: str, field: dataclasses.Field, unet, shown: bool, value: Any,
                     tab: str = "train") -> gr.Component:
    """The input for one option of a method's config, from its metadata: a dropdown of its choices (labelled for
    the loaded model where the method knows how), a checkbox, a number in its range, or a text box; `value` at
    start; elem_id "<tab>-<method>-<option>"."""
    meta, default = field.metadata, value
    label, elem_id = f"{REGISTRY[method].label}: {meta['help']}", f"{tab}-{method}-{field.name}"
    if meta.get("labels_for_model") is not None:
        choices = meta["labels_for_model"](unet)
    else:
        choices = [c if isinstance(c, tuple) else (str(c), c) for c in meta["choices"]]
    if choices:
        return gr.Dropdown(choices, value=default, label=label, elem_id=elem_id, visible=shown)
    if isinstance(default, bool):
        return gr.Checkbox(default, label=label, elem_id=elem_id, visible=shown)
    if field.default is None:  # blank: the method's default. Not a gr.Number: it shows (and sends) None as 0
        return gr.Textbox(None if value is None else str(value), label=f"{label} (blank: the default)",
                          placeholder="blank: the method's default", elem_id=elem_id, visible=shown)
    if isinstance(default, (int, float)):
        return gr.Number(default, label=label, minimum=meta["minimum"], maximum=meta["maximum"], elem_id=elem_id,
                         precision=0 if isinstance(default, int) else None, visible=shown)
    return gr.Textbox(default, label=label, elem_id=elem_id, visible=shown)
