"""What every tab shares: the one queue for model work, the one place errors become alerts, and how a tab
re-reads what other tabs change."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import gradio as gr

from pipelines import StudioError
from pipelines.train import TrainingDiverged

# Every event that runs the model joins this queue (limit 1): tabs never fight over GPU memory.
MODEL_QUEUE = "model"
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
