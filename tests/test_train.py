"""The training loop and its data: dataset folders, config, exact resume, divergence, samples,
prior preservation, gradient accumulation and checkpointing, on the tiny SD 1.5 pipeline (8x8 latents)."""

from __future__ import annotations

import argparse
import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from adapters import SCTuner, read_metadata
from pipelines import generate
from pipelines.architectures import tiny_sd15_pipeline
from pipelines.datasets import DatasetError, EpochSampler, load_images, scan_folder
from pipelines.errors import StudioError
from pipelines.loading import EMBEDDED_MODEL
from pipelines.statefile import load_state, save_state
from pipelines.train import DenoisingObjective, TrainConfig, TrainConfigError, TrainingDiverged, list_checkpoints, train
from studio.cli import main as cli_main
from studio.library import AdapterLibrary, LibraryError
from studio.shapes.world import Scene, ShapeObject, render
from studio.train_cli import add_parser, build_config

COLORS = ("red", "blue", "green", "yellow")


def write_images(folder: Path, n: int, shape: str = "star") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}-{color}.png" for i, color in enumerate(COLORS[:n])]
    for path, color in zip(paths, COLORS):
        render(Scene((ShapeObject(color, shape),))).save(path)
    return paths


@pytest.fixture
def data(tmp_path) -> Path:
    """Three uncaptioned 64x64 stars (captioned by the trigger word)."""
    write_images(tmp_path / "data", 3)
    return tmp_path / "data"


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    """Tiny, fast settings: batch 2 over 3 images crosses an epoch boundary every few steps."""
    settings = dict(data_dir=data, output_dir=out, trigger="sks", steps=4, batch_size=2, learning_rate=1e-3,
                    checkpoint_every=0, sample_steps=2)
    return TrainConfig(**{**settings, **overrides})


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)  # .double(): SaRA's bool/int tensors


# -- datasets -------------------------------------------------------------------------------------


def test_scan_reads_sidecars_metadata_repeat_folders_and_trigger(tmp_path):
    a, b, c, d = write_images(tmp_path, 4)
    a.with_suffix(".txt").write_text("a red star\n")
    b.with_suffix(".caption").write_text("a blue star")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": c.name, "text": "a green star"}) + "\n")
    write_images(tmp_path / "10_sks star", 1)  # kohya: 10 repeats, caption from the folder name
    (tmp_path / "notes").mkdir()  # a folder without images is ignored

    examples = scan_folder(tmp_path, fallback_caption="sks")
    assert [(e.image.name, e.caption, e.repeats) for e in examples] == [
        (a.name, "a red star", 1), (b.name, "a blue star", 1), (c.name, "a green star", 1), (d.name, "sks", 1),
        ("0-red.png", "sks star", 10),
    ]
    assert EpochSampler([e.repeats for e in examples], seed=0).pool.size == 14


def test_trigger_with_class_prompt_captions_as_dreambooth(data, tmp_path):
    cfg = config(data, tmp_path / "out", class_prompt="star", num_class_images=1)
    assert {e.caption for e in scan_folder(cfg.data_dir, fallback_caption=cfg.fallback_caption)} == {"sks star"}


