"""Erasing with SPM membranes through the one training loop (pipelines/erase.py): the objective's loss and draws,
configs without data, exact resume, several concepts, the NaN stop, `erase`, generation with the membrane and the
`studio erase` command. On the tiny SD 1.5 pipeline (random weights, 8x8 latents) and the embedded model."""

from __future__ import annotations

import json
import random
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from adapters import SPM, SPMConfig, read_metadata, save_adapter
from pipelines import EMBEDDED_MODEL, erase, generate, membrane_gammas, parse_infotext, save_images
from pipelines.architectures import tiny_sd15_pipeline
from pipelines.erase import SAMPLING_STEPS, ErasingObjective, latent_anchor, training_timestep
from pipelines.train import TrainConfig, TrainConfigError, TrainingDiverged, list_checkpoints, train
from studio.cli import main
from studio.library import AdapterLibrary


@pytest.fixture
def short_schedule(monkeypatch):
    """x_t sampled on a 6-step schedule instead of 30: the same code, a faster test."""
    monkeypatch.setattr(sys.modules["pipelines.erase"], "SAMPLING_STEPS", 6)


def tiny():
    return tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))


def fast(out, **overrides) -> TrainConfig:
    """A few steps, one anchor: seconds on the tiny pipeline."""
    options = {"concepts": ["triangle"], "num_anchors": 1, **overrides.pop("options", {})}
    settings = dict(output_dir=out, method="spm", method_options=options, steps=3, learning_rate=1e-3,
                    checkpoint_every=0)
    return TrainConfig(**{**settings, **overrides})


# -- the objective --------------------------------------------------------------------------------


def test_training_timestep_maps_the_sampled_depth_as_the_reference():
    assert [training_timestep(d, 1000) for d in (1, 15, SAMPLING_STEPS - 1)] == [966, 499, 33]


def test_anchors_are_random_embeddings_at_the_targets_scale():
    target = torch.randn(32, 16)
    g = torch.Generator().manual_seed(0)
    anchors = [latent_anchor(target, g) for _ in range(50)]
    ratios = torch.tensor([a.norm() / target.norm() for a in anchors])
    assert anchors[0].shape == target.shape and 0.8 <= ratios.min() and ratios.max() <= 1.2
    assert ratios.std() > 0.05  # the scale is drawn, not fixed
    again = latent_anchor(target, torch.Generator().manual_seed(0))
    assert torch.equal(again, anchors[0])  # a pure function of the generator's state


def test_loss_is_the_erasing_loss_plus_weighted_anchoring(tmp_path):
    """The objective's loss, recomputed by hand: x_t sampled with the membrane on, the frozen predictions with it
    off (scale 0), the trained ones with it on."""
    pipe = tiny()
    config = fast(tmp_path, options={"surrogate": "circle", "eta": 2.0, "anchor_weight": 10.0, "num_anchors": 2})
    objective = ErasingObjective(pipe, config, config.adapter_config())
    spm = SPM.from_unet(pipe.unet, config.adapter_config())
    torch.manual_seed(0)
    for up in spm.lora_B.values():  # a membrane that changes something
        torch.nn.init.normal_(up.weight, std=0.5)
    spm.attach(pipe.unet)
    objective.begin(spm)
    batch = objective.draw(step=0, count=2, generator=torch.Generator().manual_seed(3))
    assert batch["anchors"].shape == (2, 2, 32, 32) and 1 <= batch["depth"] < SAMPLING_STEPS

    def unet(x, t, text, added_cond=None):
        return pipe.unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added_cond).sample

    loss = objective.loss(unet, batch, slice(1, 2))  # the second row only
    text = pipe.encode_prompt(["triangle", "circle", ""], "cpu", 1, False)[0].detach()
    x = batch["noise"][1:2]
    for t in objective.sampler.timesteps[:batch["depth"]]:
        uncond, cond = unet(torch.cat([x, x]), t, text[[2, 0]]).chunk(2)
        x = objective.sampler.step(uncond + 3 * (cond - uncond), t, x).prev_sample
    t = training_timestep(batch["depth"], 1000)
    anchors = batch["anchors"][1]
    with torch.no_grad():
        spm.set_scale(0.0)
        frozen = [unet(x, t, e[None]) for e in (text[0], text[1], *anchors)]
        spm.set_scale(1.0)
        tuned = [unet(x, t, e[None]) for e in (text[0], *anchors)]
    erasing = F.mse_loss(tuned[0], frozen[1] - 2.0 * (frozen[0] - frozen[1]))
    anchoring = F.mse_loss(torch.cat(tuned[1:]), torch.cat(frozen[2:]))
    torch.testing.assert_close(loss.detach(), erasing + 10.0 * anchoring, rtol=1e-5, atol=1e-6)
    assert anchoring > 0 and spm.scale == 1.0


