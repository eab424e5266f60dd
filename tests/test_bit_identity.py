"""Images from fixed seeds stay identical across refactors of the adapter surface (issue #16): to the bit on the
CPU that recorded them, within the vector kernels' last-bit rounding on another (MAX_LEVEL_DIFFERENCE).

tests/data/bit_identity.npz holds the images these cases made on the code before the per-call context
(commit fcde20a), on the tiny random-weight SD 1.5 pipeline (no dependence on the embedded model, which is
retrained). Regenerate it only when a change is *meant* to alter images:

    python -m tests.test_bit_identity --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from adapters import CSCTuner, LoRA, LoRAConfig, SCTuner
from pipelines import EMBEDDED_MODEL, ControlSpec, edit, generate
from pipelines.architectures import tiny_sd15_pipeline
from studio.shapes.world import Scene, ShapeObject, render

REFERENCE = Path(__file__).parent / "data" / "bit_identity.npz"


def _perturbed(adapter, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return adapter


def cases() -> dict[str, np.ndarray]:
    """Every case's images as one uint8 array (N, H, W, 3), computed on 2 CPU threads as they were recorded
    (another thread count sums in another order, which changes the last bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _cases()
    finally:
        torch.set_num_threads(threads)


def _cases() -> dict[str, np.ndarray]:
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)

    def images(result) -> np.ndarray:
        return np.stack([np.asarray(image) for image in result.images])

    out = {}
    out["generate"] = images(generate(pipe, "a red circle on the left", negative_prompt="blue", seed=3,
                                      num_inference_steps=4, num_images_per_prompt=2))
    out["generate_no_cfg"] = images(generate(pipe, "a green square", seed=5, num_inference_steps=3,
                                             guidance_scale=1.0, scheduler="Euler a"))
    sc = _perturbed(SCTuner.from_unet(pipe.unet), 1)
    lora = _perturbed(LoRA.from_unet(pipe.unet, LoRAConfig(rank=4, target="attn_conv")), 2)
    out["generate_adapters"] = images(generate(pipe, "a red circle", seed=7, num_inference_steps=4,
                                               adapters=[(sc, 0.7), (lora, 0.5)]))
    csc = _perturbed(CSCTuner.from_unet(pipe.unet), 3)
    photo = render(Scene((ShapeObject("yellow", "square", "right"),), "black"))
    out["generate_control"] = images(generate(pipe, "a yellow square", seed=11, num_inference_steps=4,
                                              control=[ControlSpec("canny", photo, scale=0.8, adapter=csc)]))
    source = render(Scene((ShapeObject("red", "circle", "center"),), "white"))
    result = edit(pipe, source, "a red circle", "a blue circle", num_inference_steps=4, mask_start_t=600,
                  quantile=0.5, mask_floor=0.0, use_cache=False)  # the recording's defaults
    out["edit"] = np.stack([np.asarray(result.image), np.asarray(result.reconstruction)])
    return out


# The reference was recorded on an AMD EPYC; on an Intel Xeon the same code (commit 7d12889 too) rounds about 1 pixel
# value in 12,000 to the neighbouring grey level: the CPUs' vector kernels sum in another order. A refactor that
# changes the computation moves far more than that (a different seed or scale changes nearly every pixel), so off
# the recording CPU the test allows the kernels' last-bit noise and nothing more.
MAX_LEVEL_DIFFERENCE = 1
MAX_SHARE_DIFFERENT = 1e-3


def test_images_are_bit_identical_to_the_recorded_ones():
    reference = np.load(REFERENCE)
    made = cases()
    assert sorted(made) == sorted(reference.files)
    for name, images in made.items():
        difference = np.abs(images.astype(int) - reference[name].astype(int))
        assert difference.max() <= MAX_LEVEL_DIFFERENCE and (difference > 0).mean() <= MAX_SHARE_DIFFERENT, (
            f"{name}: images differ from the recorded ones (max {difference.max()} levels, "
            f"{(difference > 0).mean():.2%} of values)")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **cases())
    print(f"wrote {REFERENCE}")
