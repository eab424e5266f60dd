"""The Train and Edit tabs as an artist meets them (issue #20), in a real browser on the served studio: training
without opening the Samples section, a blank learning rate, the loss curve and the sample grid, the status line's
ETA, Resume and "Keep the adapter as it is" after a cancel; in Edit the translucent brush sized to the image,
clearing the paint but not the image, refused prompts, a shrunk upload, enlarged small results, a library LoRA
picked in the Adapters table; and in both, a bad upload answered by name with the last results left in place."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import expect

from adapters import CSCTuner, CSCTunerConfig, LoRA, LoRAConfig, save_adapter
from adapters.io import read_metadata
from studio.library import AdapterLibrary
from studio.shapes.world import Scene, ShapeObject, render
from studio.ui.edit_tab import mask_brush, painted_mask
from studio.ui.train_tab import (
    learning_rate_of,
    loss_frame,
    method_options,
    optional_number,
    sample_grid,
    status_line,
)
from tests.adapter_helpers import perturb
from tests.test_ui import app_url, page  # noqa: F401  (fixtures: the served studio, a Chromium page on it)

SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "shot_edit_adapters.png"
SOURCE = "a red circle on the left on a gray background"
TARGET = "a blue circle on the left on a gray background"


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    """An empty adapter library of this test's own."""
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    return tmp_path / "library"


@pytest.fixture
def lora_library(library, embedded) -> Path:
    """The test's library holding a LoRA of the embedded model ("sks", off its identity init) and a CSC-Tuner."""
    lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=2))
    perturb(lora)
    save_adapter(lora, library / "sks.safetensors", trigger_words=["sks"])
    controller = CSCTuner.from_unet(embedded.pipe.unet, CSCTunerConfig("canny", dense_kernel=1, vae_scale_factor=4))
    save_adapter(controller, library / "star-canny.safetensors")
    return library


@pytest.fixture
def stars(tmp_path) -> list[str]:
    """Three rendered stars (64 px), as files to upload."""
    paths = [tmp_path / f"{color}-star.png" for color in ("red", "blue", "green")]
    for path in paths:
        render(Scene((ShapeObject(path.stem.split("-")[0], "star"),))).save(path)
    return [str(path) for path in paths]


@pytest.fixture
def red_circle(tmp_path) -> str:
    path = tmp_path / "red-circle.png"
    render(Scene((ShapeObject("red", "circle", "left"),), "gray")).save(path)
    return str(path)


@pytest.fixture
def corrupt_png(tmp_path) -> str:
    """A file named .png holding a PNG signature and then garbage."""
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return str(path)


# -- helpers ----------------------------------------------------------------------------------------------------


def set_slider(view, elem_id: str, value: int) -> None:
    box = view.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def open_train(view, stars: list[str], trigger: str, steps: int) -> None:
    view.get_by_role("tab", name="Train").click()
    view.locator("#train-files input[type=file]").set_input_files(stars)
    view.locator("#train-trigger textarea").fill(trigger)
    set_slider(view, "train-steps", steps)


def status(view, tab: str):
    return view.locator(f"#{tab}-status textarea")


def toast(view, text: str | re.Pattern):
    """The alerts (gr.Error / gr.Warning / gr.Info messages) showing `text`."""
    return view.locator("[data-testid=toast-text]").filter(has_text=text)


def upload_and_edit(view, image: str, steps: int = 3) -> None:
    view.get_by_role("tab", name="Edit").click()
    view.locator("#edit-image input[type=file]").set_input_files(image)
    view.locator("#edit-source textarea").fill(SOURCE)
    view.locator("#edit-target textarea").fill(TARGET)
    set_slider(view, "edit-steps", steps)  # few steps: these tests are about the tab, not the edit
    view.locator("#edit-button").click()


def natural_width(locator) -> int:
    return locator.evaluate("img => img.naturalWidth")


def canvas_pixels(view) -> np.ndarray:
    """The mask editor's drawing as shown (RGB), from a screenshot of its canvas."""
    shot = view.locator("#edit-mask canvas").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)


