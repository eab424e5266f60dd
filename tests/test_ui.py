"""The Gradio studio, served in-process: the /generate, /edit, /train and /adapters_* APIs through gradio_client,
and a real browser."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from adapters import load_adapter, read_metadata
from pipelines import LoadedModel, parse_infotext
from pipelines.images import load_mask
from studio.library import AdapterLibrary
from studio.shapes.world import Scene, ShapeObject, render
from studio.ui import build_app
from studio.ui.edit_tab import painted_mask

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(embedded: LoadedModel, tmp_path_factory):
    demo = build_app(embedded, tmp_path_factory.mktemp("ui-out"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_generate_api_returns_images_with_their_settings(app_url):
    client = Client(app_url, verbose=False)
    gallery, settings = client.predict("a red circle", "", 5, 2, 7.5, 64, 64, "DDIM", 2, api_name="/generate")
    assert len(gallery) == 2
    png = Image.open(gallery[1]["image"])
    assert png.size == (64, 64)
    assert parse_infotext(png.text["parameters"])["Seed"] == "6"  # the served file keeps its metadata
    assert gallery[1]["caption"] == png.text["parameters"]
    assert "Seed: 5" in settings and "Seed: 6" in settings


def test_generate_api_turns_bad_input_into_a_readable_error(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="width=60 is not a multiple of 8: use 56 or 64"):
        client.predict("a red circle", "", 1, 2, 7.5, 60, 64, "DDIM", 1, api_name="/generate")


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("edit-in") / "red-circle.png"
    render(Scene((ShapeObject("red", "circle", "left"),), "gray")).save(path)
    return str(path)


def test_edit_api_returns_before_after_reconstruction_and_a_mask_limited_to_the_painted_region(
        app_url, red_circle, tmp_path):
    # The canvas hands back layers at its own size (here twice the image's): the left half is painted.
    layer = np.zeros((128, 128, 4), np.uint8)
    layer[:, :64] = (255, 0, 0, 255)
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    painted = {"background": handle_file(red_circle), "layers": [handle_file(str(tmp_path / "layer.png"))],
               "composite": None}
    client = Client(app_url, verbose=False)
    (before, after), reconstruction, mask, settings = client.predict(
        handle_file(red_circle), "a red circle on the left on a gray background",
        "a blue circle on the left on a gray background", painted, 4, 7.5, 200, 0.5, 1, "reference", 0.6, True,
        api_name="/edit")
    assert np.array_equal(np.asarray(Image.open(before)), np.asarray(Image.open(red_circle)))
    edited = Image.open(after)
    assert edited.size == Image.open(reconstruction).size == Image.open(mask).size == (64, 64)
    params = parse_infotext(edited.text["parameters"])  # the served file keeps its metadata
    assert params["Prompt"] == "a blue circle on the left on a gray background"
    assert params["Source prompt"] == "a red circle on the left on a gray background"
    assert (params["Steps"], params["User mask"], params["Mask floor"]) == ("4", "True", "0.6")
    assert settings == edited.text["parameters"]
    region = np.asarray(Image.open(mask))
    assert region[:, 32:].max() == 0 and region[:, :32].max() > 0  # the edit stays where it was painted


def test_edit_api_without_an_image_is_a_readable_error(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="no image to edit: upload one first"):
        client.predict(None, "a", "b", None, 4, 7.5, 200, 0.5, 1, "reference", 0.8, True, api_name="/edit")


def test_painted_mask_is_the_union_of_the_layers_alpha_and_nothing_painted_is_no_limit():
    assert painted_mask(None) is None
    assert painted_mask({"background": None, "layers": [], "composite": None}) is None
    blank = Image.new("RGBA", (100, 100))
    assert load_mask(painted_mask({"layers": [blank]}), (64, 64)) is None  # a layer with nothing painted
    top, right = np.zeros((100, 100, 4), np.uint8), np.zeros((100, 100, 4), np.uint8)
    top[:50, :, 3] = 255
    right[:, 50:, 3] = 200
    union = load_mask(painted_mask({"layers": [Image.fromarray(top), Image.fromarray(right)]}), (64, 64))
    assert union[:32].all() and union[:, 32:].all() and not union[32:, :32].any()


@pytest.fixture
def stars(tmp_path) -> list[dict]:
    """Three rendered stars, as uploads."""
    paths = [tmp_path / f"{color}-star.png" for color in ("red", "blue", "green")]
    for path in paths:
        render(Scene((ShapeObject(path.stem.split("-")[0], "star"),))).save(path)
    return [handle_file(str(path)) for path in paths]


def test_train_api_adds_the_adapter_to_the_library_for_generate_and_the_adapters_tab(
        app_url, embedded, stars, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    client = Client(app_url, verbose=False)
    samples, status = client.predict(stars, "", "sks", "sc_tuner", 2, None, "", "", 50, api_name="/train")
    assert status == "Done: 'sks' is in the adapter library; use it in the Generate tab."
    assert [sample["caption"] for sample in samples] == ["step 0", "step 2"]  # the trigger word, sampled
    table = client.predict(api_name="/adapters_list")
    assert [row[:4] for row in table["data"]] == [["sks", "sc_tuner", embedded.family, "sks"]]

    scales = {"headers": ["Adapter", "Scale"], "data": [["sks", 0.5]]}
    _, settings = client.predict("sks", "", 1, 2, 7.5, 64, 64, "DDIM", 1, scales, api_name="/generate")
    assert parse_infotext(settings)["Adapters"] == "sks:0.5"
    table = client.predict("sks", "sks-star", api_name="/adapters_rename")
    assert [row[0] for row in table["data"]] == ["sks-star"]
    assert client.predict("sks-star", api_name="/adapters_delete")["data"] == []


def test_train_tab_trains_a_lora_on_the_chosen_layers(app_url, stars, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    client = Client(app_url, verbose=False)
    # After the share of steps on the trigger alone (0) and masked loss (off), the options follow the /train
    # inputs' order: csc_tuner condition, lora rank and target, sara threshold.
    _, status = client.predict(stars, "", "sks", "lora", 1, None, "locon", "", 0, 0, False, "canny", 4, "attn_conv",
                               2e-3, api_name="/train")
    assert "'locon' is in the adapter library" in status
    [entry] = AdapterLibrary().list()
    lora = load_adapter(entry.path)
    assert lora.config.target == "attn_conv"
    assert any(path.endswith("resnets.0.conv1") for path in lora.paths.values())


def test_a_controller_trained_in_the_train_tab_steers_generate_and_previews_its_condition_map(
        app_url, stars, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    client = Client(app_url, verbose=False)
    _, status = client.predict(stars, "", "sks", "csc_tuner", 2, 1e-2, "canny-stars", "", 0, 0, False, "canny",
                               api_name="/train")
    assert "'canny-stars' is in the adapter library" in status
    assert [e.method for e in AdapterLibrary().list()] == ["csc_tuner"]

    photo = tmp_path / "photo.png"
    render(Scene((ShapeObject("red", "square", "left", "large"),))).save(photo)
    editor = {"background": handle_file(str(photo)), "layers": [], "composite": None}
    condition_map = np.asarray(Image.open(client.predict("canny-stars", editor, False, 64, 64,
                                                         api_name="/control_preview")))
    assert set(np.unique(condition_map)) == {0, 255}  # Canny's white edges on black
    assert condition_map.shape[:2] == (256, 256)  # the 64-px map, shown 4x with nearest-neighbour (display_size)
    assert condition_map[:, 160:].max() == 0  # the square is on the left: no edge on the right

    no_adapters = {"headers": ["Adapter", "Scale"], "data": []}

    def image(scale: float) -> tuple[np.ndarray, str]:
        gallery, settings = client.predict("a blue circle", "", 0, 2, 7.5, 64, 64, "DDIM", 1, no_adapters,
                                           "canny-stars", editor, False, scale, api_name="/generate")
        return np.asarray(Image.open(gallery[0]["image"])), settings

    controlled, settings = image(1.0)
    assert "Control: canny 1" in settings
    assert not np.array_equal(controlled, image(0.0)[0])
    with pytest.raises(Exception, match="no control image; upload or draw one"):
        client.predict("x", "", 0, 2, 7.5, 64, 64, "DDIM", 1, no_adapters, "canny-stars", None, False, 1.0,
                       api_name="/generate")


def test_train_cancel_stops_the_run_with_a_checkpoint_and_nothing_in_the_library(
        app_url, stars, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    client = Client(app_url, verbose=False)
    job = client.submit(stars, "", "sks", "sc_tuner", 2000, None, "", "", 0, api_name="/train")
    deadline = time.monotonic() + 600
    while not any(status.startswith("step 1/") for _, status in job.outputs()):  # a step done
        assert not job.done() and time.monotonic() < deadline, job.outputs()
        time.sleep(0.2)
    assert client.predict(api_name="/train_cancel").startswith("Stopping after this step")
    _, status = job.result()
    assert re.match(r"Stopped at step \d+; checkpoint \S+step-\d{6}\. To continue", status)
    assert AdapterLibrary().list() == []


def test_train_api_without_images_is_a_readable_error(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="no training images: upload some, or give the folder that holds them"):
        client.predict(None, "", "sks", "sc_tuner", 2, None, "", "", 50, api_name="/train")


def test_train_api_refuses_a_trigger_share_without_a_trigger_word(app_url, stars):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="needs a trigger word: fill in the trigger word, or set the share to 0"):
        client.predict(stars, "", "", "lora", 2, None, "", "", 50, 0.5, api_name="/train")


def test_train_tab_masks_the_loss_with_the_uploads_transparency(app_url, stars, tmp_path, monkeypatch):
    """Masked loss trains on PNGs whose background is transparent; an upload without transparency is refused by
    its name, with the fix, before any step."""
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match=r"blue-star.png, \S+green-star.png, \S+red-star.png have no transparency "
                                        "to mask the loss with; save them as PNGs"):
        client.predict(stars, "", "sks", "lora", 1, None, "", "", 0, 0, True, api_name="/train")
    cutouts = []
    for star in stars:
        rgba = np.asarray(Image.open(star["path"]).convert("RGBA")).copy()
        rgba[..., 3] = np.where((rgba[..., :3] < 250).any(axis=2), 255, 0)  # the white background transparent
        cutouts.append(tmp_path / Path(star["path"]).name)
        Image.fromarray(rgba, "RGBA").save(cutouts[-1])
    _, status = client.predict([handle_file(str(p)) for p in cutouts], "", "sks", "lora", 1, None, "", "", 0, 0,
                               True, api_name="/train")
    assert "'sks' is in the adapter library" in status
    assert json.loads(read_metadata(AdapterLibrary().list()[0].path)["studio.training"])["masked_loss"] is True


@pytest.fixture
def page(app_url):
    """A page of the app in Debian's Chromium driven by Playwright, or a skip saying why it cannot run here."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium executable on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except PlaywrightError as e:
            pytest.skip(f"chromium at {chromium} cannot be launched: {e.message.splitlines()[0]}")
        try:
            page = browser.new_page()
            page.goto(app_url)
            yield page
        finally:
            browser.close()


