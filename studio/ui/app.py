"""Assemble the studio: one tab per module, the model loaded once and shared by all of them.

A new tab is a module with `TITLE` and `build(model, out_dir)` (see generate_tab.py), added to TABS; a tab that
cannot serve every model family also defines `unavailable(model)`, the reason shown in its place. A tab
showing state that other tabs change (the adapter library) returns an `OnShow` from `build`: it runs
whenever the page loads and whenever the tab is selected.

Tabs talk through send-to buttons: `build` lends components by name with `common.share(...)`, and a tab that
sends to another defines `link(shared, tabs)`, called once every tab is built with all the lent components
and the gr.Tabs (to switch to the receiving tab with `gr.Tabs(selected=...)`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from pipelines import LoadedModel

from . import adapters_tab, compose_tab, edit_tab, erase_tab, generate_tab, jobs_tab, png_info_tab, train_tab
from .common import gate_model_events, sharing, stop_on_close, unavailable_reason

TABS = [generate_tab, compose_tab, edit_tab, train_tab, erase_tab, jobs_tab, adapters_tab, png_info_tab]
# Pass to `.launch(css=CSS)` (Gradio 6 takes styles there). An empty output file box is drawn as a large drop
# zone; a box that only ever receives a download needs one line.
CSS = ".studio-download .empty { min-height: 3em; height: 3em; }"


def build_app(model: LoadedModel, out_dir: str | Path | None = None) -> gr.Blocks:
    """The studio's Blocks for `model`; images are saved under `out_dir` (default: a new temp folder).

    Served with `.launch(css=CSS, ...)`; pass `allowed_paths=[out_dir]` there when out_dir is outside the
    temp folder and the working directory, so Gradio may serve the images."""
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="studio-"))
    with gr.Blocks(title="SD Studio") as demo:
        gr.Markdown(f"# SD Studio\nModel: **{model.name}** ({model.family}, hash {model.hash}) on {model.device}")
        with gr.Tabs() as tabs, sharing() as shared:
            for tab in TABS:
                reason = unavailable_reason(tab, model)
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower()) as shown:
                    if reason is None:
                        on_show = tab.build(model, out_dir)
                    else:  # the tab stays, so users learn why it is empty rather than hunt for it
                        gr.Markdown(f"**{tab.TITLE} is not available for this {model.family} model.** {reason}",
                                    elem_id=f"{tab.TITLE.lower()}-unavailable")
                        on_show = None
                if on_show is not None:
                    gr.on([demo.load, shown.select], *on_show, api_visibility="private")
        for tab in TABS:
            if hasattr(tab, "link"):
                tab.link(shared, tabs)
        # A closed (or reloaded) browser tab stops the Generate or Edit run it started, at the next step.
        demo.unload(stop_on_close)
    # Model work queues one at a time (all such events share generate_tab's MODEL_QUEUE id), and takes turns with
    # the Jobs tab's background jobs.
    gate_model_events(demo)
    demo.queue(default_concurrency_limit=1)
    return demo
