"""A batch manifest: many subjects, shared defaults, per-subject overrides of any TrainConfig field.

Three forms:

    # batch.yaml
    output: runs/stars            # optional (default: --out, else runs/jobs); relative to this file
    library: true                 # add each finished adapter to the adapter library (default true)
    defaults: {method: lora, method_options: {rank: 8}, steps: 400}
    subjects:
      - {name: red-star, data_dir: stars/red, trigger: sks}
      - {data_dir: stars/blue, trigger: zkz, steps: 600}        # name: the folder's, "blue"

    # batch.csv: a header of TrainConfig fields (data_dir required, name optional); a blank cell is the default.
    # Cells are read as numbers, true/false, [lists] and {mappings} where they look like one.
    name,data_dir,trigger,steps,method_options
    red-star,stars/red,sks,400,{rank: 8}

    # a folder of subject folders: one subject each, named after its folder, whose name is also its trigger word
    stars/red/*.png   stars/blue/*.png

Defaults given to `read_manifest` (the command line's --set, the Jobs tab's settings) go over the manifest's
defaults and under each subject's own values. Every subject is checked by building its TrainConfig (which
validates every value) before anything is queued: a bad manifest is refused as a whole, with one line per
problem naming the subject's row and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
from pathlib import Path
from typing import Any

import yaml

from adapters.io import default_library_root
from pipelines.errors import StudioError
from pipelines.train import TrainConfig, TrainConfigError, read_config_file
from studio.library import AdapterLibrary

from .job import JOB_FIELDS, PATH_FIELDS, JobSpec
from .store import JobStore

DEFAULT_OUT = Path("runs/jobs")
TOP_KEYS = ("output", "library", "defaults", "subjects")
SUBJECT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in JOB_FIELDS]
# YAML 1.1 (PyYAML) reads 1e-4 as text; these fields take numbers, so such text is read as the number it spells.
FLOAT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)}


class ManifestError(StudioError):
    """A manifest refused as a whole; the message has one line per problem, naming the row and the field."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """A validated manifest: one JobSpec per subject, in the manifest's order."""

    specs: list[JobSpec]
    rows: list[str]  # where each spec comes from ("batch.yaml: subject 2 'red-star'"), for messages
    out_dir: Path
    source: str


