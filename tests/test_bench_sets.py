"""The training sets bench/customize_quality.py draws: what they vary must vary independently."""

from __future__ import annotations

import itertools

from tests.adapter_helpers import bench_module


def test_every_background_puts_every_position_on_every_background(tmp_path):
    """Cycled in step with the positions, each position kept one background, and "on a black background" meant
    one position (docs/benchmarks.md, customization, session 26)."""
    customize = bench_module("customize_quality")
    for seed in (0, 1, 2):
        out = tmp_path / f"draw{seed}"
        customize.subject_set(out, seed=seed, subject=("orange", "star", "sks"), images=25, every_background=True)
        seen = set()
        for caption in (path.read_text() for path in out.glob("*.txt")):
            position = next((p for p in ("left", "right", "top", "bottom") if f"on the {p}" in caption), "center")
            background = next((b for b in ("black", "gray") if f"on a {b} background" in caption), "white")
            seen.add((position, background))
        assert seen == set(itertools.product(("left", "right", "top", "bottom", "center"),
                                             ("white", "black", "gray"))), seed