def test_load_images_resizes_and_center_crops(tmp_path):
    from PIL import Image

    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, 50:150] = 255  # the middle square is white, the sides black
    Image.fromarray(wide).save(tmp_path / "wide.jpg")
    (pixels,) = load_images(scan_folder(tmp_path, fallback_caption="x"), 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
    assert pixels.float().mean() > 250  # only the white center survives the crop


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no images"),
    (lambda d: write_images(d, 1), "has no caption: add 0-red.txt next to it, or set a trigger word"),
    (lambda d: [p.with_suffix(s).write_text("x") for p in write_images(d, 1) for s in (".txt", ".caption")],
     "has two captions"),
    (lambda d: write_images(d, 1)[0].with_suffix(".txt").write_text(" "), "0-red.txt is empty"),
    (lambda d: write_images(d / "stars", 1), "not a kohya repeat folder; rename it to '<repeats>_<token> <class>'"),
    (lambda d: write_images(d / "0_sks star", 1), "0 repeats would never show its images"),
    (lambda d: (d / "metadata.jsonl").write_text("{not json\n"), "metadata.jsonl line 1 is not valid JSON"),
    (lambda d: (d / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n'), "gone.png, which does"),
])
def test_scan_refuses_bad_folders_naming_the_file(tmp_path, make, message):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scan_folder(data)


def test_unreadable_image_is_refused_before_any_work(tiny_sd15, tmp_path):
    data = tmp_path / "data"
    write_images(data, 1)
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png .*re-save it"):
        train(tiny_sd15, config(data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_epoch_sampler_is_a_pure_function_of_the_position():
    sampler = EpochSampler([1, 2, 1], seed=3)
    stream = sampler.take(0, 12).tolist()
    for epoch in range(3):  # each epoch shows every example `repeats` times
        assert sorted(stream[4 * epoch:4 * epoch + 4]) == [0, 1, 1, 2]
    assert EpochSampler([1, 2, 1], seed=3).take(5, 6).tolist() == stream[5:11]
    assert EpochSampler([1, 2, 1], seed=4).take(0, 12).tolist() != stream


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "method: lora\nmethod_options: {rank: 2}\nsteps: 50\nsample_prompts: [sks star]\n"),
    (".toml", 'method = "lora"\nsteps = 50\nsample_prompts = ["sks star"]\n[method_options]\nrank = 2\n'),
])
def test_config_from_yaml_or_toml_with_overrides(data, tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text((f"data_dir: {data}\n" if suffix == ".yaml" else f'data_dir = "{data}"\n') + text)
    cfg = TrainConfig.from_file(path, steps=7, trigger="sks")
    assert (cfg.method, cfg.method_options, cfg.steps, cfg.trigger) == ("lora", {"rank": 2}, 7, "sks")
    assert cfg.data_dir == data and cfg.sample_prompts == ["sks star"] and cfg.adapter_name == "sks"


def test_prior_caption_dropout_trains_class_images_on_the_empty_caption(data, tmp_path):
    """At 1 the class images' captions never reach the UNet (other captions: the same run); at 0 they do, and the
    instance images keep theirs either way."""
    def losses(class_caption: str, dropout: float) -> list[float]:
        class_dir = tmp_path / f"class-{class_caption}"
        for path in write_images(class_dir, 2, shape="square"):
            path.with_suffix(".txt").write_text(f"a {class_caption}")
        pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
        out = tmp_path / f"{class_caption}-{dropout}"
        return train(pipe, config(data, out, class_prompt="shape", class_dir=class_dir, num_class_images=2,
                                  prior_caption_dropout=dropout)).losses

    assert losses("square", 1.0) == losses("circle", 1.0)
    assert losses("square", 0.0) != losses("circle", 0.0)


def test_instance_prompt_share_trains_images_on_the_instance_prompt_instead_of_their_captions(tmp_path):
    """At share 1 the images' own captions never reach the UNet and the instance prompt does; at 0 the captions do."""
    def losses(caption: str, share: float, instance_prompt: str = "a sks") -> list[float]:
        data = tmp_path / f"data-{caption}"
        for path in write_images(data, 3):
            path.with_suffix(".txt").write_text(f"a sks {caption}")
        pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
        out = tmp_path / f"{caption}-{share}-{instance_prompt}"
        return train(pipe, config(data, out, instance_prompt=instance_prompt, instance_prompt_share=share)).losses

    assert losses("on the left", 1.0) == losses("on a black background", 1.0)
    assert losses("on the left", 1.0) != losses("on the left", 1.0, instance_prompt="a qq")
    assert losses("on the left", 0.0) != losses("on a black background", 0.0)


def write_masks(images: list[Path], folder: Path, keep: slice) -> None:
    """A mask per image, same name: white (learn) in the columns `keep`, black elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        mask = np.zeros((64, 64), np.uint8)
        mask[:, keep] = 255
        Image.fromarray(mask, "L").save(folder / image.name)


def test_masked_loss_costs_nothing_outside_the_mask(tmp_path):
    """The instance loss counts the error inside each image's mask only: a prediction wrong only where the mask is
    black costs 0, one wrong where it is white costs what it costs without a mask."""
    images = write_images(tmp_path / "data", 2)
    write_masks(images, tmp_path / "masks", keep=slice(0, 32))  # the left half of each image
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    cfg = config(tmp_path / "data", tmp_path / "out", method="lora", masked_loss=True, mask_dir=tmp_path / "masks")
    objective = DenoisingObjective(pipe, cfg, cfg.adapter_config())
    objective.begin(adapter=None)
    batch = objective.draw(step=0, count=2, generator=torch.Generator().manual_seed(0))
    noise = batch["draws"][0]["noise"]  # the epsilon target
    half = noise.shape[-1] // 2

    def loss_with_error(columns: slice, on=objective) -> float:
        error = torch.zeros_like(noise)
        error[..., columns] = 1.0
        return on.loss(lambda *args: noise + error, batch, slice(0, 2)).item()

    assert loss_with_error(slice(half, None)) == 0.0  # wrong only on the right: the black half
    # Wrong on the white half: what the same error costs unmasked (kohya's mean over the whole image), so a
    # learning rate means the same with and without masks.
    assert loss_with_error(slice(0, half)) == pytest.approx(0.5)
    assert loss_with_error(slice(0, half // 2)) == pytest.approx(0.25)
    cfg.masked_loss, cfg.mask_dir = False, None
    unmasked = DenoisingObjective(pipe, cfg, cfg.adapter_config())
    unmasked.begin(adapter=None)
    assert loss_with_error(slice(half, None), on=unmasked) == pytest.approx(0.5)


def test_masked_loss_reads_the_images_transparency_and_refuses_images_without_a_mask(tmp_path):
    """Opaque everywhere: the same run as without a mask; a transparent half changes it; an image with no alpha
    and no mask file, or a mask that keeps nothing, is refused by name before training."""
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))

    def run(name: str, opaque: slice | None, masked: bool = True) -> list[float]:
        for image in write_images(tmp_path / name, 3):
            if opaque is not None:
                rgba = np.dstack([np.asarray(Image.open(image)), np.zeros((64, 64), np.uint8)])
                rgba[:, opaque, 3] = 255
                Image.fromarray(rgba, "RGBA").save(image)
        return train(pipe, config(tmp_path / name, tmp_path / f"out-{name}", masked_loss=masked)).losses

    assert run("opaque", slice(0, 64)) == pytest.approx(run("plain", None, masked=False), rel=1e-5)
    assert run("half", slice(0, 32)) != pytest.approx(run("plain", None, masked=False), rel=1e-3)
    with pytest.raises(DatasetError, match=r"0-red.png, \S+1-blue.png, \S+2-green.png have no transparency to mask "
                                           "the loss with; save them as PNGs .* or turn masked loss off"):
        run("no-alpha", None)
    with pytest.raises(DatasetError, match=r"the mask of .*0-red.png keeps nothing .*; mark the part to learn"):
        run("transparent", slice(0, 0))


@pytest.mark.parametrize("overrides, message", [
    ({"method": "dora"}, r"method='dora': is unknown; use one of \[.*'lora'.*'sc_tuner'"),
    ({"method_options": {"hidden_ratio": -1}}, "method_options=.*hidden_ratio must be a number > 0"),
    ({"method_options": {"rank": 4}}, r"method_options=.*sc_tuner takes \['hidden_ratio'\]"),
    ({"steps": 0}, "steps=0: must be an integer >= 1"),
    ({"learning_rate": float("inf")}, "learning_rate=inf: must be a finite number > 0"),
    ({"warmup_steps": 5}, r"warmup_steps=5: must be an integer in \[0, steps=4\)"),
    ({"warmup_steps": 1}, "'constant' has no warm-up .* use 'constant_with_warmup'"),
    ({"mixed_precision": "fp8"}, "mixed_precision='fp8': must be one of"),
    ({"num_class_images": 2}, "class_prompt=None: is needed with num_class_images=2"),
    ({"class_dir": "x"}, "class_dir=.* num_class_images=0; set num_class_images"),
    ({"prior_caption_dropout": 0.5}, "prior_caption_dropout=0.5: drops the captions of class images, but "
                                     "num_class_images=0"),
    ({"prior_caption_dropout": -0.1, "class_prompt": "star", "num_class_images": 1},
     r"prior_caption_dropout=-0.1: must be a number in \[0, 1\]"),
    ({"instance_prompt_share": 1.5}, r"instance_prompt_share=1.5: must be a number in \[0, 1\]"),
    ({"instance_prompt_share": 0.5, "trigger": None}, "instance_prompt_share=0.5: trains on the instance prompt, "
                                                      "but there is none; set instance_prompt or trigger"),
    ({"instance_prompt": " "}, "instance_prompt=' ': must be a non-empty prompt"),
    ({"mask_dir": "."}, "mask_dir=.*: is set but masked_loss is off; turn masked_loss on, or unset mask_dir"),
    ({"masked_loss": True, "mask_dir": "nowhere"}, "mask_dir=.*nowhere.*: is not a folder; pass the folder of masks"),
    ({"masked_loss": "yes"}, "masked_loss='yes': must be true or false"),
    ({"sample_every": 2}, "sample_every=2: is set but sample_prompts is empty"),
    ({"name": "a/b"}, "the adapter file's name 'a/b' contains a slash"),
    ({"resume": "nowhere"}, "resume='nowhere': must be 'latest' or a checkpoint folder"),
])
def test_config_refuses_bad_settings_naming_field_and_fix(data, tmp_path, overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        config(data, tmp_path, **overrides)


def test_config_refuses_unknown_keys_and_missing_data_dir(tmp_path):
    with pytest.raises(TrainConfigError, match=r"unknown setting\(s\) \['stpes'\]"):
        TrainConfig.from_dict({"data_dir": tmp_path, "stpes": 3})
    with pytest.raises(TrainConfigError, match="data_dir is required"):
        TrainConfig.from_dict({"steps": 3})
    with pytest.raises(TrainConfigError, match="data_dir=.*is not a folder"):
        TrainConfig(data_dir=tmp_path / "missing")


# -- training -------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_an_adapter_file(tiny_sd15, data, tmp_path):
    unet_inputs = (torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 32, 32))
    before = tiny_sd15.unet(*unet_inputs).sample
    result = train(tiny_sd15, config(data, tmp_path / "out", steps=25, learning_rate=1e-2))

    # A random UNet's noise prediction is easy to improve on: the loss falls clearly.
    assert np.mean(result.losses[-5:]) < 0.85 * np.mean(result.losses[:5])
    assert result.adapter_path == tmp_path / "out" / "sks.safetensors" and not result.cancelled
    meta = read_metadata(result.adapter_path)
    assert meta["studio.method"] == "sc_tuner" and meta["studio.base_family"] == "SD1"
    assert json.loads(meta["studio.trigger_words"]) == ["sks"]
    training = json.loads(meta["studio.training"])
    assert (training["steps"], training["step"], training["num_images"], training["resolution"]) == (25, 25, 3, 64)
    assert any(t.abs().max() > 0 for t in adapter_tensors(result.adapter_path).values())  # fc2 left zero
    # The adapter is detached again and the pipeline frozen: the UNet computes exactly what it did.
    assert torch.equal(tiny_sd15.unet(*unet_inputs).sample, before)
    assert not any(p.requires_grad for p in tiny_sd15.unet.parameters())


@pytest.mark.parametrize("method, options", [
    ("sc_tuner", {}),
    ("lora", {"rank": 2, "dropout": 0.1}),  # dropout draws from the global torch RNG
    ("sara", {"rank_min_dim": 16, "min_selected": 1}),  # the nuclear norm applies on the tiny layout too
])
def test_resume_reproduces_the_uninterrupted_run(data, tmp_path, method, options):
    """4 steps in one go == 2 steps, cancel, new objects and scrambled RNGs, resume to 4.

    Covers the data order across epochs (batch 2 over 3 images), prior preservation, gradient
    accumulation, the cosine LR schedule with warm-up, the global RNG (LoRA's dropout) and the
    adapter's own state (SaRA's generator, and its re-selection after step 2 swapping its Parameters)."""
    settings = dict(method=method, method_options=options, steps=4, gradient_accumulation_steps=2,
                    lr_scheduler="cosine", warmup_steps=1, class_prompt="star", num_class_images=2,
                    class_dir=tmp_path / "class", checkpoint_every=2, keep_last=1)
    whole = train(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), config(data, tmp_path / "a", **settings))
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-000004"]  # keep_last=1 pruned step 2

    stop_after_2 = iter([False] * 2 + [True])
    first = train(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), config(data, tmp_path / "b", **settings),
                  should_stop=lambda: next(stop_after_2))
    assert first.cancelled and first.step == 2 and first.adapter_path is None
    assert first.checkpoint == list_checkpoints(tmp_path / "b")[-1] == tmp_path / "b" / "checkpoints" / "step-000002"

    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # a "new process" with other RNG states
    resumed = train(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")),
                    config(data, tmp_path / "b", resume="latest", **settings))
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)
    diff = max_abs_diff(adapter_tensors(whole.adapter_path), adapter_tensors(resumed.adapter_path))
    print(f"{method}: resume max abs diff {diff:.3g}")
    assert diff <= 1e-6


def test_resume_refuses_other_settings_and_fresh_start_refuses_old_checkpoints(tiny_sd15, data, tmp_path):
    train(tiny_sd15, config(data, tmp_path / "out", steps=2, checkpoint_every=2))
    with pytest.raises(TrainConfigError, match="already holds checkpoints .*resume='latest'"):
        train(tiny_sd15, config(data, tmp_path / "out", steps=2))
    with pytest.raises(TrainConfigError, match="made with other batch_size"):
        train(tiny_sd15, config(data, tmp_path / "out", steps=4, batch_size=1, resume="latest"))


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_its_default(tiny_sd15, data, tmp_path):
    """A run checkpointed before `prior_caption_dropout` existed recorded no value for it: it ran at the default (0),
    so it resumes; another value is still refused."""
    train(tiny_sd15, config(data, tmp_path / "out", steps=2, checkpoint_every=2))
    path = tmp_path / "out" / "checkpoints" / "step-000002" / "state.safetensors"
    state = load_state(path)
    del state["run"]["prior_caption_dropout"]
    save_state(state, path)
    assert train(tiny_sd15, config(data, tmp_path / "out", steps=3, resume="latest")).losses
    train(tiny_sd15, config(data, tmp_path / "two", steps=2, checkpoint_every=2, class_prompt="shape",
                            num_class_images=1, class_dir=tmp_path / "class"))
    with pytest.raises(TrainConfigError, match="made with other prior_caption_dropout"):
        train(tiny_sd15, config(data, tmp_path / "two", steps=4, class_prompt="shape", num_class_images=1,
                                class_dir=tmp_path / "class", prior_caption_dropout=0.5, resume="latest"))


class BoobyTrap:
    """Unpickling this creates `marker`: what a crafted checkpoint could do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_trap(path: Path, marker: Path) -> None:
    torch.save({"step": 2, "payload": BoobyTrap(marker)}, path)
    armed = path.with_name("armed")  # the trap is real: unpickled, it runs
    torch.save(BoobyTrap(armed), path.with_name("probe.pt"))
    torch.load(path.with_name("probe.pt"), weights_only=False)
    assert armed.exists()
    armed.unlink(), path.with_name("probe.pt").unlink()


@pytest.mark.parametrize("trapped", ["state", "rng-0"])
def test_resume_never_unpickles_an_old_or_crafted_checkpoint(tiny_sd15, data, tmp_path, trapped):
    """Checkpoints hold safetensors and JSON only; a pickled state.pt or rng-N.pt (the old format, or a
    crafted one) is refused unopened, before any work, with the fix."""
    first = train(tiny_sd15, config(data, tmp_path / "out", steps=2, checkpoint_every=2))
    folder = list_checkpoints(tmp_path / "out")[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "rng-0.safetensors",
                                                        "state.safetensors"]
    (folder / f"{trapped}.safetensors").unlink()
    marker = tmp_path / "pwned"
    plant_trap(folder / f"{trapped}.pt", marker)
    before = first.adapter_path.stat().st_mtime_ns
    for resume in ("latest", str(folder)):
        with pytest.raises(StudioError, match=rf"{trapped}\.pt: checkpoint in the old unsafe pickle format .*"
                                              r"start a new run with another output_dir \(--out\)"):
            train(tiny_sd15, config(data, tmp_path / "out", steps=4, resume=resume))
    assert not marker.exists()
    assert first.adapter_path.stat().st_mtime_ns == before and list_checkpoints(tmp_path / "out") == [folder]


def test_cli_resume_from_a_pickled_checkpoint_is_one_error_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    folder = tmp_path / "out" / "checkpoints" / "step-000002"
    folder.mkdir(parents=True)
    plant_trap(folder / "state.pt", tmp_path / "pwned")
    argv = ["train", "--data", str(data), "--trigger", "sks", "--steps", "4", "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "old unsafe pickle format" in err
    assert not (tmp_path / "pwned").exists()


def test_state_files_round_trip_without_pickle_and_refuse_damage(tmp_path):
    state = {"step": 3, "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "keys": {0: torch.ones(2), "a": (1.5, None, [True])}, "dir": tmp_path}
    path = save_state(state, tmp_path / "state.safetensors")
    back = load_state(path)
    assert repr(back["python"]) == repr(state["python"]) and back["keys"]["a"] == (1.5, None, [True])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][2:] == state["numpy"][2:] and back["dir"] == tmp_path
    assert torch.equal(back["torch"], state["torch"]) and torch.equal(back["keys"][0], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StudioError, match="state.safetensors: not a readable training state file"):
        load_state(path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sd15, data, tmp_path, monkeypatch):
    calls = []

    def nan_in_step_5(self):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 5 else None

    monkeypatch.setattr(SCTuner, "regularization_loss", nan_in_step_5)
    with pytest.raises(TrainingDiverged, match=r"loss is nan in step 5\. Lower learning_rate \(now 0\.001; try "
                                               r"0\.0001\) and resume from the last good checkpoint .*step-000004"):
        train(tiny_sd15, config(data, tmp_path / "out", steps=8, checkpoint_every=2))
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["step-000002", "step-000004"]
    assert not (tmp_path / "out" / "sks.safetensors").exists()

    # The fix the message suggests works: resume from the good checkpoint with a lower rate.
    monkeypatch.undo()
    result = train(tiny_sd15, config(data, tmp_path / "out", steps=6, learning_rate=1e-4, resume="latest"))
    assert result.step == 6 and len(result.losses) == 2 and result.adapter_path.exists()


def test_samples_at_step_0_and_every_n_steps(tiny_sd15, data, tmp_path):
    seen = []
    cfg = config(data, tmp_path / "out", steps=4, sample_every=2, sample_prompts=["sks", "a star"],
                 sample_seeds=[0, 7])
    train(tiny_sd15, cfg, progress=seen.append)

    folders = sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())
    assert folders == ["step-000000", "step-000002", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "out" / "samples" / "step-000002").iterdir()) == [
        "00-seed0.png", "00-seed7.png", "01-seed0.png", "01-seed7.png"]
    assert [(p.step, len(p.samples)) for p in seen if p.samples] == [(0, 4), (2, 4), (4, 4)]
    assert [p.step for p in seen] == [0, 1, 2, 3, 4] and all(p.loss is not None for p in seen[1:])
    # SC-Tuner starts as the identity: step 0's sample is the base model's image for that seed.
    from PIL import Image

    base = generate(tiny_sd15, "sks", seed=7, num_inference_steps=2).images[0]
    assert np.array_equal(np.array(Image.open(seen[0].samples[1])), np.array(base))


