"""A worker: claim a job from the store, run it with a heartbeat, record how it ended; repeat.

    worker = Worker(JobStore("runs/jobs/jobs.sqlite"), lambda: load_pipe(None))
    worker.run()                 # every pending job, one after another (`studio jobs work`)
    worker.run(job="red-star")   # that job only, if it is pending (`studio jobs work --job red-star`)

Every mode runs jobs through this class: the local runner, its `--workers N` processes, SLURM array tasks, Ray
tasks and the app's background thread. A job's end is recorded only by the worker still holding its claim.
A stop (SIGTERM from SLURM before a time limit, Ctrl-C) ends the job at its next step with a checkpoint and
puts it back to pending; a cancel ends it as cancelled; an error marks it failed with its reason and the worker
goes on with the next job.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipelines.errors import StudioError
from pipelines.train import TrainingDiverged, TrainProgress

from .job import JobOutcome, process_state, run_job
from .store import JobRecord, JobStore, worker_label

# A job ends as failed with the message of these alone (they say what to change); anything else is a bug,
# recorded with its type (and its traceback in the job's log).
USER_ERRORS = (StudioError, TrainingDiverged)


class ModelGate:
    """One user of a model at a time, interactive work first: the app's events (generate, edit, train...) take
    the model through `interactive()`, its background jobs through `background()`. A background job asked to
    give way (`wanted()`) stops at its next step with a checkpoint and resumes from it once the event is done,
    so an event waits for one training step, not for a whole job, and the adapter is the same (exact resume)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting = 0

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._busy)
            finally:
                self._waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._busy and self._waiting == 0)
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def wanted(self) -> bool:
        """True while interactive work waits for the model."""
        return self._waiting > 0

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class _Lease:
    """The claim's heartbeat, beaten from a thread (a step, a model load or the class images may take longer than
    the lease), and what the store said back: the job is no longer ours, or a cancel was asked for."""

    def __init__(self, store: JobStore, job: JobRecord, interval_s: float):
        self.store, self.job, self.interval_s = store, job, interval_s
        self.lost, self.cancel_requested = False, job.cancel_requested
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.name}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def note(self, ours: bool, cancel: bool) -> None:
        self.lost |= not ours
        self.cancel_requested |= cancel

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.note(*self.store.heartbeat(self.job.id, self.job.token))
            except sqlite3.OperationalError:  # the store stayed locked past its busy timeout: beat again later
                pass