def test_several_concepts_take_turns_by_step(tmp_path):
    pipe = tiny()
    config = fast(tmp_path, options={"concepts": ["triangle", "circle", "star"]})
    objective = ErasingObjective(pipe, config, config.adapter_config())
    g = torch.Generator().manual_seed(0)
    objective.text_cpu = torch.randn(5, 32, 32)
    assert [objective.draw(step, 1, g)["concept"] for step in range(5)] == [0, 1, 2, 0, 1]


# -- configs --------------------------------------------------------------------------------------


def test_a_membrane_needs_no_data_and_a_data_method_says_so(tmp_path):
    assert fast(tmp_path).data_dir is None
    assert TrainConfig.from_dict({"method": "spm", "method_options": {"concepts": ["x"]}}).method == "spm"
    with pytest.raises(TrainConfigError, match="data_dir=.*: is set, but spm learns without images; unset it"):
        fast(tmp_path, data_dir=tmp_path)
    with pytest.raises(TrainConfigError, match="num_class_images=2: must be 0 for spm"):
        fast(tmp_path, num_class_images=2, class_prompt="star")
    with pytest.raises(TrainConfigError, match="data_dir=None: is not a folder; pass the folder that holds"):
        TrainConfig(method="lora")
    with pytest.raises(TrainConfigError, match=r"method_options=.*concepts must be a non-empty list .*spm takes"):
        TrainConfig(method="spm")


