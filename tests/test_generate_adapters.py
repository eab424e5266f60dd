"""Generating with adapters (pipelines/attach.py) and the library from the command line: the adapter acts
for the call only (the UNet is bit-identical after), the PNG records it, and `studio generate --adapter` /
`studio adapters list|show|rename|delete` round trip over a library folder."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adapters import SaRA, SCTuner, load_adapter, save_adapter
from pipelines import InputError, LoadedModel, generate, parse_adapter_arg, parse_infotext
from pipelines.architectures import build_unet
from studio.cli import main
from studio.library import AdapterLibrary, LibraryError

FAST = dict(seed=3, num_inference_steps=2)


@pytest.fixture(scope="module")
def sks_file(embedded: LoadedModel, tmp_path_factory) -> Path:
    """An SC-Tuner file for the embedded model with non-zero weights (a fresh tuner changes nothing)."""
    torch.manual_seed(0)
    tuner = SCTuner.from_unet(embedded.pipe.unet)
    with torch.no_grad():
        for p in tuner.parameters():
            p.normal_(0, 0.05)
    return save_adapter(tuner, tmp_path_factory.mktemp("adapters") / "sks.safetensors", trigger_words=["sks"])


def image(result) -> np.ndarray:
    return np.asarray(result.images[0])


def short_sha256(path: Path) -> str:
    """A1111's LoRA short hash: SHA-256 of the bytes after the safetensors header, 12 hex digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_an_adapter_acts_for_the_call_only_and_is_recorded(embedded, sks_file):
    before = image(generate(embedded, "a red star", **FAST))
    adapted = generate(embedded, "a red star", adapters=[(sks_file, 0.8)], **FAST)
    assert not np.array_equal(image(adapted), before)
    assert np.array_equal(image(generate(embedded, "a red star", **FAST)), before)  # detached: bit-identical
    params = parse_infotext(adapted.settings[0].infotext())
    assert (params["Adapters"], params["Adapter hashes"]) == ("sks:0.8", f"sks: {short_sha256(sks_file)}")


def test_adapters_can_stay_off_the_unconditional_branch_and_the_image_says_so(embedded, sks_file, tmp_path, capsys):
    """adapters_on_uncond=False changes a guided image and is recorded (A1111 writes an extra parameter only away from
    its default); without guidance there is no unconditional row, so nothing changes; a SaRA file refuses."""
    on = generate(embedded, "a red star", adapters=[(sks_file, 0.8)], **FAST)
    off = generate(embedded, "a red star", adapters=[(sks_file, 0.8)], adapters_on_uncond=False, **FAST)
    assert not np.array_equal(image(on), image(off))
    assert parse_infotext(off.settings[0].infotext())["Adapters on uncond"] == "False"
    assert "Adapters on uncond" not in parse_infotext(on.settings[0].infotext())
    unguided = dict(FAST, guidance_scale=1.0, adapters=[(sks_file, 0.8)])
    assert np.array_equal(image(generate(embedded, "a red star", adapters_on_uncond=False, **unguided)),
                          image(generate(embedded, "a red star", **unguided)))
    assert main(["generate", "a red star", "--steps", "2", "--seed", "3", "--adapter", f"{sks_file}:0.8",
                 "--no-adapters-on-uncond", "--out", str(tmp_path / "out")]) == 0
    saved = Image.open(capsys.readouterr().out.split()[0])
    assert np.array_equal(np.asarray(saved.convert("RGB")), image(off))
    sara = save_adapter(SaRA.from_unet(embedded.pipe.unet), tmp_path / "sara.safetensors")
    with pytest.raises(InputError, match="SaRA acts on every row of the UNet batch alike"):
        generate(embedded, "a red star", adapters=[(sara, 1.0)], adapters_on_uncond=False, **FAST)


def test_an_attached_adapter_keeps_its_own_scale_and_stays_attached(embedded, sks_file):
    unet = embedded.pipe.unet
    tuner = load_adapter(sks_file, unet)
    try:
        tuner.set_scale(0.25)
        result = generate(embedded, "a red star", adapters=[(tuner, 1.0)], **FAST)
        assert tuner.unet is unet and tuner.scale == 0.25
        assert result.settings[0].extra_params == {"Adapters": "sc_tuner:1"}  # an object has no file to hash
    finally:
        tuner.detach()


def test_a_failing_adapter_leaves_the_unet_as_it_was(embedded, sks_file, tmp_path):
    before = image(generate(embedded, "a red star", **FAST))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(InputError, match=r"adapters\[1\]: plain.safetensors has no 'studio.method'"):
        generate(embedded, "a red star", adapters=[(sks_file, 1.0), (plain, 1.0)], **FAST)
    assert np.array_equal(image(generate(embedded, "a red star", **FAST)), before)


