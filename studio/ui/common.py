"""What every tab shares: the one queue for model work, and the one place errors become alerts."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import gradio as gr

from pipelines import StudioError

# Every event that runs the model joins this queue (limit 1): tabs never fight over GPU memory.
MODEL_QUEUE = "model"


def handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tab's event handler: refused input (StudioError) becomes a gr.Error alert, and our
    warnings (a truncated prompt...) become gr.Warning toasts; anything else is a bug and propagates."""

    @functools.wraps(fn)  # keeps the signature, so Gradio still injects gr.Progress
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            # Recording warnings is process-wide; fine because model work runs one event at a time.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                result = fn(*args, **kwargs)
        except StudioError as e:
            raise gr.Error(str(e)) from e
        for w in caught:
            if issubclass(w.category, UserWarning):
                gr.Warning(str(w.message))
        return result

    return wrapped
