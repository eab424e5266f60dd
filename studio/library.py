"""The adapter library: one folder of adapter files, each described by its own header.

    library = AdapterLibrary()                    # $STUDIO_ADAPTER_DIR, else ~/.cache/sd-studio/adapters
    entry = library.add("runs/train/sks.safetensors")
    library.rename("sks", "star-style")
    [e.name for e in library.list()]              # ["star-style"]

An adapter's name is its file stem; everything else (method, base family, trigger words, date)
is read from the header `adapters.io.save_adapter` wrote, so the folder is the whole database:
files copied in by hand show up too. Writes go to a temporary name and are renamed.

A file the library cannot read as an adapter (not safetensors, no studio header, a malformed date or
trigger-word list...) is listed as a broken entry, its `problem` saying why, so one bad file never stops
`studio adapters list` or the app; `get()` refuses it with that reason, and rename/delete still work on it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from safetensors import SafetensorError

from adapters import REGISTRY, read_metadata
from adapters.base import FORMAT_VERSION
from adapters.foreign import library_fields
from adapters.io import adapter_name_problem, default_library_root
from pipelines.errors import StudioError

SUFFIX = ".safetensors"
BROKEN = "broken"  # the method of an entry whose file cannot be read; no REGISTRY key, so no code path uses it


class LibraryError(StudioError):
    """A library operation refused: unknown name, name taken, bad name, not an adapter file."""


@dataclass(frozen=True)
class AdapterEntry:
    name: str  # the file stem
    path: Path
    method: str  # a key of adapters.REGISTRY
    base_family: str  # "SD1" | "SD2" | "SDXL"
    trigger_words: tuple[str, ...]
    created: datetime  # when save_adapter wrote it (the header's modelspec.date), else the file's mtime
    problem: str | None = None  # why the file cannot be used (method is then BROKEN); None for a good adapter

    COLUMNS = ("Name", "Method", "Base", "Trigger words", "Created", "Problem")  # of `row()`

    @classmethod
    def broken(cls, path: Path, error: LibraryError) -> AdapterEntry:
        """The entry of a file `read_entry` refused: listed with the reason, never used."""
        return cls(name=path.stem, path=path, method=BROKEN, base_family="", trigger_words=(),
                   created=_mtime(path), problem=str(error).removeprefix(f"{path}: "))

    @property
    def usable(self) -> bool:
        return self.problem is None

    def row(self) -> list[str]:
        """The entry as a line of the library's tables (`studio adapters list`, the Adapters tab)."""
        return [self.name, self.method, self.base_family, ", ".join(self.trigger_words),
                f"{self.created.astimezone():%Y-%m-%d %H:%M}", self.problem or ""]


