"""The adapter library: list/add/rename/delete round trip, and the refusals."""

from __future__ import annotations

import json
import struct
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapters import LoRA, LoRAConfig, SCTuner, read_metadata, save_adapter
from pipelines.architectures import build_unet
from studio.cli import main
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
    # Listed, as broken with the reason, rather than hidden: the user sees why it is not offered anywhere.
    assert [(e.name, e.method) for e in library.list()] == [("foreign", "broken"), ("sks", "lora"),
                                                            ("style", "lora")]
    assert [e.name for e in library.usable()] == ["sks", "style"]


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path))
    assert AdapterLibrary().root == tmp_path
    monkeypatch.delenv("STUDIO_ADAPTER_DIR")
    assert str(AdapterLibrary().root).endswith(".cache/sd-studio/adapters")


def with_header(source: Path, target: Path, **changes: str) -> Path:
    """A copy of the adapter file `source` whose header entries are changed (key dots spelled as '__')."""
    meta = {**read_metadata(source), **{key.replace("__", "."): value for key, value in changes.items()}}
    save_file(load_file(source), target, metadata=meta)
    return target


# Each bad file, and the words its reason must hold: the header field and the value found.
BAD_FILES = {
    "bad-date": ({"modelspec__date": "yesterday"}, ["modelspec.date 'yesterday'", "ISO 8601"]),
    "bad-words": ({"studio__trigger_words": "sks, star"}, ["studio.trigger_words 'sks, star'", "JSON list"]),
    "bad-words-type": ({"studio__trigger_words": '{"a": 1}'}, ["studio.trigger_words", "JSON list"]),
    "bad-word-items": ({"studio__trigger_words": "[1, 2]"}, ["studio.trigger_words '[1, 2]'", "strings"]),
    "bad-config": ({"studio__config": "rank=4"}, ["studio.config 'rank=4'", "JSON object"]),
    "bad-method": ({"studio__method": "dreamtuner"}, ["studio.method 'dreamtuner' is unknown"]),
    "bad-version": ({"studio__version": "99"}, ["studio.version '99'"]),
}


def bad_library(root: Path, good: Path) -> Path:
    """`good` plus one file of each bad kind: malformed header entries, an ss_* value that is not a string
    (not even valid safetensors), a PNG renamed, an empty file."""
    root.mkdir(parents=True)
    (root / "good.safetensors").write_bytes(good.read_bytes())
    for name, (changes, _) in BAD_FILES.items():
        with_header(good, root / f"{name}.safetensors", **changes)
    header = json.dumps({"__metadata__": {"studio.method": "lora", "ss_network_dim": 4}}).encode()
    (root / "bad-ss.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (root / "not-safetensors.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (root / "empty.safetensors").write_bytes(b"")
    return root


def test_a_bad_file_is_listed_as_broken_with_its_reason_never_fatal(tmp_path, adapter_files):
    tuner, _ = adapter_files
    library = AdapterLibrary(bad_library(tmp_path / "lib", tuner))
    entries = {e.name: e for e in library.list()}  # no exception, whatever the files hold
    assert sorted(entries) == sorted([*BAD_FILES, "bad-ss", "not-safetensors", "empty", "good"])
    good = entries.pop("good")
    assert (good.method, good.trigger_words, good.problem, good.usable) == ("sc_tuner", ("sks",), None, True)
    assert [e.name for e in library.usable()] == ["good"]
    for name, entry in entries.items():
        assert (entry.method, entry.trigger_words, entry.usable) == ("broken", (), False), name
        assert entry.row()[1] == "broken" and entry.row()[-1] == entry.problem  # the table shows why
    for name, (_, words) in BAD_FILES.items():
        assert all(word in entries[name].problem for word in words), entries[name].problem
    assert "not a readable .safetensors file" in entries["bad-ss"].problem
    assert "expected a string" in entries["bad-ss"].problem  # safetensors' own words for ss_network_dim=4
    assert "not a readable .safetensors file" in entries["not-safetensors"].problem

    # Using a broken entry is refused with its reason; renaming or deleting it (the way out) works.
    with pytest.raises(LibraryError, match=r"bad-date\.safetensors: modelspec\.date 'yesterday' is not an ISO"):
        library.get("bad-date")
    with pytest.raises(LibraryError, match="bad-words.safetensors: studio.trigger_words"):
        library.resolve(str(library.root / "bad-words.safetensors"))
    assert library.rename("bad-date", "old-date").problem.startswith("modelspec.date 'yesterday'")
    library.delete("old-date")
    assert "old-date" not in library and library.get("good").method == "sc_tuner"


def test_cli_lists_a_broken_file_marked_with_its_reason(tmp_path, adapter_files, capsys):
    tuner, _ = adapter_files
    lib = ["--library", str(bad_library(tmp_path / "lib", tuner))]
    assert main(["adapters", "list", *lib]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["Name", "Method", "Base", "Trigger", "words", "Created", "Problem"]
    rows = {row.split()[0]: row for row in rows}
    assert rows["good"].split()[1:4] == ["sc_tuner", "SD1", "sks"] and rows["good"].split()[-1] != "broken"
    assert rows["bad-date"].split()[1] == "broken" and "modelspec.date 'yesterday' is not an ISO" in rows["bad-date"]
    assert rows["empty"].split()[1] == "broken" and "not a readable .safetensors file" in rows["empty"]
    assert main(["adapters", "show", "bad-words", *lib]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "studio.trigger_words 'sks, star' is not a JSON list" in err
    assert main(["adapters", "delete", "bad-words", "--yes", *lib]) == 0
    assert capsys.readouterr().out.strip() == "deleted 'bad-words'"


def test_the_app_starts_and_its_adapter_lists_skip_broken_files(embedded, tmp_path, adapter_files, monkeypatch):
    from studio.ui import adapters_tab, build_app, compose_tab, erase_tab, generate_tab

    tuner, _ = adapter_files
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(bad_library(tmp_path / "lib", tuner)))
    build_app(embedded, tmp_path / "out")  # raised on the first malformed header before
    assert [row[0] for row in generate_tab.adapter_rows()] == ["good"]  # the Generate tab offers only usable ones
    assert generate_tab.controller_choices() == [] and erase_tab.membrane_choices() == []
    assert compose_tab.concept_choices() == []  # an SC-Tuner is not a weight delta; broken ones never are
    rows = {row[0]: row for row in adapters_tab.list_adapters()}  # the Adapters tab shows all, with the reason
    assert len(rows) == len(BAD_FILES) + 4 and rows["bad-date"][1] == "broken"
