"""The job store: one SQLite file that every runner, worker and the app read and write, the single source of
truth about a batch (what to run, who runs it, how far it got, what came out).

    store = JobStore("runs/jobs/jobs.sqlite")
    store.add(specs)                         # pending jobs (a spec already there with the same settings is skipped)
    job = store.claim("host:1234")           # atomically: the oldest pending job is now ours (or None)
    store.progress(job.id, job.token, step=5, total=50, loss=0.12)
    store.finish(job.id, job.token, "done", outputs={...})

A claim is one `UPDATE ... WHERE state='pending' ... RETURNING` statement: SQLite runs it under its write lock,
so two workers never get the same job. The claim's random token fences the job: a worker whose job was taken
away (its lease expired and `requeue_dead` handed it to another) can no longer write to it. WAL mode lets
readers (status, the app's table) run while a worker writes; the busy timeout makes writers wait their turn
instead of failing.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import StudioError

from .job import JobSpec

STATES = ("pending", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,               -- the subject; also the adapter's name
    spec TEXT NOT NULL,                      -- JobSpec as JSON: TrainConfig values, output folder, library
    fingerprint TEXT NOT NULL,               -- of the spec: a re-submitted subject with other settings is refused
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,     -- claims so far
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    token TEXT,                              -- the current claim's id; only its holder writes progress and result
    worker TEXT, host TEXT, pid INTEGER,     -- who holds the claim (pid: to see a dead worker on this host)
    heartbeat REAL,                          -- the holder's last sign of life (unix time)
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    loss REAL,
    created REAL NOT NULL,
    started REAL,                            -- first claim
    claimed REAL,                            -- this attempt's claim
    finished REAL,
    outputs TEXT,                            -- JSON {"adapter", "grid", "log", "metrics", "library"}
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS events (          -- each job's history: claims, requeues, failures, cancels
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    time REAL NOT NULL,
    message TEXT NOT NULL
);
"""


class JobStoreError(StudioError):
    """A store operation refused: unknown job, a job in the wrong state for it, a store that is not one."""


@dataclass(frozen=True)
class JobRecord:
    """One row of the store."""

    id: int
    name: str
    spec: JobSpec
    fingerprint: str
    state: str
    attempts: int
    cancel_requested: bool
    token: str | None
    worker: str | None
    host: str | None
    pid: int | None
    heartbeat: float | None
    step: int
    total_steps: int
    loss: float | None
    created: float
    started: float | None
    claimed: float | None
    finished: float | None
    outputs: dict[str, str]
    error: str | None

    COLUMNS = ("ID", "Subject", "State", "Attempts", "Step", "Loss", "Time", "Adapter / error")  # of `row()`

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        values = dict(row)
        values["spec"] = JobSpec.from_json(values["spec"])
        values["outputs"] = json.loads(values["outputs"] or "{}")
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)

    @property
    def elapsed(self) -> float | None:
        """Seconds of this attempt: until it finished, or until now while it runs (None while pending)."""
        if self.claimed is None or self.state == "pending":
            return None
        return (self.finished if self.state in FINISHED and self.finished else time.time()) - self.claimed


    def row(self) -> list[str]:
        """The job as a line of the tables (`studio jobs status`, the Jobs tab)."""
        if self.state == "failed":
            info = self.error or ""
        elif self.state == "running":
            info = f"on {self.worker}" + (", cancel requested" if self.cancel_requested else "")
        else:
            info = self.outputs.get("adapter", "")
        return [str(self.id), self.name, self.state, str(self.attempts), f"{self.step}/{self.total_steps}",
                "" if self.loss is None else f"{self.loss:.4f}", duration(self.elapsed), info]