# -- Train ------------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_trains_without_opening_the_samples_section_and_plots_the_loss(page, stars, library):  # noqa: F811
    # The Samples section stays closed: its boxes send None, which used to fail the run with a bare "Error".
    open_train(page, stars, "zq-closed", 3)
    page.locator("#train-button").click()
    expect(status(page, "train")).to_have_value("Done: 'zq-closed' is in the adapter library; use it in the "
                                                "Generate tab.", timeout=120_000)
    assert [entry.name for entry in AdapterLibrary().list()] == ["zq-closed"]
    # The loss curve (one point per step) and the grid of samples, a row per sampled step (the trigger word's).
    plot = page.locator("#train-loss")
    expect(plot.locator(".mark-line path").first).to_be_attached(timeout=10_000)
    page.wait_for_timeout(500)  # drawn
    pixels = np.asarray(Image.open(io.BytesIO(plot.screenshot())).convert("RGB")).astype(int)
    smoothed = np.abs(pixels - (0xC2, 0x41, 0x0C)).max(axis=-1) < 40  # the smoothed curve's colour
    assert smoothed.sum() > 200, "no loss curve drawn"  # a line across the plot, not just its legend
    expect(page.locator("#train-grid img")).to_be_visible(timeout=10_000)
    assert natural_width(page.locator("#train-grid img")) >= 128 + 80  # a label column and a 128-px cell
    expect(page.locator("#train-samples img")).to_have_count(2)  # step 0 and step 3


@pytest.mark.browser
def test_browser_a_blank_learning_rate_stays_blank_and_trains_and_0_is_refused(page, stars, library):  # noqa: F811
    open_train(page, stars, "zq-blank", 2)
    page.locator("#train-concept").get_by_text("control").click()  # no recommended rate: the method's default
    rate = page.locator("#train-lr textarea")
    expect(rate).to_have_value("", timeout=10_000)
    expect(page.locator("#train-steps input[type=number]")).to_have_value("200")  # the concept's default
    set_slider(page, "train-steps", 2)
    expect(rate).to_have_attribute("placeholder", "blank: the method's default")
    page.locator("#train-button").click()
    expect(status(page, "train")).to_have_value(re.compile("^Done: 'zq-blank'"), timeout=120_000)
    expect(rate).to_have_value("")  # still blank, not 0
    trained = AdapterLibrary().get("zq-blank").path
    assert trained.is_file()

    # 0 would not train: refused by name, and the last run's samples stay.
    rate.fill("0")
    page.locator("#train-name textarea").fill("zq-zero")
    page.locator("#train-button").click()
    expect(toast(page, "Learning rate 0: the adapter would not learn")).to_be_visible(timeout=30_000)
    expect(page.locator("#train-samples img")).to_have_count(2)
    assert [entry.name for entry in AdapterLibrary().list()] == ["zq-blank"]


@pytest.mark.browser
def test_browser_a_corrupt_training_image_is_named_and_the_last_samples_stay(
        page, stars, corrupt_png, library):  # noqa: F811
    open_train(page, stars, "zq-good", 2)
    page.locator("#train-button").click()
    expect(status(page, "train")).to_have_value(re.compile("^Done: 'zq-good'"), timeout=120_000)
    page.locator("#train-files input[type=file]").set_input_files([*stars, corrupt_png])
    page.locator("#train-trigger textarea").fill("zq-bad")
    page.locator("#train-button").click()
    expect(toast(page, "the uploaded corrupt.png is not a readable image")).to_be_visible(timeout=30_000)
    expect(page.locator("#train-status").get_by_text("Error", exact=True)).to_be_visible()
    for elem_id in ("train-samples", "train-grid", "train-loss"):  # not covered by an "Error" badge
        expect(page.locator(f"#{elem_id}").get_by_text("Error", exact=True)).to_have_count(0)
    expect(page.locator("#train-samples img")).to_have_count(2)  # the good run's, still shown
    expect(page.locator("#train-grid img")).to_be_visible()
    assert [entry.name for entry in AdapterLibrary().list()] == ["zq-good"]


