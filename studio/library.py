"""The adapter library: one folder of adapter files, each described by its own header.

    library = AdapterLibrary()                    # $STUDIO_ADAPTER_DIR, else ~/.cache/sd-studio/adapters
    entry = library.add("runs/train/sks.safetensors")
    library.rename("sks", "star-style")
    [e.name for e in library.list()]              # ["star-style"]

An adapter's name is its file stem; everything else (method, base family, trigger words, date)
is read from the header `adapters.io.save_adapter` wrote, so the folder is the whole database:
files copied in by hand show up too. Writes go to a temporary name and are renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from safetensors import SafetensorError

from adapters import read_metadata
from adapters.io import adapter_name_problem, default_library_root
from pipelines.errors import StudioError

SUFFIX = ".safetensors"


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

    COLUMNS = ("Name", "Method", "Base", "Trigger words", "Created")  # of `row()`

    def row(self) -> list[str]:
        """The entry as a line of the library's tables (`studio adapters list`, the Adapters tab)."""
        return [self.name, self.method, self.base_family, ", ".join(self.trigger_words),
                f"{self.created.astimezone():%Y-%m-%d %H:%M}"]


def read_entry(path: Path) -> AdapterEntry:
    """An adapter file's entry, from its header alone; LibraryError if it is not a studio adapter."""
    try:
        meta = read_metadata(path)
    except (OSError, SafetensorError) as e:
        raise LibraryError(f"{path} is not a readable .safetensors file ({e})") from e
    if "studio.method" not in meta:
        raise LibraryError(f"{path} is not a studio adapter file (no 'studio.method' in its header); "
                           "train or convert it with the studio first")
    date = meta.get("modelspec.date")
    created = (datetime.fromisoformat(date) if date
               else datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc))
    return AdapterEntry(name=path.stem, path=path, method=meta["studio.method"],
                        base_family=meta.get("studio.base_family", ""),
                        trigger_words=tuple(json.loads(meta.get("studio.trigger_words", "[]"))), created=created)


class AdapterLibrary:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_library_root()

    def list(self) -> list[AdapterEntry]:
        """Every adapter in the folder, by name; other files are skipped with a warning naming them."""
        entries = []
        for path in sorted(self.root.glob(f"*{SUFFIX}")) if self.root.is_dir() else []:
            if path.name.startswith("."):  # an atomic write in progress
                continue
            try:
                entries.append(read_entry(path))
            except LibraryError as e:
                warnings.warn(f"adapter library: skipped {e}", stacklevel=2)
        return entries

    def __contains__(self, name: str) -> bool:
        return self._path(name).is_file()

    def get(self, name: str) -> AdapterEntry:
        if name not in self:
            known = [e.name for e in self.list()]
            raise LibraryError(f"no adapter named {name!r} in {self.root}; the library holds {known}")
        return read_entry(self._path(name))

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
        source, target = self.get(old).path, self._path(new)
        if target.exists():
            raise LibraryError(f"cannot rename {old!r} to {new!r}: the library already holds {new!r}; "
                               "delete it first or pick another name")
        os.replace(source, target)
        return read_entry(target)

    def delete(self, name: str) -> None:
        self.get(name).path.unlink()

    def _path(self, name: str) -> Path:
        problem = adapter_name_problem(name) if isinstance(name, str) else "is not a string"
        if problem is not None:
            raise LibraryError(f"adapter name {name!r} {problem}; use a plain file name like 'red-star-style'")
        return self.root / f"{name}{SUFFIX}"
