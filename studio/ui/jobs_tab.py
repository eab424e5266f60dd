"""The Jobs tab: many subjects trained in the background, from a manifest (YAML or CSV) or a folder of subject
folders; a table of the jobs' progress, each subject's sample grid, cancel and retry, and the finished adapters in
the library (a button opens the Generate tab).

Jobs run in one background thread of the app with the app's model (studio.jobs.Worker), never at the same time
as the app's other model work: they take turns through common.MODEL_GATE, and a job gives way to a waiting event
(generate, edit, train...) at its next step, with a checkpoint it resumes from (the adapter is the same). The job
store, OUT/jobs/jobs.sqlite, is the one `studio jobs status --store ...` reads: jobs queued here can also be run by
other workers (`studio jobs work --store ...`), and jobs left running when the app stopped resume when it starts
again and the tab is shown.
"""

from __future__ import annotations

import math
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import gradio as gr

from adapters import REGISTRY
from pipelines import InputError, LoadedModel
from studio.jobs import JobRecord, JobStore, Worker, read_manifest
from studio.jobs.manifest import check_batch, parse_settings
from studio.jobs.store import worker_label

from .common import MODEL_GATE, OnShow, handler, optional_number

TITLE = "Jobs"
# A click on the Generate tab's button, as a person would: Generate's on-show then re-reads the library.
SHOW_GENERATE = """() => {
    const tab = [...document.querySelectorAll('button[role="tab"]')].find(b => b.innerText.trim() === "Generate");
    if (tab) tab.click();
}"""


