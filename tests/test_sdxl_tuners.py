"""CSC-Tuner and orthogonal LoRA on SDXL (the tiny SDXL layout), trained through pipelines.train as on SD 1.x: a few
steps with finite losses and each caption's added conditions, an adapter file built for SDXL that changes the image
and leaves the model bit for bit as it was once detached, and a CSC-Tuner whose control image steers the output.
Images are 64x64 from 2 steps: seconds per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_helpers import train_checking_added_conditions
from PIL import Image

from adapters import OrthoLoRA, OrthoLoRAConfig, attached_adapters, load_adapter
from pipelines import ControlSpec, generate
from pipelines.train import TrainConfig
from studio.shapes.world import Scene, ShapeObject, render

STEPS = 2  # sampling steps of every image


def stars(folder: Path) -> Path:
    """Three 64x64 stars at different places, uncaptioned (the trigger word captions them)."""
    folder.mkdir(parents=True)
    for i, position in enumerate(("left", "center", "right")):
        render(Scene((ShapeObject("red", "star", position, "large"),))).save(folder / f"{i}.png")
    return folder


def shape_image(shape: str, position: str) -> Image.Image:
    return render(Scene((ShapeObject("blue", shape, position, "large"),), "white")).resize((64, 64))


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def train_on_sdxl(pipe, method: str, tmp_path: Path, **options) -> Path:
    """3 steps of `method` on the stars; every UNet call (training and samples) gets one pooled-text row per latent
    row. Returns the adapter file."""
    config = TrainConfig(data_dir=stars(tmp_path / "data"), output_dir=tmp_path / "run", method=method,
                         method_options=options, trigger="sks", steps=3, batch_size=2, learning_rate=1e-2,
                         checkpoint_every=0, sample_steps=STEPS, sample_prompts=["sks"],
                         library_dir=tmp_path / "library")
    result = train_checking_added_conditions(pipe, config)
    return result.adapter_path


@pytest.mark.parametrize("method", ["csc_tuner", "ortho_lora"])
def test_trained_on_sdxl_it_changes_the_image_and_detaches_bit_exactly(tiny_sdxl, method, tmp_path):
    unet = tiny_sdxl.unet
    before = {name: t.clone() for name, t in unet.state_dict().items()}
    options = {"dense_kernel": 1} if method == "csc_tuner" else {}
    path = train_on_sdxl(tiny_sdxl, method, tmp_path, **options)
    adapter = load_adapter(path, unet)
    assert adapter.base_family == "SDXL"
    if method == "ortho_lora":  # only B trains: A is still slot 0's basis on this UNet
        built = OrthoLoRA.from_unet(unet, OrthoLoRAConfig(slot=0))
        assert all(torch.equal(adapter.lora_A[k].weight, built.lora_A[k].weight) for k in built.paths)
        assert any(up.weight.abs().max() > 0 for up in adapter.lora_B.values())
    adapter.detach()

    control = [ControlSpec("canny", shape_image("square", "center"))] if method == "csc_tuner" else []
    kwargs = dict(seed=1, num_inference_steps=STEPS, scheduler="Euler")
    base = pixels(generate(tiny_sdxl, "sks", **kwargs))
    tuned = pixels(generate(tiny_sdxl, "sks", adapters=[(path, 1.0)], control=control, **kwargs))
    assert not np.array_equal(tuned, base)
    # Detached after the call: the same image as before, the same UNet weights and modules as before training.
    assert np.array_equal(pixels(generate(tiny_sdxl, "sks", **kwargs)), base)
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not attached_adapters(unet)


def test_a_csc_tuner_trained_on_sdxl_follows_its_control_image(tiny_sdxl, tmp_path):
    path = train_on_sdxl(tiny_sdxl, "csc_tuner", tmp_path, dense_kernel=1)
    kwargs = dict(seed=1, num_inference_steps=STEPS, scheduler="Euler")
    outputs = [pixels(generate(tiny_sdxl, "sks", control=[ControlSpec("canny", image, adapter=path)], **kwargs))
               for image in (shape_image("square", "left"), shape_image("circle", "right"))]
    assert not np.array_equal(outputs[0], outputs[1])