def cancel_after_a_step(view, stars: list[str], trigger: str, steps: int = 40) -> str:
    """Start a run, see the status line's ETA, cancel it; returns the status of the stopped run."""
    open_train(view, stars, trigger, steps)
    view.locator("#train-button").click()
    expect(status(view, "train")).to_have_value(
        re.compile(rf"^step \d+/{steps}, loss \d\.\d{{4}}, \d+\.\d\d s/step, ETA \d+( min \d\d)? s$"), timeout=120_000)
    view.locator("#train-cancel").click()
    expect(status(view, "train")).to_have_value(re.compile(r"^Stopped at step \d+; checkpoint \S+\. To continue, "
                                                           "press Resume"),
                                                timeout=60_000)
    expect(view.locator("#train-resume")).to_be_visible(timeout=10_000)
    expect(view.locator("#train-keep")).to_be_visible()
    return status(view, "train").input_value()


@pytest.mark.browser
def test_browser_cancel_then_resume_finishes_the_run_from_its_checkpoint(page, stars, library):  # noqa: F811
    stopped = cancel_after_a_step(page, stars, "zq-resume")
    assert AdapterLibrary().list() == []
    page.locator("#train-resume").click()
    expect(status(page, "train")).to_have_value("Done: 'zq-resume' is in the adapter library; use it in the "
                                                "Generate tab.", timeout=180_000)
    expect(page.locator("#train-resume")).to_be_hidden()
    step = int(re.match(r"Stopped at step (\d+)", stopped).group(1))
    training = json.loads(read_metadata(AdapterLibrary().get("zq-resume").path)["studio.training"])
    assert training["step"] == 40 > step  # the file records the steps it was trained for
    # The resumed run's samples follow the first run's: step 0, then the end.
    expect(page.locator("#train-samples img")).to_have_count(2)


@pytest.mark.browser
def test_browser_cancel_then_keep_adds_the_adapter_as_it_is(page, stars, library):  # noqa: F811
    stopped = cancel_after_a_step(page, stars, "zq-keep")
    step = int(re.match(r"Stopped at step (\d+)", stopped).group(1))
    page.locator("#train-keep").click()
    expect(status(page, "train")).to_have_value(
        f"Kept: 'zq-keep', trained {step} of 40 steps, is in the adapter library; use it in the Generate tab.",
        timeout=30_000)
    [entry] = AdapterLibrary().list()
    assert (entry.name, entry.method) == ("zq-keep", "lora")
    expect(page.locator("#train-keep")).to_be_hidden(timeout=10_000)
    expect(page.locator("#train-resume")).to_be_hidden()


# -- Edit -------------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_the_mask_brush_paints_translucent_dabs_and_clearing_keeps_the_image(page, red_circle):  # noqa: F811
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-image input[type=file]").set_input_files(red_circle)
    canvas = page.locator("#edit-mask canvas").first
    expect(canvas).to_be_visible(timeout=10_000)
    page.wait_for_timeout(1000)
    before = canvas_pixels(page)
    box = canvas.bounding_box()
    # A dab on the gray right half of the image (the image is centred in the canvas).
    x, y = box["x"] + box["width"] * 0.58, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.up()
    page.wait_for_timeout(500)
    after = canvas_pixels(page)
    changed = np.abs(after - before).sum(axis=-1) > 30
    image_area = (before.std(axis=-1) < 2) & (np.abs(before - 128).max(axis=-1) < 3)  # the gray background
    assert 0 < changed.sum() < 0.05 * image_area.sum()  # a dab, not a quarter of the image
    r, g, b = after[changed].mean(axis=0)
    assert r > 140 and b > 140 and g < 110  # gray under translucent magenta: neither black nor opaque paint

    page.get_by_role("button", name="Clear canvas").click()
    page.wait_for_timeout(1500)
    cleared = canvas_pixels(page)
    assert np.abs(cleared - before).mean() < 2  # the image is back, without the paint


def test_painted_mask_counts_the_faint_edges_of_translucent_paint():
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[10:20, 10:20] = (255, 0, 255, 128)  # the brush's half-transparent paint
    layer[20, 10:20, 3] = 40  # an anti-aliased edge
    mask = np.asarray(painted_mask({"layers": [Image.fromarray(layer, "RGBA")]}))
    assert mask[10:21, 10:20].min() == 255 and mask.sum() == 255 * 110
    assert mask_brush((64, 64)).default_size == 2 and mask_brush((512, 384)).default_size == 16