def read_manifest(source: str | Path, *, out_dir: str | Path | None = None, defaults: dict[str, Any] | None = None,
                  add_to_library: bool | None = None, base: Path | None = None) -> Batch:
    """Read and validate a manifest (a .yaml/.yml or .csv file, or a folder of subject folders).

    out_dir: where each subject's folder goes (default: the manifest's `output`, else runs/jobs). defaults: over
    the manifest's defaults, under each subject's values. add_to_library: over the manifest's `library`.
    base: what the manifest's relative paths are relative to (default: its folder; an uploaded one's: the
    working directory)."""
    path = Path(source).expanduser()
    base = base or (path if path.is_dir() else path.parent)
    top: dict[str, Any] = {}
    if path.is_dir():
        rows = _folder_rows(path)
    elif not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; pass a .yaml or .csv manifest, or a folder of "
                            "subject folders")
    elif path.suffix.lower() in (".yaml", ".yml"):
        top, rows = _yaml_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        raise ManifestError(f"manifest {path}: unknown format {path.suffix!r}; use .yaml, .yml or .csv, or a folder "
                            "of subject folders")

    problems: list[str] = []
    manifest_defaults = top.get("defaults") or {}
    if not isinstance(manifest_defaults, dict):
        raise ManifestError(f"manifest {path}: 'defaults' must be a mapping of fields ('steps: 400')")
    problems += _key_problems(f"{path}: defaults", manifest_defaults, allow_name=False)
    problems += _key_problems("the shared settings", defaults or {}, allow_name=False)
    shared = {**_resolve(manifest_defaults, base), **_resolve(defaults or {}, Path.cwd())}
    if out_dir is None:
        out_dir = base / top["output"] if top.get("output") else DEFAULT_OUT
    out_dir = Path(out_dir).expanduser().resolve()
    library = top.get("library", True) if add_to_library is None else add_to_library
    if not isinstance(library, bool):
        problems.append(f"{path}: library={library!r}: must be true or false")

    specs: list[JobSpec] = []
    wheres: list[str] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        row_problems = _key_problems(where, row, allow_name=True)
        if row_problems:
            problems += row_problems
            continue
        values = {**shared, **_resolve(row, base)}
        name = str(values.pop("name", None) or Path(str(values.get("data_dir", ""))).name)
        where = f"{where} {name!r}" if name else where
        if name in seen:
            problems.append(f"{where}: name {name!r} is also {seen[name]}; give each subject its own name")
            continue
        seen[name] = where
        try:
            spec = make_spec(name, values, out_dir, library is not False)
        except TrainConfigError as e:
            problems.append(f"{where}: {e}")
            continue
        problems += _output_problems(where, spec)
        specs.append(spec)
        wheres.append(where)
    if not rows:
        problems.append(f"{path}: no subjects; add some under 'subjects' (YAML), as rows (CSV), or as subfolders")
    if problems:
        raise ManifestError(f"manifest {path} refused, nothing was queued ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))
    return Batch(specs, wheres, out_dir, str(path))


def check_batch(batch: Batch, store: JobStore) -> None:
    """Refuse the batch as a whole where it clashes with what exists: a subject already in the store with other
    settings, or a new subject whose name the adapter library already holds."""
    problems = []
    for where, spec in zip(batch.rows, batch.specs):
        job = store.find(spec.name)
        if job is not None and job.fingerprint != spec.fingerprint():
            problems.append(f"{where}: name {spec.name!r} is already a job in {store.path} with other settings "
                            f"({differences(job.spec.config, spec.config)}; {job.state}); rename the subject, or use "
                            "another --store and --out")
        elif job is None and spec.add_to_library:
            library = AdapterLibrary(spec.config.get("library_dir"))
            if spec.name in library:
                problems.append(f"{where}: name {spec.name!r}: the adapter library ({library.root}) already holds "
                                f"{spec.name!r}; rename the subject, delete or rename that adapter, or pass "
                                "--no-library")
    if problems:
        raise ManifestError(f"manifest {batch.source} refused, nothing was queued ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))


def make_spec(name: str, values: dict[str, Any], out_dir: Path, add_to_library: bool = True) -> JobSpec:
    """The job of one subject, checked by building its TrainConfig. Samples default to the subject's caption (for
    the sample grid), the library to the default one, resolved now so that every worker adds to the same."""
    values = {k: _number(k, v) for k, v in values.items()}
    values.setdefault("library_dir", str(default_library_root()))
    values = {k: str(Path(v).expanduser().resolve()) if k in PATH_FIELDS and v is not None else v
              for k, v in values.items()}
    out_dir = Path(out_dir).expanduser().resolve()
    # Validates every value (naming the field, the value and the rule) before anything else reads them.
    config = TrainConfig.from_dict({**values, "name": name, "output_dir": out_dir / name}, source=f"subject {name!r}")
    if not values.get("sample_prompts"):
        values["sample_prompts"] = [config.fallback_caption or name]
    spec = JobSpec(name, json.loads(json.dumps(values, default=str)), out_dir / name, add_to_library)
    spec.train_config()  # as the workers will build it
    return spec


def parse_settings(text: str, source: str = "settings") -> dict[str, Any]:
    """Shared defaults written as YAML (the Jobs tab's settings box); refused unless a mapping of known fields."""
    try:
        values = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ManifestError(f"{source}: not valid YAML ({e}); write one 'field: value' per line") from e
    if not isinstance(values, dict):
        raise ManifestError(f"{source}: must be 'field: value' lines, not {type(values).__name__}")
    problems = _key_problems(source, values, allow_name=False)
    if problems:
        raise ManifestError("\n".join(problems))
    return values


def _yaml_rows(path: Path) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    try:
        top = read_config_file(path)
    except yaml.YAMLError as e:
        raise ManifestError(f"manifest {path} is not valid YAML ({e})") from e
    except TrainConfigError as e:  # not a mapping
        raise ManifestError(str(e).replace("config file", "manifest")) from e
    unknown = sorted(set(top) - set(TOP_KEYS))
    if unknown:
        hint = _did_you_mean(unknown[0], TOP_KEYS)
        raise ManifestError(f"manifest {path}: unknown key(s) {unknown}{hint}; a manifest has {list(TOP_KEYS)}, "
                            "and a subject's settings go under 'defaults' or in its entry under 'subjects'")
    subjects = top.get("subjects") or []
    if not isinstance(subjects, list):
        raise ManifestError(f"manifest {path}: 'subjects' must be a list of entries ('- data_dir: ...')")
    rows = []
    for i, row in enumerate(subjects, start=1):
        where = f"{path}: subject {i}"
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: must be a mapping of fields ('data_dir: ...'), not {row!r}")
        rows.append((where, row))
    return top, rows


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often start CSV files with a BOM
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        if None in row:  # more cells than header names
            raise ManifestError(f"{where}: {len(row[None])} cell(s) more than the header's {len(reader.fieldnames)} "
                                "columns; quote cells that hold commas")
        values = {key.strip(): _cell(cell) for key, cell in row.items() if cell is not None and cell.strip()}
        if values:
            rows.append((where, values))
    return rows


def _folder_rows(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    subjects = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(f"{folder}: folder", {"name": sub.name, "data_dir": sub.resolve(), "trigger": sub.name})
            for sub in subjects]


def _cell(text: str) -> Any:
    """A CSV cell: a number, true/false, a [list] or {mapping} where it reads as one, else the text."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false") or text[:1] in "[{":
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return text


def _number(key: str, value: Any) -> Any:
    if key in FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _resolve(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths are relative to the manifest's folder."""
    return {k: str(base / Path(v).expanduser()) if k in PATH_FIELDS and isinstance(v, (str, Path)) else v
            for k, v in values.items()}


def _key_problems(where: str, values: dict[str, Any], allow_name: bool) -> list[str]:
    problems = []
    for key in values:
        if key in JOB_FIELDS:
            problems.append(f"{where}: {key} is set by the batch (each subject trains in OUT/<name>/work and resumes "
                            "its last checkpoint); remove it, and set the batch's output instead")
        elif key == "name" and not allow_name:
            problems.append(f"{where}: name names one subject; set it in the subject's own entry")
        elif key not in SUBJECT_FIELDS:
            problems.append(f"{where}: unknown field {key!r}{_did_you_mean(key, SUBJECT_FIELDS)}; a subject takes "
                            f"TrainConfig's fields: {', '.join(SUBJECT_FIELDS)}")
    return problems


def _output_problems(where: str, spec: JobSpec) -> list[str]:
    """A finished job of other settings in the subject's output folder would be refused when it runs: say so now."""
    try:
        done = json.loads(spec.done_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    if done.get("fingerprint") == spec.fingerprint():
        return []
    try:
        made_with = json.loads((spec.result_dir / "metrics.json").read_text(encoding="utf-8"))["settings"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        made_with = {}
    return [f"{where}: name: {spec.out_dir} holds a finished job made with other settings "
            f"({differences(made_with, spec.config)}); rename the subject, choose another output folder, or delete "
            "that folder"]


def differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed between two settings: "steps 200 -> 400, trigger 'sks' -> 'zkz'"."""
    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(default)"

    changed = [f"{key} {shown(old, key)} -> {shown(new, key)}" for key in sorted(set(old) | set(new))
               if old.get(key, ...) != new.get(key, ...)]
    return ", ".join(changed) or "other output folder or library setting"


def _did_you_mean(key: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