def test_prior_preservation_generates_class_images_once(tiny_sd15, data, tmp_path, monkeypatch):
    import pipelines.train

    calls = []
    monkeypatch.setattr(pipelines.train, "generate",
                        lambda *args, **kwargs: calls.append(kwargs["seed"]) or generate(*args, **kwargs))
    settings = dict(steps=2, class_prompt="star", num_class_images=3, class_dir=tmp_path / "class")
    train(tiny_sd15, config(data, tmp_path / "one", **settings))
    assert calls == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == [f"class-0000{i}.png" for i in range(3)]

    (tmp_path / "class" / "class-00001.png").unlink()  # one lost: only that one is drawn again
    train(tiny_sd15, config(data, tmp_path / "two", **settings))
    train(tiny_sd15, config(data, tmp_path / "three", **settings))
    assert calls == [0, 1, 2, 1]


def test_gradient_accumulation_equals_the_bigger_batch(data, tmp_path):
    def run(out: str, **settings) -> tuple[dict[str, torch.Tensor], list[float]]:
        pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
        result = train(pipe, config(data, tmp_path / out, steps=3, **settings))
        return adapter_tensors(result.adapter_path), result.losses

    accumulated, accumulated_losses = run("accumulated", batch_size=1, gradient_accumulation_steps=2)
    batched, batched_losses = run("batched", batch_size=2, gradient_accumulation_steps=1)
    assert accumulated_losses == pytest.approx(batched_losses, abs=1e-6)  # the same images, noise and timesteps
    # Only rounding differs; Adam magnifies it where gradients are near zero (fc1 while fc2 is still ~0),
    # so the tolerance is loose: another batch of data moves the weights by ~6e-3.
    assert max_abs_diff(accumulated, batched) < 1e-4


