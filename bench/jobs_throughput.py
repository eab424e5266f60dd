"""Throughput of batch jobs (studio.jobs) on the embedded Shapes model: what running subjects as jobs costs over
plain `train` calls, the local runner and Ray side by side, and the job store's claim latency under contention.

    python bench/jobs_throughput.py [--subjects 8] [--steps 100] [--ray-workers 2] [--claim-workers 8]
                                    [--claim-jobs 400] [--no-ray]

1. plain: each subject trained by one `train(pipe, config)` call (after a warm-up), the baseline.
2. local runner: the same subjects as jobs through the local runner's Worker on the same loaded model (what
   `studio jobs submit` runs, less its progress bars), each right before or after its plain call (alternating):
   the per-job overhead is the time the job spends outside its train() call (claim, result folder, sample grid,
   metrics, library copy, `done`, record) plus the time in its progress callback (loss log, progress to the store),
   against the target <= 5 % of a 100-step job; the job's time minus its plain call's, end to end, is printed too
   (on a shared machine its noise is larger than the overhead).
3. Ray: the same subjects as Ray tasks on a local Ray with --ray-workers CPUs (one job per worker process, each
   loading its model once): wall time, Ray's start and the model loads included.
4. claims: --claim-workers processes claim --claim-jobs trivial jobs from one SQLite store as fast as they can
   (claim, then mark done): each claim's latency, and a check that no job was claimed twice.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import studio.jobs.job
from pipelines import load_model
from pipelines.train import TrainConfig, train
from studio.jobs import JobSpec, JobStore, Worker, read_manifest
from studio.shapes.dataset import subject_images
from studio.shapes.world import BASE_SHAPES, COLORS

TARGET_OVERHEAD = 0.05


def write_subjects(root: Path, n: int) -> Path:
    """n subjects of 5 renders each (a colour and a base shape), captioned "a <name>"."""
    colors = list(COLORS)
    for i in range(n):
        color, shape = colors[i % len(colors)], BASE_SHAPES[i // len(colors) % len(BASE_SHAPES)]
        subject_images(root / f"{color}-{shape}-{i}", color, shape, 5, seed=i)
    return root


def claim_worker(path: str, results: multiprocessing.Queue) -> None:
    store = JobStore(path)
    latencies, ids = [], []
    while True:
        start = time.perf_counter()
        job = store.claim(f"bench-{os.getpid()}")
        latencies.append(time.perf_counter() - start)
        if job is None:
            break
        ids.append(job.id)
        store.finish(job.id, job.token, "done")
    results.put((latencies, ids))


def claim_latency(folder: Path, workers: int, jobs: int) -> tuple[list[float], list[int], float]:
    store = JobStore(folder / "claims.sqlite")
    store.add([JobSpec(f"job-{i:04d}", {"data_dir": str(folder)}, folder / f"job-{i:04d}") for i in range(jobs)])
    context = multiprocessing.get_context("fork")  # the children only use sqlite3
    results = context.Queue()
    start = time.perf_counter()
    processes = [context.Process(target=claim_worker, args=(str(store.path), results)) for _ in range(workers)]
    for process in processes:
        process.start()
    gathered = [results.get() for _ in processes]
    wall = time.perf_counter() - start
    for process in processes:
        process.join()
    return [t for lat, _ in gathered for t in lat], [i for _, ids in gathered for i in ids], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ray-workers", type=int, default=2)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray runner")
    p.add_argument("--claim-workers", type=int, default=8)
    p.add_argument("--claim-jobs", type=int, default=400)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    subjects = write_subjects(tmp / "subjects", args.subjects)
    settings = {"steps": args.steps}
    start = time.perf_counter()
    model = load_model(device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - start
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; embedded model loaded in {load_s:.1f} s")
    print(f"{args.subjects} subjects x {args.steps} steps (sc_tuner, batch 1, samples at start and end: "
          "1 prompt, 20 DDIM steps)")

    # 1-2. Each subject as a plain train() call and as a job through the local runner's worker, alternating which
    # goes first, so that the load of a shared machine weighs on both alike.
    batch = read_manifest(subjects, out_dir=tmp / "local", defaults={**settings, "library_dir": str(tmp / "lib-local")})
    first = batch.specs[0]
    train(model.pipe, TrainConfig.from_dict({**first.config, "steps": 2, "output_dir": tmp / "warmup"}))  # warm-up
    store = JobStore(tmp / "local" / "jobs.sqlite")
    store.add(batch.specs)
    worker = Worker(store, lambda: model.pipe)
    inside: dict[str, float] = {}  # the train() call inside each job, timed as it runs

    def timed_train(pipe, config, **kwargs):
        start = time.perf_counter()
        try:
            return train(pipe, config, **kwargs)
        finally:
            inside[config.adapter_name] = time.perf_counter() - start

    studio.jobs.job.train = timed_train
    recording, in_callback = studio.jobs.job._recording, dict.fromkeys((spec.name for spec in batch.specs), 0.0)

    def timed_recording(spec, log, progress):  # the job's progress callback (loss log, store writes), timed
        record = recording(spec, log, progress)

        def timed(p) -> None:
            start = time.perf_counter()
            record(p)
            in_callback[spec.name] += time.perf_counter() - start

        return timed

    studio.jobs.job._recording = timed_recording
    plain, job_s = {}, {}
    for i, spec in enumerate(batch.specs):
        def run_plain(spec=spec) -> None:
            config = TrainConfig.from_dict({**spec.config, "name": spec.name, "output_dir": tmp / "plain" / spec.name})
            start = time.perf_counter()
            train(model.pipe, config)
            plain[spec.name] = time.perf_counter() - start

        def run_job(spec=spec) -> None:
            start = time.perf_counter()
            worker.run(job=spec.name)  # the local runner's loop body: requeue check, claim, run, record
            job_s[spec.name] = time.perf_counter() - start

        for run in ((run_plain, run_job) if i % 2 == 0 else (run_job, run_plain)):
            run()
    jobs = store.jobs()
    assert all(job.state == "done" for job in jobs), [(job.name, job.state, job.error) for job in jobs]
    mean_plain = statistics.mean(plain.values())
    around = statistics.mean(job_s[name] - inside[name] for name in plain)  # claim, result folder, grid, library...
    callback = statistics.mean(in_callback.values())  # inside train(): the loss log and the store's progress
    machinery = around + callback
    differences = [job_s[name] - plain[name] for name in plain]
    share = machinery / mean_plain
    print(f"{'plain train()':22s} wall {sum(plain.values()):7.1f} s   mean {mean_plain:.2f} s per subject")
    print(f"{'local runner':22s} wall {sum(job_s.values()):7.1f} s   per-job overhead {machinery * 1000:.0f} ms = "
          f"{share:.1%} of a {args.steps}-step job (target <= {TARGET_OVERHEAD:.0%}: "
          f"{'met' if share <= TARGET_OVERHEAD else 'NOT met'}): {around * 1000:.0f} ms around its train() call "
          f"(claim, result folder, grid, metrics, library copy, done, record) + {callback * 1000:.0f} ms in its "
          "progress callback (loss log, progress to the store)")
    print(f"{'':22s} job minus plain call, end to end: mean {statistics.mean(differences) * 1000:+.0f} ms, median "
          f"{statistics.median(differences) * 1000:+.0f} ms ({statistics.mean(differences) / mean_plain:+.1%}; "
          "this machine's noise included)")

    # 3. Ray
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print(f"{'ray':22s} skipped: Ray is not installed (pip install -e '.[ray]')")
        else:
            from studio.jobs import run_ray

            ray_batch = read_manifest(subjects, out_dir=tmp / "ray",
                                      defaults={**settings, "library_dir": str(tmp / "lib-ray")})
            ray_store = JobStore(tmp / "ray" / "jobs.sqlite")
            ray_store.add(ray_batch.specs)
            start = time.perf_counter()
            ray.init(num_cpus=args.ray_workers, include_dashboard=False, log_to_driver=False)
            started_s = time.perf_counter() - start
            try:
                ray_jobs = run_ray(ray_store, None, progress=False)
            finally:
                ray.shutdown()
            ray_wall = time.perf_counter() - start
            states = [job.state for job in ray_jobs]
            print(f"{f'ray ({args.ray_workers} workers)':22s} wall {ray_wall:7.1f} s   (Ray start {started_s:.1f} s, "
                  f"model loaded once per worker process); {states.count('done')}/{len(states)} done"
                  + "".join(f"; {job.name}: {job.error}" for job in ray_jobs if job.error))

    # 4. claim latency
    latencies, ids, wall = claim_latency(tmp, args.claim_workers, args.claim_jobs)
    ms = sorted(t * 1000 for t in latencies)
    twice = len(ids) - len(set(ids))
    print(f"{f'claims ({args.claim_workers} processes)':22s} {len(ids)} jobs in {wall:.2f} s "
          f"({len(ids) / wall:.0f}/s): latency median {statistics.median(ms):.2f} ms, "
          f"p95 {ms[int(0.95 * (len(ms) - 1))]:.2f} ms, max {ms[-1]:.1f} ms; claimed twice: {twice}")
    print(f"(scratch folder {tmp})")


if __name__ == "__main__":
    main()