class JobsService:
    """The app's job store (OUT/jobs/jobs.sqlite) and the background thread that runs its pending jobs."""

    def __init__(self, model: LoadedModel, out_dir: Path):
        self.model, self.root = model, out_dir / "jobs"
        self._store: JobStore | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.root / "jobs.sqlite")
        return self._store

    def jobs(self) -> list[JobRecord]:
        return self.store.jobs() if (self.root / "jobs.sqlite").exists() else []

    def submit(self, source: Path, defaults: dict[str, Any], base: Path | None = None) -> list[tuple[JobRecord, bool]]:
        batch = read_manifest(source, out_dir=self.root, defaults=defaults, base=base)
        check_batch(batch, self.store)
        added = self.store.add(batch.specs)
        self.wake()
        return added

    def wake(self) -> None:
        """Start the worker thread if needed and have it look for pending jobs now."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="studio-jobs", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        worker = Worker(self.store, lambda: self.model.pipe, label=f"app:{worker_label()}", gate=MODEL_GATE)
        while True:
            self._wake.wait(timeout=10.0)  # also a periodic look: jobs queued by the command line, dead workers'
            self._wake.clear()
            try:
                worker.run()
            except Exception as e:  # the store went away, a bug: say so and keep the thread for the next wake
                warnings.warn(f"jobs worker: {type(e).__name__}: {e}", stacklevel=1)


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks; its jobs run in the background with `model`."""
    service = JobsService(model, out_dir)

    @handler
    def submit(upload: str | None, folder: str, method: str | None, steps: str | float | None,
               settings: str) -> tuple[str, list[list[str]]]:
        if upload and folder.strip():
            raise InputError("give either a manifest or a folder of subject folders, not both; clear one of them")
        if not upload and not folder.strip():
            raise InputError("no subjects: upload a manifest (.yaml or .csv), or give the folder that holds one "
                             "folder of images per subject")
        defaults = parse_settings(settings or "", "More settings")
        if method:
            defaults["method"] = method
        steps = optional_number(steps, "Steps", example="200")
        if steps is not None:
            if not math.isfinite(steps) or steps < 1 or steps != int(steps):
                raise InputError(f"Steps {steps:g}: type a whole number of steps, 1 or more, or leave it blank for "
                                 "the manifest's (else 200)")
            defaults["steps"] = int(steps)
        if upload:  # kept with the jobs; its relative paths are relative to the app's working directory
            kept = service.root / "manifests" / Path(upload).name
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(upload, kept)
            added = service.submit(kept, defaults, base=Path.cwd())
        else:
            added = service.submit(Path(folder.strip()).expanduser(), defaults)
        new = [job.name for job, is_new in added if is_new]
        old = len(added) - len(new)
        message = f"Queued {len(new)} job(s): {', '.join(new)}." if new else "Nothing new to queue."
        if old:
            message += f" {old} were already queued with the same settings."
        return message, table()

    def table() -> list[list[str]]:
        return [row(job) for job in service.jobs()]

    def refresh(chosen: str | None, seen: dict) -> tuple[Any, Any, Any, Any, dict]:
        """Each tick: the table, the grids and the chooser, sent only when they changed (no flicker)."""
        jobs = service.jobs()
        rows = [row(job) for job in jobs]
        grids = [(job.outputs["grid"], job.name) for job in jobs if job.outputs.get("grid")]
        names = [job.name for job in jobs]
        now = {"rows": rows, "grids": grids, "names": names, "detail": details(chosen)}
        if any(job.state in ("pending", "running") for job in jobs):
            service.wake()  # pending jobs (queued elsewhere) and those a stopped app left running are picked up

        def changed(key: str, update: Any) -> Any:
            return update if now[key] != seen.get(key) else gr.skip()

        return (changed("rows", rows), changed("grids", grids), changed("names", gr.Dropdown(choices=names)),
                changed("detail", now["detail"]), now)

    def details(name: str | None) -> str:
        job = service.store.find(name) if name and service.jobs() else None
        if job is None:
            return "Pick a job in the table to see its details."
        lines = [f"**{job.name}**: {job.state}, attempt {job.attempts}, step {job.step}/{job.total_steps}"]
        if job.error:
            lines.append(f"Error: {job.error}")
        if job.state == "done" and "library" in job.outputs:
            lines.append(f"Adapter **{job.name}** is in the adapter library: open the Generate tab and set its "
                         "scale in the Adapters table.")
        lines += [f"{key}: `{path}`" for key, path in job.outputs.items()]
        return "\n\n".join(lines)

    @handler
    def cancel(name: str | None) -> tuple[str, list[list[str]]]:
        [job] = service.store.cancel([_chosen(name)])
        note = " (it stops after its current step, with a checkpoint)" if job.cancel_requested else ""
        return f"{job.name}: {job.state}{note}", table()

    @handler
    def retry(name: str | None) -> tuple[str, list[list[str]]]:
        [job] = service.store.retry([_chosen(name)])
        if job.state != "pending":
            raise InputError(f"{job.name} is {job.state}; only a failed or cancelled job can be retried")
        service.wake()
        return f"{job.name}: queued again; it resumes from its last checkpoint", table()

    @handler
    def open_in_generate(name: str | None) -> str:
        job = service.store.get(_chosen(name))
        if job.state != "done":
            raise InputError(f"{job.name} is {job.state}; its adapter is in the library once it is done")
        return f"Opened the Generate tab: set **{job.name}**'s scale in its Adapters table."

    def pick(event: gr.SelectData) -> str:  # a click on a row chooses its job
        return event.row_value[1]

    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("Train many subjects at once. A **folder of subject folders**: each subfolder is one subject, "
                        "named after it (its name is also the trigger word of images without a caption). Or a "
                        "**manifest** (YAML or CSV): shared defaults and per-subject settings, see docs/jobs.md.")
            upload = gr.File(label="Manifest (.yaml, .csv)", file_types=[".yaml", ".yml", ".csv"], type="filepath",
                             elem_id="jobs-manifest")
            folder = gr.Textbox(label="...or a folder of subject folders on the server", placeholder="data/subjects",
                                elem_id="jobs-folder")
            method = gr.Dropdown([("the manifest's (else SC-Tuner)", "")] + [(REGISTRY[m].label, m)
                                                                             for m in sorted(REGISTRY)],
                                 value="", label="Method for every subject", elem_id="jobs-method")
            # Not a gr.Number: it shows (and sends) blank as 0.
            steps = gr.Textbox(label="Steps (blank: the manifest's, else 200)", placeholder="blank: the manifest's",
                               elem_id="jobs-steps")
            with gr.Accordion("More settings for every subject", open=False):
                settings = gr.Textbox(label="One 'field: value' per line (any training setting)", lines=3,
                                      placeholder="learning_rate: 1.0e-4\nsample_steps: 20", elem_id="jobs-settings")
            submit_button = gr.Button("Submit", variant="primary", elem_id="jobs-submit")
            message = gr.Markdown(elem_id="jobs-message")
        with gr.Column(scale=2):
            jobs_table = gr.Dataframe(table(), headers=list(JobRecord.COLUMNS), type="array", interactive=False,
                                      label="Jobs (refreshed every second)", elem_id="jobs-table")
            with gr.Row(equal_height=True):
                chosen = gr.Dropdown([job.name for job in service.jobs()], value=None, label="Job (or click its row)",
                                     allow_custom_value=True, elem_id="jobs-chosen", scale=2)
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="jobs-cancel", scale=1)
                retry_button = gr.Button("Retry", elem_id="jobs-retry", scale=1)
                open_button = gr.Button("Open in Generate", elem_id="jobs-open", scale=1)
            detail = gr.Markdown("Pick a job in the table to see its details.", elem_id="jobs-detail")
            grids = gr.Gallery(label="Sample grids: the first and the last step of each subject", columns=2,
                               object_fit="contain", format="png", elem_id="jobs-grids")
    seen = gr.State({})
    timer = gr.Timer(1.0)

    submit_button.click(submit, [upload, folder, method, steps, settings], [message, jobs_table],
                        api_name="jobs_submit")
    # Store reads only: not in the model queue, and never waiting for one another.
    timer.tick(refresh, [chosen, seen], [jobs_table, grids, chosen, detail, seen], api_visibility="private",
               show_progress="hidden", concurrency_limit=None)
    chosen.change(details, chosen, detail, api_visibility="private", concurrency_limit=None)
    jobs_table.select(pick, outputs=chosen, api_visibility="private")
    cancel_button.click(cancel, chosen, [message, jobs_table], api_name="jobs_cancel", concurrency_limit=None)
    retry_button.click(retry, chosen, [message, jobs_table], api_name="jobs_retry", concurrency_limit=None)
    open_button.click(open_in_generate, chosen, message, api_visibility="private").success(
        None, js=SHOW_GENERATE, api_visibility="private")
    return OnShow(lambda: table(), [], [jobs_table])


def row(job: JobRecord) -> list[str]:
    """The job's line of the table; a finished adapter by its file name (the details give the whole path)."""
    cells = job.row()
    if job.state == "done" and cells[-1]:
        cells[-1] = Path(cells[-1]).name
    return cells


def _chosen(name: str | None) -> str:
    if not name:
        raise InputError("no job chosen: pick one in the table first")
    return name
