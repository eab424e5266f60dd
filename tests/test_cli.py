"""The `studio` command: generate and edit save PNGs, shapes dataset writes renders, shapes train passes
through, bad input exits 2 in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from adapter_helpers import perturb
from PIL import Image

from adapters import CSCTuner, CSCTunerConfig, LoRA, LoRAConfig, save_adapter
from pipelines import parse_infotext
from studio.cli import main
from studio.library import AdapterLibrary
from studio.shapes.world import Scene, ShapeObject, render


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "edit" in out and "shapes" in out


def test_generate_saves_pngs_and_prints_their_paths(tmp_path, capsys):
    code = main(["generate", "a red circle", "--seed", "1", "--steps", "2", "--n", "2", "--scheduler", "Euler",
                 "--negative", "blurry", "--guidance", "6", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "00000-1.png"), str(tmp_path / "00001-2.png")]
    params = parse_infotext(Image.open(printed[1]).text["parameters"])
    assert (params["Prompt"], params["Negative prompt"], params["Seed"]) == ("a red circle", "blurry", "2")
    assert (params["Steps"], params["Sampler"], params["CFG scale"]) == ("2", "Euler", "6.0")


def test_edit_writes_the_edit_its_reconstruction_and_mask_and_prints_their_paths(tmp_path, capsys):
    render(Scene((ShapeObject("red", "square"),))).save(tmp_path / "in.png")
    left = np.zeros((128, 128), np.uint8)  # a mask at another size than the image is resized to it
    left[:, :64] = 255
    Image.fromarray(left).save(tmp_path / "left.png")
    code = main(["edit", str(tmp_path / "in.png"), "--source", "a red square", "--target", "a blue square",
                 "--steps", "2", "--mask-start", "600", "--quantile", "0.4", "--dilation", "0", "--mask-floor", "0.5",
                 "--threshold-mode", "paper", "--no-source-blend", "--mask", str(tmp_path / "left.png"),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / name) for name in ("edited.png", "reconstruction.png", "mask.png")]
    assert all(Image.open(path).size == (64, 64) for path in printed)
    params = parse_infotext(Image.open(printed[0]).text["parameters"])
    assert (params["Prompt"], params["Source prompt"], params["Steps"]) == ("a blue square", "a red square", "2")
    assert (params["Mask start"], params["Mask quantile"], params["Mask dilation"]) == ("600", "0.4", "0")
    assert params["Mask floor"] == "0.5"
    assert (params["Threshold mode"], params["Source blend"], params["User mask"]) == ("paper", "False", "True")
    assert np.asarray(Image.open(printed[2]))[:, 32:].max() == 0  # nothing edited outside the user's mask
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edited.png", "mask.png", "reconstruction.png"]


def test_edit_with_a_library_lora_changes_the_image_and_an_unknown_adapter_is_refused_first(
        embedded, tmp_path, monkeypatch, capsys):
    import pipelines

    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "lib"))
    lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=2))
    perturb(lora)
    AdapterLibrary().add(save_adapter(lora, tmp_path / "sks.safetensors", trigger_words=["sks"]))
    render(Scene((ShapeObject("red", "square"),))).save(tmp_path / "in.png")
    common = ["edit", str(tmp_path / "in.png"), "--source", "a red square", "--target", "a blue square",
              "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--adapter", "sks:0.8", "--out", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out.split()
    plain, with_lora = Image.open(printed[0]), Image.open(printed[3])
    assert not np.array_equal(np.asarray(plain), np.asarray(with_lora))
    assert "Adapters" not in parse_infotext(plain.text["parameters"])
    assert parse_infotext(with_lora.text["parameters"])["Adapters"] == "sks:0.8"

    # Refused in one line naming the adapter, before the model loads.
    controller = CSCTuner.from_unet(embedded.pipe.unet, CSCTunerConfig("canny", dense_kernel=1, vae_scale_factor=4))
    AdapterLibrary().add(save_adapter(controller, tmp_path / "star-canny.safetensors"))
    monkeypatch.setattr(pipelines, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main([*common, "--adapter", "nope", "--out", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no adapter named 'nope' in ")
    assert main([*common, "--adapter", "star-canny", "--out", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == ("error: adapter 'star-canny' is a CSC-Tuner: it steers generation "
                                               "by a control image, which an edit does not take; leave it out or set "
                                               "its scale to 0 (generate with a control image uses it)")
    assert not (tmp_path / "nope").exists()


def test_generate_with_a_controller_and_annotate(embedded, tmp_path, capsys):
    """--control drives the CSC-Tuner given by --adapter; `annotate` writes a folder's hints."""
    render(Scene((ShapeObject("red", "star", "left", "large"),))).save(tmp_path / "photo.png")
    controller = CSCTuner.from_unet(embedded.pipe.unet, CSCTunerConfig("canny", dense_kernel=1, vae_scale_factor=4))
    perturb(controller)
    path = save_adapter(controller, tmp_path / "star-canny.safetensors")
    common = ["generate", "a blue circle", "--seed", "0", "--steps", "2", "--adapter", str(path)]

    assert main([*common, "--control", f"canny:{tmp_path / 'photo.png'}:0.5", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out.split()
    assert parse_infotext(Image.open(printed[0]).text["parameters"])["Control"] == "canny 0.5"
    assert main([*common, "--control", f"canny:{tmp_path / 'photo.png'}:0", "--out", str(tmp_path / "b")]) == 0
    off = capsys.readouterr().out.split()
    assert not np.array_equal(np.asarray(Image.open(printed[0])), np.asarray(Image.open(off[0])))

    assert main(common + ["--out", str(tmp_path / "c")]) == 2  # a controller without its control image
    assert "no --control image for them; add --control canny:IMAGE" in capsys.readouterr().err
    assert main(["generate", "x", "--control", f"color:{tmp_path / 'photo.png'}"]) == 2
    assert "no 'color' CSC-Tuner among the --adapter files" in capsys.readouterr().err

    assert main(["annotate", str(tmp_path / "a"), "--condition", "canny", "--out", str(tmp_path / "hints")]) == 0
    hint = capsys.readouterr().out.split()
    assert hint == [str(tmp_path / "hints" / Path(printed[0]).name)]
    assert set(np.unique(np.asarray(Image.open(hint[0])))) <= {0, 255}  # Canny: white edges on black


def test_compose_writes_both_modes_with_the_same_seed_and_refuses_a_bad_region(embedded, tmp_path, capsys):
    files = []
    for seed, trigger in ((0, "sks"), (1, "zkz")):
        lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=2))
        perturb(lora, seed)
        files.append(str(save_adapter(lora, tmp_path / f"{trigger}.safetensors", trigger_words=[trigger])))
    common = ["compose", "a sks and a zkz", "--adapter", files[0], "--adapter", f"{files[1]}:0.5"]
    regions = ["--region", "0,0,32,64:a sks", "--region", "32,0,64,64:a zkz"]
    code = main([*common, *regions, "--mode", "both", "--steps", "2", "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).parent.name for p in printed] == ["composer", "merge"]
    params = [parse_infotext(Image.open(p).text["parameters"]) for p in printed]
    assert [p["Compose"] for p in params] == ["composer", "merge"]
    assert params[0]["Seed"] == params[1]["Seed"] and params[0]["Adapters"] == "sks:1, zkz:0.5"
    options = ["--every-delta", "--cells", "touched", "--no-adapters-on-uncond", "--step-size", "40",
               "--early-stop-from", "10"]
    assert main([*common, *regions, *options, "--steps", "2", "--out", str(tmp_path / "beyond")]) == 0
    beyond = parse_infotext(Image.open(capsys.readouterr().out.split()[0]).text["parameters"])
    assert "cells touched, every delta in its box" in beyond["Composer"]
    assert "step 40, refine 25, early stop from 10" in beyond["Composer"]
    assert beyond["Adapters on uncond"] == "False"
    assert main([*common, "--region", "0,0,32:a sks"]) == 2
    assert "expected X0,Y0,X1,Y1:PROMPT" in capsys.readouterr().err
    assert main([*common, *regions[:2], "--steps", "2"]) == 2
    assert "2 concepts but 1 regions" in capsys.readouterr().err


def test_shapes_train_passes_its_arguments_through(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shapes", "train", "--help"])
    assert exit_info.value.code == 0
    assert "--vae-steps" in capsys.readouterr().out  # studio.shapes.train's own help


def test_shapes_dataset_writes_renders_with_captions(tmp_path, capsys):
    out = tmp_path / "data"
    code = main(["shapes", "dataset", "--out", str(out), "--n", "6", "--seed", "2", "--shapes", "star", "ring"])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"wrote 6 images with captions to {out}"
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(6)]
    assert sorted(out.glob("*.txt")) == [p.with_suffix(".txt") for p in images]
    for image in images:
        assert Image.open(image).size == (64, 64)
        words = set(image.with_suffix(".txt").read_text().split())
        assert words & {"star", "ring"} and not words & {"circle", "square", "triangle", "cross"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "error: --n 0: the number of images must be at least 1"),
        (["--outline-prob", "1.5"], "error: --outline-prob 1.5: a share must lie in [0, 1]"),
    ],
)
def test_shapes_dataset_refuses_bad_values_in_one_line(tmp_path, argv, message, capsys):
    assert main(["shapes", "dataset", "--out", str(tmp_path / "data"), *argv]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "data").exists()  # refused before writing anything


