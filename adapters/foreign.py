"""LoRA files from other tools, as an Adapter: kohya/A1111 (LoCon included), diffusers/peft and legacy diffusers
attention-processor files, with their text-encoder parts.

    unet = pipe.unet
    link_text_encoders(unet, {"text_encoder": pipe.text_encoder})   # pipelines do this for their model
    lora = load_foreign_lora("detail.safetensors", unet)            # attached; lora.report lists the keys
    lora.set_scale(0.8)
    lora.detach()                                                   # UNet and text encoder exactly as before

Every module a file adapts is found by name: kohya names by encoding every real module path of the loaded model
(adapters/kohya.py, never by decoding underscores), peft and legacy keys by their dotted path, which must be a
Linear or Conv2d of that component. The update is peft's and kohya's, W x + s (alpha / r) up(down(x)), with alpha
per module: kohya's `.alpha` tensor (missing: alpha = r), peft's `lora_alpha` / `alpha_pattern` from the header's
`lora_adapter_metadata` (missing: alpha = r; rsLoRA's alpha / sqrt(r) kept as alpha' = alpha sqrt(r)). A LoCon
convolution's down-projection is a conv with the target's kernel, stride and padding and its up-projection a 1x1
conv, so it applies as up(down(x)) in the same place.

The adapter attaches by forward hooks on the target layers (the UNet's, and the text encoders' that are linked to
it): nothing of the model is replaced, and detaching removes the hooks, so outputs are bit-identical to before.

A file is refused (ForeignLoRAError, a ValueError naming the file and the reason) when its header names another
model family (`ss_base_model_version`, `modelspec.architecture`), when its cross-attention width is not the
UNet's, when a named module's shape does not fit, or when none of its keys names a module of the model. Keys that
name nothing (another text encoder's layers, LyCORIS parts this loader does not apply) are left out with a
warning, and listed in the adapter's `report`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from .base import Adapter, detect_family, device_of
from .kohya import KOHYA_KEY, KOHYA_PARTS, PREFIXES, adaptable_modules, module_names, spellings

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # pipeline attributes a LoRA file may adapt
_TEXT_ENCODERS = "studio_text_encoders"  # where a UNet keeps the text encoders linked to it (not a submodule)

# diffusers/peft: <component>.<path>.lora_A.weight / lora_B.weight (DoRA adds lora_magnitude_vector).
_PEFT_KEY = re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight")
# Legacy diffusers: attention processors' to_q_lora (UNet), the old text-encoder patch's to_q_lora (on q_proj),
# LoRACompatibleLinear's `.lora.` and LoRALinearLayer's `.lora_linear_layer.`; keys without a component prefix
# are the UNet's (the earliest files had none).
_LEGACY_PROCESSOR = re.compile(
    r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_LEGACY_TEXT = re.compile(r"(text_encoder|text_encoder_2)\.(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_LEGACY_LAYER = re.compile(r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.(?:lora|lora_linear_layer)\."
                           r"(down|up)\.weight")
_UNET_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_CLIP_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_CROSS_ATTENTION_INPUT = re.compile(r"attn2[._]to_[kv]$")  # a UNet module whose input is the text (width = context)
# What other tools write in `ss_base_model_version` / `modelspec.architecture`, by family (prefix match).
_SS_FAMILIES = (("sdxl", "SDXL"), ("sd_v2", "SD2"), ("sd_v1", "SD1"))
_MODELSPEC_FAMILIES = (("stable-diffusion-xl", "SDXL"), ("stable-diffusion-v2", "SD2"), ("stable-diffusion-v1", "SD1"))


class ForeignLoRAError(ValueError):
    """A LoRA file refused: the message names the file and the reason (pipelines show it as a StudioError)."""


# -- the text encoders a UNet's adapters may also adapt -----------------------------------------------------------
def link_text_encoders(unet: nn.Module, text_encoders: Mapping[str, nn.Module | None]) -> None:
    """Remember the pipeline's text encoders on its UNet, so that a LoRA file loaded for the UNet (which is all an
    adapter is given) finds and adapts them too. Kept as a plain attribute: not a submodule, not in state dicts."""
    unknown = set(text_encoders) - set(COMPONENTS[1:])
    if unknown:
        raise ValueError(f"link_text_encoders: unknown components {sorted(unknown)}; use {COMPONENTS[1:]}")
    object.__setattr__(unet, _TEXT_ENCODERS, {k: v for k, v in text_encoders.items() if v is not None})


def link_pipeline(pipe: Any) -> None:
    """`link_text_encoders` for a diffusers pipeline (its `text_encoder` and, for SDXL, `text_encoder_2`)."""
    link_text_encoders(pipe.unet, {name: getattr(pipe, name, None) for name in COMPONENTS[1:]})


def linked_models(unet: nn.Module) -> dict[str, nn.Module]:
    """Component -> model: the UNet and the text encoders linked to it."""
    return {"unet": unet, **unet.__dict__.get(_TEXT_ENCODERS, {})}


# -- what a file holds ----------------------------------------------------------------------------------------------
@dataclass
class KeyReport:
    """Which keys of a LoRA file name a module of the model and which do not (with the reason)."""

    file: str
    formats: tuple[str, ...]  # "kohya", "peft", "legacy diffusers"
    matched: dict[str, tuple[str, str]] = field(default_factory=dict)  # file's module name -> (component, path)
    matched_keys: int = 0  # tensors used (down, up and alpha)
    unmatched: dict[str, str] = field(default_factory=dict)  # file key -> why it was left out
    header: dict[str, str] = field(default_factory=dict)  # the file's ss_* and modelspec.* entries

    def by_component(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for component, _ in self.matched.values():
            counts[component] = counts.get(component, 0) + 1
        return counts

    def lines(self, limit: int = 20) -> list[str]:
        """The report as text lines (`studio adapters inspect`)."""
        parts = ", ".join(f"{c} {n}" for c, n in sorted(self.by_component().items())) or "none"
        lines = [f"file: {self.file}", f"format: {' + '.join(self.formats) or 'unknown'}",
                 f"matched: {len(self.matched)} modules, {self.matched_keys} keys ({parts})",
                 f"unmatched: {len(self.unmatched)} keys"]
        for key, why in list(self.unmatched.items())[:limit]:
            lines.append(f"  {key}: {why}")
        if len(self.unmatched) > limit:
            lines.append(f"  ... and {len(self.unmatched) - limit} more")
        for key, value in sorted(self.header.items()):
            lines.append(f"{key}: {value if len(value) <= 200 else value[:200] + '...'}")
        return lines


@dataclass
class _Module:
    """One adapted module as the file has it, before it is matched to the model."""

    fmt: str
    name: str  # the file's name for it: a kohya name, or "<component>.<path>"
    component: str | None = None  # known for peft and legacy keys; kohya's comes from the match
    path: str | None = None
    down: str | None = None  # file keys
    up: str | None = None
    alpha_key: str | None = None


def lora_file_format(keys: list[str]) -> tuple[str, ...]:
    """The LoRA formats whose keys `keys` hold ((): none, not a LoRA file this module reads)."""
    found = []
    if any(KOHYA_KEY.fullmatch(k) for k in keys):
        found.append("kohya")
    if any(_PEFT_KEY.fullmatch(k) for k in keys):
        found.append("peft")
    if any(_LEGACY_PROCESSOR.fullmatch(k) or _LEGACY_TEXT.fullmatch(k) or _LEGACY_LAYER.fullmatch(k) for k in keys):
        found.append("legacy diffusers")
    return tuple(found)


def file_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a .safetensors file, from its header only."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _parse(keys: list[str]) -> tuple[dict[str, _Module], dict[str, str]]:
    """Group the file's keys by module (name -> _Module) and list the keys that are no LoRA down/up/alpha."""
    modules: dict[str, _Module] = {}
    other: dict[str, str] = {}
    alphas: dict[str, str] = {}  # non-kohya alpha keys, by their stem

    def module(fmt: str, name: str, component: str | None = None, path: str | None = None) -> _Module:
        return modules.setdefault(name, _Module(fmt, name, component, path))

    for key in keys:
        if m := KOHYA_KEY.fullmatch(key):
            if m[2] not in KOHYA_PARTS:
                other[key] = (f"{m[2]!r} is a LyCORIS/DoRA part (LoHa, LoKr, Tucker or DoRA); only plain LoRA and "
                              "LoCon down/up/alpha are applied")
                continue
            entry = module("kohya", m[1])
            if m[2] == "alpha":
                entry.alpha_key = key
            else:
                setattr(entry, "down" if m[2].startswith("lora_down") else "up", key)
        elif m := _PEFT_KEY.fullmatch(key):
            entry = module("peft", f"{m[1]}.{m[2]}", m[1], m[2])
            setattr(entry, "down" if m[3] == "A" else "up", key)
        elif m := _LEGACY_PROCESSOR.fullmatch(key):
            component = m[1] or "unet"
            path = f"{m[2]}.{_UNET_ATTN[m[3]]}"
            setattr(module("legacy diffusers", f"{component}.{path}", component, path), m[4], key)
            alphas[key.rsplit(".", 2)[0]] = f"{component}.{path}"  # ...processor.to_q_lora(.alpha)
        elif m := _LEGACY_TEXT.fullmatch(key):
            path = f"{m[2]}.{_CLIP_ATTN[m[3]]}"
            setattr(module("legacy diffusers", f"{m[1]}.{path}", m[1], path), m[4], key)
            alphas[key.rsplit(".", 2)[0]] = f"{m[1]}.{path}"
        elif m := _LEGACY_LAYER.fullmatch(key):
            component = m[1] or "unet"
            setattr(module("legacy diffusers", f"{component}.{m[2]}", component, m[2]), m[3], key)
            alphas[key.rsplit(".", 2)[0]] = f"{component}.{m[2]}"  # <path>.lora(.alpha)
        elif key.endswith(".lora_magnitude_vector") or key.endswith(".lora_magnitude_vector.weight"):
            other[key] = "a DoRA magnitude vector; only plain LoRA is applied"
        elif not key.endswith(".alpha"):
            other[key] = "not a LoRA down, up or alpha key of a known format"
    # Legacy / peft-style alphas: `<stem>.alpha` next to `<stem>.down.weight`, `<c>.<path>.alpha`, or diffusers'
    # own network-alpha spelling, `<down key>.alpha`.
    alphas.update({m.down: name for name, m in modules.items() if m.down and m.fmt != "kohya"})
    for key in keys:
        if key.endswith(".alpha") and not KOHYA_KEY.fullmatch(key):
            stem = key[: -len(".alpha")]
            name = alphas.get(stem, stem)
            if name in modules:
                modules[name].alpha_key = key
            else:
                other[key] = "an alpha with no LoRA down/up pair of the same name"
    return modules, other


