"""Batch subject customization: many training jobs from one manifest, run here, on SLURM, on Ray or in the app.

- job.py: `run_job(pipe, spec)`, one idempotent job (resumes after a crash, does nothing once done);
- manifest.py: `read_manifest(path)`, a YAML/CSV manifest or a folder of subject folders, validated as a whole;
- store.py: `JobStore`, the SQLite store every worker claims from and reports to (the single source of truth);
- worker.py: `Worker` (claim, run with a heartbeat, record), `run_one` (one job under `accelerate launch`),
  `ModelGate` (the app's jobs give way to its interactive work);
- runners.py: `run_local` (here, `--workers N`), `sbatch_script` (a SLURM array), `run_ray` (Ray tasks).

docs/jobs.md shows each way to run a batch; `studio jobs --help` the command line.
"""

from .job import JobError, JobOutcome, JobSpec, run_job
from .manifest import Batch, ManifestError, read_manifest
from .runners import run_local, run_ray, sbatch_script
from .store import STATES, JobRecord, JobStore, JobStoreError
from .worker import ModelGate, Worker, load_pipe, run_one

__all__ = [
    "STATES",
    "Batch",
    "JobError",
    "JobOutcome",
    "JobRecord",
    "JobSpec",
    "JobStore",
    "JobStoreError",
    "ManifestError",
    "ModelGate",
    "Worker",
    "load_pipe",
    "read_manifest",
    "run_job",
    "run_local",
    "run_one",
    "run_ray",
    "sbatch_script",
]