def test_only_reading_an_adapter_file_is_a_user_error(embedded, sks_file, monkeypatch):
    """A file that passes the header and base-model checks but then fails to attach is a bug: it propagates as
    itself, not dressed as refused input."""
    def broken(self, unet):
        raise ValueError("internal wiring error")

    monkeypatch.setattr(SCTuner, "_attach", broken)
    with pytest.raises(ValueError, match="internal wiring error") as raised:
        generate(embedded, "a red star", adapters=[(sks_file, 1.0)], **FAST)
    assert not isinstance(raised.value, InputError)


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ("sks.safetensors", "adapters must be a list of"),
        ([("nowhere.safetensors", 1.0)], r"adapters\[0\]: adapter file nowhere.safetensors does not exist"),
        ([("SKS", math.nan)], r"adapters\[0\]: scale=nan must be a finite number"),
        ([("SKS", 1.0), ("SKS", 0.5)], "names the same adapter twice"),
        ([("SD15", 1.0)], r"adapters\[0\]: other.safetensors was trained on an SD1 UNet with fingerprint"),
    ],
)
def test_bad_adapters_are_refused_naming_the_fix(embedded, sks_file, tmp_path, adapters, message):
    other = save_adapter(SCTuner.from_unet(build_unet("tiny-sd15")), tmp_path / "other.safetensors")
    files = {"SKS": sks_file, "SD15": other}
    if isinstance(adapters, list):
        adapters = [(files.get(source, source), scale) for source, scale in adapters]
    with pytest.raises(InputError, match=message):
        generate(embedded, "a red star", adapters=adapters, **FAST)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("sks", ("sks", 1.0)), ("sks:0.5", ("sks", 0.5)), ("C:/a.safetensors", ("C:/a.safetensors", 1.0)),
     ("C:/a.safetensors:-1", ("C:/a.safetensors", -1.0)), ("a:b", ("a:b", 1.0))],
)
def test_adapter_argument_form(text, expected):
    assert parse_adapter_arg(text) == expected


# -- the command line ----------------------------------------------------------------------------


def test_the_library_resolves_a_name_or_an_adapter_file(sks_file, tmp_path):
    library = AdapterLibrary(tmp_path / "lib")
    library.add(sks_file, "star")
    assert library.resolve("star").path == tmp_path / "lib" / "star.safetensors"
    assert library.resolve(sks_file).path == sks_file
    with pytest.raises(LibraryError, match="adapter file missing.safetensors does not exist"):
        library.resolve("missing.safetensors")


def test_cli_generates_with_a_library_adapter(sks_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "lib"))
    AdapterLibrary().add(sks_file, "star-style")
    assert main(["generate", "a red star", "--steps", "2", "--seed", "1", "--adapter", "star-style:0.5",
                 "--out", str(tmp_path / "out")]) == 0
    params = parse_infotext(Image.open(capsys.readouterr().out.split()[0]).text["parameters"])
    assert (params["Adapters"], params["Adapter hashes"]) == ("star-style:0.5", f"star-style: {short_sha256(sks_file)}")
    assert main(["generate", "x", "--adapter", "nope"]) == 2  # refused before the model loads
    assert capsys.readouterr().err.strip().startswith("error: no adapter named 'nope' in ")


def test_cli_lists_shows_renames_and_deletes_library_adapters(sks_file, tmp_path, monkeypatch, capsys):
    lib = ["--library", str(tmp_path / "lib")]
    AdapterLibrary(tmp_path / "lib").add(sks_file)
    assert main(["adapters", "list", *lib]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["Name", "Method", "Base"] and row.split()[:4] == ["sks", "sc_tuner", "SD1", "sks"]
    assert main(["adapters", "show", "sks", *lib]) == 0
    shown = capsys.readouterr().out
    assert "method: sc_tuner" in shown and "trigger words: sks" in shown
    assert main(["adapters", "rename", "sks", "star", *lib]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "lib" / "star.safetensors")

    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert main(["adapters", "delete", "star", *lib]) == 2
    assert "'star' not deleted; answer y, or pass --yes" in capsys.readouterr().err
    assert main(["adapters", "delete", "star", "--yes", *lib]) == 0
    assert main(["adapters", "list", *lib]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("holds no adapters yet: train one with `studio train`")


def test_help_lists_train_and_adapters(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "adapters" in out