@pytest.mark.browser
def test_browser_types_a_prompt_and_sees_an_image(page):
    page.locator("#gen-prompt textarea").fill("a blue square on the left")
    page.locator("#gen-button").click()
    expect(page.locator("#gen-gallery img").first).to_be_visible(timeout=30_000)
    expect(page.locator("#gen-settings textarea")).to_have_value(
        re.compile(r"^a blue square on the left\nSteps: 25, Sampler: DDIM"), timeout=10_000)


@pytest.mark.browser
def test_browser_uploads_an_image_edits_it_and_sees_the_result(page, red_circle):
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-image input[type=file]").set_input_files(red_circle)
    page.locator("#edit-source textarea").fill("a red circle on the left on a gray background")
    page.locator("#edit-target textarea").fill("a blue circle on the left on a gray background")
    steps = page.locator("#edit-steps input[type=number]")
    steps.fill("4")  # few steps: the test is about the wiring, not the edit
    steps.blur()
    page.locator("#edit-button").click()
    expect(page.locator("#edit-result img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#edit-settings textarea")).to_have_value(
        re.compile(r"^a blue circle on the left on a gray background\nSteps: 4, Sampler: DDIM"),
        timeout=10_000)


@pytest.mark.browser
def test_browser_shows_the_train_and_adapters_tabs(page):
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-button")).to_be_visible(timeout=10_000)
    page.get_by_role("tab", name="Adapters").click()
    expect(page.locator("#adapters-table")).to_be_visible(timeout=10_000)


