"""The Jobs tab (studio/ui/jobs_tab.py): refused submissions through the /jobs_submit API, and a real browser
submitting a folder of two subjects, watching them reach done, seeing their sample grids and opening one in the
Generate tab."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client
from playwright.sync_api import expect

from studio.shapes.dataset import subject_images
from tests.test_ui import app_url, page  # noqa: F401  (fixtures: the served studio, a Chromium page on it)
from tests.test_ui_studio import toast

SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "jobs_tab.png"


@pytest.fixture
def subjects(tmp_path, monkeypatch) -> Path:
    """Two subject folders of three renders each, and a temporary adapter library."""
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    subject_images(tmp_path / "subjects" / "red-star", "red", "star", 3, seed=0)
    subject_images(tmp_path / "subjects" / "blue-moon", "blue", "circle", 3, seed=1)
    return tmp_path / "subjects"


@pytest.mark.parametrize("inputs, message", [
    ((None, "", "", None, ""), "no subjects: upload a manifest"),
    ((None, "/no/such/folder", "", None, ""), r"manifest /no/such/folder does not exist"),
    ((None, "{subjects}", "", "0", ""), r"Steps 0: type a whole number of steps, 1 or more, or leave it blank"),
    ((None, "{subjects}", "", "2.5", ""), r"Steps 2.5: type a whole number of steps"),
    ((None, "{subjects}", "", "many", ""), r"Steps: 'many' is not a number; type one \(e.g. 200\)"),
    ((None, "{subjects}", "", "inf", ""), r"Steps inf: type a whole number of steps"),
    ((None, "{subjects}", "", None, "stpes: 3"), r"More settings: unknown field 'stpes' \(did you mean 'steps'\?\)"),
    ((None, "{subjects}", "", None, "learning_rate: -1"),
     r"folder 'blue-moon': learning_rate=-1: must be a finite number > 0"),
])
def test_a_refused_submission_says_why_and_queues_nothing(app_url, subjects, inputs, message):  # noqa: F811
    client = Client(app_url, verbose=False)
    upload, folder, method, steps, settings = inputs
    with pytest.raises(Exception, match=message):
        client.predict(upload, folder.format(subjects=subjects), method, steps, settings, api_name="/jobs_submit")


@pytest.mark.browser
def test_browser_steps_left_blank_mean_the_manifests(page):  # noqa: F811
    """The field starts blank, as its label says, and a submission with it blank gets past it: Gradio's
    gr.Number showed blank as a red 0 and refused it as below its minimum, before any other check."""
    page.get_by_role("tab", name="Jobs").click()
    steps = page.locator("#jobs-steps textarea")
    expect(steps).to_have_value("")
    page.locator("#jobs-folder textarea").fill("/no/such/folder")
    page.locator("#jobs-submit").click()
    toast(page, "manifest /no/such/folder does not exist").to_be_visible(timeout=30_000)
    expect(page.locator(".toast-body").filter(has_text="minimum")).to_have_count(0)


@pytest.mark.browser
def test_browser_submits_a_folder_of_subjects_sees_them_done_and_opens_one_in_generate(page, subjects):  # noqa: F811
    page.get_by_role("tab", name="Jobs").click()
    page.locator("#jobs-folder textarea").fill(str(subjects))
    steps = page.locator("#jobs-steps textarea")
    steps.fill("3")  # very few steps: the test is about the wiring
    steps.blur()
    page.get_by_text("More settings for every subject").click()
    page.locator("#jobs-settings textarea").fill("sample_steps: 4\nsample_seeds: [0, 1, 2]")
    page.locator("#jobs-submit").click()
    expect(page.locator("#jobs-message")).to_contain_text("Queued 2 job(s): blue-moon, red-star", timeout=30_000)

    table = page.locator("#jobs-table")

    def cells(text: str):  # the table's visible cells (it also keeps hidden ones, for measuring)
        return table.get_by_text(text, exact=True).filter(visible=True)

    expect(cells("done")).to_have_count(2, timeout=180_000)  # the timer refreshes the table
    expect(page.locator("#jobs-grids img")).to_have_count(2, timeout=30_000)  # each subject's sample grid
    cells("red-star").click()
    expect(page.locator("#jobs-detail")).to_contain_text("red-star: done", timeout=10_000)
    expect(page.locator("#jobs-detail")).to_contain_text("is in the adapter library", timeout=10_000)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.locator("#jobs-open").click()
    expect(page.locator("#gen-prompt")).to_be_visible(timeout=10_000)
    page.get_by_text("Adapters (from the library").click()
    expect(page.locator("#gen-adapters")).to_contain_text("red-star", timeout=10_000)
    expect(page.locator("#gen-adapters")).to_contain_text("blue-moon", timeout=10_000)