@pytest.mark.browser
def test_browser_edit_shows_small_results_enlarged_and_says_when_an_upload_is_shrunk(
        page, red_circle, tmp_path):  # noqa: F811
    large = tmp_path / "large.png"
    Image.open(red_circle).resize((200, 150)).save(large)
    upload_and_edit(page, str(large))
    expect(toast(page, "The image (200x150) is scaled and center-cropped to 64x64")).to_be_visible(timeout=30_000)
    expect(page.locator("#edit-settings textarea")).to_have_value(re.compile(r"Steps: 3"), timeout=120_000)
    for elem_id in ("edit-reconstruction", "edit-mask-out"):
        image = page.locator(f"#{elem_id} img").first
        expect(image).to_be_visible(timeout=10_000)
        page.wait_for_function(f"() => document.querySelector('#{elem_id} img').naturalWidth >= 256",
                               timeout=10_000)  # 64 px shown 4x, nearest-neighbour


@pytest.mark.browser
def test_browser_edit_refuses_an_empty_target_and_explains_an_empty_source(page, red_circle):  # noqa: F811
    page.get_by_role("tab", name="Edit").click()
    expect(page.locator("#edit-source textarea")).to_have_attribute("placeholder", "describe the image as it is")
    page.locator("#edit-image input[type=file]").set_input_files(red_circle)
    page.locator("#edit-source textarea").fill("a red circle")
    page.locator("#edit-button").click()
    expect(toast(page, "the target prompt is empty")).to_be_visible(timeout=30_000)
    page.locator("#edit-source textarea").fill("")
    page.locator("#edit-target textarea").fill("a blue circle")
    set_slider(page, "edit-steps", 2)
    page.locator("#edit-button").click()
    expect(toast(page, "No source prompt: the image is inverted with the empty prompt")).to_be_visible(
        timeout=30_000)
    expect(page.locator("#edit-settings textarea")).to_have_value(re.compile(r"^a blue circle\n"), timeout=120_000)


@pytest.mark.browser
def test_browser_a_corrupt_upload_in_edit_is_named_and_the_last_result_stays(
        page, red_circle, corrupt_png):  # noqa: F811
    upload_and_edit(page, red_circle)
    settings = page.locator("#edit-settings textarea")
    expect(settings).to_have_value(re.compile(r"Steps: 3"), timeout=120_000)
    last = settings.input_value()
    page.locator("#edit-image input[type=file]").set_input_files(corrupt_png)
    # Said on upload, by the box's name and the reason...
    refused = toast(page, "Image to edit: the uploaded file is not a readable image")
    expect(refused.first).to_be_visible(timeout=30_000)
    page.locator("[data-testid=toast-close]").first.click()
    expect(refused).to_have_count(0)
    page.locator("#edit-button").click()
    # ...and again when Edit is pressed anyway.
    expect(refused.first).to_be_visible(timeout=30_000)
    # The last result stays, uncovered: the error shows on the status line, not over the images.
    expect(page.locator("#edit-status").get_by_text("Error", exact=True)).to_be_visible()
    for elem_id in ("edit-result", "edit-reconstruction", "edit-mask-out", "edit-settings"):
        expect(page.locator(f"#{elem_id}").get_by_text("Error", exact=True)).to_have_count(0)
    expect(settings).to_have_value(last)
    expect(page.locator("#edit-result img").first).to_be_visible()
    expect(page.locator("#edit-reconstruction img")).to_be_visible()


def test_edit_api_with_a_library_lora_at_scale_1_differs_from_scale_0(app_url, red_circle, lora_library):  # noqa: F811
    client = Client(app_url, verbose=False)

    def edit_with(table: list[list]) -> tuple[np.ndarray, str]:
        (_, after), _, _, settings = client.predict(
            handle_file(red_circle), SOURCE, TARGET, None, 3, 7.5, 200, 0.25, 1, "reference", 0.8, True,
            {"headers": ["Adapter", "Trigger words", "Scale"], "data": table}, api_name="/edit")
        return np.asarray(Image.open(after)), settings

    on, on_settings = edit_with([["sks", "sks", 1], ["star-canny", "", 0]])
    off, off_settings = edit_with([["sks", "sks", 0], ["star-canny", "", 0]])
    assert not np.array_equal(on, off)
    assert 'Adapters: "sks:1"' in on_settings and "Adapters" not in off_settings
    with pytest.raises(Exception, match="adapter 'star-canny' is a CSC-Tuner: it steers generation by a control "
                                        "image, which an edit does not take; leave it out or set its scale to 0"):
        edit_with([["star-canny", "", 1]])


