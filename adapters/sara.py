"""SaRA (Hu et al., ICLR 2025, arXiv 2409.06633): re-train the pretrained weights that are nearly zero.

M1 = (|P0| < θ) over every UNet tensor (Linear/Conv weights, biases, norm affines, time embedding),
one global absolute θ. Only those entries train, as a sparse ΔP:

    P = P0 + s·ΔP    on M1 (s = scale),   P = P0 elsewhere, bit for bit
    L = L_diffusion + λ_rank·‖P ⊙ M‖_*     one random eligible 2-D weight per step (sec. 4)

At T_p (half the run by default) M2 = M1 ∧ (|P| < θ) keeps training; the rest of M1 stays at its
values (sec. 4, progressive re-selection). Sections are the paper's (SaRA, arXiv 2409.06633); the design
choices below are summarised in docs/methods.md, SaRA.

Memory (the paper's unstructured backpropagation, sec. 4, corrected: docs/methods.md). Each target tensor W
stays one frozen dense copy inside the UNet. The adapter holds, per target, the sorted flat indices of the
entries that train (int32; 4 B each, cheaper than a bool mask below 25 % density) and their ΔP as one 1-D
fp32 `nn.Parameter`: the optimizer, clipping and DDP see only those. A `torch.nn.utils.parametrize`
parametrization makes `module.weight` W itself after writing P0 + s·ΔP into W's storage at the indices (in
place, under no_grad, only when ΔP changed), and its backward hands ΔP the gathered dW[idx]. The dense dW
thus lives one layer at a time inside autograd; W never gets a `.grad` or optimizer state, and no second
dense copy (P0 + scatter(ΔP) out of place) is ever saved for backward.

The trained tensor is ΔP rather than P itself: the file stores ΔP, and fp32 (P − P0) + P0
does not always give back P, so only this keeps a resumed run bit-identical. One consequence:
AdamW's weight decay pulls ΔP towards 0 (towards the base), where the reference decays the
absolute values of the selected weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from .base import Adapter, base_parameters, device_of, option, register
from .checks import is_int, is_number
from .deltas import LoraExport, lora_from_deltas

logger = logging.getLogger(__name__)

# How M1 is chosen; bump it if the rule changes, since files record the indices it picked.
SELECTION_RULE = "abs(float32(P0)) < threshold on every UNet parameter, v1"
RESELECT_MODES = ("gather", "reference")
# The dtypes a base may be loaded in. The file carries one checksum per dtype: a SaRA trained on the
# fp32 base then also loads on that base cast to fp16/bf16, while any other base is refused.
CHECKSUM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# File keys: "<parameter name>.sara_<part>" per target, "sara.<name>" for the adapter's own state.
PARTS = ("idx", "delta", "shape", "trainable")


def auto_learning_rate(threshold: float) -> float:
    """lr(θ) = 1e-3·exp(−350·θ): the paper's fit of the best LR per threshold (Fig. 22).

    θ = 2e-4 / 8e-4 / 2e-3 gives 9.3e-4 / 7.6e-4 / 5.0e-4. An explicit learning rate always wins."""
    return 1e-3 * math.exp(-350.0 * threshold)


# The paper's thresholds (sec. 4.1): about 5 M / 20 M / 50 M trainable entries on SD 1.5.
THRESHOLD_PRESETS = (2e-4, 8e-4, 2e-3)


def threshold_presets(unet: nn.Module) -> list[tuple[str, float]]:
    """(label, θ) per preset, labelled by the trainable-parameter count it gives on this model."""
    default = SaRAConfig().threshold
    counts = count_selected(unet, THRESHOLD_PRESETS)
    return [(f"θ = {t:g}: {count / 1e6:.2f} M trainable, lr {auto_learning_rate(t):.2g}"
             + (" (default)" if t == default else ""), t) for t, count in counts.items()]


@dataclass
class SaRAConfig:
    # On SD 1.5, 2e-4 / 8e-4 / 2e-3 select ≈ 5 M / 20 M / 50 M entries.
    threshold: float = option(2e-3, "θ: the pretrained weights with |P0| < θ train (the learning rate follows it)",
                              choices=THRESHOLD_PRESETS, labels_for_model=threshold_presets, ui=True)
    # Paper and reference: half; None keeps M1 all along.
    reselect_at: float | None = option(0.5, "T_p, the share of the run after which only the still-small entries "
                                       "train (blank: never re-select)", minimum=0.01, maximum=0.99)
    # "gather" keeps the surviving entries' Adam moments; "reference" restarts them from zero (what the
    # reference's memory-efficient path does), the ablation partner.
    reselect_mode: str = option("gather", "at re-selection, keep the surviving entries' Adam moments (gather) or "
                                "restart them (reference)", choices=RESELECT_MODES)
    # 5e-3 scored best in the paper (App. K); the reference README uses 5e-4.
    rank_weight: float = option(5e-3, "λ_rank, the nuclear-norm weight (0: off)", minimum=0.0)
    # On SD 1.5: attention, FF and time-embedding Linears, not the 1x1-conv proj_in/out.
    rank_min_dim: int = option(64, "the nuclear norm picks 2-D weights with min(out, in) above this", minimum=0)
    min_selected: int = option(100, "... holding more than this many trainable entries", minimum=0)
    seed: int = option(0, "seeds the nuclear norm's per-step choice of weight", minimum=0)

    def __post_init__(self) -> None:
        if not is_number(self.threshold, 0, inclusive=False):
            raise ValueError(f"SaRAConfig.threshold must be a number > 0 (the paper uses 2e-4, 8e-4 or 2e-3), "
                             f"got {self.threshold!r}")
        reselect_at = self.reselect_at
        if reselect_at is not None and not (is_number(reselect_at, 0, inclusive=False) and reselect_at < 1):
            raise ValueError(f"SaRAConfig.reselect_at must be a fraction in (0, 1) of the run's steps (0.5: halfway), "
                             f"or None to train M1 throughout; got {self.reselect_at!r}")
        if self.reselect_mode not in RESELECT_MODES:
            raise ValueError(f"SaRAConfig.reselect_mode must be one of {RESELECT_MODES}, got {self.reselect_mode!r}")
        if not is_number(self.rank_weight, 0):
            raise ValueError(f"SaRAConfig.rank_weight must be a number >= 0 (0: no nuclear norm), "
                             f"got {self.rank_weight!r}")
        for name in ("rank_min_dim", "min_selected", "seed"):
            if not is_int(getattr(self, name), 0):
                raise ValueError(f"SaRAConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")


def small_entries(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """M1 of one tensor: |P0| < θ, compared in fp32 so that the rule does not depend on W's dtype."""
    return weight.detach().float().abs() < threshold


