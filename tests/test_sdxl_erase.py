"""Erasing with SPM membranes on SDXL (pipelines/erase.py on the tiny SDXL layout): every UNet call of the erasing
objective gets each row's pooled text and the native size ids, an anchor's pooled text is drawn from the loop's
generator, a resumed run equals the uninterrupted one, and the membrane works at generation (gamma per prompt in the
settings), in `studio erase` and in the Erase tab. x_t is sampled on a 6-step schedule: seconds per run."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapters import SPM, load_adapter
from pipelines import EMBEDDED_MODEL, LoadedModel, erase, generate, membrane_gammas, parse_infotext
from pipelines.architectures import tiny_sdxl_pipeline
from pipelines.erase import ErasingObjective, erase_config
from pipelines.train import train
from studio.cli import main
from studio.library import AdapterLibrary

NATIVE_SIZE_IDS = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]  # (original h, w, crop top, left, target h, w): 64 px, no crop


@pytest.fixture(autouse=True)
def short_schedule(monkeypatch):
    """x_t sampled on a 6-step schedule instead of 30: the same code, a faster test."""
    monkeypatch.setattr(sys.modules["pipelines.erase"], "SAMPLING_STEPS", 6)


def record_unet_calls(pipe) -> tuple[list[dict], object]:
    """Each UNet call's latent rows and added conditions, and the hook's handle (remove it)."""
    calls = []

    def record(module, args, kwargs):
        calls.append({"rows": args[0].shape[0], **kwargs["added_cond_kwargs"]})

    return calls, pipe.unet.register_forward_pre_hook(record, with_kwargs=True)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def test_a_membrane_trains_on_sdxl_and_erases_with_gamma_per_prompt(tiny_sdxl, tmp_path):
    calls, handle = record_unet_calls(tiny_sdxl)
    try:
        result = erase(tiny_sdxl, "triangle", steps=2, num_anchors=2, learning_rate=1e-2, output_dir=tmp_path)
    finally:
        handle.remove()
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    # Sampling x_t, the frozen and the trained predictions: one pooled-text row per latent row, native size ids.
    assert calls and all(c["text_embeds"].shape[0] == c["rows"] for c in calls)
    assert all(c["time_ids"].tolist() == [NATIVE_SIZE_IDS] * c["rows"] for c in calls)

    membrane = load_adapter(result.adapter_path, tiny_sdxl.unet)
    assert isinstance(membrane, SPM) and membrane.base_family == "SDXL"
    membrane.detach()
    kwargs = dict(seed=0, num_inference_steps=2, scheduler="Euler")
    base = generate(tiny_sdxl, "a red triangle", **kwargs)
    erased = generate(tiny_sdxl, "a red triangle", adapters=[(result.adapter_path, 1.0)], **kwargs)
    assert not np.array_equal(pixels(erased), pixels(base))
    params = parse_infotext(erased.settings[0].infotext())
    assert params["SPM gamma"] == "triangle: 1.000" and params["Adapters"] == "erase-triangle:1"
    other = generate(tiny_sdxl, "a blue circle", adapters=[(result.adapter_path, 1.0)], **kwargs)
    gamma = float(parse_infotext(other.settings[0].infotext())["SPM gamma"].split(": ")[1])
    gammas = membrane_gammas(tiny_sdxl, result.adapter_path, ["a red triangle", "a blue circle"])
    assert gammas[0] == 1.0 and 0 < gammas[1] < 1 and gamma == pytest.approx(gammas[1], abs=1e-3)


def test_resume_on_sdxl_reproduces_the_uninterrupted_run(tiny_sdxl, tmp_path):
    """4 steps in one go == 2 steps, cancel, scrambled RNGs, resume to 4: the anchors' pooled text comes from the
    loop's generator too."""
    def config(out, **overrides):
        return erase_config(["triangle", "circle"], steps=4, num_anchors=1, learning_rate=1e-3, output_dir=out,
                            gradient_accumulation_steps=2, lr_scheduler="cosine", warmup_steps=1,
                            checkpoint_every=2, keep_last=1, **overrides)

    whole = train(tiny_sdxl, config(tmp_path / "a"))
    stop_after_2 = iter([False] * 2 + [True])
    first = train(tiny_sdxl, config(tmp_path / "b"), should_stop=lambda: next(stop_after_2))
    assert first.cancelled and first.step == 2
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    resumed = train(tiny_sdxl_pipeline(str(EMBEDDED_MODEL / "tokenizer")), config(tmp_path / "b", resume="latest"))
    assert resumed.step == 4 and resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)
    a, b = load_file(whole.adapter_path), load_file(resumed.adapter_path)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_up" in k)