@pytest.mark.browser
def test_browser_shows_method_options_for_the_chosen_method_and_the_control_panel(page):
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-csc_tuner-condition")).to_be_hidden()
    page.locator("#train-method input").fill("CSC-Tuner (controller)")  # then the listed choice, not Enter
    page.get_by_role("option", name="CSC-Tuner (controller)", exact=True).click()
    expect(page.locator("#train-csc_tuner-condition")).to_be_visible(timeout=10_000)
    expect(page.locator("#train-method-help")).to_contain_text("controllable tuner", timeout=10_000)
    page.locator("#train-method input").fill("SaRA")
    page.get_by_role("option", name="SaRA", exact=True).click()
    expect(page.locator("#train-csc_tuner-condition")).to_be_hidden(timeout=10_000)
    expect(page.locator("#train-sara-threshold input")).to_have_value(re.compile(r"M trainable.*\(default\)"),
                                                                      timeout=10_000)
    # The kind of concept picks the method measured to meet the targets on it, and says why; with its settings, as
    # the share of steps on the trigger alone (the subject's recommendation has one, a controller's none).
    share = page.locator("#train-trigger-share input[type=number]")
    expect(share).to_have_value("0.5")
    target = page.locator("#train-lora-target input")
    page.locator("#train-concept").get_by_text("style").click()  # attention + feed-forward LoRA meets a style
    expect(page.locator("#train-method-help")).to_contain_text("Recommended for a style: LoRA", timeout=10_000)
    expect(page.locator("#train-method-help")).to_contain_text("meets the targets on the Shapes style")
    expect(target).to_have_value("attention + feed-forward")
    expect(page.locator("#train-steps input[type=number]")).to_have_value("1000")
    expect(page.locator("#train-lr textarea")).to_have_value("0.001")
    expect(share).to_have_value("0")
    # Style to subject: LoRA both times, so the method does not change, and the advice must follow all the same.
    page.locator("#train-concept").get_by_text("subject").click()
    expect(page.locator("#train-method-help")).to_contain_text("Recommended for a subject: LoRA", timeout=10_000)
    expect(target).to_have_value("attention + resnet convolutions (LoCon)")
    expect(page.locator("#train-steps input[type=number]")).to_have_value("2000")
    expect(share).to_have_value("0.5")
    page.locator("#train-concept").get_by_text("control").click()
    expect(page.locator("#train-csc_tuner-condition")).to_be_visible(timeout=10_000)
    expect(page.locator("#train-method-help")).to_contain_text("Recommended for a control", timeout=10_000)
    expect(share).to_have_value("0")
    page.get_by_role("tab", name="Generate").click()
    page.get_by_text("Control (a CSC-Tuner").click()
    expect(page.locator("#gen-controller")).to_be_visible(timeout=10_000)
    expect(page.locator("#gen-control-image")).to_be_visible(timeout=10_000)
    expect(page.locator("#gen-condition-map")).to_be_visible(timeout=10_000)