@pytest.mark.browser
def test_browser_edit_with_an_adapter_scale_set_in_the_table(page, red_circle, lora_library):  # noqa: F811
    page.get_by_role("tab", name="Edit").click()  # the table re-reads the library when the tab is shown
    page.locator("#edit-image input[type=file]").set_input_files(red_circle)
    page.locator("#edit-source textarea").fill(SOURCE)
    page.locator("#edit-target textarea").fill(TARGET)
    set_slider(page, "edit-steps", 3)
    page.locator("#edit-adapters-box").get_by_text("Adapters (from the library").click()
    table = page.locator("#edit-adapters")
    expect(table).to_contain_text("star-canny", timeout=10_000)
    table.locator("[role=row]").filter(has_text="sks").get_by_text("0", exact=True).filter(visible=True).dblclick()
    page.keyboard.type("0.8")
    page.keyboard.press("Enter")
    # The scale shows in the table before Edit is pressed: on a busy machine a click can beat the cell's commit.
    expect(table.locator("[role=row]").filter(has_text="sks").first).to_contain_text("0.8", timeout=10_000)
    page.locator("#edit-button").click()
    settings = page.locator("#edit-settings textarea")
    expect(settings).to_have_value(re.compile(r'Adapters: "sks:0\.8", Adapter hashes: "sks: [0-9a-f]{12}"'),
                                   timeout=120_000)
    for elem_id in ("edit-status", "edit-result", "edit-reconstruction", "edit-mask-out", "edit-settings"):
        expect(page.locator(f"#{elem_id}").get_by_text("Error", exact=True)).to_have_count(0)
    expect(page.locator("#edit-reconstruction img")).to_be_visible(timeout=10_000)
    page.wait_for_timeout(500)  # the enlarged results drawn
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


# -- the handlers' pure parts -----------------------------------------------------------------------------------


def test_blank_means_the_default_and_a_non_number_or_zero_rate_is_refused_by_name():
    assert learning_rate_of(None) is None and learning_rate_of("  ") is None
    assert learning_rate_of("1e-4") == 1e-4 and learning_rate_of(2e-3) == 2e-3
    with pytest.raises(Exception, match=r"Learning rate 0: the adapter would not learn; type a rate > 0"):
        learning_rate_of("0")
    with pytest.raises(Exception, match=r"Learning rate: 'fast' is not a number"):
        learning_rate_of("fast")
    assert optional_number("", "x") is None and optional_number("3", "x") == 3.0
    assert method_options([], "lora", []) == {}


def test_status_line_gives_the_step_loss_and_eta():
    assert status_line(0, 10, None, None) == "step 0/10"
    assert status_line(4, 10, 0.12345, 0.5) == "step 4/10, loss 0.1235, 0.50 s/step, ETA 3 s"
    assert status_line(10, 250, 0.1, 1.0).endswith("ETA 4 min 00 s")


def test_sample_grid_has_a_row_per_sampled_step(tmp_path):
    samples = []
    for step in (0, 5, 10):
        for seed in (0, 1):
            path = tmp_path / f"{step}-{seed}.png"
            Image.new("RGB", (64, 64), (step * 20, 0, seed * 200)).save(path)
            samples.append((str(path), f"step {step}"))
    grid = sample_grid(samples)
    gap = 4
    assert grid.size == (80 + 2 * (128 + gap), gap + 3 * (128 + gap))
    assert grid.getpixel((80 + 128 + gap + 5, gap + 128 + gap + 5)) == (100, 0, 200)  # step 5, seed 1
    assert sample_grid([]) is None


def test_the_loss_curve_has_the_measured_and_the_smoothed_loss():
    frame = loss_frame([[1, 1.0], [2, 0.0]])
    assert frame.values.tolist() == [[1, 1.0, "loss"], [1, 1.0, "smoothed"], [2, 0.0, "loss"], [2, 0.9, "smoothed"]]
    assert (str(loss_frame([]).dtypes["step"]), str(loss_frame(None).dtypes["loss"])) == ("int64", "float64")
