"""Warm-starting the Shapes UNet: attention added at a new resolution starts as an exact no-op, then trains;
attention the new layout lacks is dropped; the caption-dropout rows show the whole world."""

import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from pipelines.errors import StudioError
from pipelines.loading import EMBEDDED_MODEL
from pipelines.statefile import load_state
from studio.cli import main as cli_main
from studio.shapes import train as shapes_train
from studio.shapes.model import unet_config
from studio.shapes.train import main, train_vae, warm_start_unet


def _trained_two_level_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(cross_attention=(8, 4)))
    with torch.no_grad():  # every weight non-trivial, as after training (zero-init layers included)
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def test_the_default_layout_is_the_shipped_unets():
    """`studio shapes train` with its defaults rebuilds the architecture that ships in assets/."""
    shipped = UNet2DConditionModel.load_config(EMBEDDED_MODEL / "unet")
    default = UNet2DConditionModel(**unet_config()).config
    assert {k: default[k] for k in shipped if not k.startswith("_")} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in shipped.items() if not k.startswith("_")}
    # SD 1.x's pattern: text at the two higher resolutions, none at the lowest.
    assert shipped["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet_config((8, 4))["down_block_types"][0] == "DownBlock2D"


def test_grown_unet_starts_out_computing_what_the_trained_one_did():
    trained = _trained_two_level_unet()
    grown = UNet2DConditionModel(**unet_config(cross_attention=(16, 8, 4))).eval()
    warm_start_unet(grown, trained, log=lambda msg: None)
    assert grown.config.down_block_types[0] == "CrossAttnDownBlock2D"
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 32, 64)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(grown(x, t, text).sample, trained(x, t, text).sample)

    # The added blocks learn: their zeroed output projection gets a gradient from the first step.
    grown(x, t, text).sample.square().mean().backward()
    new_proj = grown.down_blocks[0].attentions[0].proj_out
    assert new_proj.weight.grad is not None and new_proj.weight.grad.abs().sum() > 0


def test_warm_start_drops_attention_the_new_layout_lacks_and_keeps_the_rest():
    trained = _trained_two_level_unet()
    sd15 = UNet2DConditionModel(**unet_config(cross_attention=(16, 8)))
    logged = []
    warm_start_unet(sd15, trained, log=logged.append)
    assert "dropped: down_blocks.2.attentions.0" in logged[0]
    own, theirs = sd15.state_dict(), trained.state_dict()
    shared = [k for k in own if k in theirs]
    assert len(shared) > 100 and all(torch.equal(own[k], theirs[k]) for k in shared)
    assert torch.count_nonzero(sd15.down_blocks[0].attentions[0].proj_out.weight) == 0  # added: a no-op


def test_warm_start_refuses_other_widths():
    other = dict(unet_config(), block_out_channels=(32, 96, 128))
    with pytest.raises(ValueError, match="do not fit this UNet.*same block widths"):
        warm_start_unet(UNet2DConditionModel(**unet_config()), UNet2DConditionModel(**other), log=lambda msg: None)


def test_a_unet_init_folder_without_a_model_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), "--unet-init", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no unet/config.json there" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_named_captions_never_name_held_out_content_and_the_unnamed_pool_shows_it():
    """What `train_unet` draws from: captions only ever name base shapes, filled; the pool behind the
    caption-dropout rows is a uniform draw over every shape and both styles."""
    from studio.shapes.train import render_pool
    from studio.shapes.world import BASE_SHAPES, HELD_OUT_SHAPES, SHAPES

    _, captions = render_pool(300, seed=200, shapes=BASE_SHAPES, outline_prob=0.0)
    words = {word for caption in captions for word in caption.split()}
    assert not words & {*HELD_OUT_SHAPES, "outline"} and {*BASE_SHAPES} <= words
    _, unnamed = render_pool(300, seed=400, shapes=SHAPES, outline_prob=0.5)
    held_out = sum(any(shape in caption for shape in HELD_OUT_SHAPES) for caption in unnamed) / len(unnamed)
    outlined = sum("outline" in caption for caption in unnamed) / len(unnamed)
    assert 0.4 < held_out < 0.75 and 0.4 < outlined < 0.75, (held_out, outlined)  # about half of each


def test_unknown_words_name_nothing_and_never_a_world_word():
    """A share of captions get a word no caption uses (inside the caption, or as the whole caption "a <word>");
    the rest of the caption, so what the image shows, is kept; the draw is seeded."""
    from studio.shapes.model import WORLD_WORDS
    from studio.shapes.train import with_unknown_words

    captions = ["a red circle on the left", "a small blue square on a black background"] * 200
    changed = with_unknown_words(captions, 0.25, random.Random(3))
    assert changed == with_unknown_words(captions, 0.25, random.Random(3))
    assert with_unknown_words(captions, 0.0, random.Random(3)) == captions
    whole = inside = 0
    for before, after in zip(captions, changed):
        if after == before:
            continue
        new_words = [w for w in after.split() if w not in WORLD_WORDS]
        assert len(new_words) == 1 and new_words[0].isalpha(), after
        if after == f"a {new_words[0]}":
            whole += 1
        else:  # inside: the caption with the one word taken out is the original
            inside += 1
            assert " ".join(w for w in after.split() if w != new_words[0]) == before
    assert 0.18 < (whole + inside) / len(captions) < 0.32 and whole > 30 and inside > 30, (whole, inside)


class _BoobyTrap:
    """Unpickling this creates `marker`: what a crafted state file could do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("stage", ["vae", "vae_ft", "unet"])
def test_a_pickled_stage_state_is_refused_unopened_before_any_work(tmp_path, capsys, stage):
    """Stage states are safetensors with a JSON header; an old or crafted <stage>_state.pt never runs."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"step": 1, "model": _BoobyTrap(marker)}, out / f"{stage}_state.pt")
    with pytest.raises(StudioError, match=rf"{stage}_state\.pt: checkpoint in the old unsafe pickle format .*"
                                          rf"train into another --out, or delete {stage}_state\.pt"):
        main(["--out", str(out)])
    assert cli_main(["shapes", "train", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == [f"{stage}_state.pt"]  # no log, no tokenizer: nothing ran


def test_a_stage_resumes_exactly_from_its_state_file(tmp_path, monkeypatch):
    """3 VAE steps in one go == a crash after the step-2 state, other RNG states, then a resume to 3."""
    args = argparse.Namespace(seed=0, vae_steps=3, vae_batch=2, vae_lr=1e-3, vae_kl=1e-6, vae_pool=4, ckpt_every=2)
    (tmp_path / "a").mkdir()
    whole = train_vae(tmp_path / "a", args, torch.device("cpu"), log=lambda msg: None)

    (tmp_path / "b").mkdir()
    real_save = shapes_train.save_state

    def save_then_crash(state, path):
        real_save(state, path)
        raise KeyboardInterrupt  # the process dies right after its checkpoint

    monkeypatch.setattr(shapes_train, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_vae(tmp_path / "b", args, torch.device("cpu"), log=lambda msg: None)
    monkeypatch.setattr(shapes_train, "save_state", real_save)
    assert load_state(tmp_path / "b" / "vae_state.safetensors")["step"] == 2
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # a "new process"
    logged = []
    resumed = train_vae(tmp_path / "b", args, torch.device("cpu"), log=logged.append)
    assert "vae: resumed at step 2" in logged
    own, theirs = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own)
