"""bench/fusion_quality.py's crosstalk measure: what a concept's delta adds on the prompts the measure samples."""

from __future__ import annotations

import pytest

from adapters import LoRA, LoRAConfig
from tests.adapter_helpers import bench_module, perturb


def test_delta_norms_read_a_copy_as_equal_a_blank_adapter_as_zero_and_the_base_untouched(embedded):
    fusion = bench_module("fusion_quality")
    unet = embedded.pipe.unet
    own = LoRA.from_unet(unet, LoRAConfig(rank=2))
    perturb(own, seed=0)  # B off zero: a delta on every adapted layer
    blank = LoRA.from_unet(unet, LoRAConfig(rank=2))  # B = 0, as initialised
    copy = LoRA.from_unet(unet, LoRAConfig(rank=2))
    copy.load_state_dict(own.state_dict())
    image = fusion.generate(embedded, "a red circle", seed=0, num_inference_steps=2).images[0]

    same = fusion.delta_norms(embedded, ["a red circle"], own, copy, 1, 7.5, 2, 0)
    none = fusion.delta_norms(embedded, ["a red circle"], own, blank, 1, 7.5, 2, 0)
    assert set(same) == {"cross-attention k, v", "cross-attention q, out", "self-attention"}  # LoRA's targets
    for kind, (own_sum, other_sum, base_sum) in same.items():
        assert own_sum > 0 and base_sum > 0, kind
        assert other_sum == pytest.approx(own_sum, rel=1e-6), kind
        assert none[kind][1] == 0 and none[kind][0] == pytest.approx(own_sum, rel=1e-6), kind
    # The hooks are gone and the adapters were never attached: the base draws what it drew before.
    again = fusion.generate(embedded, "a red circle", seed=0, num_inference_steps=2).images[0]
    assert list(image.getdata()) == list(again.getdata())