def _header_family(meta: Mapping[str, str]) -> tuple[str, str] | None:
    """(family or the header's own words, which entry says it) from kohya's or SAI's header, else None."""
    version = meta.get("ss_base_model_version", "").strip()
    if version:
        family = next((f for prefix, f in _SS_FAMILIES if version.startswith(prefix)), version)
        return family, f"ss_base_model_version={version!r}"
    architecture = meta.get("modelspec.architecture", "").strip()
    if architecture:
        base = architecture.split("/")[0]
        family = next((f for prefix, f in _MODELSPEC_FAMILIES if base.startswith(prefix)), base)
        return family, f"modelspec.architecture={architecture!r}"
    return None


_WIDTH_FAMILY = {768: "SD1", 1024: "SD2", 2048: "SDXL"}  # cross-attention width of the published bases


def library_fields(path: str | os.PathLike, meta: Mapping[str, str]) -> dict[str, Any] | None:
    """What the adapter library lists of a LoRA file of another tool (None: the file holds no LoRA keys), from
    headers alone: method "lora", the base family (header, else the cross-attention width of its tensor shapes,
    else ""), trigger words (`modelspec.trigger_phrase`, else the "activation text" of A1111's sidecar
    `<name>.json`), and `created` (`modelspec.date` as a datetime, or None)."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if not lora_file_format(keys):
            return None
        said = _header_family(meta)
        family = said[0] if said else ""
        if not family:
            for key in keys:
                if re.search(r"attn2[._]to_[kv](\.lora_down|\.lora_A|_lora\.down|\.lora\.down)", key):
                    family = _WIDTH_FAMILY.get(f.get_slice(key).get_shape()[1], "")
                    break
    words = [w.strip() for w in meta.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    sidecar = Path(path).with_suffix(".json")
    if not words and sidecar.is_file():
        try:
            words = [w.strip() for w in str(json.loads(sidecar.read_text()).get("activation text", "")).split(",")
                     if w.strip()]
        except (OSError, ValueError, AttributeError):
            words = []  # a broken sidecar is A1111's business; the LoRA itself is fine
    try:
        created = datetime.fromisoformat(meta["modelspec.date"]) if meta.get("modelspec.date") else None
        if created is not None:
            created.astimezone()
    except (ValueError, OverflowError):
        created = None
    return {"method": "lora", "base_family": family, "trigger_words": tuple(words), "created": created}


def _peft_alpha(meta: Mapping[str, str], component: str, path: str, rank: int) -> float:
    """A peft module's alpha' (so that alpha' / r is its scaling) from diffusers' `lora_adapter_metadata`."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return float(rank)  # diffusers and peft read a file without it so: scaling 1
    fields = json.loads(raw)
    alpha = fields.get(f"{component}.lora_alpha", rank)
    for pattern, value in (fields.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):  # peft's own pattern rule (get_pattern_key)
            alpha = value
            break
    if fields.get(f"{component}.use_rslora"):
        return float(alpha) * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return float(alpha)


def layer_dims(layer: nn.Module) -> tuple[int, ...] | str:
    """(in, out) of a Linear, (in, out, kh, kw) of an ungrouped zero-padded Conv2d of any stride (a downsampler's
    too: a LoCon down-projection takes the layer's stride, padding and dilation), else what the layer is."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros":
        return layer.in_channels, layer.out_channels, *layer.kernel_size
    return f"{type(layer).__name__}" + (f" with groups {layer.groups}, padding mode {layer.padding_mode!r}"
                                        if isinstance(layer, nn.Conv2d) else "")


def _fits(layer: nn.Module, down: torch.Size, up: torch.Size) -> tuple[int, ...] | str:
    """The (down, up) shapes to apply on `layer`, or why the file's tensors do not fit it."""
    shape = layer_dims(layer)
    if isinstance(shape, str):
        return f"is a {shape}, which a LoRA here does not adapt"
    rank = down[0]
    if len(down) < 2 or len(up) < 2 or up[1] != rank:
        return f"has lora_down {tuple(down)} and lora_up {tuple(up)}, whose ranks differ"
    if len(shape) == 2:  # Linear (in, out); some tools store its factors as 1x1 convs
        if tuple(down[2:]) not in ((), (1, 1)) or tuple(up[2:]) not in ((), (1, 1)) or (down[1], up[0]) != shape:
            return f"is Linear({shape[0]} -> {shape[1]}) but the file has down {tuple(down)}, up {tuple(up)}"
        return rank, shape[0], shape[1]
    want_down = (rank, shape[0], *shape[2:])
    if tuple(down) != want_down and not (shape[2:] == (1, 1) and tuple(down) == want_down[:2]):
        return f"is Conv2d{shape} but the file's lora_down is {tuple(down)} (expected {want_down})"
    if tuple(up) not in ((shape[1], rank, 1, 1), (shape[1], rank)):
        return f"is Conv2d{shape} but the file's lora_up is {tuple(up)} (expected {(shape[1], rank, 1, 1)})"
    return rank, shape[0], shape[1], *shape[2:]


# -- the adapter ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One adapted module: where it is, the file's name for it, and its rank and alpha."""

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    path: str
    name: str
    rank: int
    alpha: float
    shape: tuple[int, ...]  # the layer's `layer_dims` when loaded


@dataclass
class ForeignLoRAConfig:
    file: str = ""  # where it was read from
    formats: tuple[str, ...] = ()


class ForeignLoRA(Adapter):
    """A LoRA file of another tool, attached by forward hooks; build it with `read_lora_file` /
    `load_foreign_lora`. Not in REGISTRY: it is read, not trained."""

    method = "lora"  # what it is for the library, fusion and the infotext: a LoRA
    config_class = ForeignLoRAConfig
    label = "LoRA (file of another tool)"
    is_weight_delta = True

    def __init__(self, config: ForeignLoRAConfig, targets: list[Target], down: list[torch.Tensor],
                 up: list[torch.Tensor], report: KeyReport):
        super().__init__(config)
        self.targets = targets
        self._unet_target = {f"{t.path}.weight": i for i, t in enumerate(targets) if t.component == "unet"}
        # Frozen parameters, not buffers: they follow .to() and count as the adapter's weights, but never train.
        self.down = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in down])
        self.up = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in up])
        self.report = report
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_unet(cls, unet: nn.Module, config: Any = None) -> ForeignLoRA:
        raise NotImplementedError("a foreign LoRA comes from its file: use read_lora_file / load_foreign_lora")

    @classmethod
    def from_shapes(cls, config: Any, shapes: dict[str, tuple[int, ...]]) -> ForeignLoRA:
        raise NotImplementedError("a foreign LoRA comes from its file: use read_lora_file / load_foreign_lora")

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [*self.down, *self.up]

    @property
    def adapts_text_encoders(self) -> bool:
        """Whether the file has a text-encoder part (kohya `lora_te*`, peft `text_encoder*.`) that was matched."""
        return any(t.component != "unet" for t in self.targets)

    def config_dict(self) -> dict[str, Any]:
        # save_adapter would label kohya tensors as our LoRA, which would then not load back.
        raise ValueError(f"{Path(self.config.file).name} is a LoRA file of another tool: keep (copy) the file "
                         "itself; studio adapters are saved with save_adapter, exported with export_kohya")

    # -- wiring: forward hooks on the target layers ---------------------------------------------------------------
    def _layers(self, unet: nn.Module) -> list[nn.Module]:
        """The target layers in `unet`'s model (its linked text encoders too), each checked to have its shape."""
        models = linked_models(unet)
        found = {component: adaptable_modules(model) for component, model in models.items()}  # one walk each
        layers, problems = [], []
        for t in self.targets:
            if t.component not in models:
                problems.append(f"{t.name}: the model has no {t.component} linked to this UNet")
                continue
            layer = found[t.component].get(t.path)
            if layer is None or layer_dims(layer) != t.shape:
                problems.append(f"{t.component}.{t.path} is missing or has another shape")
                continue
            layers.append(layer)
        if problems:
            raise ForeignLoRAError(f"{Path(self.config.file).name} does not fit this model ({len(problems)} of "
                                   f"{len(self.targets)} modules: {'; '.join(problems[:3])}); load it again for "
                                   "this model")
        return layers

    def _attach(self, unet: nn.Module) -> None:
        layers = self._layers(unet)
        self.to(device_of(unet))
        self._handles = [layer.register_forward_hook(partial(self._forward_hook, i), with_kwargs=True)
                         for i, layer in enumerate(layers)]

    def _detach(self) -> None:
        if self.merged:
            self.unmerge()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, i: int, layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        """output + s (alpha / r) up(down(x)), as peft and kohya compute it (two small products, in x's dtype)."""
        if self.merged:
            return None
        t = self.targets[i]
        x = args[0] if args else kwargs["input"]
        down, up = self.down[i].to(x.dtype), self.up[i].to(x.dtype)
        if isinstance(layer, nn.Conv2d):
            down = down.view(t.rank, t.shape[0], *t.shape[2:])  # (r, in, kh, kw)
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)  # (B, r, H', W')
            h = F.conv2d(h, up.view(t.shape[1], t.rank, 1, 1))  # (B, out, H', W')
        else:
            h = F.linear(F.linear(x, down.view(t.rank, t.shape[0])), up.view(t.shape[1], t.rank))
        # Per-row scales are the UNet batch's; a text encoder's batch is another one.
        scale = self.scale_for(output) if t.component == "unet" else self.scale
        return output + h * (scale * t.alpha / t.rank)

    # -- weight deltas ------------------------------------------------------------------------------------------
    def _delta(self, i: int, scale: float) -> torch.Tensor:
        t = self.targets[i]
        delta = self.up[i].detach().flatten(1).float() @ self.down[i].detach().flatten(1).float()  # (out, in*kh*kw)
        return (delta * (scale * t.alpha / t.rank)).view(t.shape[1], t.shape[0], *t.shape[2:])

    def delta_weights(self, scale: float | None = None) -> dict[str, torch.Tensor]:
        """The UNet's deltas (`<path>.weight` -> s (alpha / r) up down, fp32), for fusion and export; the text
        encoders' are in `text_encoder_deltas`."""
        s = self.scale if scale is None else scale
        return {f"{t.path}.weight": self._delta(i, s) for i, t in enumerate(self.targets) if t.component == "unet"}

    def delta_weight(self, name: str, scale: float | None = None) -> torch.Tensor | None:
        i = self._unet_target.get(name)
        return None if i is None else self._delta(i, self.scale if scale is None else scale)

    def text_encoder_deltas(self, scale: float | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """component -> (`<path>.weight` -> delta) for the text encoders this file adapts."""
        s = self.scale if scale is None else scale
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        for i, t in enumerate(self.targets):
            if t.component != "unet":
                deltas.setdefault(t.component, {})[f"{t.path}.weight"] = self._delta(i, s)
        return deltas

    def _weights(self) -> list[nn.Parameter]:
        """Each target's weight Parameter (a parametrized weight's stored original, as SaRA leaves it)."""
        unet = self._check_attached("merge")
        out = []
        for layer in self._layers(unet):
            if parametrize.is_parametrized(layer, "weight"):
                out.append(layer.parametrizations.weight.original)
            else:
                out.append(layer.weight)
        return out

    def merge(self) -> None:
        """W += delta in every target, UNet and text encoders (all checked finite first: else nothing changes)."""
        weights = self._weights()
        if self.merged:
            raise RuntimeError("this LoRA is already merged")
        deltas = [self._delta(i, self.scale) for i in range(len(self.targets))]
        bad = [self.targets[i].name for i, d in enumerate(deltas) if not torch.isfinite(d).all()]
        if bad:
            raise ValueError(f"the delta is not finite in {len(bad)} weights (e.g. {bad[0]}); nothing was merged")
        with torch.no_grad():
            for weight, delta in zip(weights, deltas):
                weight += delta.to(weight.device, weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        weights = self._weights()
        if not self.merged:
            raise RuntimeError("this LoRA is not merged")
        with torch.no_grad():
            for i, weight in enumerate(weights):
                weight -= self._delta(i, self.scale).to(weight.device, weight.dtype)
        self.merged = False

    def set_scale(self, scale: float) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before changing the scale of a merged LoRA (its delta used the old scale)")
        super().set_scale(scale)


# -- reading ------------------------------------------------------------------------------------------------------
def _refuse(name: str, why: str) -> ForeignLoRAError:
    return ForeignLoRAError(f"{name}: {why}")


def inspect_lora_file(path: str | os.PathLike, models: Mapping[str, nn.Module], *,
                      strict: bool = True) -> tuple[KeyReport, list[Target], list[torch.Tensor], list[torch.Tensor]]:
    """Match a LoRA file's keys against `models` (component -> model; "unet" required): the report, and the
    targets with their down and up tensors. Refuses a family mismatch (header, with `strict`; cross-attention
    width, always), a shape that does not fit, and zero matches."""
    path = Path(path)
    name = path.name
    unet = models["unet"]
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata() or {}, list(f.keys())
    formats = lora_file_format(keys)
    report = KeyReport(file=str(path), formats=formats,
                       header={k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec."))})
    if not formats:
        raise _refuse(name, f"none of its {len(keys)} tensors is a LoRA key this studio reads (kohya lora_unet_/"
                            "lora_te_, diffusers/peft unet.<path>.lora_A, legacy ...processor.to_q_lora)")
    # 1. The base model: the header's word first (nothing read yet), then the shapes.
    family = detect_family(unet)
    said = _header_family(meta)
    if strict and said is not None and said[0] != family:
        raise _refuse(name, f"it is a LoRA for {said[0]} ({said[1]}), but the loaded model is {family}; load "
                            f"an {said[0]} model, or pick a LoRA made for {family}")
    modules, other = _parse(keys)
    report.unmatched.update(other)
    tensors = load_file(str(path))
    context = unet.config.cross_attention_dim
    for m in modules.values():
        spelled = m.name if m.fmt == "kohya" else m.name.split(".", 1)[1]
        is_unet = m.name.startswith(PREFIXES["unet"]) if m.fmt == "kohya" else m.component == "unet"
        if is_unet and m.down and _CROSS_ATTENTION_INPUT.search(spelled):
            width = tensors[m.down].shape[1]
            if width != context:
                raise _refuse(name, f"its cross-attention layers read text {width} wide ({m.down}), but the "
                                    f"loaded {family} UNet's is {context} wide: it was made for another base model")
    # 2. Names: kohya by encoding the model's paths, peft and legacy by their dotted path.
    kohya, ambiguous = module_names(models) if "kohya" in formats else ({}, set())
    layers = {c: adaptable_modules(model) for c, model in models.items()}
    # peft and legacy keys name a module by its dotted path, in any of its spellings (text_model.* of old files).
    dotted = {c: {spelled: path for path in found for spelled in spellings(c, path, models[c])}
              for c, found in layers.items()}
    targets, downs, ups, misfits = [], [], [], []
    for m in modules.values():
        keys_of = [k for k in (m.down, m.up, m.alpha_key) if k]
        if m.down is None or m.up is None:
            for k in keys_of:
                report.unmatched[k] = f"{m.name} has no {'lora_up' if m.up is None else 'lora_down'} tensor"
            continue
        component, module_path, why = _resolve(m, kohya, ambiguous, dotted)
        if component is None:
            for k in keys_of:
                report.unmatched[k] = why
            continue
        layer = layers[component][module_path]
        down, up = tensors[m.down], tensors[m.up]
        fit = _fits(layer, down.shape, up.shape)
        if isinstance(fit, str):
            misfits.append(f"{m.name} ({component}.{module_path}) {fit}")
            continue
        rank = fit[0]
        if m.alpha_key is not None:
            alpha_tensor = tensors[m.alpha_key]
            if alpha_tensor.numel() != 1:
                misfits.append(f"{m.alpha_key} holds {alpha_tensor.numel()} values, not one alpha")
                continue
            alpha = float(alpha_tensor)
        elif m.fmt == "peft":
            alpha = _peft_alpha(meta, component, module_path, rank)
        else:
            alpha = float(rank)  # kohya and A1111 read a missing alpha as the rank (scaling 1)
        shape = layer_dims(layer)
        targets.append(Target(component, module_path, m.name, rank, alpha, shape))
        downs.append(down.reshape(rank, shape[0], *shape[2:]).float())  # (r, in) or (r, in, kh, kw)
        ups.append(up.reshape(shape[1], rank).float())  # (out, r)
        report.matched[m.name] = (component, module_path)
        report.matched_keys += len(keys_of)
    if misfits:
        raise _refuse(name, f"{len(misfits)} of its modules do not fit the loaded {family} model "
                            f"({'; '.join(misfits[:3])}); it was made for another base model")
    if not targets:
        first = next(iter(report.unmatched.items()), ("", "no keys"))
        raise _refuse(name, f"none of its {len(keys)} keys names a module of the loaded {family} model "
                            f"(e.g. {first[0]}: {first[1]}); it was made for another model")
    return report, targets, downs, ups


def _resolve(m: _Module, kohya: dict[str, tuple[str, str]], ambiguous: set[str],
             dotted: dict[str, dict[str, str]]) -> tuple[str | None, str, str]:
    """(component, module path, "") of a file's module in the model, or (None, "", why not)."""
    if m.fmt == "kohya":
        if m.name in kohya:
            return (*kohya[m.name], "")
        if m.name in ambiguous:
            return None, "", "two modules of the model share this kohya name"
        component = next(c for c, prefixes in PREFIXES.items() if m.name.startswith(prefixes))
        if component not in dotted:
            return None, "", f"a {component} key, but the model has no {component} linked to this UNet"
        return None, "", f"no module of the loaded model's {component} has this kohya name"
    if m.component not in dotted:
        return None, "", f"a {m.component} key, but the model has no {m.component} linked to this UNet"
    if m.path not in dotted[m.component]:
        return None, "", f"the model's {m.component} has no Linear or Conv2d {m.path}"
    return m.component, dotted[m.component][m.path], ""


def read_lora_file(path: str | os.PathLike, models: Mapping[str, nn.Module], *, strict: bool = True) -> ForeignLoRA:
    """The LoRA file at `path` as an unattached adapter for `models` (component -> model); unmatched keys warn."""
    report, targets, downs, ups = inspect_lora_file(path, models, strict=strict)
    adapter = ForeignLoRA(ForeignLoRAConfig(str(path), report.formats), targets, downs, ups, report)
    adapter.record_base(models["unet"])
    if report.unmatched:
        example = next(iter(report.unmatched.items()))
        warnings.warn(f"{Path(path).name}: {len(report.unmatched)} keys left out, e.g. {example[0]} ({example[1]}); "
                      "`studio adapters inspect` lists them", stacklevel=2)
    return adapter


def load_foreign_lora(path: str | os.PathLike, unet: nn.Module, attach: bool = True, *,
                      strict: bool = True) -> ForeignLoRA:
    """The LoRA file at `path` for `unet` and the text encoders linked to it (`link_text_encoders`); attached
    unless `attach=False`. `strict=False` skips the header's family check (shapes are still checked)."""
    adapter = read_lora_file(path, linked_models(unet), strict=strict)
    if attach:
        adapter.attach(unet)
    return adapter