def test_an_anchor_s_pooled_text_is_drawn_from_the_generator_and_reaches_the_unet(tiny_sdxl, tmp_path):
    config = erase_config("triangle", num_anchors=3, output_dir=tmp_path)
    objective = ErasingObjective(tiny_sdxl, config, config.adapter_config())
    spm = SPM.from_unet(tiny_sdxl.unet, config.adapter_config())
    spm.attach(tiny_sdxl.unet)
    try:
        objective.begin(spm)
        batch = objective.draw(step=0, count=2, generator=torch.Generator().manual_seed(3))
        again = objective.draw(step=0, count=2, generator=torch.Generator().manual_seed(3))
        other = objective.draw(step=0, count=2, generator=torch.Generator().manual_seed(4))
        pooled = batch["pooled_anchors"]
        concept = objective.pooled_cpu[0]
        assert pooled.shape == (2, 3, *concept.shape) and batch["anchors"].shape[:2] == (2, 3)
        assert torch.equal(pooled, again["pooled_anchors"]) and not torch.equal(pooled, other["pooled_anchors"])
        ratios = pooled.flatten(0, 1).norm(dim=-1) / concept.norm()  # at the concept's scale, not its direction
        assert ratios.min() >= 0.8 and ratios.max() <= 1.2 and len(set(ratios.tolist())) == 6

        calls, handle = record_unet_calls(tiny_sdxl)
        try:
            objective.loss(lambda x, t, text, added: tiny_sdxl.unet(x, t, text, added_cond_kwargs=added).sample,
                           batch, slice(1, 2))
        finally:
            handle.remove()
    finally:
        spm.detach()
    # The trained prediction's rows: the concept's real pooled text, then row 1's K anchors' drawn pooled text.
    expected = torch.cat([concept[None], pooled[1]])
    torch.testing.assert_close(calls[-1]["text_embeds"], expected)


def test_studio_erase_on_an_sdxl_model_adds_the_membrane_to_the_library(tiny_sdxl, tmp_path, monkeypatch, capsys):
    tiny_sdxl.save_pretrained(tmp_path / "sdxl")
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    assert main(["erase", "triangle", "--steps", "1", "--anchors", "1", "--model", str(tmp_path / "sdxl"),
                 "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "added to the library as 'erase-triangle'"
    (entry,) = AdapterLibrary().list()
    assert entry.method == "spm" and load_adapter(entry.path, tiny_sdxl.unet).base_family == "SDXL"


def test_the_erase_tab_serves_sdxl_and_compares_with_gamma(tiny_sdxl, tmp_path, monkeypatch):
    import gradio as gr

    from studio.ui import erase_tab
    from studio.ui.common import unavailable_reason

    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    model = LoadedModel(pipe=tiny_sdxl, family="SDXL", source="test", name="tiny-sdxl", hash="0")
    assert unavailable_reason(erase_tab, model) is None
    with gr.Blocks() as demo:
        erase_tab.build(model, tmp_path)
    assert "erase-concepts" in {getattr(block, "elem_id", None) for block in demo.blocks.values()}

    result = erase(tiny_sdxl, "triangle", steps=1, num_anchors=1, learning_rate=1e-2, output_dir=tmp_path / "run")
    AdapterLibrary().add(result.adapter_path)
    gallery, table = erase_tab.compare(model, "erase-triangle", ["a red triangle", "a blue circle"], 1.0, 0, 2,
                                       tmp_path / "images")
    assert len(gallery) == 4 and table[0] == ["a red triangle", 1.0] and 0 < table[1][1] < 1
