"""Merging weight-delta adapters into a UNet, and fusing them into one LoRA file.

    with merge_into(pipe.unet, [(cat, 0.6), (dog, 0.6)]):     # W + Σ w_k ΔW_k while the block runs
        image = generate(pipe, "<cat> and <dog>", seed=0)
    # the original weights are back, bit for bit

    fused = fused_lora([(cat, 0.6), (dog, 0.6)])             # one LoRA computing that same sum (the ranks add)
    save_adapter(fused, "runs/cat-and-dog.safetensors")      # a plain diffusers LoRA file

A merge is the unnormalised weighted sum Σ w_k ΔW_k of each adapter's delta at scale 1: what diffusers'
`set_adapters(names, adapter_weights=...)` computes with the adapters side by side, and what peft's
`add_weighted_adapter(combination_type="cat")` builds. Orthogonal LoRAs (Po et al., arXiv 2312.02432, sec. 3)
default to w = 0.6 as published, other adapters to 1.0 (the naive sum): `Adapter.default_merge_weight`.
Never peft's "linear" combination: it sums the A's and the B's separately, which adds cross terms B_i A_j that
apply one concept's update to another's inputs (docs/methods.md, "Merging").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import Adapter, base_parameters, device_of, unet_fingerprint
from .checks import is_int, is_number
from .deltas import fuse_deltas, lora_from_deltas
from .lora import TARGETS, LoRA, LoRAConfig
from .ortho_lora import OrthogonalityReport, OrthoLoRA, check_orthogonal

Weighted = Adapter | tuple[Adapter, float | None]  # an adapter alone: its default_merge_weight
# The layers a fused LoRA carries for an adapter that is not a LoRA (SaRA): those a studio LoRA can target.
LORA_SUFFIXES = tuple(f".{name}" for name in dict.fromkeys((*TARGETS["attn_ff"], *TARGETS["attn_conv"])))


@dataclass
class MergedWeights:
    """A merge done by `merge_into`: `restore()` (or leaving its `with` block) copies back every weight it changed,
    bit for bit."""

    unet: nn.Module
    weights: list[tuple[Adapter, float]]  # each adapter and the weight it was merged with
    orthogonality: OrthogonalityReport | None  # between the orthogonal LoRAs, when two or more were merged
    originals: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(repr=False)  # name -> (weight, exact copy)

    @property
    def active(self) -> bool:
        """Whether the merged weights are still in the UNet."""
        return bool(self.originals)

    def restore(self) -> None:
        """Put back the weights as they were before the merge (a no-op once restored). The Parameters themselves
        are kept, so this works whatever peft wrappers were added or removed meanwhile."""
        with torch.no_grad():
            for weight, original in self.originals.values():
                weight.copy_(original)
        self.originals = {}

    def __enter__(self) -> MergedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def merge_into(unet: nn.Module, adapters: Iterable[Weighted], *, tolerance: float = 1e-4) -> MergedWeights:
    """W += Σ_k w_k ΔW_k for the adapters' deltas at scale 1 (their own `scale` is not used: the weight is their
    strength), keeping an exact copy of every weight changed for `restore()`.

    `adapters`: adapters, or (adapter, weight) pairs (a weight of None: the adapter's `default_merge_weight`). They
    need not be attached (their deltas come from their own weights) and must not be attached to `unet` (their branch
    would add the delta a second time). Everything is checked before any weight changes: weight-delta methods only,
    built for this UNet's architecture, finite deltas. Orthogonal LoRAs that share basis directions are merged with a
    warning (their `OrthogonalityReport` is in the result, `tolerance` on |cos| decides)."""
    weighted = _weighted(adapters)
    fingerprint = unet_fingerprint(unet)
    params = dict(base_parameters(unet))
    loras, terms = [], []
    for i, (adapter, weight) in enumerate(weighted):
        _check(i, adapter, fingerprint)
        if adapter.unet is unet:
            raise ValueError(f"{_name(i, adapter)} is attached to this UNet, so its branch already adds its delta; "
                             "detach() it first (merge_into adds the delta to the weights)")
        if isinstance(adapter, LoRA):  # checked on its factors: its dense delta is only ever built summed
            shapes = {f"{path}.weight": (shape[1], shape[0], *shape[2:]) for path, shape in adapter.shapes.items()}
            tensors = list(adapter.parameters())
            loras.append((adapter, weight))
        else:
            deltas = adapter.delta_weights(scale=1.0)
            shapes, tensors = {name: tuple(d.shape) for name, d in deltas.items()}, list(deltas.values())
            terms.append((deltas, weight))
        problems = [name for name, shape in shapes.items() if name not in params or params[name].shape != shape]
        if problems:
            raise ValueError(f"{_name(i, adapter)} changes weights this UNet lacks or shapes differently (e.g. "
                             f"{problems[0]}); merge adapters built for this model")
        _check_finite(i, adapter, tensors)

    report = _orthogonality(weighted, tolerance)
    fused = fuse_deltas([*terms, (_summed_lora_deltas(loras, device_of(unet)), 1.0)])
    # Finite factors may still overflow. One sum reads each delta once (an element check would write a mask too):
    # it is finite only if every element is, or itself overflows, which is refused alike.
    if not torch.isfinite(sum((delta.sum() for delta in fused.values()), torch.zeros(()))):
        raise ValueError("the weighted sum of the deltas overflows; nothing was merged: lower the weights")
    originals = {}
    with torch.no_grad():
        for name, delta in fused.items():
            weight = params[name]
            originals[name] = (weight, weight.detach().clone())
            delta = delta.to(weight.device)
            if weight.dtype == torch.float32:
                weight.add_(delta)  # in place: no temporary the size of W
            else:
                weight.copy_(weight.float() + delta)  # summed in fp32, rounded once to W's dtype
    return MergedWeights(unet, weighted, report, originals)


_FOLDS = "studio_folded_deltas"  # on the UNet object: name -> (weight, its own tensor, {owner id: delta})


def fold_for_call(unet: nn.Module, owner: object, deltas: dict[str, torch.Tensor] | None) -> None:
    """Run `unet` with `owner`'s weight deltas folded into its weights (`deltas` None: take them out again), for
    an attached adapter whose branch is bypassed meanwhile (a membrane whose strength is one number for the whole
    call: adapters/spm.py). Several owners fold at once; a weight then holds its own tensor + the sum of their
    deltas (in fp32, rounded once) in a new tensor, and its own tensor is set aside untouched and put back when no
    owner is left: the restore is exact, in any order. The cost is a second copy of the folded weights while
    folded."""
    folds = unet.__dict__.setdefault(_FOLDS, {})
    touched = {name for name, (_, _, by) in folds.items() if by.pop(id(owner), None) is not None}
    if deltas:
        params = dict(base_parameters(unet))
        for name, delta in deltas.items():
            weight = params[name]
            folds.setdefault(name, (weight, weight.data, {}))[2][id(owner)] = delta
            touched.add(name)
    with torch.no_grad():
        for name in touched:
            weight, own, by = folds[name]
            if by:
                weight.data = (own.float() + sum(d.to(own.device, torch.float32) for d in by.values())).to(own.dtype)
            else:
                weight.data = own
                del folds[name]


def _summed_lora_deltas(loras: list[tuple[LoRA, float]], device: torch.device) -> dict[str, torch.Tensor]:
    """Σ_k w_k s_k B_k A_k per layer as one product of the concatenated factors (peft's "cat"), on `device`: no
    adapter's dense delta is built on its own, so merging 5 LoRAs costs about what merging one does."""
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, weight in loras:
        for path, pair in _lora_pairs(lora, weight, device).items():
            per_layer.setdefault(path, []).append(pair)
    deltas = {}
    for path, pairs in per_layer.items():
        down = torch.cat([a.flatten(1) for a, _ in pairs])  # (Σr, in [* kh * kw])
        up = torch.cat([b.flatten(1) for _, b in pairs], dim=1)  # (out, Σr)
        deltas[f"{path}.weight"] = (up @ down).view(up.shape[0], *pairs[0][0].shape[1:])
    return deltas


def fused_lora(adapters: Iterable[Weighted], *, svd_rank: int = 64) -> LoRA:
    """One plain LoRA (method "lora") whose delta is exactly Σ_k w_k ΔW_k of the given LoRAs (orthogonal ones
    included), as peft's "cat" combination builds it: A = [A_1; A_2; ...], B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]
    with s_k = alpha_k / r_k, and alpha = the total rank (alpha / r = 1). It targets the union of their layers
    (zero blocks where an adapter lacks one); `save_adapter` writes it as a diffusers-loadable file.

    A weight-delta adapter that is not a LoRA (SaRA) joins as the rank-`svd_rank` truncated SVD of its delta on the
    layers a LoRA can carry (attention, feed-forward, resnet convolutions), with a warning saying how much of its
    delta's energy that keeps."""
    weighted = _weighted(adapters)
    if not is_int(svd_rank, 1):
        raise ValueError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    first = weighted[0][0]
    parts: list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]] = []  # (path -> (A, w s B), rank)
    for i, (adapter, weight) in enumerate(weighted):
        _check(i, adapter, first.base_fingerprint)
        if isinstance(adapter, LoRA):
            pairs, rank = _lora_pairs(adapter, weight, torch.device("cpu")), adapter.config.rank
        else:
            pairs, rank = _svd_pairs(i, adapter, weight, svd_rank)
        _check_finite(i, adapter, (t for pair in pairs.values() for t in pair))
        parts.append((pairs, rank))

    shapes = {path: (a.shape[1:], b.shape[0]) for pairs, _ in parts for path, (a, b) in pairs.items()}
    tensors = {}
    for path, (a_tail, out) in sorted(shapes.items()):
        downs, ups = [], []
        for pairs, rank in parts:
            a, b = pairs.get(path) or (torch.zeros(rank, *a_tail), torch.zeros(out, rank, *(1,) * (len(a_tail) - 1)))
            downs.append(a)
            ups.append(b)
        tensors[f"unet.{path}.lora_A.weight"] = torch.cat(downs, dim=0).contiguous()
        tensors[f"unet.{path}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()

    total = sum(rank for _, rank in parts)
    config = LoRAConfig(rank=total, alpha=total, target=_target_for(list(shapes)))
    lora = LoRA.from_shapes(config, {key: tuple(t.shape) for key, t in tensors.items()})
    lora.load_tensors(tensors)
    lora.base_family, lora.base_fingerprint = first.base_family, first.base_fingerprint
    return lora


# -- helpers ------------------------------------------------------------------------------------------


def _weighted(adapters: Iterable[Weighted]) -> list[tuple[Adapter, float]]:
    weighted = []
    for item in adapters:
        adapter, weight = item if isinstance(item, tuple) else (item, None)
        weight = type(adapter).default_merge_weight if weight is None else weight
        if not is_number(weight):
            raise ValueError(f"the weight of {_name(len(weighted), adapter)} must be a finite number, got {weight!r}")
        weighted.append((adapter, float(weight)))
    if not weighted:
        raise ValueError("no adapters given: pass (adapter, weight) pairs")
    return weighted


def _name(i: int, adapter: Adapter) -> str:
    return f"adapters[{i}] ({adapter.label})"


def _check(i: int, adapter: Adapter, fingerprint: str | None) -> None:
    """A weight delta, built for the UNet with this fingerprint (when both are known)."""
    if not adapter.is_weight_delta:
        raise ValueError(f"{_name(i, adapter)} is not a weight delta, so it cannot be merged into the weights; "
                         "attach it instead (adapter.attach(unet)) and leave it out of the merge")
    if fingerprint is not None and adapter.base_fingerprint is not None and adapter.base_fingerprint != fingerprint:
        raise ValueError(f"{_name(i, adapter)} was built for another base (UNet fingerprint "
                         f"{adapter.base_fingerprint}, not {fingerprint}); leave it out, or load the base model it was "
                         "trained on")


def _check_finite(i: int, adapter: Adapter, tensors: Iterable[torch.Tensor]) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError(f"{_name(i, adapter)} has non-finite (NaN or inf) weights: leave it out, or retrain it "
                         "(its training diverged)")


def _orthogonality(weighted: list[tuple[Adapter, float]], tolerance: float) -> OrthogonalityReport | None:
    """Check the orthogonal LoRAs among `weighted` against each other; warn where they share directions."""
    orthogonal = [adapter for adapter, _ in weighted if isinstance(adapter, OrthoLoRA)]
    if len(orthogonal) < 2:
        return None
    report = check_orthogonal(orthogonal, tolerance)
    if report.shared:
        worst = max(report.overlap[n] for n in report.shared)
        warnings.warn(f"the orthogonal LoRAs share basis directions at input width(s) {report.shared} (|cos| up to "
                      f"{worst:.2f}): their concepts will cross-talk there. Train concepts meant to merge on one basis "
                      "seed with slots of their own (the default: each training run claims one)", stacklevel=3)
    return report


def _lora_pairs(lora: LoRA, weight: float, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (A, w·s·B) in fp32 on `device`."""
    factor = weight * lora.config.alpha / lora.config.rank
    return {path: (lora.lora_A[key].weight.detach().to(device, torch.float32),
                   factor * lora.lora_B[key].weight.detach().to(device, torch.float32))
            for key, path in lora.paths.items()}


def _svd_pairs(i: int, adapter: Adapter, weight: float,
               rank: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """A non-LoRA delta as rank-`rank` LoRA factors on the layers a LoRA can carry, warning what is lost."""
    deltas = adapter.delta_weights(scale=1.0)
    matrices = {name: d for name, d in deltas.items() if d.ndim >= 2}
    carried = {name: d for name, d in matrices.items() if name.removesuffix(".weight").endswith(LORA_SUFFIXES)}
    export = lora_from_deltas(carried, rank)
    total = sum(d.float().square().sum().item() for d in matrices.values())
    kept = export.energy_kept * sum(d.float().square().sum().item() for d in carried.values())
    energy = kept / total if total > 0 else 1.0
    dropped = sum(int(torch.count_nonzero(d)) for d in deltas.values() if d.ndim < 2)
    if energy < 1 - 1e-6 or dropped:
        warnings.warn(f"{_name(i, adapter)} is not a LoRA: fused as a rank-{rank} SVD of its delta on the attention, "
                      f"feed-forward and resnet-convolution layers, keeping {100 * energy:.1f} % of its energy "
                      f"({dropped} bias and norm entries dropped); raise svd_rank to keep more", stacklevel=3)
    pairs = {}
    for key in export.tensors:
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            up = export.tensors[f"unet.{path}.lora_B.weight"]
            pairs[path] = (export.tensors[key].float().cpu(), weight * up.float().cpu())  # alpha = rank: s = 1
    return pairs, rank


def _target_for(paths: list[str]) -> str:
    """The narrowest LoRA target naming every path. It only describes the fused LoRA: loading uses the file's exact
    layers, so a union no single target covers (feed-forward and convolutions) is recorded as "attn_conv"."""
    for target in ("attn", "attn_ff", "attn_conv"):
        suffixes = tuple(f".{name}" for name in TARGETS[target])
        if all(path.endswith(suffixes) for path in paths):
            return target
    return "attn_conv"

