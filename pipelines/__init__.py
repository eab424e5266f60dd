"""The headless Python API: load a model, generate with adapters and control, train/customize, edit, annotate.

- load: `load_model` (a diffusers folder, a single-file checkpoint, a hub id, or the embedded model);
- generate: `generate` with adapters (`check_adapters`, `parse_adapter_arg`) and CSC-Tuner control
  (`ControlSpec`, `parse_control_arg`), saved as PNGs with their settings (`save_images`, `parse_infotext`);
- train/customize: an adapter from a folder of images, in `pipelines.train` (`TrainConfig`, `train`; import them
  from there);
- erase: concepts erased by an SPM membrane (`erase`, `membrane_gammas`), applied like any adapter in `generate`;
- edit: real-image editing with uniform attention maps (`invert`, `reconstruct`, `edit`, `save_edit`);
- annotators: control hints drawn from images (`ANNOTATORS`, `prepare_hint`, `build_control_pairs`).
"""

from .annotators import ANNOTATORS, build_control_pairs, prepare_hint
from .attach import check_adapters, parse_adapter_arg
from .control import ControlSpec, parse_control_arg
from .edit import EditResult, Inversion, check_edit_inputs, edit, invert, reconstruct, save_edit
from .erase import erase, membrane_gammas
from .errors import GenerationInterrupted, InputError, ModelLoadError, NonFiniteError, StudioError
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
    "ANNOTATORS",
    "EMBEDDED_MODEL",
    "SCHEDULERS",
    "ControlSpec",
    "EditResult",
    "GenerationInterrupted",
    "GenerationResult",
    "GenerationSettings",
    "InputError",
    "Inversion",
    "LoadedModel",
    "ModelLoadError",
    "NonFiniteError",
    "StudioError",
    "build_control_pairs",
    "check_adapters",
    "check_edit_inputs",
    "check_inputs",
    "edit",
    "erase",
    "generate",
    "invert",
    "load_model",
    "membrane_gammas",
    "parse_adapter_arg",
    "parse_control_arg",
    "parse_infotext",
    "prepare_hint",
    "reconstruct",
    "save_edit",
    "save_images",
    "save_png",
]