def test_gradient_checkpointing_is_non_reentrant_so_sc_tuner_still_learns(tiny_sd15):
    """diffusers' default checkpointing gives SC-Tuner the same gradients as none; reentrant
    checkpointing would give it none at all (its up-block inputs need no grad), the reason
    train() relies on the default."""
    unet = tiny_sd15.unet.requires_grad_(False)
    adapter = SCTuner.from_unet(unet)
    adapter.attach(unet)
    for tuner in adapter.tuners.values():  # leave the zero init, so fc1 gets gradient too
        torch.nn.init.normal_(tuner.fc2.weight, std=0.1)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 32, 32))

    def grads() -> list[torch.Tensor | None]:
        adapter.zero_grad(set_to_none=True)
        unet(*inputs).sample.square().mean().backward()
        return [p.grad for p in adapter.parameters()]

    plain = grads()
    unet.enable_gradient_checkpointing()
    default = grads()
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain, default))

    unet.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=True))
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"), \
            pytest.raises(RuntimeError, match="does not require grad"):
        grads()  # not even a graph to backpropagate through: the tuners would never train


# -- command line ---------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_cli_flags_override_the_config_file(data, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data_dir: {data}\nmethod: lora\nmethod_options: {{rank: 2, alpha: 4}}\nsteps: 50\n"
                    "learning_rate: 0.001\n")
    cfg = build_config(parse("--config", str(path), "--steps", "7", "--option", "rank=8", "--trigger", "sks",
                             "--sample-prompt", "sks star", "--sample-prompt", "a star"))
    assert (cfg.steps, cfg.learning_rate, cfg.trigger) == (7, 1e-3, "sks")  # flags win, the file's rest stands
    assert cfg.method_options == {"rank": 8, "alpha": 4} and cfg.sample_prompts == ["sks star", "a star"]
    cfg = build_config(parse("--config", str(path), "--trigger", "sks", "--instance-prompt", "a sks",
                             "--instance-prompt-share", "0.5"))
    assert (cfg.instance_prompt, cfg.instance_prompt_share, cfg.instance_prompt_text) == ("a sks", 0.5, "a sks")
    cfg = build_config(parse("--config", str(path), "--masked-loss", "--mask-dir", str(data)))
    assert (cfg.masked_loss, cfg.mask_dir) == (True, data)
    with pytest.raises(TrainConfigError, match="expected KEY=VALUE"):
        build_config(parse("--data", str(data), "--option", "rank"))


