"""Helpers shared by the adapter test modules."""

import torch


def run(unet, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def perturb(adapter, seed: int = 0) -> None:
    """Move every adapter weight off its (identity) init, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
