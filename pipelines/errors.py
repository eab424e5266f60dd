"""The errors the studio raises for input it refuses (before any work starts).

Each message names the argument or file, the value received, the rule, and the fix, on one
line: the CLI prints it as `error: ...` and the UI shows it as an alert, both without a
traceback. Catch `StudioError` to handle every refusal in one place.
"""

from __future__ import annotations


class StudioError(ValueError):
    """A refused input; the message says what was wrong and what to do instead."""


class ModelLoadError(StudioError):
    """A model source that cannot be loaded: unknown path, not a model, offline hub id, unsafe pickle..."""


class InputError(StudioError):
    """A generation setting out of range (size, steps, guidance, number of images, seed...)."""


class NonFiniteError(StudioError):
    """Denoising produced NaN or inf (a broken adapter or model, or half-precision overflow); nothing is saved."""


class GenerationInterrupted(RuntimeError):
    """The progress callback asked to stop; no images are returned."""
