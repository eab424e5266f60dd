"""The Gradio studio, served in-process: the /generate API through gradio_client, and a real browser."""

from __future__ import annotations

import re
import shutil
import socket

import pytest
from gradio_client import Client
from PIL import Image
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from pipelines import LoadedModel, parse_infotext
from studio.ui import build_app

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


@pytest.mark.browser
def test_browser_types_a_prompt_and_sees_an_image(app_url):
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
            page.locator("#gen-prompt textarea").fill("a blue square on the left")
            page.locator("#gen-button").click()
            expect(page.locator("#gen-gallery img").first).to_be_visible(timeout=30_000)
            expect(page.locator("#gen-settings textarea")).to_have_value(
                re.compile(r"^a blue square on the left\nSteps: 25, Sampler: DDIM"), timeout=10_000)
        finally:
            browser.close()