def count_selected(unet: nn.Module, thresholds: Sequence[float]) -> dict[float, int]:
    """How many UNet entries each θ selects: M1's size, the trainable-parameter count of a SaRA built
    with that θ (before re-selection), without building one."""
    counts = dict.fromkeys(thresholds, 0)
    for name, _ in base_parameters(unet):
        weight = _tensor(*_owner(unet, name))
        for threshold in counts:
            counts[threshold] += int(small_entries(weight, threshold).sum())
    return counts


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class _InjectDelta(torch.autograd.Function):
    """Autograd plumbing only: `weight` already holds P0 + s·ΔP at `idx` (SparseDelta.write).

    Forward returns W itself (autograd hands out a view of it, with this node as its grad_fn);
    backward gives ΔP the gathered s·dW[idx] and W nothing."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.scale = scale
        return weight

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (idx,) = ctx.saved_tensors
        return grad_weight.reshape(-1).index_select(0, idx).float() * ctx.scale, None, None, None  # (N,) -> (n,)


class SparseDelta(nn.Module):
    """ΔP on the selected entries of one UNet tensor W (`name`, `shape`, N entries).

    `idx`/`delta`: the n entries still training (sorted flat indices; the fp32 Parameter).
    `frozen_idx`/`frozen_delta`: the entries of M1 that left training at re-selection, kept at their
    last values. Together they are M1, which is what files store. While attached, `base`/`frozen_base`
    hold P0 at those entries in W's dtype, to put W back bit for bit."""

    def __init__(self, name: str, shape: tuple[int, ...], device: torch.device | str | None = None):
        super().__init__()
        self.name, self.shape = name, tuple(shape)
        index_dtype = _index_dtype(math.prod(self.shape))
        empty = torch.empty(0, device=device)
        self.register_buffer("idx", torch.empty(0, dtype=index_dtype, device=device))  # (n,)
        self.delta = nn.Parameter(empty.clone())  # (n,) fp32
        self.register_buffer("frozen_idx", torch.empty(0, dtype=index_dtype, device=device))  # (m,)
        self.register_buffer("frozen_delta", empty.clone())  # (m,) fp32
        self.register_buffer("base", None, persistent=False)  # (n,) W's dtype, while attached
        self.register_buffer("frozen_base", None, persistent=False)  # (m,)
        self.scale = 1.0
        self.written: int | None = None  # delta._version when P0 + s·ΔP was last written into W

    def extra_repr(self) -> str:
        return f"{self.name}, shape={self.shape}, trainable={self.delta.numel()}, frozen={self.frozen_delta.numel()}"

    @property
    def num_selected(self) -> int:
        return self.delta.numel() + self.frozen_delta.numel()

    def assign(self, idx: torch.Tensor, delta: torch.Tensor, frozen_idx: torch.Tensor, frozen_delta: torch.Tensor,
               *, new_parameter: bool = False) -> None:
        """New contents. By default `delta` stays the same Parameter object, resized in place, so an optimizer
        built before still holds it (loading a checkpoint). That is only safe while no autograd graph that used
        it is alive: autograd keeps the leaf's gradient sink, with the old shape, as long as one is (e.g. the
        last step's `loss`). Re-selection, in the middle of training, therefore takes a `new_parameter`."""
        index_dtype, device = self.idx.dtype, self.delta.device
        self.idx, self.frozen_idx = idx.to(device, index_dtype), frozen_idx.to(device, index_dtype)
        if new_parameter:
            self.delta = nn.Parameter(delta.to(device, torch.float32))
        else:
            self.delta.data = delta.to(device, torch.float32)
            self.delta.grad = None
        self.frozen_delta = frozen_delta.to(device, torch.float32)
        self.written = None

    # -- the weight it sits on ------------------------------------------------------------
    def bind(self, weight: torch.Tensor) -> None:
        """Remember P0 at the entries before anything is written (attach)."""
        flat = weight.detach().view(-1)
        self.base, self.frozen_base = flat.index_select(0, self.idx), flat.index_select(0, self.frozen_idx)
        self.written = None

    def write(self, weight: torch.Tensor, frozen: bool = True) -> None:
        """W[idx] = P0 + s·ΔP, computed in fp32 then cast to W's dtype (also at frozen_idx unless frozen=False:
        those change only with the scale)."""
        with torch.no_grad():
            flat = weight.view(-1)  # W's own storage: it must be contiguous (attach checks)
            flat[self.idx] = (self.base.float() + self.scale * self.delta).to(flat.dtype)
            if frozen:
                flat[self.frozen_idx] = (self.frozen_base.float() + self.scale * self.frozen_delta).to(flat.dtype)
        self.written = self.delta._version

    def restore(self, weight: torch.Tensor) -> None:
        """W back to P0, bit for bit (detach)."""
        with torch.no_grad():
            flat = weight.view(-1)
            flat[self.idx] = self.base
            flat[self.frozen_idx] = self.frozen_base
        self.base = self.frozen_base = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The parametrization: called with W whenever the UNet reads `module.<attr>`. The write is skipped
        while ΔP's version counter is unchanged, so the recomputation of gradient checkpointing and repeated
        forwards leave W's version alone, and the W saved by an earlier forward stays valid for backward."""
        if self.written != self.delta._version:
            self.write(weight, frozen=False)
        if self.delta.numel() == 0 or not (torch.is_grad_enabled() and self.delta.requires_grad):
            # No graph to build (inference, or nothing left training here): W itself, so no dense dW is made and
            # the kernels are those of the bare UNet (CPU linear picks its path by the bias' requires_grad).
            return weight
        return _InjectDelta.apply(self.delta, weight, self.idx, self.scale)

    # -- views of ΔP ----------------------------------------------------------------------
    def selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M1's flat indices, sorted; the order that sorts cat(idx, frozen_idx) into them)."""
        if not self.frozen_idx.numel():  # before re-selection: no sort of up to 10^7 indices
            return self.idx, torch.arange(self.idx.numel(), device=self.idx.device)
        order = torch.cat([self.idx, self.frozen_idx]).argsort()
        return torch.cat([self.idx, self.frozen_idx])[order], order

    def masked_values(self) -> torch.Tensor:
        """P ⊙ M of a 2-D weight, (out, in) fp32, built out of place so the gradient reaches ΔP."""
        values = self.base.float() + self.delta  # (n,)
        flat = torch.zeros(math.prod(self.shape), dtype=torch.float32, device=values.device)
        return flat.index_put((self.idx,), values).view(self.shape)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔP over M1, W's shape, fp32 (without the scale)."""
        flat = torch.zeros(math.prod(self.shape), dtype=torch.float32, device=self.delta.device)
        flat[self.idx] = self.delta.detach()
        flat[self.frozen_idx] = self.frozen_delta
        return flat.view(self.shape)


