"""One subject-customization job: `run_job(pipe, spec)` is one idempotent call.

    spec = JobSpec("red-star", {"data_dir": "data/red", "trigger": "sks", "steps": 200}, Path("runs/jobs/red-star"))
    outcome = run_job(model.pipe, spec)      # trains, or resumes after a crash, or says it is already done

Its folder, OUT/<name>/:

    work/            TrainConfig.output_dir: checkpoints/, samples/, log.txt, losses.jsonl (kept for resuming)
    result/          <name>.safetensors, samples.png (sample grid), log.txt, metrics.json
    done             JSON: the spec's fingerprint and the outputs; written last

Run again after a crash, it resumes from the last checkpoint (train's resume="latest"); the finished result
is written to a hidden temporary folder renamed to result/ when complete, then the adapter goes to the library,
then `done` is written: each step is redone only if the one before did not complete. Run again after success,
it does nothing and says so. A spec with other settings than those that made `done` is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import StudioError
from pipelines.train import TrainConfig, TrainProgress, train
from studio.library import AdapterLibrary, LibraryError

# Fields the job sets itself: its folder, and resuming whatever a previous attempt left.
JOB_FIELDS = ("output_dir", "resume")
PATH_FIELDS = ("data_dir", "class_dir", "hint_dir", "mask_dir", "library_dir")


class JobError(StudioError):
    """A job that cannot run as asked (its folder holds another job's result)."""


@dataclass(frozen=True)
class JobSpec:
    """What one job trains and where its outputs go."""

    name: str  # the subject: the job's name and the adapter's
    config: dict[str, Any]  # TrainConfig fields as JSON values (paths as absolute strings), but output_dir/resume
    out_dir: Path  # OUT/<name>
    add_to_library: bool = True  # the finished adapter goes to the library (config's library_dir, else the default)

    @property
    def work_dir(self) -> Path:
        return self.out_dir / "work"

    @property
    def result_dir(self) -> Path:
        return self.out_dir / "result"

    @property
    def done_file(self) -> Path:
        return self.out_dir / "done"

    @property
    def steps(self) -> int:
        return int(self.config.get("steps", TrainConfig.steps))

    def train_config(self) -> TrainConfig:
        """The job's TrainConfig (it validates every value): resuming from the work folder's last checkpoint."""
        return TrainConfig.from_dict({**self.config, "name": self.name, "output_dir": self.work_dir,
                                      "resume": "latest"}, source=f"job {self.name!r}")

    def fingerprint(self) -> str:
        """A hash of the settings and the output folder: the same subject submitted again is the same job."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "config": self.config, "out_dir": str(self.out_dir),
                           "add_to_library": self.add_to_library}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        values = json.loads(text)
        return cls(values["name"], values["config"], Path(values["out_dir"]), values["add_to_library"])


@dataclass
class JobOutcome:
    status: str  # "done", "already done" or "cancelled" (a checkpoint was written: run again to continue)
    step: int
    outputs: dict[str, str] = field(default_factory=dict)  # adapter, grid, log, metrics (and library) paths
    message: str = ""


def run_job(pipe, spec: JobSpec, *, progress: Callable[[TrainProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None, attempt: int | None = None) -> JobOutcome:
    """Run `spec` to its end with `pipe`, resuming whatever an earlier call left (see the module's doc).

    `progress` and `should_stop` are train's; `should_stop()` True ends the call with a checkpoint (status
    "cancelled"). Bad data (an unreadable image, a missing caption) raises DatasetError before any work.
    Under `accelerate launch` every process calls this; the main one writes the outputs."""
    main = process_state().is_main_process
    config = spec.train_config()
    fingerprint = spec.fingerprint()
    done = _read_json(spec.done_file)
    if done is not None:
        if done.get("fingerprint") != fingerprint:
            raise JobError(f"{spec.out_dir} holds a finished job made with other settings; give this subject "
                           "another name or output folder, or delete that folder to train it again")
        return JobOutcome("already done", spec.steps, done["outputs"], f"{spec.name}: already done, nothing to do")

    log = _JobLog(spec.work_dir / "log.txt", enabled=main)
    log.write(f"attempt {attempt or '?'}: {spec.name}, {config.method}, {config.steps} steps")
    metrics = _read_json(spec.result_dir / "metrics.json")
    if metrics is None or metrics.get("fingerprint") != fingerprint:  # else trained before: only finish up
        try:
            result = train(pipe, config, progress=_recording(spec, log, progress) if main else progress,
                           should_stop=should_stop)
        except BaseException as e:
            log.write(f"stopped by {type(e).__name__}: {e}\n{traceback.format_exc()}")
            raise
        if result.cancelled:
            log.write(f"stopped at step {result.step}; checkpoint {result.checkpoint}")
            return JobOutcome("cancelled", result.step, {"log": str(log.path)},
                              f"{spec.name}: stopped at step {result.step}; run it again to continue")
        if main:
            _write_result(spec, config, result.adapter_path, log, fingerprint)
    if not main:
        return JobOutcome("done", spec.steps)

    outputs = {key: str(spec.result_dir / name) for key, name in _result_files(spec).items()
               if (spec.result_dir / name).exists()}
    if spec.add_to_library:
        outputs["library"] = str(_add_to_library(spec, config))
    _write_json_atomic(spec.done_file, {"fingerprint": fingerprint, "finished": time.time(), "outputs": outputs})
    log.write(f"done: {outputs.get('adapter')}")
    return JobOutcome("done", spec.steps, outputs, f"{spec.name}: done")


def process_state():
    """accelerate's view of this process (its rank and device under `accelerate launch` or torchrun). CPU-only
    multi-process runs (ACCELERATE_USE_CPU=1 with torchrun: gloo) are honoured too."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _result_files(spec: JobSpec) -> dict[str, str]:
    return {"adapter": f"{spec.name}.safetensors", "grid": "samples.png", "log": "log.txt", "metrics": "metrics.json"}


def _recording(spec: JobSpec, log: _JobLog,
               progress: Callable[[TrainProgress], None] | None) -> Callable[[TrainProgress], None]:
    """The progress callback that also keeps each step's loss (work/losses.jsonl) and a line per 10% in the log."""
    losses = spec.work_dir / "losses.jsonl"
    every = max(1, spec.steps // 10)

    def record(p: TrainProgress) -> None:
        if p.loss is not None:
            with open(losses, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": p.step, "loss": p.loss}) + "\n")
        if p.step % every == 0 or p.step == p.total_steps or p.checkpoint:
            loss = "" if p.loss is None else f", loss {p.loss:.4f}"
            log.write(f"step {p.step}/{p.total_steps}{loss}" + (f"; checkpoint {p.checkpoint.name}" if p.checkpoint
                                                                  else ""))
        if progress is not None:
            progress(p)

    return record


def _write_result(spec: JobSpec, config: TrainConfig, adapter: Path, log: _JobLog, fingerprint: str) -> None:
    """result/ written whole: into a hidden temporary folder, renamed when complete."""
    files = _result_files(spec)
    for stale in spec.out_dir.glob(".result.tmp-*"):  # left by an attempt that died while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = spec.out_dir / f".result.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    shutil.copyfile(adapter, tmp / files["adapter"])
    grid = sample_grid(spec.work_dir / "samples")
    if grid is not None:
        grid.save(tmp / files["grid"])
    losses = _losses(spec.work_dir / "losses.jsonl", config.steps)
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {
        "name": spec.name, "fingerprint": fingerprint, "method": config.method, "steps": config.steps,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_final_mean": sum(tail) / len(tail) if tail else None, "losses": losses,
        "adapter_sha256": hashlib.sha256((tmp / files["adapter"]).read_bytes()).hexdigest(),
        "settings": {k: v for k, v in spec.config.items()}, "finished": time.time(),
    }
    (tmp / files["metrics"]).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    log.write("result written")
    shutil.copyfile(log.path, tmp / files["log"])
    if spec.result_dir.exists():  # a previous attempt's, written before its `done`: replaced by this one
        shutil.rmtree(spec.result_dir)
    os.replace(tmp, spec.result_dir)


def _losses(path: Path, steps: int) -> list[float]:
    """The loss of each step 1..steps; a step redone after a resume keeps its last value (the same, by exact
    resume)."""
    by_step: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row["loss"]
    return [by_step[s] for s in range(1, steps + 1) if s in by_step]


def _add_to_library(spec: JobSpec, config: TrainConfig) -> Path:
    """The result's adapter in the library as the subject's name; a file already there is kept if it is this very
    adapter (a retried finish) and refused otherwise."""
    library = AdapterLibrary(config.library_dir)
    adapter = spec.result_dir / _result_files(spec)["adapter"]
    if spec.name in library:
        existing = library.get(spec.name).path
        if existing.read_bytes() == adapter.read_bytes():
            return existing
        raise LibraryError(f"the adapter library ({library.root}) already holds another {spec.name!r}; rename or "
                           f"delete it, then retry this job (its training is kept in {spec.result_dir})")
    return library.add(adapter, spec.name).path


def sample_grid(samples_dir: Path, min_cell: int = 128) -> Image.Image | None:
    """The first and last sample steps as two labelled rows (before and after training), one column per
    (prompt, seed), each image scaled up to at least `min_cell` pixels; None without samples."""
    steps = sorted(p for p in samples_dir.glob("step-*") if p.is_dir()) if samples_dir.is_dir() else []
    rows = [(folder, sorted(folder.glob("*.png"))) for folder in dict.fromkeys([steps[0], steps[-1]])] if steps else []
    rows = [(folder, files) for folder, files in rows if files]
    if not rows:
        return None
    width, height = Image.open(rows[0][1][0]).size
    scale = max(1, -(-min_cell // min(width, height)))  # whole multiples keep small renders sharp
    cell = (width * scale, height * scale)
    label_width, columns = 80, max(len(files) for _, files in rows)
    grid = Image.new("RGB", (label_width + columns * cell[0], len(rows) * cell[1]), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=16)
    for r, (folder, files) in enumerate(rows):
        draw.text((8, r * cell[1] + cell[1] // 2), f"step {int(folder.name[5:])}", fill="black", font=font,
                  anchor="lm")
        for c, file in enumerate(files):
            with Image.open(file) as image:
                grid.paste(image.convert("RGB").resize(cell, Image.Resampling.NEAREST),
                           (label_width + c * cell[0], r * cell[1]))
    return grid


class _JobLog:
    """The job's log: timestamped lines appended to work/log.txt, across attempts."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json_atomic(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(values, indent=1), encoding="utf-8")
    os.replace(tmp, path)
