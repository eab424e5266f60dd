"""Batch jobs (studio.jobs, `studio jobs`): the idempotent job, manifests refused as a whole, the SQLite store's
atomic claims and dead-worker requeue, cancel and retry, nothing lost when the runner is SIGKILLed, and the
scale-out modes (worker processes, a SLURM array script, Ray tasks, one job over several processes), all on a
tiny SD 1.5 pipeline saved to disk so that subprocesses can load it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines import EMBEDDED_MODEL, generate
from pipelines.architectures import tiny_sd15_pipeline
from pipelines.statefile import load_state
from studio.cli import main
from studio.jobs import (
    JobError,
    JobSpec,
    JobStore,
    ManifestError,
    ModelGate,
    Worker,
    read_manifest,
    run_job,
)
from studio.jobs.manifest import check_batch, make_spec
from studio.library import AdapterLibrary, LibraryError
from studio.shapes.dataset import subject_images

ROOT = Path(__file__).resolve().parent.parent
# Tiny, fast and exactly resumable settings: a checkpoint every 2 steps, samples of 1 DDIM step.
FAST = {"steps": 6, "learning_rate": 1e-3, "checkpoint_every": 2, "sample_steps": 1}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny pipeline as a diffusers folder: what `--model` loads in a subprocess."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")).save_pretrained(folder)
    return folder


@pytest.fixture
def library(tmp_path, monkeypatch) -> AdapterLibrary:
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    return AdapterLibrary()


def subject(folder: Path, color: str = "red", shape: str = "star", n: int = 3) -> Path:
    subject_images(folder, color, shape, n, seed=0)  # 64x64 renders with .txt captions
    return folder


@pytest.fixture
def subjects(tmp_path) -> Path:
    """A folder of two subject folders."""
    subject(tmp_path / "subjects" / "red-star")
    subject(tmp_path / "subjects" / "blue-moon", "blue", "circle")
    return tmp_path / "subjects"


def tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def spec(tmp_path: Path, data: Path, name: str = "red-star", library: bool = True, **settings) -> JobSpec:
    return make_spec(name, {"data_dir": str(data), **FAST, **settings}, tmp_path / "out", library)


def cli(*argv: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`studio ...` in a subprocess (one thread, as the tests run), from the repository root."""
    return subprocess.run([sys.executable, "-m", "studio.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


# -- one job --------------------------------------------------------------------------------------------------------


def test_a_job_resumes_after_a_stop_does_nothing_once_done_and_equals_an_uninterrupted_run(tmp_path, library,
                                                                                           monkeypatch):
    data = subject(tmp_path / "red-star")
    job = spec(tmp_path, data)
    stops = iter([False] * 3 + [True])  # stopped before step 4: the checkpoint of step 3 is written on the way out
    first = run_job(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), job, should_stop=lambda: next(stops))
    assert (first.status, first.step) == ("cancelled", 3)
    assert not job.result_dir.exists() and not job.done_file.exists()

    resumed = run_job(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), job)
    assert resumed.status == "done"
    files = {key: Path(path) for key, path in resumed.outputs.items()}
    assert files["adapter"] == job.result_dir / "red-star.safetensors"
    assert files["library"] == library.get("red-star").path
    assert Image.open(files["grid"]).size == (80 + 128, 2 * 128)  # label column, one sample, steps 0 and 6
    metrics = json.loads(files["metrics"].read_text())
    assert len(metrics["losses"]) == 6 and metrics["settings"]["steps"] == 6
    log = files["log"].read_text()
    assert "stopped at step 3" in log and "step 6/6" in log and log.count("attempt") == 2
    assert sorted(p.name for p in job.out_dir.iterdir()) == ["done", "result", "work"]  # no temporary folder left

    whole = run_job(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), spec(tmp_path / "b", data, library=False))
    assert max_abs_diff(tensors(files["adapter"]), tensors(whole.outputs["adapter"])) <= 1e-6

    import studio.jobs.job

    monkeypatch.setattr(studio.jobs.job, "train", lambda *a, **k: pytest.fail("a finished job trained again"))
    again = run_job(None, job)
    assert (again.status, again.outputs) == ("already done", resumed.outputs)
    assert "already done, nothing to do" in again.message
    # Killed after its result was renamed into place but before `done`: it only finishes up.
    job.done_file.unlink()
    assert run_job(None, job).status == "done" and job.done_file.exists()
    with pytest.raises(JobError, match="finished job made with other settings"):
        run_job(None, spec(tmp_path, data, steps=8))


