"""Where jobs run: here (one after another, or N worker processes), as a SLURM array, or as Ray tasks.

    run_local(store, model=None, workers=2)          # `studio jobs submit/resume --workers 2`
    print(sbatch_script(store, store.jobs(["pending"]), model="sd15/"))   # `studio jobs sbatch`
    run_ray(store, model=None, num_cpus=2)           # `studio jobs ray`

Every mode runs `Worker` and reads progress from the store, the single source of truth; one job across several
GPUs is `accelerate launch -m studio.cli jobs run-one` (worker.run_one), see docs/jobs.md.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipelines.errors import StudioError

from .store import FINISHED, JobRecord, JobStore
from .worker import Worker, cached_pipe, load_pipe


class StoreProgress:
    """Progress bars drawn from the store (so they show every worker's jobs, whichever process runs them): one for
    the batch, one per running job; a line per job as it ends."""

    def __init__(self, store: JobStore, ids: list[int], *, disable: bool = False, interval_s: float = 0.5):
        self.store, self.ids, self.interval_s, self.disable = store, set(ids), interval_s, disable
        self.overall = tqdm(total=len(ids), desc="jobs", unit="job", file=sys.stderr, disable=disable, position=0)
        self.bars: dict[int, tqdm] = {}
        self.reported: set[int] = set()

    def write(self, message: str) -> None:
        if not self.disable:
            tqdm.write(message, file=sys.stderr)

    def refresh(self) -> None:
        jobs = [job for job in self.store.jobs() if job.id in self.ids]
        self.overall.n = sum(job.state in FINISHED for job in jobs)
        counts = {state: sum(job.state == state for job in jobs) for state in ("running", "failed", "cancelled")}
        self.overall.set_postfix_str(", ".join(f"{n} {state}" for state, n in counts.items() if n), refresh=False)
        self.overall.refresh()
        for job in jobs:
            bar = self.bars.get(job.id)
            if job.state == "running":
                if bar is None:
                    bar = self.bars[job.id] = tqdm(total=job.total_steps, desc=job.name, unit="step", leave=False,
                                                   file=sys.stderr, disable=self.disable)
                bar.total, bar.n = job.total_steps, job.step
                bar.set_postfix_str("" if job.loss is None else f"loss {job.loss:.4f}", refresh=False)
                bar.refresh()
            elif bar is not None:
                bar.close()
                del self.bars[job.id]
            if job.state in FINISHED and job.id not in self.reported:  # one line per job as it ends
                self.reported.add(job.id)
                self.write(f"{job.name}: {job.state}" + (f": {job.error or job.outputs.get('adapter', '')}"
                                                          if job.state != "cancelled" else ""))

    @contextlib.contextmanager
    def running(self) -> Iterator[StoreProgress]:
        """Refresh from a thread while the body runs; close the bars after."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.interval_s):
                with contextlib.suppress(Exception):  # a busy store or a closed terminal must not stop the work
                    self.refresh()

        thread = threading.Thread(target=loop, name="jobs-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            with contextlib.suppress(Exception):
                self.refresh()
            for bar in self.bars.values():
                bar.close()
            self.overall.close()


def run_local(store: JobStore, model: str | None = None, *, workers: int = 1, progress: bool = True,
              stop: threading.Event | None = None, heartbeat_s: float = 10.0) -> list[JobRecord]:
    """Run every pending job (and those of dead workers) on this machine: in this process, one after another, or in
    `workers` worker processes (`studio jobs work`), each with its own copy of the model. Returns the jobs of the
    run, as they ended."""
    if workers < 1:
        raise ValueError(f"workers={workers}: must be at least 1")
    requeued = store.requeue_dead()
    ids = [job.id for job in store.jobs(("pending",))]
    display = StoreProgress(store, ids, disable=not progress)
    for name in requeued:
        display.write(f"{name}: its worker died; requeued (it resumes from its last checkpoint)")
    with display.running():
        if workers == 1:
            Worker(store, lambda: load_pipe(model), stop=stop, heartbeat_s=heartbeat_s).run()
        else:
            command = [sys.executable, "-m", "studio.cli", "jobs", "work", "--store", str(store.path), "--quiet",
                       "--lease", str(store.lease_s), *(["--model", model] if model else [])]
            children = [subprocess.Popen(command) for _ in range(workers)]
            # Ctrl-C reaches the children too (one process group): each stops after its step, with a checkpoint.
            for child in children:
                while True:
                    try:
                        child.wait()
                        break
                    except KeyboardInterrupt:
                        continue
    return [store.get(job_id) for job_id in ids]


def ray_task(store_path: str, job_id: int, model: str | None, lease_s: float) -> str:
    """One job in a Ray worker process: claimed from the store (if still pending) and run; returns its state."""
    store = JobStore(store_path, lease_s=lease_s)
    worker = Worker(store, lambda: cached_pipe(model, os.environ.get("CUDA_VISIBLE_DEVICES")))
    ran = worker.run(job=job_id)
    return ran[0].state if ran else store.get(job_id).state


def run_ray(store: JobStore, model: str | None = None, *, address: str | None = None, num_cpus: int | None = None,
            progress: bool = True) -> list[JobRecord]:
    """Every pending job as a Ray task, one GPU each where the cluster has GPUs (else one CPU). Connects to the
    cluster at `address` ("auto": the one this machine belongs to), else starts a local Ray with `num_cpus`.
    The store must be reachable from every Ray node (a shared file system). Returns the jobs as they ended."""
    try:
        import ray
    except ImportError as e:
        raise StudioError("Ray is not installed: pip install -e '.[ray]' (or pip install ray)") from e

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        store.requeue_dead()
        ids = [job.id for job in store.jobs(("pending",))]
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(ray_task)
        refs = [task.remote(str(store.path), job_id, model, store.lease_s) for job_id in ids]
        display = StoreProgress(store, ids, disable=not progress)
        with display.running():
            remaining = list(refs)
            while remaining:
                finished, remaining = ray.wait(remaining, num_returns=1)
                try:
                    ray.get(finished[0])
                except Exception as e:  # the worker process died (killed, out of memory): the job stays running
                    display.write(f"a Ray task died ({type(e).__name__}); `studio jobs resume` requeues its job")
        return [store.get(job_id) for job_id in ids]
    finally:
        if started:
            ray.shutdown()


def sbatch_script(store: JobStore, jobs: list[JobRecord], *, model: str | None = None, python: str = sys.executable,
                  gpus: int = 1, cpus: int = 8, mem: str | None = None, time_limit: str = "04:00:00",
                  partition: str | None = None, max_parallel: int | None = None, log_dir: Path | None = None,
                  options: list[str] | None = None) -> str:
    """A SLURM array script: task i runs job i of `jobs` (`studio jobs work --job ID`), claimed from the store, so
    a job that is already done, running or cancelled is skipped. Submit it with `sbatch`; the log folder (default:
    slurm/ beside the store) must exist by then (SLURM opens the task's output file before the script runs)."""
    if not jobs:
        raise ValueError("no jobs to run; queue some first (studio jobs submit MANIFEST --queue-only)")
    log_dir = (log_dir or store.path.parent / "slurm").resolve()
    array = f"0-{len(jobs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", "#SBATCH --job-name=studio-jobs", f"#SBATCH --array={array}",
             f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --time={time_limit}",
             f"#SBATCH --output={log_dir}/%A_%a.out",
             # SIGTERM 2 minutes before the limit: the job checkpoints and goes back to pending; --requeue lets
             # SLURM restart a preempted task, which takes its job back (the same array task is the same worker).
             "#SBATCH --signal=B:TERM@120", "#SBATCH --requeue"]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [f"#SBATCH {option}" for option in options or []]
    command = [python, "-m", "studio.cli", "jobs", "work", "--store", str(store.path), "--lease", str(store.lease_s),
               *(["--model", model] if model else [])]
    lines += [
        "",
        f"# {len(jobs)} job(s) of {store.path}: `studio jobs status --store {shlex.quote(str(store.path))}`",
        "set -euo pipefail",
        "JOBS=(" + " ".join(str(job.id) for job in jobs) + ")",
        # exec: the worker itself receives SLURM's SIGTERM
        "exec " + " ".join(shlex.quote(part) for part in command) + ' --job "${JOBS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ]
    return "\n".join(lines)


def summary(jobs: list[JobRecord]) -> dict[str, Any]:
    """How many jobs ended in each state."""
    return {state: sum(job.state == state for job in jobs) for state in ("done", "failed", "cancelled", "pending",
                                                                         "running")}
