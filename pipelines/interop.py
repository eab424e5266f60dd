"""LoRA files in and out, for a loaded model: the refusals of adapters/foreign.py as StudioErrors.

    report = inspect_lora("detail.safetensors", model)        # matched / unmatched keys (KeyReport)
    lora = load_lora("detail.safetensors", model)              # attached to the UNet and text encoder(s)
    export_lora("runs/train/sks.safetensors", "sks-kohya.safetensors", format="kohya")

In `generate`, a LoRA file of another tool is given like any adapter file: adapters=[("detail.safetensors", 0.8)].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers import DiffusionPipeline

from adapters import load_adapter, read_metadata
from adapters.foreign import ForeignLoRA, KeyReport, inspect_lora_file, link_pipeline, linked_models
from adapters.kohya import export_kohya

from .errors import InputError
from .loading import LoadedModel

EXPORT_FORMATS = ("kohya",)  # diffusers/peft is what save_adapter writes already


def _pipe(model: LoadedModel | DiffusionPipeline) -> DiffusionPipeline:
    pipe = model.pipe if isinstance(model, LoadedModel) else model
    link_pipeline(pipe)
    return pipe


def inspect_lora(path: str | os.PathLike, model: LoadedModel | DiffusionPipeline, *, strict: bool = True) -> KeyReport:
    """Which keys of the LoRA file at `path` name modules of `model` (UNet and text encoders); InputError with the
    reason when the file would be refused (another base model, no key matching, shapes that do not fit)."""
    pipe = _pipe(model)
    if not Path(path).is_file():
        raise InputError(f"LoRA file {path} does not exist")
    try:
        return inspect_lora_file(path, linked_models(pipe.unet), strict=strict)[0]
    except ValueError as e:
        raise InputError(str(e)) from e


def load_lora(path: str | os.PathLike, model: LoadedModel | DiffusionPipeline, *, scale: float = 1.0,
              strict: bool = True) -> ForeignLoRA:
    """The LoRA file of another tool at `path`, attached to `model` at `scale` (detach() undoes it exactly)."""
    pipe = _pipe(model)
    inspect_lora(path, pipe, strict=strict)  # the refusals, as InputError, before anything is attached
    adapter = load_adapter(path, pipe.unet, strict=strict)
    adapter.set_scale(scale)
    return adapter


def export_lora(source: str | os.PathLike, out: str | os.PathLike, *, format: str = "kohya",
                rank: int | None = None) -> Path:
    """Write the studio adapter file `source` as a LoRA file of `format` (kohya: `.alpha` kept, `ss_*` and
    `modelspec.*` header); its trigger words go along. `rank`: for a weight delta that is not a LoRA (SaRA),
    the rank of its SVD factorisation."""
    if format not in EXPORT_FORMATS:
        raise InputError(f"format={format!r}: LoRA export writes {EXPORT_FORMATS} (diffusers/peft files are what "
                         "the studio saves already)")
    meta = read_metadata(source)
    if "studio.method" not in meta:
        raise InputError(f"{Path(source).name} is not a studio adapter (no studio.method): it is already another "
                         "tool's file")
    try:
        adapter = load_adapter(source)
        words = json.loads(meta.get("studio.trigger_words", "[]"))
        return export_kohya(adapter, out, trigger_words=words, rank=rank)
    except ValueError as e:
        raise InputError(f"{Path(source).name}: {e}") from e
