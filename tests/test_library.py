"""The adapter library: list/add/rename/delete round trip, and the refusals."""

from __future__ import annotations

from datetime import datetime

import pytest
from safetensors.torch import save_file

from adapters import LoRA, LoRAConfig, SCTuner, save_adapter
from pipelines.architectures import build_unet
from studio.library import AdapterLibrary, LibraryError


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    """Two adapter files as training writes them (an SC-Tuner with a trigger word, a LoRA without)."""
    folder = tmp_path_factory.mktemp("adapters")
    unet = build_unet("tiny-sd15")
    tuner = save_adapter(SCTuner.from_unet(unet), folder / "sks.safetensors", trigger_words=["sks"])
    lora = save_adapter(LoRA.from_unet(unet, LoRAConfig(rank=2)), folder / "style.safetensors")
    return tuner, lora


def test_round_trip(tmp_path, adapter_files):
    tuner, lora = adapter_files
    library = AdapterLibrary(tmp_path / "lib")
    assert library.list() == []  # the folder does not exist yet

    entry = library.add(tuner)
    assert (entry.name, entry.method, entry.base_family, entry.trigger_words) == ("sks", "sc_tuner", "SD1", ("sks",))
    assert isinstance(entry.created, datetime) and entry.path == tmp_path / "lib" / "sks.safetensors"
    library.add(lora, name="watercolor")
    assert [(e.name, e.method) for e in library.list()] == [("sks", "sc_tuner"), ("watercolor", "lora")]

    renamed = library.rename("sks", "red star")
    assert renamed.trigger_words == ("sks",)
    assert library.get("red star").path == tmp_path / "lib" / "red star.safetensors"
    library.delete("watercolor")
    assert [e.name for e in library.list()] == ["red star"]
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["red star.safetensors"]  # no temporary files


def test_refusals(tmp_path, adapter_files):
    tuner, lora = adapter_files
    library = AdapterLibrary(tmp_path)
    library.add(tuner)
    library.add(lora)
    with pytest.raises(LibraryError, match="already holds 'sks'.*overwrite=True"):
        library.add(lora, name="sks")
    assert library.add(lora, name="sks", overwrite=True).method == "lora"
    with pytest.raises(LibraryError, match="cannot rename 'sks' to 'style': the library already holds 'style'"):
        library.rename("sks", "style")
    for bad, problem in (("", "is empty"), ("a/b", "contains a slash"), ("..\\x", "contains a slash"),
                         (".hidden", "starts with '.'")):
        with pytest.raises(LibraryError, match=f"adapter name {bad!r} {problem}".replace("\\", "\\\\")):
            library.rename("sks", bad)
    with pytest.raises(LibraryError, match=r"no adapter named 'nope' .* holds \['sks', 'style'\]"):
        library.delete("nope")

    foreign = tmp_path / "foreign.safetensors"  # e.g. a LoRA from another tool: no studio header
    save_file({}, foreign)
    with pytest.raises(LibraryError, match="not a studio adapter file"):
        library.add(foreign)
    with pytest.warns(UserWarning, match="skipped .*foreign.safetensors is not a studio adapter"):
        assert [e.name for e in library.list()] == ["sks", "style"]


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path))
    assert AdapterLibrary().root == tmp_path
    monkeypatch.delenv("STUDIO_ADAPTER_DIR")
    assert str(AdapterLibrary().root).endswith(".cache/sd-studio/adapters")