class Worker:
    """Claims and runs jobs of `store` with the pipeline `load_pipe()` returns (called once, at the first claim).

    stop: set it to stop at the next step (the job goes back to pending with a checkpoint). gate: share the model
    with interactive work (the app). echo: where one line per finished job goes."""

    def __init__(self, store: JobStore, load_pipe: Callable[[], Any], *, label: str | None = None,
                 stop: threading.Event | None = None, gate: ModelGate | None = None, heartbeat_s: float = 10.0,
                 progress_every_s: float = 0.5, echo: Callable[[str], None] | None = None):
        self.store, self.load_pipe, self.label = store, load_pipe, label or worker_label()
        self.stop = stop or threading.Event()
        self.gate, self.heartbeat_s, self.progress_every_s = gate, heartbeat_s, progress_every_s
        self.echo = echo or (lambda message: None)
        self._pipe: Any = None

    def run(self, *, job: str | int | None = None, max_jobs: int | None = None) -> list[JobRecord]:
        """Claim and run jobs until none is pending, `max_jobs` ran, or stop is set; with `job`, that job only
        (if it is pending). Returns the jobs run, as they ended."""
        ran: list[JobRecord] = []
        while not self.stop.is_set() and (max_jobs is None or len(ran) < max_jobs):
            for name in self.store.requeue_dead():
                self.echo(f"{name}: its worker died; requeued (it resumes from its last checkpoint)")
            claimed = self.store.claim(self.label, job)
            if claimed is None:
                if job is not None:
                    found = self.store.get(job)
                    self.echo(f"{found.name}: {found.state}" + (f" (by {found.worker})" if found.state == "running"
                                                                 else "") + "; nothing to do")
                break
            ran.append(self.run_claimed(claimed))
            if job is not None:
                break
        return ran

    def run_claimed(self, job: JobRecord) -> JobRecord:
        """Run a job this worker claimed to its end (or to a stop), and record that end."""
        with _Lease(self.store, job, self.heartbeat_s) as lease:
            last_write = 0.0

            def progress(p: TrainProgress) -> None:
                nonlocal last_write
                if time.monotonic() - last_write >= self.progress_every_s or p.step == p.total_steps:
                    last_write = time.monotonic()
                    with contextlib.suppress(sqlite3.OperationalError):  # a busy store: the next step reports
                        lease.note(*self.store.progress(job.id, job.token, p.step, p.total_steps, p.loss))

            def should_stop() -> bool:
                return (self.stop.is_set() or lease.lost or lease.cancel_requested
                        or (self.gate is not None and self.gate.wanted()))

            while True:
                outcome = self._attempt(job, progress, should_stop)
                if outcome is None:  # failed, and recorded
                    break
                if outcome.status != "cancelled":
                    self._finish(job, "done", outputs=outcome.outputs, note=outcome.message)
                    break
                if lease.lost:
                    self.echo(f"{job.name}: another worker holds it now (this one's lease lapsed); left to it")
                    break
                if lease.cancel_requested:
                    self._finish(job, "cancelled", outputs=outcome.outputs,
                                 note=f"cancelled at step {outcome.step} (retry continues from its checkpoint)")
                    break
                if self.gate is not None and self.gate.wanted() and not self.stop.is_set():
                    continue  # it gave way to interactive work: resume from the checkpoint it just wrote
                self._finish(job, "pending", note=f"stopped at step {outcome.step}; pending again (resumes from its "
                                                  "checkpoint)")
                break
        return self.store.get(job.id)

    def _attempt(self, job: JobRecord, progress: Callable[[TrainProgress], None],
                 should_stop: Callable[[], bool]) -> JobOutcome | None:
        """One run_job call, in the model's turn; None when it failed (recorded as such)."""
        turn = self.gate.background() if self.gate is not None else contextlib.nullcontext()
        with turn:
            if self._pipe is None:
                try:
                    self._pipe = self.load_pipe()
                except BaseException:  # a bad --model is no fault of the job: it waits for a worker that can load it
                    self._finish(job, "pending", note="the model could not be loaded; pending again")
                    raise
            try:
                return run_job(self._pipe, job.spec, progress=progress, should_stop=should_stop, attempt=job.attempts)
            except USER_ERRORS as e:
                self._finish(job, "failed", error=str(e), outputs=_log_output(job))
            except Exception as e:  # a bug or an out-of-memory: this job fails, the worker goes on
                self._finish(job, "failed", error=f"{type(e).__name__}: {e}", outputs=_log_output(job))
            except BaseException:  # Ctrl-C pressed twice, SystemExit: pending again, then out
                self._finish(job, "pending", note="interrupted; pending again (resumes from its last checkpoint)")
                raise
        return None

    def _finish(self, job: JobRecord, state: str, **kwargs: Any) -> None:
        if not self.store.finish(job.id, job.token, state, **kwargs):
            self.echo(f"{job.name}: no longer this worker's; its end ({state}) was not recorded")
            return
        what = kwargs.get("error") or kwargs.get("outputs", {}).get("adapter") or kwargs.get("note") or ""
        self.echo(f"{job.name}: {state}" + (f": {what}" if what else ""))


def _log_output(job: JobRecord) -> dict[str, str]:
    log = job.spec.work_dir / "log.txt"
    return {"log": str(log)} if log.exists() else {}


def load_pipe(source: str | None) -> Any:
    """The model's pipeline for this process: the device accelerate gives it (its GPU under `accelerate launch` or
    Ray, else the best available)."""
    from pipelines import load_model

    return load_model(source, device=process_state().device).pipe


@functools.lru_cache(maxsize=1)
def cached_pipe(source: str | None, visible_devices: str | None) -> Any:
    """load_pipe, kept for the next task run by this process (a Ray worker); keyed by the GPUs it may see."""
    return load_pipe(source)


def run_one(store: JobStore, job: str | int, load: Callable[[], Any], *, stop: threading.Event | None = None,
            echo: Callable[[str], None] | None = None, heartbeat_s: float = 10.0) -> JobRecord | None:
    """Run one job in every process of an `accelerate launch` (one process without it): the main process claims
    it and records its end, every process trains its share. Returns the job as it ended (None in the others)."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    stop = stop or threading.Event()
    claimed = None
    if state.is_main_process:
        store.requeue_dead()
        claimed = store.claim(worker_label(), job)
        if claimed is None and echo is not None:
            found = store.get(job)
            echo(f"{found.name}: {found.state}; nothing to do")
    [claimed] = broadcast_object_list([claimed])
    if claimed is None:
        return None
    if state.is_main_process:
        worker = Worker(store, load, stop=stop, heartbeat_s=heartbeat_s, echo=echo)
        return worker.run_claimed(claimed)
    # The others follow the main process: train() stops every process when should_stop is True in any of them.
    # Refused data fails the same way in every process, and the main one records it: the others end quietly
    # (a crash here would make the launcher kill the main process before it records the failure).
    with contextlib.suppress(*USER_ERRORS):
        run_job(load(), claimed.spec, should_stop=stop.is_set)
    return None


@contextlib.contextmanager
def stop_on_signals(echo: Callable[[str], None]) -> Iterator[threading.Event]:
    """An event that SIGTERM (SLURM's warning before a time limit or preemption) and Ctrl-C set, for the body: the
    job ends at its next step with a checkpoint and goes back to pending. A second Ctrl-C aborts at once. The
    previous handlers are back after the body."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        echo(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (pid {os.getpid()})")

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
