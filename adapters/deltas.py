"""Pure functions over weight deltas (`Adapter.delta_weights()`: UNet parameter name -> dense ΔW).

Merging, LoRA export and fusion need nothing of a method but its deltas: a SaRA or an orthogonal LoRA
exports to a plain LoRA file, and several adapters fuse into one set of deltas, the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from .checks import is_int


class LoraExport(NamedTuple):
    """`lora_from_deltas`' result; write `tensors` with lora_alpha = rank (alpha / r = 1)."""

    tensors: dict[str, torch.Tensor]  # unet.<module>.lora_A.weight (r, in[, k, k]) / lora_B.weight (out, r[, 1, 1])
    rank: int
    energy_kept: float  # Σ kept σ² / ‖ΔW‖²_F over the exported weights; 1.0 is exact
    dropped_entries: int  # nonzero entries of biases and norm affines (1-D deltas), which a LoRA cannot carry


def fuse_deltas(weighted: Iterable[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Σ_k w_k ΔW_k per parameter: several adapters' deltas as one (in fp32). Orthogonal adaptation
    (Po et al., CVPR 2024, arXiv 2312.02432, sec. 3) makes this sum lose nothing of each concept."""
    fused: dict[str, torch.Tensor] = {}
    for deltas, weight in weighted:
        for name, delta in deltas.items():
            term = delta.float() if weight == 1 else weight * delta.float()  # no copy for the common weight 1
            fused[name] = fused[name] + term if name in fused else term
    return fused


def lora_from_deltas(deltas: dict[str, torch.Tensor], rank: int) -> LoraExport:
    """Every ≥ 2-D `<module>.weight` delta as a rank-`rank` LoRA by truncated SVD, in diffusers/peft keys.

    A conv ΔW (out, in, k, k) is factored as (out, in·k·k): lora_A is a k×k conv, lora_B a 1×1 one, as
    peft builds them. Modules narrower than `rank` are zero-padded so one r (= lora_alpha) fits all."""
    if not is_int(rank, 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    tensors, kept, total, dropped = {}, 0.0, 0.0, 0
    for name in sorted(deltas):
        delta = deltas[name].float()
        module, _, attr = name.rpartition(".")
        if attr != "weight" or delta.ndim < 2:
            dropped += int(torch.count_nonzero(delta))
            continue
        out_dim, *rest = delta.shape
        u, s, vh = torch.linalg.svd(delta.reshape(out_dim, -1), full_matrices=False)  # (out, q) (q,) (q, in·k·k)
        r = min(rank, s.numel())
        energy = s.square()
        kept, total = kept + energy[:r].sum().item(), total + energy.sum().item()
        root = s[:r].sqrt()  # split σ evenly between the factors
        lora_b = torch.zeros(out_dim, rank, device=delta.device)
        lora_a = torch.zeros(rank, vh.shape[1], device=delta.device)
        lora_b[:, :r], lora_a[:r] = u[:, :r] * root, root[:, None] * vh[:r]
        if rest[1:]:  # conv: A (r, in, k, k), B (out, r, 1, 1)
            lora_a, lora_b = lora_a.reshape(rank, *rest), lora_b.reshape(out_dim, rank, 1, 1)
        tensors[f"unet.{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = lora_b.contiguous()
    return LoraExport(tensors, rank, kept / total if total > 0 else 1.0, dropped)