def test_shapes_dataset_refuses_a_folder_of_other_images_and_an_unknown_shape(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    assert main(["shapes", "dataset", "--out", str(tmp_path), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "other image/caption files (e.g. photo.png)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal, with the allowed values
        main(["shapes", "dataset", "--out", str(tmp_path / "x"), "--shapes", "hexagon"])
    assert exit_info.value.code == 2
    assert "argument --shapes: invalid choice: 'hexagon'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--width", "62"], "error: width=62 is not a multiple of 8: use 56 or 64"),
        (["generate", "x", "--steps", "0"], "error: num_inference_steps=0 must be a positive integer"),
        (["generate", "x", "--guidance", "-2"], "error: guidance_scale=-2.0 must be a finite number from 0 to 30"),
        (["generate", "x", "--model", "/no/such/model"], "error: model '/no/such/model': no such file or folder"),
        (["edit", "x.png", "--source", "a", "--target", "b", "--steps", "0"],
         "error: num_inference_steps=0 must be a positive integer"),
        (["edit", "x.png", "--source", "a", "--target", "b", "--quantile", "2"],
         "error: quantile=2.0 must be in [0, 1]"),
        (["edit", "/no/such.png", "--source", "a", "--target", "b"],
         "error: /no/such.png cannot be opened as an image"),
        (["generate", "x", "--control", "canny"], "error: control 'canny': expected CONDITION:IMAGE[:SCALE]"),
        (["generate", "x", "--control", "canny:/no/such.png"], "error: /no/such.png cannot be opened as an image"),
        (["annotate", "/no/such/folder", "--condition", "canny", "--out", "hints"],
         "error: image_dir='/no/such/folder' is not a folder"),
        (["compose", "x", "--adapter", "/no/such.safetensors"], "error: adapter file /no/such.safetensors does not"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)



def test_generate_shows_the_users_warnings_but_not_the_libraries_chatter(tmp_path):
    # Issue 20: transformers' torchvision notices and the loading bars came first; a truncated prompt must still show.
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    done = subprocess.run(
        [sys.executable, "-m", "studio.cli", "generate", "a red circle " + "and a blue square " * 20, "--steps", "1",
         "--seed", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent,
        env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "00000-0.png")]
    for noise in ("torchvision", "[transformers]", "Loading pipeline components", "Loading weights", "Traceback"):
        assert noise not in done.stderr, done.stderr
    assert "warning: prompt is" in done.stderr and "tokens are dropped" in done.stderr