def duration(seconds: float | None) -> str:
    """12s, 3m04s, 1h02m."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def this_host() -> str:
    return socket.gethostname()


def worker_label() -> str:
    """Who is working: the SLURM array task (a requeued task is the same worker), else host:pid."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"slurm:{array}_{task}"
    return f"{this_host()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class JobStore:
    """The SQLite job store at `path` (created with its folder if missing).

    wal: write-ahead logging, for workers on one host (the default). A store on a network file system shared by
    several nodes (SLURM) must use the rollback journal instead (wal=False when it is created): WAL's shared
    memory does not work across hosts. The mode is chosen when the file is created and kept after.
    lease_s: a running job whose worker has not beaten its heartbeat for this long counts as dead."""

    def __init__(self, path: str | os.PathLike, *, wal: bool = True, busy_timeout_s: float = 30.0,
                 lease_s: float = 120.0):
        self.path = Path(path).expanduser().resolve()
        self.busy_timeout_s, self.lease_s = busy_timeout_s, lease_s
        self._local = threading.local()
        if self.path.is_dir():
            raise JobStoreError(f"job store {self.path} is a folder; pass the store file ({self.path}/jobs.sqlite?)")
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            if new:
                con.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}")
                _sync_for_journal(con)
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise JobStoreError(f"job store {self.path} has schema version {version}; this studio reads "
                                    f"{SCHEMA_VERSION}: use the studio version that made it, or a new --store")
            if version == 0:  # new (IF NOT EXISTS: two processes creating it at once is fine)
                con.executescript(SCHEMA)
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, in autocommit mode: every statement is its own transaction unless wrapped in
        BEGIN IMMEDIATE (see _transaction). One per thread and process (a forked child opens its own), kept open:
        opening one per call costs ~20 ms in WAL mode (the last one to close checkpoints the log)."""
        try:
            con = getattr(self._local, "con", None)
            if con is None or self._local.pid != os.getpid():
                con = self._local.con = self._open()
                self._local.pid = os.getpid()
            yield con
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e) or "malformed" in str(e):
                raise JobStoreError(f"{self.path} is not a job store ({e}); pass another --store") from e
            raise

    def _open(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                  check_same_thread=True)
        except sqlite3.Error as e:
            raise JobStoreError(f"cannot open the job store {self.path} ({e}); check the path and its permissions") \
                from e
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        _sync_for_journal(con)
        return con

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements as one: BEGIN IMMEDIATE takes the write lock first, so reads inside see what no one
        else can change before the commit."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- adding and reading ---------------------------------------------------------------------------------------

    def add(self, specs: Iterable[JobSpec]) -> list[tuple[JobRecord, bool]]:
        """Queue `specs` as pending jobs, all or none; returns (job, added) per spec, added=False for a spec
        already here with the same settings (submitting a batch twice queues it once)."""
        now, results = time.time(), []
        with self._transaction() as con:
            for spec in specs:
                row = con.execute("SELECT * FROM jobs WHERE name = ?", (spec.name,)).fetchone()
                fingerprint = spec.fingerprint()
                if row is not None:
                    if row["fingerprint"] != fingerprint:
                        raise JobStoreError(f"job {spec.name!r} is already in {self.path} with other settings "
                                            f"({row['state']}); rename the subject or use another store")
                    results.append((JobRecord.from_row(row), False))
                    continue
                row = con.execute(
                    "INSERT INTO jobs (name, spec, fingerprint, total_steps, created) VALUES (?, ?, ?, ?, ?) "
                    "RETURNING *", (spec.name, spec.to_json(), fingerprint, spec.steps, now)).fetchone()
                self._event(con, row["id"], "submitted", now)
                results.append((JobRecord.from_row(row), True))
        return results

    def jobs(self, states: Iterable[str] | None = None) -> list[JobRecord]:
        """Every job (or those in `states`), oldest first."""
        with self._connect() as con:
            if states is None:
                rows = con.execute("SELECT * FROM jobs ORDER BY id").fetchall()
            else:
                states = list(states)
                marks = ",".join("?" * len(states))
                rows = con.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def find(self, ref: str | int) -> JobRecord | None:
        """The job with this id (an int, or digits) or name, or None."""
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE name = ?", (str(ref),)).fetchone()
            if row is None and str(ref).isdigit():
                row = con.execute("SELECT * FROM jobs WHERE id = ?", (int(ref),)).fetchone()
        return JobRecord.from_row(row) if row is not None else None

    def get(self, ref: str | int) -> JobRecord:
        job = self.find(ref)
        if job is None:
            names = [j.name for j in self.jobs()]
            raise JobStoreError(f"no job {ref!r} in {self.path}; its jobs are {names[:20]}"
                                f"{' ...' if len(names) > 20 else ''} (by name or id)")
        return job

    def events(self, job_id: int) -> list[tuple[float, str]]:
        with self._connect() as con:
            rows = con.execute("SELECT time, message FROM events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return [(row["time"], row["message"]) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as con:
            rows = con.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {row["state"]: row["n"] for row in rows}

    # -- a worker's side ------------------------------------------------------------------------------------------

    def claim(self, worker: str, job: str | int | None = None) -> JobRecord | None:
        """Make the oldest pending job (or the one named by `job`, if pending) ours, atomically; None if there is
        none. A job whose claim lapsed with this very worker (a requeued SLURM task) is taken back at once."""
        now, token, host, pid = time.time(), uuid.uuid4().hex, this_host(), os.getpid()
        claim = ("UPDATE jobs SET state = 'running', attempts = attempts + 1, token = ?, worker = ?, host = ?, "
                 "pid = ?, heartbeat = ?, claimed = ?, started = COALESCE(started, ?), finished = NULL, error = NULL "
                 "WHERE id = {target} AND (state = 'pending' OR (state = 'running' AND worker = ? AND "
                 "cancel_requested = 0 AND (host != ? OR pid != ?))) RETURNING *")
        args = (token, worker, host, pid, now, now, now)
        with self._transaction() as con:  # the claim and its event: one commit
            if job is None:
                target = "(SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT 1)"
                row = con.execute(claim.format(target=target), (*args, worker, host, pid)).fetchone()
            else:
                found = self.get(job)
                row = con.execute(claim.format(target="?"), (*args, found.id, worker, host, pid)).fetchone()
            if row is not None:
                self._event(con, row["id"], f"claimed by {worker} (attempt {row['attempts']})", now)
        return JobRecord.from_row(row) if row is not None else None

    def heartbeat(self, job_id: int, token: str) -> tuple[bool, bool]:
        """Record that the claim's holder lives; returns (the job is still ours, a cancel was asked for)."""
        with self._connect() as con:
            row = con.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND token = ? AND state = 'running' "
                              "RETURNING cancel_requested", (time.time(), job_id, token)).fetchone()
        return row is not None, bool(row and row["cancel_requested"])

    def progress(self, job_id: int, token: str, step: int, total: int, loss: float | None) -> tuple[bool, bool]:
        """Record the training step reached (also a heartbeat); returns what `heartbeat` returns."""
        with self._connect() as con:
            row = con.execute("UPDATE jobs SET step = ?, total_steps = ?, loss = ?, heartbeat = ? "
                              "WHERE id = ? AND token = ? AND state = 'running' RETURNING cancel_requested",
                              (step, total, loss, time.time(), job_id, token)).fetchone()
        return row is not None, bool(row and row["cancel_requested"])

    def finish(self, job_id: int, token: str, state: str, *, outputs: dict[str, str] | None = None,
               error: str | None = None, note: str | None = None) -> bool:
        """End the claim: done, failed or cancelled, or back to pending (interrupted: it resumes from its
        checkpoint). False if the job was no longer ours (nothing is written then)."""
        if state not in ("pending", *FINISHED):
            raise ValueError(f"state {state!r}: a claim ends in pending, done, failed or cancelled")
        now = time.time()
        with self._transaction() as con:
            row = con.execute(
                "UPDATE jobs SET state = ?, token = NULL, finished = ?, outputs = COALESCE(?, outputs), error = ?, "
                "cancel_requested = 0 WHERE id = ? AND token = ? AND state = 'running' RETURNING id",
                (state, now if state in FINISHED else None, json.dumps(outputs) if outputs is not None else None,
                 error, job_id, token)).fetchone()
            if row is not None:
                self._event(con, job_id, note or (f"{state}: {error}" if error else state), now)
        return row is not None

    # -- housekeeping: dead workers, cancel, retry ----------------------------------------------------------------

    def requeue_dead(self) -> list[str]:
        """Running jobs whose worker died (its pid is gone on this host, or its heartbeat is older than the lease)
        go back to pending (to cancelled if a cancel was asked for); they resume from their last checkpoint.
        Returns their names."""
        now, host, names = time.time(), this_host(), []
        with self._transaction() as con:
            for row in con.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                if row["host"] == host and row["pid"] is not None and not pid_alive(row["pid"]):
                    why = f"worker {row['worker']} is gone (pid {row['pid']} no longer runs on {host})"
                elif row["heartbeat"] is None or now - row["heartbeat"] > self.lease_s:
                    why = f"worker {row['worker']} sent no heartbeat for {self.lease_s:.0f} s"
                else:
                    continue
                state = "cancelled" if row["cancel_requested"] else "pending"
                con.execute("UPDATE jobs SET state = ?, token = NULL, cancel_requested = 0, finished = ? "
                            "WHERE id = ?", (state, now if state == "cancelled" else None, row["id"]))
                self._event(con, row["id"], f"{why}: {'cancelled' if state == 'cancelled' else 'requeued'}", now)
                names.append(row["name"])
        return names

    def cancel(self, refs: Iterable[str | int] | None = None) -> list[JobRecord]:
        """Cancel jobs (default: every pending and running one): a pending one at once, a running one at its
        worker's next step (with a checkpoint, so `retry` continues it). Finished jobs are left as they are.
        Returns the jobs as they are afterwards."""
        targets = self._targets(refs, ("pending", "running"))
        now = time.time()
        with self._transaction() as con:
            for job in targets:
                if job.state == "pending":
                    con.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'pending'",
                                (now, job.id))
                    self._event(con, job.id, "cancelled", now)
                elif job.state == "running":
                    con.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job.id,))
                    self._event(con, job.id, "cancel requested: stops after its current step", now)
        return [self.get(job.id) for job in targets]

    def retry(self, refs: Iterable[str | int] | None = None) -> list[JobRecord]:
        """Queue failed or cancelled jobs again (default: all of them); each resumes from its last checkpoint.
        Returns the jobs as they are afterwards."""
        targets = self._targets(refs, ("failed", "cancelled"))
        now = time.time()
        with self._transaction() as con:
            for job in targets:
                if job.state in ("failed", "cancelled"):
                    con.execute("UPDATE jobs SET state = 'pending', error = NULL, finished = NULL, "
                                "cancel_requested = 0 WHERE id = ? AND state = ?", (job.id, job.state))
                    self._event(con, job.id, f"retry (was {job.state})", now)
        return [self.get(job.id) for job in targets]

    def _targets(self, refs: Iterable[str | int] | None, states: tuple[str, ...]) -> list[JobRecord]:
        if refs is None:
            return self.jobs(states)
        return [self.get(ref) for ref in refs]

    @staticmethod
    def _event(con: sqlite3.Connection, job_id: int, message: str, now: float) -> None:
        con.execute("INSERT INTO events (job_id, time, message) VALUES (?, ?, ?)", (job_id, now, message))


def _sync_for_journal(con: sqlite3.Connection) -> None:
    """In WAL mode NORMAL syncs at checkpoints, not at every commit: a crashed process loses nothing, a power cut at
    most the last commits, and the store stays consistent; claims commit several times faster. The rollback
    journal (a store on a network file system) keeps FULL, which it needs for that."""
    if con.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        con.execute("PRAGMA synchronous=NORMAL")


def as_dict(job: JobRecord) -> dict[str, Any]:
    """A job as plain JSON values (`studio jobs status --json`)."""
    return {"id": job.id, "name": job.name, "state": job.state, "attempts": job.attempts, "step": job.step,
            "total_steps": job.total_steps, "loss": job.loss, "worker": job.worker, "created": job.created,
            "started": job.started, "finished": job.finished, "elapsed": job.elapsed, "outputs": job.outputs,
            "error": job.error, "cancel_requested": job.cancel_requested, "out_dir": str(job.spec.out_dir)}