@pytest.mark.parametrize("concepts, message", [
    (["   "], r"concepts\[0\]='   ' is empty"),
    ([" ".join(["red"] * 40)], "is 42 tokens but the text encoder reads 32"),
])
def test_bad_concepts_are_refused_before_any_work(tmp_path, concepts, message):
    with pytest.raises(TrainConfigError, match=message):
        erase(tiny(), concepts, steps=1, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- training through the loop --------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(tmp_path, short_schedule):
    """4 steps in one go == 2 steps, cancel, new objects and scrambled RNGs, resume to 4: the x_t sampling depth,
    noise and anchors come from the loop's generator; gradient accumulation splits the rows."""
    settings = dict(steps=4, gradient_accumulation_steps=2, lr_scheduler="cosine", warmup_steps=1,
                    checkpoint_every=2, keep_last=1, options={"concepts": ["triangle", "circle"]})
    whole = train(tiny(), fast(tmp_path / "a", **settings))
    stop_after_2 = iter([False] * 2 + [True])
    first = train(tiny(), fast(tmp_path / "b", **settings), should_stop=lambda: next(stop_after_2))
    assert first.cancelled and first.step == 2
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    resumed = train(tiny(), fast(tmp_path / "b", resume="latest", **settings))
    assert resumed.step == 4 and resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)
    a, b = load_file(whole.adapter_path), load_file(resumed.adapter_path)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"spm: resume max abs diff {diff:.3g}")
    assert diff <= 1e-6 and any(t.abs().max() > 0 for k, t in a.items() if "lora_up" in k)


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, short_schedule):
    calls = []

    def nan_in_step_3(self):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else None

    monkeypatch.setattr(SPM, "regularization_loss", nan_in_step_3)
    with pytest.raises(TrainingDiverged, match=r"loss is nan in step 3\. .*step-000002"):
        train(tiny(), fast(tmp_path, steps=4, checkpoint_every=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]


def test_erase_writes_a_membrane_that_generate_applies_with_its_gamma(tmp_path):
    pipe = tiny()
    seen = []
    result = erase(pipe, "triangle", steps=2, num_anchors=1, learning_rate=1e-2, output_dir=tmp_path,
                   sample_prompts=["a triangle"], progress=seen.append)
    assert result.adapter_path == tmp_path / "erase-triangle.safetensors" and len(result.losses) == 2
    assert all(np.isfinite(result.losses)) and [p.step for p in seen] == [0, 1, 2]
    meta = read_metadata(result.adapter_path)
    assert meta["studio.method"] == "spm"
    assert json.loads(meta["studio.config"])["concepts"] == ["triangle"]
    training = json.loads(meta["studio.training"])
    assert (training["max_grad_norm"], training["sampling_steps"], training["resolution"]) == (None, 30, 64)

    base = generate(pipe, "a red triangle", seed=0, num_inference_steps=2)
    erased = generate(pipe, "a red triangle", seed=0, num_inference_steps=2, adapters=[(result.adapter_path, 1.0)])
    assert not np.array_equal(np.asarray(erased.images[0]), np.asarray(base.images[0]))
    path = save_images(erased, tmp_path / "images")[0]
    params = parse_infotext(Image.open(path).text["parameters"])
    assert params["SPM gamma"] == "triangle: 1.000" and params["Adapters"] == "erase-triangle:1"
    gammas = membrane_gammas(pipe, result.adapter_path, ["a red triangle", "a blue circle"])
    assert gammas[0] == 1.0 and 0 < gammas[1] < 1


def test_cli_erases_and_adds_the_membrane_to_the_library(tmp_path, monkeypatch, capsys, short_schedule):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    out = tmp_path / "out"
    assert main(["erase", "triangle", "--concept", "star", "--steps", "1", "--anchors", "1", "--transport",
                 "squared", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [str(out / "erase-triangle-star.safetensors"), "added to the library as 'erase-triangle-star'"]
    (entry,) = AdapterLibrary().list()
    assert entry.method == "spm"
    config = json.loads(read_metadata(entry.path)["studio.config"])
    assert (config["concepts"], config["transport"]) == (["triangle", "star"], "squared")


@pytest.mark.parametrize("argv, message", [
    (["erase", " "], r"error: method_options=.*concepts\[0\]=' ' is empty"),
    (["erase", "triangle", "--eta", "-1"], "error: method_options=.*eta must be a finite number >= 0"),
    (["erase", "triangle", "--steps", "0"], "error: steps=0: must be an integer >= 1"),
])
def test_cli_refuses_bad_input_before_loading_the_model(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pipelines.load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert re.match(message, capsys.readouterr().err)


def test_cli_refuses_an_unknown_transport(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "triangle", "--transport", "cubic"])
    assert "invalid choice: 'cubic'" in capsys.readouterr().err


def test_cli_refuses_a_concept_the_tokenizer_would_truncate(tmp_path, capsys):
    assert main(["erase", " ".join(["red"] * 40), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    assert "is 42 tokens but the text encoder reads 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_membrane_for_another_architecture(tmp_path, capsys):
    spm = SPM.from_unet(tiny().unet, SPMConfig(concepts=["triangle"]))
    path = save_adapter(spm, tmp_path / "tiny-membrane.safetensors")
    assert main(["generate", "a red triangle", "--adapter", str(path), "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "tiny-membrane.safetensors was trained on an SD1 UNet with fingerprint" in capsys.readouterr().err