class _Injection(nn.Module):
    """The module registered as the parametrization. It only points at its SparseDelta (weakly): the
    UNet's parameters, state dict and dtype casts must never take in the adapter's fp32 ΔP."""

    def __init__(self, target: SparseDelta):
        super().__init__()
        self.target = weakref.ref(target)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        target = self.target()
        if target is None:
            raise RuntimeError("the SaRA adapter attached here was deleted without detach(); its weights are lost")
        return target(weight)


def _owner(unet: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter `name` and the attribute, seen through a peft LoRA wrapper."""
    path, _, attr = name.rpartition(".")
    module = unet.get_submodule(path)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module, attr


def _tensor(module: nn.Module, attr: str) -> torch.Tensor:
    """The stored tensor itself, also while parametrized (then `module.<attr>` is computed from it)."""
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def _sha256(values: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """sha256 over (name, P0 at M1 cast to `dtype`) in name order."""
    h = hashlib.sha256()
    for name in sorted(values):
        h.update(name.encode())
        h.update(values[name].to(dtype).cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


@register
class SaRA(Adapter):
    """One SparseDelta per UNet tensor with selected entries, keyed by its parameter name ("." -> "_").

    Build with `from_unet(unet)` (selects M1) or `from_shapes` + `load_tensors` (a saved file). The
    training loop calls `regularization_loss()` each step and `on_step_end` after each optimizer step."""

    method = "sara"
    config_class = SaRAConfig
    label = "SaRA"
    per_row = False  # its delta is written into the weights every row shares
    summary = ("Re-trains the pretrained weights that are nearly zero (a sparse delta, exact merge); no per-row "
               "scale, as its delta lives in the weights every row shares.")
    is_weight_delta = True

    def __init__(self, config: SaRAConfig):
        super().__init__(config)
        self.targets = nn.ModuleDict()
        self.generator = torch.Generator().manual_seed(config.seed)  # the nuclear norm's layer choice
        self.reselected_at: int | None = None  # the step whose end re-selected, once it has
        self.base_checksums: dict[str, str] = {}  # dtype name -> sha256 of P0 at M1 (see attach)

    @classmethod
    def default_learning_rate(cls, config: SaRAConfig) -> float:
        return auto_learning_rate(config.threshold)

    @classmethod
    def from_unet(cls, unet: nn.Module, config: SaRAConfig | None = None) -> SaRA:
        """Select M1 on `unet`'s current weights (seen through peft LoRA wrappers), ΔP = 0; log the counts."""
        adapter = cls(config or SaRAConfig())
        device = device_of(unet)
        if device.type == "meta":
            raise ValueError("SaRA selects entries by magnitude: build it from a UNet with real weights, not 'meta'")
        base, total = {}, 0
        # Name order, as load_tensors: optimizer states line up.
        for name in sorted(name for name, _ in base_parameters(unet)):
            weight = _tensor(*_owner(unet, name))
            idx = small_entries(weight, adapter.config.threshold).view(-1).nonzero().squeeze(1)  # (n,) sorted
            logger.info("SaRA: %s selects %d of %d entries", name, idx.numel(), weight.numel())
            if idx.numel():
                target = SparseDelta(name, weight.shape, device)
                target.assign(idx, torch.zeros(idx.shape, device=device), idx[:0], torch.zeros(0, device=device))
                adapter.targets[adapter._key(name)] = target
                base[name] = weight.detach().view(-1).index_select(0, idx)
            total += weight.numel()
        logger.info("SaRA: θ=%g selects %d of %d UNet entries (%.2f %%) in %d tensors", adapter.config.threshold,
                    adapter.num_selected, total, 100 * adapter.num_selected / max(total, 1), len(adapter.targets))
        adapter.base_checksums = {key: _sha256(base, dtype) for key, dtype in CHECKSUM_DTYPES.items()}
        adapter.record_base(unet)
        return adapter

    @classmethod
    def from_shapes(cls, config: SaRAConfig, shapes: dict[str, tuple[int, ...]]) -> SaRA:
        # Which entries still train is in the tensors' values, not their shapes: load_tensors builds the targets.
        return cls(config)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    @property
    def num_selected(self) -> int:
        """|M1|: the entries ΔP covers (and files store)."""
        return sum(t.num_selected for t in self.targets.values())

    @property
    def num_trainable(self) -> int:
        """The entries still training (|M2| after re-selection)."""
        return sum(t.delta.numel() for t in self.targets.values())

    # -- wiring -------------------------------------------------------------------------
    def _wiring(self, unet: nn.Module) -> Iterator[tuple[SparseDelta, nn.Module, str]]:
        for target in self.targets.values():
            yield (target, *_owner(unet, target.name))

    def _attach(self, unet: nn.Module) -> None:
        """Check that the UNet is the base this ΔP belongs to, then write P0 + s·ΔP and parametrize each target.

        parametrize rather than a forward-pre-hook: every read of `module.weight` (not only the module's own
        forward) is routed, and the leaf Parameter stays registered (renamed `parametrizations.weight.original`)
        for DDP, `.to()` and clipping; a pre-hook would have to swap `_parameters` entries in and out."""
        if not self.targets:
            raise RuntimeError("this SaRA adapter has no entries; build it with SaRA.from_unet or load_tensors")
        self.to(device_of(unet))
        wiring = list(self._wiring_checked(unet))
        self._check_base(wiring)
        for target, module, attr in wiring:
            weight = _tensor(module, attr)
            target.scale = self.scale  # targets built by load_tensors start at 1
            target.bind(weight)
            target.write(weight)
            # unsafe=True: skip parametrize's trial evaluation; the injection returns W, so shape and dtype hold.
            parametrize.register_parametrization(module, attr, _Injection(target), unsafe=True)

    def _wiring_checked(self, unet: nn.Module) -> Iterator[tuple[SparseDelta, nn.Module, str]]:
        problems = []
        for target in self.targets.values():
            try:
                module, attr = _owner(unet, target.name)
                weight = _tensor(module, attr)
            except AttributeError:
                problems.append(f"{target.name} is missing")
                continue
            if tuple(weight.shape) != target.shape:
                problems.append(f"{target.name} is {tuple(weight.shape)}, expected {target.shape}")
            elif parametrize.is_parametrized(module, attr):
                problems.append(f"{target.name} is already parametrized (another SaRA is attached: merge or detach it)")
            elif not weight.is_contiguous():
                problems.append(f"{target.name} is not contiguous (channels_last?): attach before changing its layout")
            else:
                yield target, module, attr
        if problems:
            raise ValueError(f"this SaRA adapter does not fit the UNet ({len(problems)} of {len(self.targets)} "
                             f"tensors: {'; '.join(problems[:3])}); build one for this model with SaRA.from_unet(unet)")

    def _check_base(self, wiring: list[tuple[SparseDelta, nn.Module, str]]) -> None:
        """Refuse other base weights: the checksum of P0 at M1 must match the one taken when M1 was selected."""
        values, dtypes = {}, set()
        for target, module, attr in wiring:
            weight = _tensor(module, attr)
            values[target.name] = weight.detach().view(-1).index_select(0, target.selection()[0])
            dtypes.add(str(weight.dtype).removeprefix("torch."))
        dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= CHECKSUM_DTYPES.keys() else "float32"
        if _sha256(values, CHECKSUM_DTYPES[dtype]) != self.base_checksums.get(dtype):
            raise ValueError(
                f"this SaRA adapter was trained on other base weights: the {dtype} checksum of the base values at its "
                f"{self.num_selected} entries differs from the one recorded at training. Attach it to the model it "
                "was trained on (in fp16/bf16: that model's weights cast with .to(dtype))"
            )

    def _detach(self) -> None:
        """W back to P0 bit for bit, parametrizations removed (the original Parameter objects return)."""
        for target, module, attr in self._wiring(self.unet):
            target.restore(_tensor(module, attr))
            if not self.merged:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self.merged = False

    # -- training -----------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor | None:
        """λ_rank·‖P ⊙ M‖_* of one eligible 2-D weight drawn with the adapter's generator (sec. 4)."""
        if self.config.rank_weight == 0:
            return None
        self._check_attached("compute the nuclear norm of")
        eligible = [t for t in self.targets.values()
                    if len(t.shape) == 2 and min(t.shape) > self.config.rank_min_dim
                    and t.delta.numel() > self.config.min_selected]
        if not eligible:
            return None
        target = eligible[int(torch.randint(len(eligible), (1,), generator=self.generator))]
        return self.config.rank_weight * torch.linalg.matrix_norm(target.masked_values(), ord="nuc")

    def on_step_end(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """`step`: 0-based index of the optimizer step just taken. Re-selects once round(reselect_at·T) are done."""
        # An optimizer that updates through `.data` (bitsandbytes) does not bump ΔP's version: write anyway.
        for target in self.targets.values():
            target.written = None
        if self.config.reselect_at is None or self.reselected_at is not None:
            return
        if step + 1 >= round(self.config.reselect_at * total_steps):
            self.reselect(optimizer, step)

    def reselect(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """M2 = M1 ∧ (|P0 + ΔP| < θ) (sec. 4, progressive re-selection); the rest of M1 freezes at its values.

        Each ΔP becomes a new, smaller Parameter, put in the old one's place in `optimizer.param_groups`. In
        "gather" mode it takes the surviving entries of the old state (every state tensor shaped like ΔP: Adam's
        moments; `step` as is); in "reference" mode it starts without state. A training loop must take the
        parameters anew (for clipping) after `on_step_end`; DDP must be re-wrapped."""
        self._check_attached("re-select")
        slots = {id(p): (group["params"], i) for group in optimizer.param_groups for i, p in enumerate(group["params"])}
        if any(id(t.delta) not in slots for t in self.targets.values()):
            raise ValueError("the optimizer does not hold this SaRA adapter's parameters; build it from "
                             "adapter.trainable_parameters()")
        before = self.num_trainable
        for target in self.targets.values():
            old, delta = target.delta, target.delta.detach()
            keep = (target.base.float() + delta).abs() < self.config.threshold  # (n,) bool
            target.frozen_base = torch.cat([target.frozen_base, target.base[~keep]])
            target.base = target.base[keep]
            target.assign(target.idx[keep], delta[keep], torch.cat([target.frozen_idx, target.idx[~keep]]),
                          torch.cat([target.frozen_delta, delta[~keep]]), new_parameter=True)
            params, i = slots[id(old)]
            params[i] = target.delta
            state = optimizer.state.pop(old, None)
            if state and self.config.reselect_mode == "gather":
                optimizer.state[target.delta] = {
                    k: v[keep] if torch.is_tensor(v) and v.shape == keep.shape else v for k, v in state.items()
                }
        self._write_all()  # W still holds the values from before this step's update at the newly frozen entries
        self.reselected_at = step
        logger.info("SaRA: re-selection after step %d keeps %d of %d trainable entries (%.1f %%), mode %s",
                    step + 1, self.num_trainable, before, 100 * self.num_trainable / max(before, 1),
                    self.config.reselect_mode)

    # -- inference ----------------------------------------------------------------------
    def _write_all(self) -> None:
        for target, module, attr in self._wiring(self.unet):
            target.write(_tensor(module, attr))

    def set_scale(self, scale: float) -> None:
        """P = P0 + scale·ΔP, written at once while attached."""
        if self.merged:
            raise RuntimeError("unmerge() before changing the scale of a merged SaRA (its weights hold the old scale)")
        super().set_scale(scale)
        for target in self.targets.values():
            target.scale = self.scale
        if self.unet is not None:
            self._write_all()

    def merge(self) -> None:
        """Bake P0 + s·ΔP into the weights and remove the parametrizations (plain Parameters, plain names).

        Not the base class's W += delta: W already holds P0 + s·ΔP (written by the parametrization), computed in
        fp32 from P0, so dropping the parametrizations merges exactly and detach() still restores P0 bit for bit."""
        unet = self._check_attached("merge")
        if self.merged:
            raise RuntimeError("this SaRA adapter is already merged")
        bad = [t.name for t in self.targets.values()
               if not (torch.isfinite(t.delta).all() and torch.isfinite(t.frozen_delta).all())]
        if bad:
            raise ValueError(f"ΔP is not finite in {len(bad)} tensors (e.g. {bad[0]}); nothing was merged")
        self._write_all()
        for _, module, attr in self._wiring(unet):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self.merged = True

    def unmerge(self) -> None:
        """Back to the parametrized state; the weights hold the same values, detach() restores P0 exactly."""
        unet = self._check_attached("unmerge")
        if not self.merged:
            raise RuntimeError("this SaRA adapter is not merged")
        for target, module, attr in self._wiring(unet):
            parametrize.register_parametrization(module, attr, _Injection(target), unsafe=True)
        self.merged = False

    def set_row_scales(self, row_scales: torch.Tensor | None) -> None:
        if row_scales is not None:
            raise NotImplementedError("SaRA writes its delta into the UNet's weights, which every batch row shares: "
                                      "it has one scale per call, not one per row")

    def delta_weights(self, scale: float | None = None) -> dict[str, torch.Tensor]:
        """Every target's dense s·ΔP over M1 (fp32, W's shape), biases and norm affines included."""
        s = self.scale if scale is None else scale
        return {target.name: s * target.delta_weight() for target in self.targets.values()}

    def delta_weight(self, name: str, scale: float | None = None) -> torch.Tensor | None:
        key = self._key(name)
        if key not in self.targets:
            return None
        return (self.scale if scale is None else scale) * self.targets[key].delta_weight()

    def export_lora(self, rank: int) -> LoraExport:
        """ΔP (at scale 1: choose the scale when loading) as a rank-`rank` LoRA by truncated SVD
        (adapters/deltas.py)."""
        export = lora_from_deltas(self.delta_weights(scale=1.0), rank)
        logger.info("SaRA -> LoRA rank %d: %d modules, %.2f %% of ΔP's energy kept, %d bias/norm entries dropped",
                    rank, len(export.tensors) // 2, 100 * export.energy_kept, export.dropped_entries)
        return export

    # -- serialisation ------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Per target over M1 (sorted): `.sara_idx`, `.sara_delta` (fp32 ΔP), `.sara_shape`, and after
        re-selection `.sara_trainable` (bool); plus the base checksums, the generator and the re-selection step."""
        out = {}
        for target in self.targets.values():
            idx, order = target.selection()
            out[f"{target.name}.sara_idx"] = idx
            out[f"{target.name}.sara_delta"] = torch.cat([target.delta.detach(), target.frozen_delta])[order]
            out[f"{target.name}.sara_shape"] = torch.tensor(target.shape, dtype=torch.int64)
            if self.reselected_at is not None:
                out[f"{target.name}.sara_trainable"] = order < target.delta.numel()
        for dtype, digest in self.base_checksums.items():
            out[f"sara.base_sha256.{dtype}"] = torch.frombuffer(bytearray.fromhex(digest), dtype=torch.uint8)
        out["sara.generator_state"] = self.generator.get_state()
        if self.reselected_at is not None:
            out["sara.reselected_at"] = torch.tensor(self.reselected_at, dtype=torch.int64)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load `tensors()` output. A fresh adapter (from_shapes) builds its targets; one that has targets
        must have the same ones and keeps its Parameter objects (an optimizer built before stays valid: the
        training loop's resume relies on it). While attached, the checksum is checked again on the new M1."""
        entries = self._parse(tensors)
        if self.targets and set(entries) != {t.name for t in self.targets.values()}:
            raise ValueError("these tensors belong to another SaRA adapter (other tensors selected); "
                             "build a fresh one with SaRA.from_shapes(config, shapes) to load them")
        unet = self.unet
        if unet is not None:
            self.detach()
        for name, (shape, idx, delta, trainable) in entries.items():
            key = self._key(name)
            if key not in self.targets:
                self.targets[key] = SparseDelta(name, shape, idx.device)
            elif self.targets[key].shape != shape:
                raise ValueError(f"{name}: these tensors are for shape {shape}, not {self.targets[key].shape}")
            self.targets[key].assign(idx[trainable], delta[trainable], idx[~trainable], delta[~trainable])
        self.base_checksums = {
            dtype: bytes(tensors[f"sara.base_sha256.{dtype}"].tolist()).hex() for dtype in CHECKSUM_DTYPES
        }
        self.generator.set_state(tensors["sara.generator_state"])
        self.reselected_at = int(tensors["sara.reselected_at"]) if "sara.reselected_at" in tensors else None
        if unet is not None:
            self.attach(unet)

    def _parse(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Validate a file's tensors: name -> (shape, idx (n,), delta (n,) fp32, trainable (n,) bool)."""
        reselected = "sara.reselected_at" in tensors
        names = sorted(key.removesuffix(".sara_idx") for key in tensors if key.endswith(".sara_idx"))
        if not names:
            raise ValueError("no SaRA tensors ('<parameter>.sara_idx') found: this is not a SaRA adapter file")
        expected = {f"{name}.sara_{part}" for name in names for part in PARTS if reselected or part != "trainable"}
        expected |= {f"sara.base_sha256.{dtype}" for dtype in CHECKSUM_DTYPES} | {"sara.generator_state"}
        expected |= {"sara.reselected_at"} if reselected else set()
        missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"SaRA tensors incomplete or foreign: missing {missing[:3]}, unexpected {unexpected[:3]}")
        entries = {}
        for name in names:
            shape = tuple(tensors[f"{name}.sara_shape"].tolist())
            idx, delta = tensors[f"{name}.sara_idx"], tensors[f"{name}.sara_delta"]
            trainable = tensors[f"{name}.sara_trainable"] if reselected else torch.ones_like(idx, dtype=torch.bool)
            ok = (idx.ndim == 1 and idx.dtype in (torch.int32, torch.int64) and delta.dtype == torch.float32
                  and delta.shape == idx.shape == trainable.shape and trainable.dtype == torch.bool)
            ok = ok and (idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < math.prod(shape)
                                              and bool((idx[1:] > idx[:-1]).all())))
            if not ok:
                raise ValueError(f"{name}: sara_idx must be sorted int32/int64 indices into {shape} and sara_delta "
                                 "(and sara_trainable) fp32 (bool) tensors of the same length")
            entries[name] = (shape, idx.long(), delta, trainable)
        return entries

    def header_metadata(self) -> dict[str, str]:
        return {
            "studio.sara.selection_rule": SELECTION_RULE,
            "studio.sara.num_selected": str(self.num_selected),
            "studio.sara.num_trainable": str(self.num_trainable),
        }


def naive_masked_parameters(unet: nn.Module, threshold: float) -> tuple[list[nn.Parameter], list[RemovableHandle]]:
    """The bench's baseline: the same entries train as plain masked fine-tuning (LT-SFT-like), i.e. every
    tensor with a selected entry gets requires_grad, a dense `.grad` (masked by a hook) and, in the optimizer,
    dense Adam moments. Use weight_decay=0, or decay moves the unselected entries too. Remove the handles
    and reset requires_grad to undo."""
    params, handles = [], []
    for p in unet.parameters():
        mask = small_entries(p, threshold)
        if mask.any():
            p.requires_grad_(True)
            handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
            params.append(p)
    return params, handles
