"""What every tab shares: the one queue for model work, the one place errors become alerts, and how a tab
re-reads what other tabs change."""

from __future__ import annotations

import contextlib
import functools
import inspect
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import gradio as gr

from pipelines import StudioError
from pipelines.train import TrainConfig, TrainingDiverged, TrainProgress, TrainResult, train
from studio.jobs import ModelGate

# Every event that runs the model joins this queue (limit 1): tabs never fight over GPU memory.
MODEL_QUEUE = "model"
# The Jobs tab's background jobs use the same model outside Gradio's queue: they and the queue's events take turns
# through this gate (app.py gates every MODEL_QUEUE event), and a job gives way to a waiting event at its next step.
MODEL_GATE = ModelGate()
# Errors shown as alerts: refused input, and a diverged training run (its message names the fix).
USER_ERRORS = (StudioError, TrainingDiverged)


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
