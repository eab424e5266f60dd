"""Adapters for one `generate` call: adapter files (e.g. from the library) or objects, each with a scale.

    generate(model, "sks star", adapters=[("runs/train/sks.safetensors", 0.8)])
    generate(model, "sks star", adapters=[(tuner, 1.0)])    # an Adapter object, attached or not

For the call, files are loaded and attached and every adapter gets its scale; afterwards everything is
put back as it was: adapters attached here are detached (which restores the UNet exactly, adapters/base.py),
the others get their previous scale. The images record them as A1111 records LoRAs: an `Adapters` entry
("name:scale", the CLI's --adapter form) and an `Adapter hashes` entry ("name: hash", hashed as A1111 hashes
LoRAs for its "Lora hashes").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from adapters import Adapter, attached_adapters, load_adapter
from adapters.checks import is_number

from .errors import InputError
from .loading import lora_hash

AdapterUse = tuple[Adapter | str | os.PathLike, float]  # (adapter file or object, scale)
ADAPTER_ARG_FORM = "NAME_OR_FILE[:SCALE], e.g. sks:0.8"
ON_UNCOND_PARAM = "Adapters on uncond"  # the infotext entry of generate(adapters_on_uncond=False)


def split_scale(text: str) -> tuple[str, float | None]:
    """"SOURCE[:SCALE]" -> (source, scale or None). The source may itself hold colons (C:/a.png): only a
    trailing number is taken as the scale."""
    source, sep, scale = text.rpartition(":")
    try:
        value = float(scale) if sep and source else None
    except ValueError:
        value = None
    return (text, None) if value is None else (source, value)


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """The CLI form NAME_OR_FILE[:SCALE] -> (name or file, scale; default 1)."""
    source, value = split_scale(text)
    value = 1.0 if value is None else value
    if not source or not math.isfinite(value):
        raise InputError(f"adapter {text!r}: expected {ADAPTER_ARG_FORM}")
    return source, value


def check_adapters(adapters: Sequence[AdapterUse]) -> None:
    """Refuse bad adapters before any work: the pairs' types, finite scales, missing files, repeats. What a
    file holds (a studio adapter for this base model) is checked when `attached` loads it."""
    if not isinstance(adapters, (list, tuple)):
        raise InputError(f"adapters must be a list of (adapter file or Adapter, scale) pairs, "
                         f"got {type(adapters).__name__}")
    for i, use in enumerate(adapters):
        if not isinstance(use, (list, tuple)) or len(use) != 2:
            raise InputError(f"adapters[{i}]={use!r} must be an (adapter file or Adapter, scale) pair")
        source, scale = use
        if not is_number(scale):
            raise InputError(f"adapters[{i}]: scale={scale!r} must be a finite number (1.0 full strength, 0 off)")
        if isinstance(source, (str, os.PathLike)):
            if not Path(source).is_file():
                raise InputError(f"adapters[{i}]: adapter file {source} does not exist")
        elif not isinstance(source, Adapter):
            raise InputError(f"adapters[{i}]: {type(source).__name__} is neither an adapter file nor an Adapter")
    sources = [id(s) if isinstance(s, Adapter) else Path(s).resolve() for s, _ in adapters]
    if len(set(sources)) < len(sources):
        raise InputError("adapters names the same adapter twice; give it once, with the sum of the scales")


def adapter_params(adapters: Sequence[AdapterUse], on_uncond: bool = True) -> dict[str, str]:
    """The infotext entries of a generation's adapters; {} without any. Adapter objects have no file: they
    are named by their method and have no hash. "Adapters on uncond: False" only when they stayed off the
    unconditional branch (A1111 writes an extra parameter only away from its default)."""
    if not adapters:
        return {}
    named = [(_name(source), source, scale) for source, scale in adapters]
    params = {"Adapters": ", ".join(f"{name}:{scale:g}" for name, _, scale in named)}
    hashes = [f"{name}: {lora_hash(Path(s))}" for name, s, _ in named if not isinstance(s, Adapter)]
    if hashes:
        params["Adapter hashes"] = ", ".join(hashes)
    if not on_uncond:
        params[ON_UNCOND_PARAM] = "False"
    return params


def check_on_uncond_flag(adapters_on_uncond: object) -> None:
    if not isinstance(adapters_on_uncond, bool):
        raise InputError(f"adapters_on_uncond={adapters_on_uncond!r} must be True or False (False: the adapters stay "
                         "off the unconditional branch)")


def check_off_uncond(unet: nn.Module, adapters_on_uncond: bool) -> None:
    """Before denoising: with the adapters to stay off the unconditional rows, each attached one must take a scale
    per row (SaRA's delta is in the weights every row shares; a merged adapter's too)."""
    if adapters_on_uncond:
        return
    whole = [a.label + (" (merged)" if a.merged else "") for a in attached_adapters(unet) if not a.acts_per_row]
    if whole:
        raise InputError(f"adapters_on_uncond=False: {', '.join(whole)} acts on every row of the UNet batch alike, "
                         "so it cannot stay off the unconditional branch; keep adapters on it (CLI: drop "
                         "--no-adapters-on-uncond; UI: tick 'Adapters on the negative prompt too')")


def call_params(unet: nn.Module) -> dict[str, str]:
    """What the adapters attached to `unet` report about the call that just ran (`Adapter.infotext_params`), for
    the images' settings; a key several adapters report (two membranes' gammas) lists their values, A1111 style."""
    params: dict[str, list[str]] = {}
    for adapter in attached_adapters(unet):
        for key, value in adapter.infotext_params().items():
            params.setdefault(key, []).append(value)
    return {key: ", ".join(values) for key, values in params.items()}


@contextmanager
def attached(unet: nn.Module, adapters: Sequence[AdapterUse]) -> Iterator[None]:
    """Within the block, `unet` runs with `adapters` at their scales; everything is restored on exit,
    also when the block (or a later adapter's loading) fails."""
    check_adapters(adapters)
    with ExitStack() as restore:  # undone in reverse order
        for i, (source, scale) in enumerate(adapters):
            adapter = attach_for_call(f"adapters[{i}]", source, unet, restore)
            restore.callback(adapter.set_scale, adapter.scale)
            adapter.set_scale(scale)
        yield


def attach_for_call(what: str, source: Adapter | str | os.PathLike, unet: nn.Module, restore: ExitStack) -> Adapter:
    """The adapter of `source` attached to `unet`, with its detach registered on `restore` when attached here
    (also used by pipelines/control.py); errors start with `what`, e.g. "adapters[0]"."""
    if isinstance(source, Adapter):
        if source.unet is unet:
            return source
        if source.unet is not None:
            raise InputError(f"{what}: the {source.method} adapter is attached to another UNet; detach it")
    adapter = read_adapter(what, source, unet)
    adapter.attach(unet)
    restore.callback(adapter.detach)
    return adapter


def read_adapter(what: str, source: Adapter | str | os.PathLike, unet: nn.Module) -> Adapter:
    """The adapter of `source` (an object as it is, a file read but not attached) once it is known to be an
    adapter for `unet`'s base model; errors start with `what`, e.g. "adapters[0]"."""
    if isinstance(source, Adapter):
        return source
    name = Path(source).name
    try:  # only reading the file is the user's pick: a failure to attach after these checks is a bug
        adapter = load_adapter(source, unet, attach=False)  # checks the header and the base model
    except (ValueError, SafetensorError) as e:  # not an adapter file, or not one for this model
        raise InputError(f"{what}: {e}" if name in str(e) else f"{what}: adapter file {name}: {e}") from e
    except RuntimeError as e:  # load_state_dict: tensors missing, unexpected or of the wrong shape
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())[:300]
        raise InputError(f"{what}: adapter file {name} does not hold the tensors its header promises ({detail}): "
                         "the file is damaged or was edited; save or train it again") from e
    # NaN/inf weights (a diverged run, a bad conversion) would turn every image black: refuse them now.
    broken = [key for key, t in adapter.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:
        raise InputError(f"{what}: adapter file {name} has NaN/inf weights in {len(broken)} tensor(s) (first: "
                         f"{broken[0]}), which would turn every image black: train it again or use an earlier "
                         "checkpoint of its run")
    return adapter


def _name(source: Adapter | str | os.PathLike) -> str:
    return source.method if isinstance(source, Adapter) else Path(source).stem
