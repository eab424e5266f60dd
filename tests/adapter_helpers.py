"""Helpers shared by the adapter test modules."""

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).parents[1] / "bench"


def bench_module(name: str):
    """A script of bench/ as a module (bench/ is not a package; its scripts import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(unet, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def perturb(adapter, seed: int = 0) -> None:
    """Move every adapter weight off its (identity) init, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def train_checking_added_conditions(pipe, config):
    """`train(pipe, config)`, asserting that every UNet call (training and samples) gets one pooled-text row per
    latent row (SDXL's added conditions) and that the losses are finite; returns the result."""
    import numpy as np

    from pipelines.train import train

    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["added_cond_kwargs"]["text_embeds"].shape[0]))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = train(pipe, config)
    finally:
        handle.remove()
    assert result.step == config.steps and all(np.isfinite(result.losses))
    assert calls and all(rows == pooled for rows, pooled in calls)
    return result
