"""generate(): determinism, samplers, batches, PNG metadata, and refusals before any work."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import (
    SCHEDULERS,
    GenerationInterrupted,
    InputError,
    LoadedModel,
    generate,
    parse_infotext,
    save_images,
    save_png,
)
from pipelines.generate import MAX_SEED, image_generators

STEPS = 3


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_and_different_seed_different_image(embedded: LoadedModel):
    a = generate(embedded, "a red circle", seed=1, num_inference_steps=STEPS)
    b = generate(embedded, "a red circle", seed=1, num_inference_steps=STEPS)
    c = generate(embedded, "a red circle", seed=2, num_inference_steps=STEPS)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


def test_default_size_is_the_models_native_size(embedded: LoadedModel):
    result = generate(embedded, "a blue square", seed=0, num_inference_steps=2)
    native = embedded.pipe.unet.config.sample_size * embedded.pipe.vae_scale_factor
    assert result.images[0].size == (native, native)
    assert (result.settings[0].width, result.settings[0].height) == (native, native)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs_and_leaves_the_pipeline_as_it_was(embedded: LoadedModel, scheduler: str):
    before = embedded.pipe.scheduler
    result = generate(embedded, "a green triangle", seed=3, num_inference_steps=STEPS, scheduler=scheduler)
    assert result.settings[0].sampler == scheduler
    assert result.images[0].mode == "RGB"
    assert embedded.pipe.scheduler is before


def test_batch_seeds_count_up_and_each_image_regenerates_alone(embedded: LoadedModel):
    batch = generate(embedded, "a yellow circle", seed=10, num_inference_steps=STEPS, num_images_per_prompt=3,
                     width=32, height=48)
    assert len(batch.images) == 3 and [s.seed for s in batch.settings] == [10, 11, 12]
    assert batch.images[0].size == (32, 48)
    alone = generate(embedded, "a yellow circle", seed=11, num_inference_steps=STEPS, width=32, height=48)
    # Batched and single convolutions round differently in the last bit: allow one grey level.
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1


def test_callback_reports_every_step_and_can_interrupt(embedded: LoadedModel):
    seen = []
    generate(embedded, "a circle", seed=0, num_inference_steps=4, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(GenerationInterrupted):
        generate(embedded, "a circle", seed=0, num_inference_steps=4, callback=lambda i, n: i == 2)


def test_png_carries_a1111_parameters_and_exact_json(embedded: LoadedModel, tmp_path):
    result = generate(embedded, "a red circle, on the left: large", negative_prompt="blurry", seed=7,
                      num_inference_steps=STEPS, guidance_scale=5.0, scheduler="Euler a", num_images_per_prompt=2)
    paths = save_images(result, tmp_path)
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"]
    assert [p.name for p in save_images(result, tmp_path)] == ["00002-7.png", "00003-8.png"]  # numbering goes on
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))

    png = Image.open(paths[1])
    infotext = png.text["parameters"]
    assert infotext.splitlines()[0] == "a red circle, on the left: large"  # prompts are never quoted
    params = parse_infotext(infotext)
    assert params["Prompt"] == "a red circle, on the left: large"
    assert params["Negative prompt"] == "blurry"
    assert params["Steps"] == str(STEPS) and params["Sampler"] == "Euler a" and params["CFG scale"] == "5.0"
    assert params["Seed"] == "8" and params["Size"] == "64x64"
    assert params["Model"] == embedded.name and params["Model hash"] == embedded.hash

    exact = json.loads(png.text["studio"])
    assert exact["seed"] == 8 and exact["prompt"] == "a red circle, on the left: large"
    assert exact["scheduler_config"]["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert "diffusers" in exact["versions"]
    assert np.array_equal(pixels(png.convert("RGB")), pixels(result.images[1]))


def test_infotext_quotes_values_with_separators(embedded: LoadedModel, tmp_path):
    settings = generate(embedded, "x", seed=1, num_inference_steps=1).settings[0]
    odd = dataclasses.replace(settings, model_name="my model, v2: final")
    assert 'Model: "my model, v2: final"' in odd.infotext()
    path = save_png(Image.new("RGB", (8, 8)), odd, tmp_path / "odd.png")
    assert parse_infotext(Image.open(path).text["parameters"])["Model"] == "my model, v2: final"


def test_empty_prompt_is_allowed(embedded: LoadedModel):
    result = generate(embedded, "", seed=0, num_inference_steps=2)
    assert result.images[0].size == (64, 64) and result.settings[0].prompt == ""


def test_long_prompt_is_truncated_with_a_warning(embedded: LoadedModel):
    limit = embedded.pipe.tokenizer.model_max_length
    prompt = " ".join(["red"] * limit)  # one token each, plus start and end tokens
    with pytest.warns(UserWarning, match=r"prompt is \d+ tokens, the text encoder reads \d+: the last 2 tokens"):
        result = generate(embedded, prompt, seed=0, num_inference_steps=1)
    assert result.images  # truncated, not refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 62}, "width=62 is not a multiple of 8: use 56 or 64"),
        ({"height": 100}, "height=100 is not a multiple of 8: use 96 or 104"),
        ({"width": 4096}, "width=4096 is out of range"),
        ({"height": 0}, "height=0 is out of range"),
        ({"num_inference_steps": 0}, "num_inference_steps=0 must be a positive integer"),
        ({"num_inference_steps": -3}, "num_inference_steps=-3 must be a positive integer"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0 must be a finite number from 0 to 30"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt=0 must be from 1"),
        ({"scheduler": "PLMS"}, "scheduler='PLMS' is unknown: use one of DDIM, Euler"),
        ({"seed": -5}, "seed=-5 must be an integer from 0"),
    ],
)
def test_bad_settings_are_refused_before_any_work(embedded: LoadedModel, kwargs: dict, message: str):
    calls = []
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        generate(embedded, "a red circle", **kwargs, callback=lambda i, n: calls.append(i))
    assert calls == []


def test_seeds_wrap_past_the_range_so_every_recorded_seed_regenerates_its_image(embedded: LoadedModel):
    # --seed 4294967295 --n 2: the second image's seed wraps to 0 (as A1111's), a seed that can be entered again.
    batch = generate(embedded, "a blue square", seed=MAX_SEED, num_inference_steps=2, num_images_per_prompt=2)
    assert [s.seed for s in batch.settings] == [MAX_SEED, 0]
    # The starting noise of image k is bit-identical to that of its recorded seed alone...
    batch_generators, _ = image_generators(MAX_SEED, None, 2)
    alone_generators, _ = image_generators(0, None, 1)
    assert torch.equal(torch.randn(1, 4, 16, 16, generator=batch_generators[1]),
                       torch.randn(1, 4, 16, 16, generator=alone_generators[0]))
    for image, settings in zip(batch.images, batch.settings):
        alone = generate(embedded, "a blue square", seed=settings.seed, num_inference_steps=2)
        # ...and so is the image, but for batched and single convolutions rounding differently: one grey level.
        assert np.abs(pixels(image) - pixels(alone.images[0])).max() <= 1
    assert [s.seed for s in generate(embedded, "x", seed=MAX_SEED - 1, num_inference_steps=1,
                                     num_images_per_prompt=3).settings] == [MAX_SEED - 1, MAX_SEED, 0]
