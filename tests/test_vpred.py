"""SD 2.x-style v-prediction: generation, a tuner trained a few steps, and UAM editing (whose inversion maths
read the UNet's output by the scheduler's prediction type, pipelines/edit.py `model_output_to_epsilon`).

Two v-prediction models:
- `v_tiny`: the random-weight tiny SD 1.5 layout with the scheduler set to v_prediction (shapes and plumbing);
- `v_shapes`: the trained embedded Shapes model re-expressed as a v-predictor by a forward hook
  (v = (ε − √(1−ᾱ)·z_t)/√ᾱ). Read correctly it must behave exactly as the ε model does, and read as ε
  it must not: a numerical test of the conversion on a model whose outputs mean something.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from adapters.context import Row
from pipelines import EMBEDDED_MODEL, generate
from pipelines.architectures import tiny_sd15_pipeline
from pipelines.edit import (
    INVERSION_CACHE,
    _Branches,
    _run_denoising,
    ddim_schedule,
    edit,
    encode_prompts,
    invert,
    model_output_to_epsilon,
    predict_x0,
    reconstruct,
)
from pipelines.train import TrainConfig, train
from studio.shapes.world import Scene, ShapeObject, render

STEPS = 4


def with_prediction_type(pipe: StableDiffusionPipeline, prediction_type: str) -> StableDiffusionPipeline:
    """The same modules with a scheduler that reads the UNet's output as `prediction_type`."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


@pytest.fixture
def v_tiny() -> StableDiffusionPipeline:
    return with_prediction_type(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), "v_prediction")