def _mtime(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    except OSError:  # gone meanwhile, or a dangling link
        return datetime.fromtimestamp(0, tz=timezone.utc)


def read_entry(path: Path) -> AdapterEntry:
    """An adapter file's entry, from its header alone; LibraryError, naming the header field, the value
    and the fix, if it is not a usable studio adapter."""
    try:
        meta = read_metadata(path)
    except (OSError, SafetensorError) as e:
        raise LibraryError(f"{path}: not a readable .safetensors file ({e}); delete it or replace it with "
                           "an adapter file the studio wrote") from e
    method = meta.get("studio.method")
    if method is None and (lora := library_fields(path, meta)) is not None:
        # A kohya / diffusers LoRA of another tool: its ss_* and modelspec.* header describes it (adapters/foreign.py).
        return AdapterEntry(name=path.stem, path=path, created=lora.pop("created") or _mtime(path), **lora)
    if method is None:
        raise LibraryError(f"{path}: not a studio adapter file (no 'studio.method' in its header); "
                           "train or convert it with the studio first")
    if method not in REGISTRY:
        raise LibraryError(f"{path}: studio.method {method!r} is unknown to this studio (known: {sorted(REGISTRY)}); "
                           "open it with the studio version that wrote it")
    if meta.get("studio.version") != FORMAT_VERSION:
        raise LibraryError(f"{path}: studio.version {meta.get('studio.version')!r}, but this studio reads adapter "
                           f"format {FORMAT_VERSION!r}; open it with the studio version that wrote it")
    for key in ("studio.config", "studio.training"):
        _header_json(path, meta, key, dict, "a JSON object")
    words = _header_json(path, meta, "studio.trigger_words", list, 'a JSON list of strings such as ["sks"]', "[]")
    if not all(isinstance(w, str) for w in words):
        raise LibraryError(f"{path}: studio.trigger_words {meta['studio.trigger_words']!r} must be a JSON list of "
                           'strings such as ["sks"]; re-save the adapter with the studio')
    date = meta.get("modelspec.date")
    try:
        created = datetime.fromisoformat(date) if date else _mtime(path)
        created.astimezone()  # as row() shows it: a year-1 date with a zone overflows
    except (ValueError, OverflowError):
        raise LibraryError(f"{path}: modelspec.date {date!r} is not an ISO 8601 date such as "
                           "'2024-05-01T12:00:00+00:00'; fix that header entry or re-save the adapter") from None
    return AdapterEntry(name=path.stem, path=path, method=method, base_family=meta.get("studio.base_family", ""),
                        trigger_words=tuple(words), created=created)


def _header_json(path: Path, meta: dict[str, str], key: str, kind: type, what: str, default: str = "{}"):
    """The header entry `key` decoded from JSON, refused unless it is a `kind`."""
    text = meta.get(key, default)
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise LibraryError(f"{path}: {key} {text[:80]!r} is not {what}; re-save the adapter with the studio")
    return value


class AdapterLibrary:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_library_root()

    def list(self) -> list[AdapterEntry]:
        """Every adapter file in the folder, by name; one that cannot be read is a broken entry (its
        `problem` says why), never an error: filter with `usable()` where only working adapters fit."""
        entries = []
        for path in sorted(self.root.glob(f"*{SUFFIX}")) if self.root.is_dir() else []:
            if path.name.startswith(".") or not path.is_file():  # an atomic write in progress; a folder
                continue
            try:
                entries.append(read_entry(path))
            except LibraryError as e:
                entries.append(AdapterEntry.broken(path, e))
        return entries

    def usable(self) -> list[AdapterEntry]:
        """The entries of `list()` that can be loaded (broken ones left out)."""
        return [entry for entry in self.list() if entry.usable]

    def __contains__(self, name: str) -> bool:
        return self._path(name).is_file()

    def get(self, name: str) -> AdapterEntry:
        """The adapter `name`; LibraryError if there is none, or if its file is broken (with the reason)."""
        if name not in self:
            known = [e.name for e in self.list()]
            raise LibraryError(f"no adapter named {name!r} in {self.root}; the library holds {known}")
        return read_entry(self._path(name))

    def entry(self, name: str) -> AdapterEntry:
        """The entry of `name`, a broken one included (what rename and delete act on); LibraryError if none."""
        if name not in self:
            self.get(name)  # raises, listing the library
        try:
            return read_entry(self._path(name))
        except LibraryError as e:
            return AdapterEntry.broken(self._path(name), e)

    def resolve(self, name_or_path: str | os.PathLike) -> AdapterEntry:
        """The adapter a user means: an adapter file given by its path, else the library's adapter of that
        name (how `studio generate --adapter` and the UI read their choice)."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return read_entry(path)
        if len(path.parts) > 1 or path.suffix == SUFFIX:  # meant as a path: not a name to look up
            raise LibraryError(f"adapter file {path} does not exist (nor is it a name in the library {self.root})")
        return self.get(str(name_or_path))

    def add(self, path: str | os.PathLike, name: str | None = None, *, overwrite: bool = False) -> AdapterEntry:
        """Copy the adapter file at `path` into the library as `name` (default: its file stem).
        Refuses a name already taken unless `overwrite`."""
        source = Path(path)
        read_entry(source)  # refuse anything that is not an adapter before copying
        name = source.stem if name is None else name
        target = self._path(name)
        if target.exists() and not overwrite:
            raise LibraryError(f"the library already holds {name!r}; pick another name, or pass overwrite=True "
                               "to replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        return read_entry(target)

    def rename(self, old: str, new: str) -> AdapterEntry:
        """Rename an adapter's file; a broken one too (the result is then its broken entry)."""
        source, target = self.entry(old).path, self._path(new)
        if target.exists():
            raise LibraryError(f"cannot rename {old!r} to {new!r}: the library already holds {new!r}; "
                               "delete it first or pick another name")
        os.replace(source, target)
        try:
            return read_entry(target)
        except LibraryError as e:
            return AdapterEntry.broken(target, e)

    def delete(self, name: str) -> None:
        """Delete an adapter's file; a broken one too."""
        self.entry(name).path.unlink()

    def _path(self, name: str) -> Path:
        problem = adapter_name_problem(name) if isinstance(name, str) else "is not a string"
        if problem is not None:
            raise LibraryError(f"adapter name {name!r} {problem}; use a plain file name like 'red-star-style'")
        return self.root / f"{name}{SUFFIX}"