def test_a_finished_adapter_is_not_written_over_another_of_the_same_name_in_the_library(tmp_path, library):
    data = subject(tmp_path / "red-star")
    other = run_job(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), spec(tmp_path / "a", data, seed=1))
    before = library.get("red-star").path.read_bytes()
    assert before == Path(other.outputs["adapter"]).read_bytes()
    with pytest.raises(LibraryError, match="already holds another 'red-star'; rename or delete it, then retry"):
        run_job(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), spec(tmp_path / "b", data))
    assert library.get("red-star").path.read_bytes() == before


# -- manifests ------------------------------------------------------------------------------------------------------


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_manifest_defaults_settings_and_rows_take_precedence_in_that_order(tmp_path, library):
    subject(tmp_path / "stars" / "red")
    subject(tmp_path / "stars" / "blue", "blue")
    manifest = write_yaml(tmp_path / "batch.yaml", """
output: out
defaults: {method: lora, method_options: {rank: 2}, steps: 400, learning_rate: 1e-4, trigger: sks}
subjects:
  - {name: red-star, data_dir: stars/red}
  - {data_dir: stars/blue, steps: 9, trigger: zkz, sample_prompts: [a zkz], masked_loss: true, mask_dir: stars/blue}
""")
    batch = read_manifest(manifest, defaults={"steps": 50, "seed": 3})
    red, blue = batch.specs
    assert batch.out_dir == tmp_path / "out" and red.out_dir == tmp_path / "out" / "red-star"
    assert (red.name, blue.name) == ("red-star", "blue")  # the folder's name when none is given
    assert (red.steps, blue.steps) == (50, 9)  # --set over the manifest's defaults, the row over both
    config = red.train_config()
    assert (config.method, config.method_options, config.learning_rate, config.seed) == ("lora", {"rank": 2}, 1e-4, 3)
    assert config.data_dir == tmp_path / "stars" / "red"  # relative to the manifest
    assert blue.train_config().mask_dir == tmp_path / "stars" / "blue"  # every path setting is
    assert config.sample_prompts == ["sks"] and blue.train_config().sample_prompts == ["a zkz"]
    assert config.output_dir == red.work_dir and config.resume == "latest"


def test_csv_manifest_cells_are_typed_and_blank_cells_are_defaults(tmp_path, library):
    subject(tmp_path / "red")
    subject(tmp_path / "blue", "blue")
    (tmp_path / "batch.csv").write_text("name,data_dir,trigger,steps,learning_rate,method,method_options,sample_seeds\n"
                                        "a,red,sks,7,1e-3,lora,{rank: 4},\"[1, 2]\"\n"
                                        "b,blue,zkz,,,,,\n")
    a, b = read_manifest(tmp_path / "batch.csv").specs
    ca, cb = a.train_config(), b.train_config()
    assert (ca.steps, ca.learning_rate, ca.method_options, ca.sample_seeds) == (7, 1e-3, {"rank": 4}, [1, 2])
    assert (cb.steps, cb.method, cb.trigger) == (200, "sc_tuner", "zkz")


def test_a_folder_of_subject_folders_is_one_subject_per_folder_named_and_triggered_by_it(subjects, library):
    batch = read_manifest(subjects, out_dir=subjects.parent / "out", defaults={"steps": 5})
    assert [(s.name, s.train_config().trigger, s.steps) for s in batch.specs] == [("blue-moon", "blue-moon", 5),
                                                                                  ("red-star", "red-star", 5)]


