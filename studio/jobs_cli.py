"""`studio jobs`: train many subjects from one manifest, resumably, here or on a cluster (docs/jobs.md).

    studio jobs submit batch.yaml                  # queue every subject and run them here, with progress
    studio jobs submit subjects/ --set steps=400   # a folder of subject folders; shared settings from flags
    studio jobs status                             # state, attempts, step, loss, time, adapter or error
    studio jobs resume                             # after a crash or Ctrl-C: requeue dead workers' jobs, run
    studio jobs cancel red-star                    # (no name: every pending and running job)
    studio jobs retry                              # failed and cancelled jobs back to pending (then resume)
    studio jobs submit batch.yaml --queue-only && studio jobs resume --workers 2   # two worker processes
    studio jobs sbatch batch.yaml --gpus 1 > batch.sbatch && sbatch batch.sbatch  # a SLURM array
    studio jobs ray batch.yaml --address auto      # Ray tasks, one GPU each
    accelerate launch --multi_gpu -m studio.cli jobs run-one --job red-star   # one job on several GPUs

The job store (SQLite, default OUT/jobs.sqlite; OUT: --out, the manifest's `output`, else runs/jobs) records
every job's state (pending, running, done, failed, cancelled), attempts, timings, outputs and errors. Each
subject's folder OUT/<name>/ holds work/ (checkpoints, samples, log) and, once done, result/ (the adapter,
samples.png, log.txt, metrics.json); the adapter also goes to the adapter library (unless --no-library).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

DEFAULT_STORE = Path("runs/jobs/jobs.sqlite")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("jobs", help="batch training of many subjects (manifest, job store, SLURM, Ray)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    submit = sub.add_parser("submit", help="validate a manifest, queue its subjects, run them here")
    _manifest_options(submit, required=True)
    _run_options(submit)
    submit.add_argument("--queue-only", action="store_true", help="only queue the jobs (run them with resume, work, "
                                                                   "sbatch or ray)")
    submit.set_defaults(run=_submit)

    status = sub.add_parser("status", help="every job's state, attempts, progress, time and outputs or error")
    status.add_argument("job", nargs="?", help="one job (name or id): all its details and history")
    _store_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    resume = sub.add_parser("resume", help="requeue the jobs of dead workers and run every pending job here")
    _store_option(resume)
    _run_options(resume)
    resume.set_defaults(run=_resume)

    for name, help_text, fn in (("cancel", "cancel jobs (default: every pending and running one)", _cancel),
                                ("retry", "queue failed and cancelled jobs again (default: all of them)", _retry)):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("jobs", nargs="*", metavar="JOB", help="names or ids")
        _store_option(q)
        q.set_defaults(run=fn)

    work = sub.add_parser("work", help="a worker: claim pending jobs and run them (what SLURM tasks and the "
                                       "--workers processes run)")
    _store_option(work)
    _model_option(work)
    which = work.add_mutually_exclusive_group()
    which.add_argument("--job", help="run only this job (name or id), if it is pending")
    which.add_argument("--claim-one", action="store_true", help="run one pending job, then stop")
    work.add_argument("--quiet", action="store_true", help="no line per finished job")
    work.set_defaults(run=_work)

    one = sub.add_parser("run-one", help="run one job in every process of `accelerate launch` (one job, many GPUs)")
    _store_option(one)
    _model_option(one)
    one.add_argument("--job", required=True, help="name or id")
    one.set_defaults(run=_run_one)

    sbatch = sub.add_parser("sbatch", help="write a SLURM array script running the pending jobs (queues MANIFEST "
                                           "first, if given)")
    _manifest_options(sbatch, required=False)
    _model_option(sbatch)
    sbatch.add_argument("--gpus", type=int, default=1, help="GPUs per job (default 1; 0: none)")
    sbatch.add_argument("--cpus", type=int, default=8, help="CPUs per job (default 8)")
    sbatch.add_argument("--mem", default=None, help="memory per job, e.g. 32G (default: the partition's)")
    sbatch.add_argument("--time", dest="time_limit", default="04:00:00", help="time limit per job (default 04:00:00)")
    sbatch.add_argument("--partition", default=None)
    sbatch.add_argument("--max-parallel", type=int, default=None, help="at most this many jobs at once")
    sbatch.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="another #SBATCH line, e.g. --sbatch-option=--account=abc (repeatable)")
    sbatch.add_argument("--python", default=sys.executable, help="the Python of the compute nodes (default: this one)")
    sbatch.set_defaults(run=_sbatch)

    ray = sub.add_parser("ray", help="run the pending jobs as Ray tasks, one GPU each (queues MANIFEST first, if "
                                     "given); needs pip install -e '.[ray]'")
    _manifest_options(ray, required=False)
    _model_option(ray)
    ray.add_argument("--address", default=None, help="a Ray cluster ('auto': this machine's); default: a local Ray")
    ray.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ray.set_defaults(run=_ray)
    return p


def _store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None,
                   help=f"the job store (default {DEFAULT_STORE}; OUT/jobs.sqlite for a manifest)")
    p.add_argument("--lease", type=float, default=120.0,
                   help="seconds without a heartbeat after which a running job's worker counts as dead (default 120)")


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the embedded model)")


def _manifest_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("manifest", nargs=None if required else "?", type=Path,
                   help="a .yaml or .csv manifest, or a folder of subject folders")
    p.add_argument("--out", type=Path, default=None,
                   help="where each subject's folder goes (default: the manifest's `output`, else runs/jobs)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                   help="a shared setting over the manifest's defaults, e.g. --set steps=400 (repeatable)")
    p.add_argument("--no-library", action="store_true", help="do not add the finished adapters to the library")
    p.add_argument("--no-wal", action="store_true",
                   help="create the store with SQLite's rollback journal: for a store on a network file system used "
                        "from several nodes (WAL needs every worker on one host)")
    _store_option(p)


def _run_options(p: argparse.ArgumentParser) -> None:
    _model_option(p)
    p.add_argument("--workers", type=int, default=1, help="jobs at once, each in its own process (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _open(args: argparse.Namespace, path: Path | None = None, must_exist: bool = True, wal: bool = True):
    from studio.jobs import JobStore, JobStoreError

    path = path or args.store or DEFAULT_STORE
    if must_exist and not path.is_file():
        raise JobStoreError(f"no job store at {path}; submit a manifest first (studio jobs submit), or pass --store")
    return JobStore(path, wal=wal, lease_s=args.lease)


def _queue(args: argparse.Namespace):
    """Validate the manifest as a whole, then queue it; the store (where not given: OUT/jobs.sqlite)."""
    from studio.jobs import read_manifest
    from studio.jobs.manifest import check_batch

    defaults = dict(map(_parse_setting, args.settings))
    batch = read_manifest(args.manifest, out_dir=args.out, defaults=defaults,
                          add_to_library=False if args.no_library else None)
    store = _open(args, args.store or batch.out_dir / "jobs.sqlite", must_exist=False, wal=not args.no_wal)
    check_batch(batch, store)
    added = store.add(batch.specs)
    new = sum(is_new for _, is_new in added)
    print(f"queued {new} job(s) in {store.path}" + (f"; {len(added) - new} already there" if new < len(added) else ""),
          file=sys.stderr)
    return store, [job for job, _ in added]


def _parse_setting(text: str) -> tuple[str, object]:
    """`steps=400` -> ("steps", 400): the value is read as YAML, so numbers, true/false and [lists] get their types."""
    from studio.jobs import ManifestError

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ManifestError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set steps=400")
    return key.strip(), yaml.safe_load(value)


def _submit(args: argparse.Namespace) -> None:
    from studio.jobs import run_local

    store, jobs = _queue(args)
    if args.queue_only:
        return
    if all(job.state == "done" for job in jobs):
        print("every job is already done; nothing to do", file=sys.stderr)
    else:
        with _stopping() as stop:
            run_local(store, args.model, workers=args.workers, progress=not args.no_progress, stop=stop)
    _report(store, [job.id for job in jobs])


def _resume(args: argparse.Namespace) -> None:
    from studio.jobs import run_local

    store = _open(args)
    with _stopping() as stop:
        ran = run_local(store, args.model, workers=args.workers, progress=not args.no_progress, stop=stop)
    if not ran:
        print("no pending jobs; nothing to do", file=sys.stderr)
    _report(store, [job.id for job in store.jobs()])


def _cancel(args: argparse.Namespace) -> None:
    store = _open(args)
    for job in store.cancel(args.jobs or None):
        note = " (stops after its current step)" if job.cancel_requested else ""
        print(f"{job.name}: {job.state}{note}")


def _retry(args: argparse.Namespace) -> None:
    store = _open(args)
    jobs = store.retry(args.jobs or None)
    for job in jobs:
        print(f"{job.name}: {job.state}" + ("" if job.state == "pending" else " (only failed or cancelled jobs retry)"))
    if any(job.state == "pending" for job in jobs):
        print(f"run them with: studio jobs resume --store {store.path}", file=sys.stderr)


def _work(args: argparse.Namespace) -> None:
    from studio.jobs import Worker, load_pipe

    store = _open(args)
    echo = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    with _stopping(echo) as stop:
        worker = Worker(store, lambda: load_pipe(args.model), stop=stop, echo=echo)
        ran = worker.run(job=args.job, max_jobs=1 if args.claim_one else None)
    if any(job.state == "failed" for job in ran):
        raise SystemExit(1)


def _run_one(args: argparse.Namespace) -> None:
    from studio.jobs import load_pipe, run_one

    store = _open(args)
    echo = lambda message: print(message, file=sys.stderr)  # noqa: E731
    with _stopping(echo) as stop:
        job = run_one(store, args.job, lambda: load_pipe(args.model), stop=stop, echo=echo)
    if job is not None and job.state == "failed":
        raise SystemExit(1)


def _sbatch(args: argparse.Namespace) -> None:
    from studio.jobs import sbatch_script

    if args.manifest is not None:
        store, jobs = _queue(args)
        jobs = [store.get(job.id) for job in jobs]
    else:
        store = _open(args)
        jobs = store.jobs()
    pending = [job for job in jobs if job.state == "pending"]
    if not pending:
        raise SystemExit("error: no pending jobs to run (studio jobs status shows them; retry requeues failed ones)")
    log_dir = store.path.parent / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens the output files before the script runs
    print(sbatch_script(store, pending, model=args.model, python=args.python, gpus=args.gpus, cpus=args.cpus,
                        mem=args.mem, time_limit=args.time_limit, partition=args.partition,
                        max_parallel=args.max_parallel, log_dir=log_dir, options=args.sbatch_option), end="")


def _ray(args: argparse.Namespace) -> None:
    from studio.jobs import run_ray

    store = _queue(args)[0] if args.manifest is not None else _open(args)
    ran = run_ray(store, args.model, address=args.address, num_cpus=args.num_cpus)
    _report(store, [job.id for job in ran])


def _stopping(echo=None):
    """Ctrl-C and SIGTERM stop the running job after its step, with a checkpoint (pending again)."""
    from studio.jobs.worker import stop_on_signals

    return stop_on_signals(echo or (lambda message: print(message, file=sys.stderr)))


def _report(store, ids: list[int]) -> None:
    """The jobs' table; exit status 1 if any failed."""
    jobs = [store.get(job_id) for job_id in ids]
    print(format_table(jobs))
    failed = [job.name for job in jobs if job.state == "failed"]
    if failed:
        print(f"{len(failed)} job(s) failed ({', '.join(failed)}): `studio jobs status NAME` shows why; fix it, then "
              f"`studio jobs retry` and `studio jobs resume`", file=sys.stderr)
        raise SystemExit(1)


def _status(args: argparse.Namespace) -> None:
    from studio.jobs.store import as_dict

    store = _open(args)
    if args.job is not None:
        job = store.get(args.job)
        if args.json:
            print(json.dumps({**as_dict(job), "events": store.events(job.id)}, indent=1))
            return
        for key, value in as_dict(job).items():
            if value not in (None, {}, ""):
                print(f"{key}: {value}")
        print("history:")
        for when, message in store.events(job.id):
            print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}  {message}")
        return
    jobs = store.jobs()
    if args.json:
        print(json.dumps([as_dict(job) for job in jobs], indent=1))
        return
    print(format_table(jobs))
    counts = store.counts()
    print(", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no jobs", file=sys.stderr)


def format_table(jobs) -> str:
    from studio.jobs import JobRecord

    rows = [list(JobRecord.COLUMNS)] + [job.row() for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(JobRecord.COLUMNS) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)
