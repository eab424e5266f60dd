"""LoRA (Hu et al., 2021) through peft: W x + s (alpha / r) B A x on the UNet's attention Linears, optionally
its feed-forward Linears or its resnets' 3x3 convolutions (kohya's LoCon: A is a kxk conv to r channels, B a 1x1).

The adapter owns its `lora_A`/`lora_B` Linears; `attach` lets peft wrap the targets
(`inject_adapter_in_model`, the diffusers way) and then puts our modules into peft's layers, so the
weights the training loop optimises and saves are the ones the forward pass uses. Files are in
diffusers/peft format (`unet.<path>.lora_A.weight`, header `lora_adapter_metadata`), so diffusers'
`pipe.load_lora_weights(path)` reads them too.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .base import Adapter, Recommendation, device_of, option, register
from .checks import is_int, is_number

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TARGETS = {
    "attn": ATTN_TARGETS,
    "attn_ff": (*ATTN_TARGETS, "ff.net.0.proj", "ff.net.2"),
    "attn_conv": (*ATTN_TARGETS, "conv1", "conv2"),  # conv1/conv2: the two 3x3 convolutions of each resnet
}


@dataclass
class LoRAConfig:
    rank: int = option(4, "rank r of each low-rank update", minimum=1, maximum=1024, ui=True)
    # None -> rank, i.e. the LoRA branch scaled by alpha / rank = 1 (kohya and peft read a missing alpha so too).
    alpha: float | None = option(None, "alpha: the update is scaled by alpha / rank (blank: alpha = rank)")
    # "attn_ff" is the SCEdit paper's LoRA baseline (23.94 M parameters on SD 1.5 at rank 64); "attn_conv"
    # (kohya's LoCon) shapes what attention cannot reach: a UNet level without attention or a shape the base
    # never drew.
    target: str = option("attn", "the layers adapted", choices=(
        ("attention (q, k, v, out)", "attn"), ("attention + feed-forward", "attn_ff"),
        ("attention + resnet convolutions (LoCon)", "attn_conv")), ui=True)
    dropout: float = option(0.0, "dropout on the LoRA branch's input, training only", minimum=0.0, maximum=0.99)

    def __post_init__(self) -> None:
        if not is_int(self.rank, 1):
            raise ValueError(f"LoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = self.rank
        if not is_number(self.alpha):
            raise ValueError(f"LoRAConfig.alpha must be a finite number (or None for alpha = rank), got {self.alpha!r}")
        if self.target not in TARGETS:
            raise ValueError(f"LoRAConfig.target must be one of {sorted(TARGETS)}, got {self.target!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")


def layer_shape(layer: nn.Module) -> tuple[int, ...] | str:
    """(in, out) of a Linear, (in, out, kh, kw) of a "same" Conv2d (stride 1, padding k // 2, no groups or
    dilation, as a resnet's), else a description of what it is."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        if (layer.stride, layer.padding, layer.dilation, layer.groups) == ((1, 1), (kh // 2, kw // 2), (1, 1), 1):
            return layer.in_channels, layer.out_channels, kh, kw
        return f"Conv2d with stride {layer.stride}, padding {layer.padding}, groups {layer.groups}"
    return type(layer).__name__


def target_layers(unet: nn.Module, target: str) -> dict[str, nn.Module]:
    """Module path -> the Linear or Conv2d to adapt (seen through a peft wrapper another adapter left there)."""
    suffixes = tuple(f".{name}" for name in TARGETS[target])
    found = {}
    for path, module in unet.named_modules():
        if path.endswith(suffixes):
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(shape := layer_shape(base), str):
                raise ValueError(f"{path} is a {shape}; LoRA here adapts Linear and 'same' Conv2d layers only")
            found[path] = base
    return found


def _low_rank_pair(shape: tuple[int, ...], rank: int) -> tuple[nn.Module, nn.Module]:
    """peft's A and B for a layer of this shape: Linears, or a kxk conv to `rank` channels and a 1x1 conv."""
    if len(shape) == 2:
        return nn.Linear(shape[0], rank, bias=False), nn.Linear(rank, shape[1], bias=False)
    kh, kw = shape[2:]
    return (nn.Conv2d(shape[0], rank, (kh, kw), padding=(kh // 2, kw // 2), bias=False),
            nn.Conv2d(rank, shape[1], 1, bias=False))


@contextmanager
def _requires_grad_kept(*modules: nn.Module) -> Iterator[None]:
    # peft's injection freezes the base model and set_adapter/delete_adapter unfreeze active adapters;
    # attaching or detaching an adapter must not change what trains.
    saved = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    yield
    for p, requires_grad in saved:
        p.requires_grad_(requires_grad)


class BranchInput(nn.Module):
    """What every peft layer of one LoRA applies to its branch's input (peft's `lora_dropout` slot): dropout,
    then the per-row scale factors when set. lora_A and lora_B have no bias, so scaling a row's input scales
    that row's update: a scale per UNet batch row without touching peft's forward."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.row_scales: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.row_scales is None:
            return x
        return x * self.row_scales.to(x.device, x.dtype).view(-1, *(1,) * (x.ndim - 1))


def pair_shapes(shapes: dict[str, tuple[int, ...]], down_key: re.Pattern, up_key: Callable[[str], str],
                path_of: Callable[[str], str]) -> dict[str, tuple[int, ...]]:
    """Target path -> layer shape (in, out[, kh, kw]) from a saved file's tensor shapes: every key matching
    `down_key` (group 1: the module's name in the file) paired with the key `up_key(name)`; the down-projection
    is (r, in[, kh, kw]), the up-projection (out, r[, 1, 1]). LoRA's peft keys and SPM's kohya keys both pair so."""
    targets = {}
    for name, shape in shapes.items():
        if m := down_key.fullmatch(name):
            up = shapes.get(up_key(m[1]))
            if up is None:
                raise ValueError(f"{name} has no matching {up_key(m[1])} tensor")
            targets[path_of(m[1])] = (shape[1], up[0], *shape[2:])
    return targets


_names = itertools.count()  # peft adapter names must be unique per UNet; one per LoRA instance
_A_KEY = re.compile(r"unet\.(.+)\.lora_A\.weight")


@register
class LoRA(Adapter):
    """`shapes` maps each target module path to its `layer_shape`; build with `from_unet(unet)` or
    `from_shapes` (a saved file's tensor shapes)."""

    method = "lora"
    config_class = LoRAConfig
    label = "LoRA"
    summary = ("Low-rank updates of the attention (and optionally feed-forward or convolution) weights through "
               "peft; files load in diffusers, A1111 and ComfyUI.")
    is_weight_delta = True
    recommended_for = {
        "subject": Recommendation(
            {"target": "attn_conv", "rank": 8}, learning_rate=1e-3, steps=2000, instance_prompt_share=0.5,
            reason="meets the targets on the Shapes subject given 20 images that vary position, size and "
                   "background: at CFG 7.5 with the trigger alone on half the steps and 'Adapters on the negative "
                   "prompt too' unticked in Generate, the bare trigger draws the subject 8 of 8 (fidelity 100 %), "
                   "new contexts are right in 92 % and base prompts lose 0.7 points; with 5 images it memorises "
                   "them and new contexts fall to 54 % (docs/benchmarks.md, session 19)"),
        "style": Recommendation(
            {"target": "attn_ff", "rank": 8}, learning_rate=1e-3, steps=1000,
            reason="meets the targets on the Shapes style given about 40 images that take each colour and shape "
                   "through the positions and backgrounds: at CFG 7.5 with 'Adapters on the negative prompt too' "
                   "unticked in Generate, new colours and shapes are drawn in the style in 94 % and 88 % on two "
                   "draws of the images, new contexts in 85 % and 80 %, base prompts lose 1.2 and 0.9 points; with "
                   "positions drawn at random, one draw of 40 meets them (85 / 80) and one falls short (71 % drawn "
                   "in the style); on that first draw LoCon scores 75 / 65 and SC-Tuner 4 / 5, and with 8-20 images "
                   "every tuner falls short (docs/benchmarks.md, session 21)"),
    }

    def __init__(self, config: LoRAConfig, shapes: dict[str, tuple[int, int]]):
        super().__init__(config)
        # ModuleDict names cannot hold dots; "a.b.to_out.0" -> "a_b_to_out_0" (kohya's spelling of the path).
        self.paths = {path.replace(".", "_"): path for path in shapes}
        self._key_of = {f"{path}.weight": key for key, path in self.paths.items()}  # for `delta_weight`
        if len(self.paths) != len(shapes):
            raise ValueError("two target paths collapse to the same module name once dots become underscores")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.shapes = dict(shapes)
        for key, path in self.paths.items():
            # A keeps torch's default init, kaiming-uniform(a=sqrt(5)), as peft does; B = 0, so the adapted
            # UNet starts equal to the base.
            self.lora_A[key], self.lora_B[key] = _low_rank_pair(tuple(shapes[path]), config.rank)
            nn.init.zeros_(self.lora_B[key].weight)
        # One input module (no weights) shared by every peft layer, owned here so that adapter.train() /
        # adapter.eval() switch its dropout, as they would if the LoRA branches were our own modules.
        self.branch_input = BranchInput(config.dropout)
        self.adapter_name = f"studio_lora_{next(_names)}"

    @classmethod
    def targets(cls, unet: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
        """Module path -> the Linear or Conv2d this method adapts in `unet` (refused when there is none)."""
        layers = target_layers(unet, config.target)
        if not layers:
            raise ValueError(f"no {TARGETS[config.target]} layers found in this UNet")
        return layers

    @classmethod
    def from_unet(cls, unet: nn.Module, config: LoRAConfig | None = None) -> LoRA:
        config = config if config is not None else cls.config_class()
        layers = cls.targets(unet, config)
        with torch.device(device_of(unet)):
            adapter = cls(config, {path: layer_shape(m) for path, m in layers.items()})
        adapter.record_base(unet)
        return adapter

    @classmethod
    def from_shapes(cls, config: LoRAConfig, shapes: dict[str, tuple[int, ...]]) -> LoRA:
        # A rank other than config.rank fails in load_tensors' strict load.
        return cls(config, pair_shapes(shapes, _A_KEY, lambda path: f"unet.{path}.lora_B.weight", lambda path: path))

    # -- serialisation: diffusers/peft keys and header ------------------------------------
    def _file_keys(self) -> dict[str, str]:
        """File key (`unet.<path>.lora_A.weight`) -> our state_dict key (`lora_A.<name>.weight`)."""
        return {
            f"unet.{path}.{part}.weight": f"{part}.{key}.weight"
            for key, path in self.paths.items()
            for part in ("lora_A", "lora_B")
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        return {file_key: state[key].detach().contiguous() for file_key, key in self._file_keys().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        keys = self._file_keys()
        missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
        if missing or unexpected:
            raise ValueError(f"LoRA tensors do not fit its targets: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict({key: tensors[file_key] for file_key, key in keys.items()}, strict=True)

    def peft_fields(self) -> dict:
        """The LoraConfig fields that describe this adapter (exact module paths, so nothing else matches)."""
        return {
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": sorted(self.paths.values()),
        }

    def header_metadata(self) -> dict[str, str]:
        # diffusers' LoRA loader builds LoraConfig(**fields) from this JSON, keys prefixed by the component.
        fields = {f"unet.{name}": value for name, value in self.peft_fields().items()}
        return {"lora_adapter_metadata": json.dumps(fields, sort_keys=True)}

    # -- wiring -------------------------------------------------------------------------
    def _layers(self, action: str) -> list[BaseTunerLayer]:
        unet = self._check_attached(action)
        return [unet.get_submodule(path) for path in self.paths.values()]

    def _check_fits(self, unet: nn.Module) -> None:
        """Every target exists and has our widths; checked before anything is touched."""
        problems = []
        for path, want in self.shapes.items():
            try:
                module = unet.get_submodule(path)
            except AttributeError:
                problems.append(f"{path} is missing")
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            found = layer_shape(base)
            if found != tuple(want):
                problems.append(f"{path} is {found}, expected {'Linear' if len(want) == 2 else 'Conv2d'}{tuple(want)}")
        if problems:
            raise ValueError(
                f"this {self.label} does not fit the UNet ({len(problems)} of {len(self.paths)} targets differ: "
                f"{'; '.join(problems[:3])}); build one for this model with {type(self).__name__}.from_unet(unet)"
            )
        if any(m.merged for m in unet.modules() if isinstance(m, BaseTunerLayer)):
            # peft's injection would silently unmerge them.
            raise RuntimeError("the UNet has merged (fused) adapters; unmerge them before attaching another LoRA")
        if self.adapter_name in getattr(unet, "peft_config", {}):
            raise RuntimeError(f"the UNet already has an adapter named {self.adapter_name!r}")

    def _attach(self, unet: nn.Module) -> None:
        self._check_fits(unet)
        active = {path: list(m.active_adapters) for path, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
        self.to(device_of(unet))
        with _requires_grad_kept(unet, self), warnings.catch_warnings():
            # Several adapters on one UNet is intended here; peft warns about it.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # low_cpu_mem_usage: peft's own lora_A/B are made on `meta` and never filled, as ours replace them.
            inject_adapter_in_model(
                LoraConfig(**self.peft_fields()), unet, adapter_name=self.adapter_name, low_cpu_mem_usage=True
            )
            # Our modules go into peft's layers: the forward pass uses the very weights we train and save.
            for key, path in self.paths.items():
                layer = unet.get_submodule(path)
                layer.lora_A[self.adapter_name] = self.lora_A[key]
                layer.lora_B[self.adapter_name] = self.lora_B[key]
                layer.lora_dropout[self.adapter_name] = self.branch_input
            # peft made the new adapter the only active one in every tuner layer: re-activate the others.
            for path, m in unet.named_modules():
                if isinstance(m, BaseTunerLayer):
                    ours = [self.adapter_name] if self.adapter_name in getattr(m, "lora_A", {}) else []
                    m.set_adapter(active.get(path, []) + ours)
        for layer in (unet.get_submodule(path) for path in self.paths.values()):
            layer.set_scale(self.adapter_name, self.scale)  # scaling = scale * alpha / r

    def _detach(self) -> None:
        if self.merged:
            self.unmerge()
        unet = self.unet
        with _requires_grad_kept(unet):
            for path in self.paths.values():
                layer = unet.get_submodule(path)
                if set(layer.lora_A) == {self.adapter_name}:
                    # Ours is the layer's only adapter: put the original nn.Linear object back, no wrapper left.
                    parent, _, child = path.rpartition(".")
                    setattr(unet.get_submodule(parent), child, layer.get_base_layer())
                else:
                    layer.delete_adapter(self.adapter_name)
        unet.peft_config.pop(self.adapter_name)
        # peft created `unet.peft_config`; drop it when empty unless diffusers manages it.
        if not unet.peft_config and not getattr(unet, "_hf_peft_config_loaded", False):
            del unet.peft_config

    # -- scale, row scales and weight deltas ------------------------------------------------
    def set_row_scales(self, row_scales: torch.Tensor | None) -> None:
        super().set_row_scales(row_scales)
        self.branch_input.row_scales = row_scales

    def delta_weights(self, scale: float | None = None) -> dict[str, torch.Tensor]:
        """`<path>.weight` -> s (alpha / r) B A, shaped as the weight (a conv's B A: (out, in, kh, kw)); in the
        adapter's dtype, computed from its own modules (no UNet needed)."""
        return {f"{path}.weight": self._delta(key, scale) for key, path in self.paths.items()}

    def delta_weight(self, name: str, scale: float | None = None) -> torch.Tensor | None:
        key = self._key_of.get(name)
        return None if key is None else self._delta(key, scale)

    def _delta(self, key: str, scale: float | None) -> torch.Tensor:
        factor = (self.scale if scale is None else scale) * self.config.alpha / self.config.rank
        a, b = self.lora_A[key].weight, self.lora_B[key].weight
        delta = b.detach().flatten(1) @ a.detach().flatten(1)  # (out, r) @ (r, in [* kh * kw])
        return (delta * factor).view(b.shape[0], *a.shape[1:])

    def _bypass(self, on: bool) -> None:
        # Only this adapter leaves each layer's active set. (Marking it merged in peft would stop every branch of
        # the layer: peft runs only the base layer while any adapter is marked merged, other adapters included.)
        layers = self._layers("merge")
        with _requires_grad_kept(*layers):  # set_adapter sets requires_grad in the layer it is called on only
            for layer in layers:
                others = [name for name in layer.active_adapters if name != self.adapter_name]
                layer.set_adapter(others if on else [n for n in layer.lora_A if n in others or n == self.adapter_name])

    def set_scale(self, scale: float) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before changing the scale of a merged LoRA (its delta used the old scale)")
        super().set_scale(scale)
        if self.unet is not None:
            for layer in self._layers("scale"):
                layer.set_scale(self.adapter_name, self.scale)  # scaling = scale * alpha / r