def test_cli_trains_the_embedded_model_and_adds_the_adapter_to_the_library(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    argv = ["--data", str(data), "--trigger", "sks", "--steps", "2", "--out", str(tmp_path / "out")]
    args = parse(*argv)
    args.run(args)
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "out" / "sks.safetensors"),
                                                    "added to the library as 'sks'"]
    assert [e.name for e in AdapterLibrary().list()] == ["sks"]
    with pytest.raises(LibraryError, match="already holds 'sks'; pass --name .* --overwrite .* --no-library"):
        args = parse(*argv, "--resume", "latest")
        args.run(args)


def test_caption_dropout_trains_on_the_empty_caption(data, tmp_path):
    """At dropout 1 the caption never reaches the UNet (another trigger word: the same run); at 0 it does."""
    def losses(trigger: str, dropout: float) -> list[float]:
        pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
        out = tmp_path / f"{trigger}-{dropout}"
        return train(pipe, config(data, out, trigger=trigger, caption_dropout=dropout)).losses

    assert losses("sks", 1.0) == losses("zwx", 1.0)
    assert losses("sks", 0.0) != losses("zwx", 0.0)
    with pytest.raises(TrainConfigError, match="caption_dropout=1.5: must be a number in"):
        config(data, tmp_path / "bad", caption_dropout=1.5)
