"""The headless Python API: load a model, generate (later: train/customize, compose, edit, erase)."""

from .errors import GenerationInterrupted, InputError, ModelLoadError, StudioError
from .generate import (
    SCHEDULERS,
    GenerationResult,
    GenerationSettings,
    check_inputs,
    generate,
    parse_infotext,
    save_images,
    save_png,
)
from .loading import EMBEDDED_MODEL, LoadedModel, load_model

__all__ = [
    "EMBEDDED_MODEL",
    "SCHEDULERS",
    "GenerationInterrupted",
    "GenerationResult",
    "GenerationSettings",
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "StudioError",
    "check_inputs",
    "generate",
    "load_model",
    "parse_infotext",
    "save_images",
    "save_png",
]