@pytest.mark.parametrize("text, message", [
    ("defautls: {steps: 3}\nsubjects: [{data_dir: red}]\n",
     r"unknown key\(s\) \['defautls'\] \(did you mean 'defaults'\?\)"),
    ("subjects:\n  - {data_dir: red}\n  - {data_dir: red, stpes: 3}\n",
     r"subject 2: unknown field 'stpes' \(did you mean 'steps'\?\)"),
    ("subjects:\n  - {data_dir: red}\n  - {name: gone, data_dir: missing}\n",
     r"subject 2 'gone': data_dir=.*missing'\): is not a folder"),
    ("subjects:\n  - {data_dir: red}\n  - {data_dir: red, trigger: x}\n",
     r"subject 2 'red': name 'red' is also .*subject 1 'red'; give each subject its own name"),
    ("subjects:\n  - {data_dir: red, steps: 0}\n", r"subject 1 'red': steps=0: must be an integer >= 1"),
    ("subjects:\n  - {data_dir: red, method: dora}\n", r"subject 1 'red': method='dora': is unknown"),
    ("subjects:\n  - {data_dir: red, output_dir: x}\n", r"subject 1: output_dir is set by the batch"),
    ("defaults: {name: x}\nsubjects: [{data_dir: red}]\n", r"defaults: name names one subject"),
])
def test_a_bad_manifest_is_refused_whole_naming_the_row_and_the_field(tmp_path, library, text, message):
    subject(tmp_path / "red")
    manifest = write_yaml(tmp_path / "batch.yaml", text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest)
    # The command line refuses it the same way, in one `error:` (exit 2), before anything is queued.
    assert main(["jobs", "submit", str(manifest), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "jobs.sqlite").exists()


def test_every_problem_is_listed_at_once_and_library_and_store_clashes_are_refused(tmp_path, library, capsys):
    subject(tmp_path / "red")
    subject(tmp_path / "blue", "blue")
    bad = write_yaml(tmp_path / "bad.yaml", "subjects:\n  - {data_dir: red, steps: -1}\n  - {data_dir: blue, "
                                            "lr: 1}\n  - {data_dir: nowhere}\n")
    with pytest.raises(ManifestError, match=r"\(3 problems\):\n  .*steps=-1.*\n  .*'lr'.*\n  .*nowhere"):
        read_manifest(bad)

    manifest = write_yaml(tmp_path / "ok.yaml", "subjects: [{data_dir: red}, {data_dir: blue}]\n")
    store = JobStore(tmp_path / "jobs.sqlite")
    (library.root).mkdir(parents=True)
    (library.root / "blue.safetensors").write_bytes(b"")  # a name the library already holds
    with pytest.raises(ManifestError, match=r"subject 2 'blue': name 'blue': the adapter library .* already holds "
                                            r"'blue'; rename the subject, .* or pass --no-library"):
        check_batch(read_manifest(manifest), store)
    store.add(read_manifest(manifest, add_to_library=False).specs)
    with pytest.raises(ManifestError, match=r"subject 1 'red': name 'red' is already a job in .* with other settings "
                                            r"\(steps \(default\) -> 7; pending\)"):
        check_batch(read_manifest(manifest, add_to_library=False, defaults={"steps": 7}), store)
    assert len(store.jobs()) == 2


# -- the store ------------------------------------------------------------------------------------------------------


def dummy_specs(n: int, tmp_path: Path) -> list[JobSpec]:
    return [JobSpec(f"job-{i:03d}", {"data_dir": str(tmp_path), "steps": 1}, tmp_path / f"job-{i:03d}")
            for i in range(n)]


def _claim_all(path: str, results: multiprocessing.Queue) -> None:
    store = JobStore(path)
    claimed = []
    while (job := store.claim(f"worker-{os.getpid()}")) is not None:
        claimed.append(job.id)
        store.finish(job.id, job.token, "done")
    results.put(claimed)


def test_concurrent_workers_never_claim_the_same_job(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add(dummy_specs(60, tmp_path))
    context = multiprocessing.get_context("fork")  # the children only use sqlite3
    results = context.Queue()
    workers = [context.Process(target=_claim_all, args=(str(store.path), results)) for _ in range(8)]
    for worker in workers:
        worker.start()
    claimed = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
    every = sorted(i for ids in claimed for i in ids)
    assert every == [job.id for job in store.jobs()]  # each job exactly once
    assert {job.state for job in store.jobs()} == {"done"} and {job.attempts for job in store.jobs()} == {1}
    assert store.add(dummy_specs(60, tmp_path))[0][1] is False  # the same batch again: queued once
    with sqlite_connection(store.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def sqlite_connection(path: Path):
    import contextlib
    import sqlite3

    return contextlib.closing(sqlite3.connect(path))


def test_a_store_for_a_network_file_system_keeps_its_rollback_journal(tmp_path):
    JobStore(tmp_path / "jobs.sqlite", wal=False).add(dummy_specs(1, tmp_path))  # `--no-wal`
    store = JobStore(tmp_path / "jobs.sqlite")  # opened later with the default: the file's mode stays
    job = store.claim("w")
    assert store.finish(job.id, job.token, "done") and store.get(job.id).state == "done"
    with sqlite_connection(store.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_dead_workers_jobs_are_requeued_and_their_late_results_refused(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite", lease_s=60)
    store.add(dummy_specs(4, tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    a, b, c, d = (store.claim(f"w{i}") for i in range(4))
    with sqlite_connection(store.path) as con, con:
        con.execute("UPDATE jobs SET pid = ? WHERE id = ?", (gone.pid, a.id))  # a worker process that exited
        con.execute("UPDATE jobs SET host = 'elsewhere', heartbeat = ? WHERE id = ?", (time.time() - 120, b.id))
        con.execute("UPDATE jobs SET host = 'elsewhere', heartbeat = ? WHERE id = ?", (time.time() - 5, c.id))
        con.execute("UPDATE jobs SET pid = ?, cancel_requested = 1 WHERE id = ?", (gone.pid, d.id))
    assert sorted(store.requeue_dead()) == [a.name, b.name, d.name]
    states = {job.name: job.state for job in store.jobs()}
    assert states == {a.name: "pending", b.name: "pending", c.name: "running", d.name: "cancelled"}
    assert "is gone (pid" in store.events(a.id)[-1][1] and "no heartbeat for 60 s" in store.events(b.id)[-1][1]

    again = store.claim("w9", a.name)
    assert again.attempts == 2 and again.token != a.token
    assert store.finish(a.id, a.token, "done") is False  # the dead worker's claim is void
    assert store.heartbeat(a.id, a.token) == (False, False)
    assert store.finish(again.id, again.token, "done") and store.get(a.id).state == "done"


def test_a_requeued_slurm_task_takes_its_job_back_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    store = JobStore(tmp_path / "jobs.sqlite")
    [(job, _)] = store.add(dummy_specs(1, tmp_path))
    from studio.jobs.store import worker_label

    first = store.claim(worker_label(), job.id)
    assert first.worker == "slurm:77_0"
    assert store.claim(worker_label(), job.id) is None  # the same process: still its own claim
    with sqlite_connection(store.path) as con, con:
        con.execute("UPDATE jobs SET host = 'node-3', pid = 1 WHERE id = ?", (job.id,))  # ran on another node
    second = store.claim(worker_label(), job.id)  # SLURM requeued the task: the job comes back to it
    assert second.attempts == 2 and store.claim("slurm:77_1", job.id) is None


def test_store_refuses_unknown_jobs_and_a_file_that_is_not_a_store(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    with pytest.raises(Exception, match=r"no job 'nope' in .*; its jobs are \[\]"):
        store.cancel(["nope"])
    (tmp_path / "notes.txt").write_text("not a database, just text " * 100)
    with pytest.raises(Exception, match="is not a job store"):
        JobStore(tmp_path / "notes.txt")


def test_cli_status_cancel_retry_and_a_model_that_cannot_load(tmp_path, capsys):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add(dummy_specs(3, tmp_path))
    flags = ["--store", str(store.path)]
    assert main(["jobs", "cancel", "job-001", *flags]) == 0
    assert capsys.readouterr().out == "job-001: cancelled\n"
    assert main(["jobs", "retry", *flags]) == 0
    assert capsys.readouterr().out == "job-001: pending\n"
    # A model that cannot be loaded fails no job: the claimed one is pending again, the error said once.
    assert main(["jobs", "work", *flags, "--model", str(tmp_path / "no-model")]) == 2
    assert "error: model" in capsys.readouterr().err
    assert [(j.state, j.attempts) for j in store.jobs()] == [("pending", 1), ("pending", 0), ("pending", 0)]
    assert main(["jobs", "status", *flags]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "Subject", "State", "Attempts", "Step", "Loss", "Time", "Adapter", "/", "error"]
    assert out[1].split()[:5] == ["1", "job-000", "pending", "1", "0/1"]
    assert main(["jobs", "status", "job-000", *flags]) == 0
    assert "the model could not be loaded; pending again" in capsys.readouterr().out
    assert main(["jobs", "status", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "no job store at" in capsys.readouterr().err


# -- workers: cancel, retry, failures, the model gate ---------------------------------------------------------------


def test_cancel_stops_a_running_job_with_a_checkpoint_and_retry_finishes_it(tmp_path, library):
    store = JobStore(tmp_path / "jobs.sqlite")
    subject(tmp_path / "red")
    subject(tmp_path / "blue", "blue")
    [(long, _), (other, _)] = store.add([spec(tmp_path, tmp_path / "red", "red", steps=40),
                                         spec(tmp_path, tmp_path / "blue", "blue")])
    worker = Worker(store, lambda: tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")), progress_every_s=0)
    thread = threading.Thread(target=worker.run, kwargs={"job": long.id})
    thread.start()
    deadline = time.monotonic() + 120
    while store.get(long.id).step < 2:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    assert [j.state for j in store.cancel()] == ["running", "cancelled"]  # a pending job is cancelled at once
    thread.join(timeout=120)
    job = store.get(long.id)
    assert job.state == "cancelled" and 2 <= job.step < 40 and job.cancel_requested is False
    assert (long.spec.work_dir / "checkpoints" / f"step-{job.step:06d}").is_dir()

    assert [j.state for j in store.retry()] == ["pending", "pending"]
    assert [(j.name, j.state, j.attempts) for j in Worker(store, worker.load_pipe).run()] == [("red", "done", 2),
                                                                                             ("blue", "done", 1)]
    assert "cancelled at step" in " ".join(message for _, message in store.events(long.id))
    assert store.retry([other.id])[0].state == "done"  # a finished job is not retried


def test_the_model_gate_makes_a_job_give_way_to_interactive_work_without_changing_its_adapter(tmp_path, library):
    """A background job (the app's) stops at its next step when interactive work waits, lets it use the model as
    it was (no adapter attached), then resumes from its checkpoint: the adapter equals an uninterrupted run's."""
    store = JobStore(tmp_path / "jobs.sqlite")
    data = subject(tmp_path / "red")
    [(job, _)] = store.add([spec(tmp_path, data, "red", steps=30, checkpoint_every=0)])
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    clean = generate(pipe, "a red star", seed=1, num_inference_steps=2).images[0]
    gate = ModelGate()
    worker = Worker(store, lambda: pipe, gate=gate, progress_every_s=0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    while store.get(job.id).step < 3:
        assert thread.is_alive()
        time.sleep(0.02)
    with gate.interactive():
        during = generate(pipe, "a red star", seed=1, num_inference_steps=2).images[0]
        paused_at = store.get(job.id).step
        time.sleep(0.3)
        assert store.get(job.id).step == paused_at and store.get(job.id).state == "running"
    thread.join(timeout=120)
    assert np.array_equal(np.asarray(during), np.asarray(clean))
    done = store.get(job.id)
    assert done.state == "done" and done.attempts == 1 and 3 <= paused_at < 30
    assert "stopped at step" in Path(done.outputs["log"]).read_text()
    whole = run_job(tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer")),
                    spec(tmp_path / "b", data, "red", library=False, steps=30, checkpoint_every=0))
    assert max_abs_diff(tensors(done.outputs["adapter"]), tensors(whole.outputs["adapter"])) <= 1e-6


# -- nothing lost: SIGKILL mid-job, then resume ---------------------------------------------------------------------


def test_a_killed_runner_loses_nothing_resume_finishes_and_a_corrupt_subject_fails_alone(tmp_path, tiny_model):
    subject(tmp_path / "subjects" / "red-star")
    subject(tmp_path / "subjects" / "blue-moon", "blue", "circle")
    broken = subject(tmp_path / "subjects" / "broken", "green", "square")
    (broken / "000001.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "batch.yaml").write_text("defaults: {steps: 40, checkpoint_every: 4, learning_rate: 1.0e-3, "
                                         "sample_steps: 1}\nsubjects:\n  - {data_dir: subjects/red-star}\n"
                                         "  - {data_dir: subjects/broken}\n  - {data_dir: subjects/blue-moon}\n")
    env = {"STUDIO_ADAPTER_DIR": str(tmp_path / "library")}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    runner = subprocess.Popen([sys.executable, "-m", "studio.cli", "jobs", "submit", str(tmp_path / "batch.yaml"),
                               "--out", str(killed), "--model", str(tiny_model), "--no-progress"], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoints = killed / "red-star" / "work" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):  # mid-job: after its first checkpoint
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    store = JobStore(killed / "jobs.sqlite")
    assert [(j.name, j.state) for j in store.jobs()] == [("red-star", "running"), ("broken", "pending"),
                                                         ("blue-moon", "pending")]
    assert store.get("red-star").step < 40 and not (killed / "red-star" / "done").exists()

    resumed = cli("jobs", "resume", "--store", str(killed / "jobs.sqlite"), "--model", str(tiny_model),
                  "--no-progress", env=env)
    assert resumed.returncode == 1, resumed.stderr  # one job failed: said, with its status command
    assert "1 job(s) failed (broken)" in resumed.stderr
    jobs = {j.name: j for j in store.jobs()}
    assert {name: j.state for name, j in jobs.items()} == {"red-star": "done", "broken": "failed",
                                                           "blue-moon": "done"}
    assert jobs["red-star"].attempts == 2 and jobs["blue-moon"].attempts == 1
    assert "cannot read image" in jobs["broken"].error and "000001.png" in jobs["broken"].error
    assert any("is gone (pid" in message for _, message in store.events(jobs["red-star"].id))

    uninterrupted = cli("jobs", "submit", str(tmp_path / "batch.yaml"), "--out", str(whole), "--model",
                        str(tiny_model), "--no-progress", "--no-library", env=env)
    assert uninterrupted.returncode == 1, uninterrupted.stderr
    for name in ("red-star", "blue-moon"):
        diff = max_abs_diff(tensors(killed / name / "result" / f"{name}.safetensors"),
                            tensors(whole / name / "result" / f"{name}.safetensors"))
        assert diff <= 1e-6, (name, diff)
    assert sorted(p.name for p in (tmp_path / "library").iterdir()) == ["blue-moon.safetensors",
                                                                       "red-star.safetensors"]

    status = json.loads(cli("jobs", "status", "--json", "--store", str(killed / "jobs.sqlite")).stdout)
    assert [(j["name"], j["state"], j["attempts"]) for j in status] == [("red-star", "done", 2),
                                                                       ("broken", "failed", 1),
                                                                       ("blue-moon", "done", 1)]


# -- scale-out ------------------------------------------------------------------------------------------------------


def test_two_worker_processes_share_the_queue(subjects, tmp_path, tiny_model, library):
    out = tmp_path / "out"
    assert main(["jobs", "submit", str(subjects), "--out", str(out), "--queue-only", "--set", "steps=4",
                 "--set", "sample_steps=1"]) == 0
    assert main(["jobs", "resume", "--store", str(out / "jobs.sqlite"), "--model", str(tiny_model), "--workers", "2",
                 "--no-progress"]) == 0
    jobs = JobStore(out / "jobs.sqlite").jobs()
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1), ("done", 1)]
    assert all(j.worker.split(":")[-1] != str(os.getpid()) for j in jobs)  # run by the worker processes


def test_sbatch_array_tasks_each_run_the_job_their_task_id_picks(subjects, tmp_path, tiny_model, library, capsys):
    out = tmp_path / "out"
    assert main(["jobs", "sbatch", str(subjects), "--out", str(out), "--set", "steps=4", "--set", "sample_steps=1",
                 "--model", str(tiny_model), "--gpus", "0", "--max-parallel", "8", "--partition", "debug"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1%8" in script and "#SBATCH --partition=debug" in script and "--gres" not in script
    assert "JOBS=(1 2)" in script and f"--output={out / 'slurm'}/%A_%a.out" in script and (out / "slurm").is_dir()
    assert 'jobs work --store' in script and '--job "${JOBS[$SLURM_ARRAY_TASK_ID]}"' in script
    (tmp_path / "batch.sbatch").write_text(script)

    def task(i: int) -> subprocess.Popen:  # what SLURM runs for array task i (the #SBATCH lines are comments)
        return subprocess.Popen(["bash", str(tmp_path / "batch.sbatch")], cwd=tmp_path, env={
            **os.environ, "OMP_NUM_THREADS": "1", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": str(i)},
            stderr=subprocess.PIPE, text=True)

    tasks = [task(0), task(1)]
    assert [t.wait(timeout=300) for t in tasks] == [0, 0], [t.stderr.read() for t in tasks]
    jobs = JobStore(out / "jobs.sqlite").jobs()
    assert [(j.name, j.state, j.attempts, j.worker) for j in jobs] == [("blue-moon", "done", 1, "slurm:41_0"),
                                                                      ("red-star", "done", 1, "slurm:41_1")]
    rerun = task(0)
    assert rerun.wait(timeout=300) == 0 and "blue-moon: done; nothing to do" in rerun.stderr.read()


def test_ray_runs_each_job_as_a_task_on_a_local_ray(subjects, tmp_path, tiny_model, library):
    ray = pytest.importorskip("ray")
    from studio.jobs import read_manifest, run_ray

    store = JobStore(tmp_path / "out" / "jobs.sqlite")
    store.add(read_manifest(subjects, out_dir=tmp_path / "out", defaults={"steps": 4, "sample_steps": 1}).specs)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"STUDIO_ADAPTER_DIR": str(library.root), "OMP_NUM_THREADS": "1"}})
    try:
        jobs = run_ray(store, str(tiny_model), progress=False)
    finally:
        ray.shutdown()
    assert [(j.name, j.state, j.attempts) for j in jobs] == [("blue-moon", "done", 1), ("red-star", "done", 1)]
    assert sorted(e.name for e in library.list()) == ["blue-moon", "red-star"]


def test_one_job_over_two_processes_claims_once_and_trains_on_both(subjects, tmp_path, tiny_model, library):
    """`accelerate launch --multi_gpu -m studio.cli jobs run-one` on GPUs; here torchrun with two CPU processes
    (gloo), as accelerate launches them."""
    out = tmp_path / "out"
    assert main(["jobs", "submit", str(subjects), "--out", str(out), "--queue-only", "--set", "steps=2",
                 "--set", "sample_steps=1", "--set", "checkpoint_every=2"]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "studio.cli", "jobs", "run-one", "--store", str(out / "jobs.sqlite"), "--job", "red-star",
                          "--model", str(tiny_model)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    store = JobStore(out / "jobs.sqlite")
    assert [(j.name, j.state, j.attempts) for j in store.jobs()] == [("blue-moon", "pending", 0),
                                                                    ("red-star", "done", 1)]
    state = load_state(out / "red-star" / "work" / "checkpoints" / "step-000002" / "state.safetensors")
    assert state["run"]["num_processes"] == 2
    assert sum("claimed by" in message for _, message in store.events(store.get("red-star").id)) == 1