@contextlib.contextmanager
def v_expressed(embedded) -> Iterator[StableDiffusionPipeline]:
    """The embedded ε model turned into a v-predictor by a forward hook on its UNet, for the `with` block only
    (the embedded model is shared by the session; anything run on it inside the block sees v too)."""
    alphas = embedded.pipe.scheduler.alphas_cumprod.float()

    def to_velocity(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        a = alphas[torch.as_tensor(timestep).long().cpu()].view(-1, 1, 1, 1).to(sample.device)
        eps = output[0] if isinstance(output, tuple) else output.sample
        v = (eps - (1 - a) ** 0.5 * sample) / a**0.5  # ε = √(1−ᾱ)·z_t + √ᾱ·v solved for v
        return (v,) if isinstance(output, tuple) else type(output)(sample=v)

    handle = embedded.pipe.unet.register_forward_hook(to_velocity, with_kwargs=True)
    INVERSION_CACHE.clear()
    try:
        yield with_prediction_type(embedded.pipe, "v_prediction")
    finally:
        handle.remove()
        INVERSION_CACHE.clear()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return render(Scene((ShapeObject("red", "circle", "center"),), "white"))


def test_conversion_gives_the_v_formulas_x0_and_inverts_the_velocity():
    """ε from v, then x̂0 = predict_x0(z_t, ε), equals x0 = √ᾱ·z_t − √(1−ᾱ)·v; and the velocity of (x0, ε)
    (diffusers' get_velocity) converts back to that ε and x0."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).unbind()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([600])
    a = scheduler.alphas_cumprod[600].double()
    z_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    v = scheduler.get_velocity(x0[None], noise[None], t)[0].double()
    eps = model_output_to_epsilon(z_t, v, a, "v_prediction")
    torch.testing.assert_close(eps, noise)
    torch.testing.assert_close(predict_x0(z_t, eps, a), x0)
    torch.testing.assert_close(model_output_to_epsilon(z_t, x0, a, "sample"), noise)
    assert model_output_to_epsilon(z_t, noise, a, "epsilon") is noise


def test_generate_on_v_prediction_differs_from_the_epsilon_reading(v_tiny):
    v = generate(v_tiny, "a red circle", num_inference_steps=STEPS, seed=1).images[0]
    as_eps = generate(with_prediction_type(v_tiny, "epsilon"), "a red circle", num_inference_steps=STEPS,
                      seed=1).images[0]
    assert np.abs(pixels(v) - pixels(as_eps)).max() > 0.05


def test_generate_on_the_v_expressed_shapes_model_matches_the_epsilon_model(embedded):
    kwargs = dict(num_inference_steps=STEPS, seed=3, guidance_scale=5.0)
    eps_image = generate(embedded, "a red circle", **kwargs).images[0]
    with v_expressed(embedded) as v_shapes:
        v_image = generate(v_shapes, "a red circle", **kwargs).images[0]
    assert np.abs(pixels(eps_image) - pixels(v_image)).max() <= 2 / 255  # fp32 rounding, then 8-bit


def test_a_lora_trains_on_v_prediction_with_a_finite_loss_and_changes_the_output(v_tiny, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate(("red", "blue")):
        render(Scene((ShapeObject(color, "star"),))).save(data / f"{i}-{color}.png")
    config = TrainConfig(data_dir=data, output_dir=tmp_path / "out", trigger="sks", method="lora",
                         method_options={"rank": 2}, steps=3, batch_size=2, learning_rate=1e-2,
                         checkpoint_every=0, sample_steps=2)
    result = train(v_tiny, config)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))

    before = generate(v_tiny, "sks", num_inference_steps=STEPS, seed=0).images[0]
    after = generate(v_tiny, "sks", num_inference_steps=STEPS, seed=0,
                     adapters=[(result.adapter_path, 1.0)]).images[0]
    assert np.abs(pixels(before) - pixels(after)).max() > 0


def test_inversion_reconstructs_only_when_v_is_read_as_v(embedded, image):
    """Invert with "" and reconstruct: read as v, the v-expressed model reproduces the ε model's reconstruction
    and stays close to the input; read as ε, the same outputs drive the latents far off."""
    target = pixels(image)
    eps_model = reconstruct(embedded, invert(embedded, image, num_inference_steps=10, use_cache=False)).image
    with v_expressed(embedded) as v_shapes:
        as_v = reconstruct(v_shapes, invert(v_shapes, image, num_inference_steps=10, use_cache=False)).image
        wrong = with_prediction_type(v_shapes, "epsilon")
        as_eps = reconstruct(wrong, invert(wrong, image, num_inference_steps=10, use_cache=False)).image

    assert np.abs(pixels(as_v) - pixels(eps_model)).max() <= 2 / 255
    error_v, error_eps = np.abs(pixels(as_v) - target).mean(), np.abs(pixels(as_eps) - target).mean()
    assert error_v < 0.5 * error_eps, (error_v, error_eps)


def test_inverted_latent_returns_to_the_input_latent(embedded, image):
    """In latent space: DDIM inversion then denoising with "" lands near z0 when v is read as v."""
    errors = {}
    with v_expressed(embedded) as v_shapes:
        for kind in ("v_prediction", "epsilon"):
            pipe = with_prediction_type(v_shapes, kind)
            inversion = invert(pipe, image, num_inference_steps=10, use_cache=False)
            branches = _Branches(encode_prompts(pipe, [""]), names=(Row("", "uniform"),), guided=(False,))
            # the loop behind `reconstruct`, stopped before decoding
            latents, _ = _run_denoising(pipe, branches, inversion.uniform_latents, inversion.schedule)
            errors[kind] = float((latents - inversion.image_latents).abs().mean())
    assert errors["v_prediction"] < 0.25 * errors["epsilon"], errors


def test_edit_runs_end_to_end_on_v_prediction(v_tiny, embedded, image):
    result = edit(v_tiny, image, "a red circle", "a blue circle", num_inference_steps=STEPS, mask_start_t=600,
                  use_cache=False)
    assert result.image.size == image.size and result.mask.size == image.size
    assert ddim_schedule(v_tiny.scheduler.config, STEPS).timesteps == result.inversion.schedule.timesteps
    with v_expressed(embedded) as v_shapes:
        shapes = edit(v_shapes, image, "a red circle", "a blue circle", num_inference_steps=STEPS,
                      mask_start_t=600, use_cache=False)
    assert np.isfinite(pixels(shapes.image)).all()
