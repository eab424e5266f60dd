"""The `studio` command: generate saves PNGs, shapes train passes through, bad input exits 2 in one line."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines import parse_infotext
from studio.cli import main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "shapes" in out


def test_generate_saves_pngs_and_prints_their_paths(tmp_path, capsys):
    code = main(["generate", "a red circle", "--seed", "1", "--steps", "2", "--n", "2", "--scheduler", "Euler",
                 "--negative", "blurry", "--guidance", "6", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "00000-1.png"), str(tmp_path / "00001-2.png")]
    params = parse_infotext(Image.open(printed[1]).text["parameters"])
    assert (params["Prompt"], params["Negative prompt"], params["Seed"]) == ("a red circle", "blurry", "2")
    assert (params["Steps"], params["Sampler"], params["CFG scale"]) == ("2", "Euler", "6.0")


def test_shapes_train_passes_its_arguments_through(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shapes", "train", "--help"])
    assert exit_info.value.code == 0
    assert "--vae-steps" in capsys.readouterr().out  # studio.shapes.train's own help


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--width", "62"], "error: width=62 is not a multiple of 8: use 56 or 64"),
        (["generate", "x", "--steps", "0"], "error: num_inference_steps=0 must be a positive integer"),
        (["generate", "x", "--guidance", "-2"], "error: guidance_scale=-2.0 must be >= 0"),
        (["generate", "x", "--model", "/no/such/model"], "error: model '/no/such/model': no such file or folder"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)

