"""Controlled generation: CSC-Tuners with their control images, for one `generate` call.

    generate(model, "a cat", control=[ControlSpec("canny", "photo.png", scale=0.8, adapter="cat-canny.safetensors")])
    generate(model, "a cat", adapters=[("cat-canny.safetensors", 0.8)], control=[parse_control_arg("canny:photo.png")])

A ControlSpec names a condition, an image, optionally a scale and the CSC-Tuner (an adapter file or
object); without one, the CSC-Tuner of that condition already attached to the UNet is used (e.g. one
given in generate's `adapters`, which are attached first). For the call, files are loaded and attached,
every tuner gets its scale, and the hints go into the call's context (`ctx.hints[condition]`, one image
per condition); afterwards everything is put back as it was: tuners attached here are detached, the
others get their previous scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from adapters import REGISTRY, CSCTuner, CSCTunerConfig, attached_adapters, read_metadata
from adapters.checks import is_number
from adapters.csc_tuner import CONDITION_NAME

from .annotators import prepare_hint
from .attach import attach_for_call, split_scale
from .errors import InputError
from .images import ImageInput

CONTROL_ARG_FORM = "CONDITION:IMAGE[:SCALE], e.g. canny:edges.png:0.8"


@dataclass(frozen=True)
class ControlSpec:
    """One control of a generation: which condition, from which image, how strongly, through which tuner."""

    condition: str  # what the control shows: "canny", "color", "sketch"... (the tuner's CSCTunerConfig.condition)
    image: ImageInput  # a source image, drawn by ANNOTATORS[condition]; with annotate=False, a ready-made hint
    scale: float | None = None  # the tuner's scale for this call (0: off; not clamped at 1); None: its own
    adapter: CSCTuner | str | os.PathLike | None = None  # None: the tuner of `condition` attached to the UNet
    annotate: bool = True  # False: `image` already is the hint (light lines on black for canny/sketch)


def parse_control_arg(text: str) -> ControlSpec:
    """The CLI form CONDITION:IMAGE[:SCALE] -> ControlSpec (the tuner: the attached one of that condition;
    no SCALE: the tuner's own). The image path may itself hold colons (C:/x.png): only a trailing number is
    taken as the scale."""
    condition, sep, rest = text.partition(":")
    if not sep or not condition or not rest:
        raise InputError(f"control {text!r}: expected {CONTROL_ARG_FORM}")
    image, value = split_scale(rest)
    spec = ControlSpec(condition, Path(image), value)
    check_controls([spec])
    return spec


def check_controls(control: Sequence[ControlSpec]) -> None:
    """Refuse bad controls before any work: types, scales, condition names, and for adapter files,
    that they are CSC-Tuners of the stated condition (read from the header, no tensor loaded)."""
    if isinstance(control, ControlSpec) or not isinstance(control, (list, tuple)):
        raise InputError(f"control must be a list of ControlSpec, got {type(control).__name__}; wrap it in a list")
    for i, spec in enumerate(control):
        if not isinstance(spec, ControlSpec):
            raise InputError(f"control[{i}] is a {type(spec).__name__}, not a ControlSpec")
        what = f"control[{i}] ({spec.condition!r})"
        if not isinstance(spec.condition, str) or not CONDITION_NAME.fullmatch(spec.condition):
            raise InputError(f"control[{i}].condition={spec.condition!r} must be a lowercase name such as 'canny'")
        scale = spec.scale
        if scale is not None and not is_number(scale):
            raise InputError(f"{what}: scale={scale!r} must be a finite number (1.0 full control, 0 off), or None "
                             "for the tuner's own")
        adapter = spec.adapter
        if isinstance(adapter, CSCTuner):
            _check_condition(what, spec.condition, adapter.config.condition, "this tuner")
        elif isinstance(adapter, (str, os.PathLike)):
            _check_condition(what, spec.condition, _file_condition(what, Path(adapter)), Path(adapter).name)
        elif adapter is not None:
            raise InputError(f"{what}: adapter must be a CSCTuner, a CSC-Tuner file or None, "
                             f"got {type(adapter).__name__}")
    adapters = [spec.adapter for spec in control if spec.adapter is not None]
    if len({id(a) if isinstance(a, CSCTuner) else Path(a).resolve() for a in adapters}) < len(adapters):
        raise InputError("control names the same CSC-Tuner twice; give each tuner one control image")
    conditions = [spec.condition for spec in control]
    repeated = sorted({c for c in conditions if conditions.count(c) > 1})
    if repeated:
        raise InputError(f"control gives several {', '.join(repeated)} images; a call takes one control image per "
                         "condition: keep one of them")


def control_params(control: Sequence[ControlSpec]) -> dict[str, str]:
    """The infotext entry of a generation's controls, e.g. {"Control": "canny 0.8, color"} (no scale: the
    tuner's own, recorded with the adapters); {} without any."""
    if not control:
        return {}
    return {"Control": ", ".join(spec.condition + ("" if spec.scale is None else f" {spec.scale:g}")
                                 for spec in control)}


def is_controller(method: str | None) -> bool:
    """Whether adapters of this method (a library entry's, a file header's) are driven by control images."""
    cls = REGISTRY.get(method)
    return cls is not None and cls.needs_hints


def controller_condition(path: str | os.PathLike) -> str:
    """The condition a CSC-Tuner file was trained on, read from its header; a file of another method is refused."""
    return _file_condition(Path(path).name, Path(path))


def _file_condition(what: str, path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{what}: adapter file {path} does not exist")
    try:
        meta = read_metadata(path)
    except SafetensorError as e:
        raise InputError(f"{what}: {path.name} is not a .safetensors adapter file ({e})") from e
    if meta.get("studio.method") != CSCTuner.method:
        raise InputError(f"{what}: {path.name} is a {meta.get('studio.method')!r} adapter, not a CSC-Tuner; "
                         "load it as an adapter, and pass a CSC-Tuner file here")
    return CSCTunerConfig(**json.loads(meta["studio.config"])).condition


def _check_condition(what: str, given: str, expected: str, tuner: str) -> None:
    if given != expected:
        raise InputError(f"{what}: {tuner} was trained on {expected!r} hints, not {given!r}; use a {given!r} "
                         f"CSC-Tuner, or give it a {expected!r} control image")


@contextmanager
def controlled(unet: nn.Module, control: Sequence[ControlSpec],
               size: tuple[int, int]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, `unet` has the tuners of `control` attached at their scales; the block gets the hints
    for the call's context (condition -> (1, 3, height, width) in [0, 1]) at image `size` = (width, height).

    Every CSC-Tuner attached to `unet` must get a control (an attached tuner without a hint would stop
    the UNet mid-run); hints are made before anything is loaded or changed."""
    check_controls(control)
    attached = attached_adapters(unet, CSCTuner)
    tuners: list[CSCTuner | Path] = [_tuner_of(i, spec, attached) for i, spec in enumerate(control)]
    idle = [t.config.condition for t in attached if t.scale != 0 and not any(t is u for u in tuners)]
    if idle:
        raise InputError(f"CSC-Tuner(s) {idle} are attached but control has no image for them; add a ControlSpec "
                         "for each, set their scale to 0, or detach them")
    hints = {spec.condition: prepare_hint(spec.image, spec.condition, size, annotate=spec.annotate).to(unet.device)
             for spec in control}

    with ExitStack() as restore:  # undone in reverse order, also when the run fails
        for i, (spec, source) in enumerate(zip(control, tuners)):
            tuner = attach_for_call(f"control[{i}] ({spec.condition!r})", source, unet, restore)
            if spec.scale is not None:
                restore.callback(tuner.set_scale, tuner.scale)
                tuner.set_scale(spec.scale)
        yield hints


def _tuner_of(i: int, spec: ControlSpec, attached: list[CSCTuner]) -> CSCTuner | Path:
    """The tuner (or the file to load it from) that `spec` drives: its own, else the attached one of its condition."""
    if spec.adapter is None:
        found = [t for t in attached if t.config.condition == spec.condition]
        if len(found) != 1:
            problem = "no" if not found else f"{len(found)}"
            raise InputError(f"control[{i}] ({spec.condition!r}): {problem} {spec.condition!r} CSC-Tuner(s) attached "
                             "to the model; name the one to use with ControlSpec(adapter=<file or tuner>)")
        return found[0]
    return spec.adapter if isinstance(spec.adapter, CSCTuner) else Path(spec.adapter)
