"""The studio as artists use it (issue 20): every refusal says why and keeps the last results, sizes follow the
model, Stop (and a closed browser tab) ends a run at its next step, seed buttons, per-image settings, PNG Info and
the send-to buttons, the History, and adapters that add their trigger word. Driven in Chromium, on the embedded
64-px model with a few steps."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import expect

from adapters import CSCTuner, CSCTunerConfig, LoRA, LoRAConfig, SCTuner, load_adapter, read_metadata, save_adapter
from pipelines import EMBEDDED_MODEL, GenerationSettings, load_model, save_png
from pipelines.architectures import unet_inputs
from pipelines.attach import attached
from studio.ui.common import display_size, refreshed_dropdown
from studio.ui.generate_tab import adapter_scales, size_limits, size_presets
from studio.ui.png_info_tab import with_adapters
from tests.adapter_helpers import perturb
from tests.test_ui import app_url, page  # noqa: F401  (fixtures: the served studio, a Chromium page on it)

NO_ADAPTERS = {"headers": ["Adapter", "Trigger words", "Scale"], "data": []}
LONG = 150  # steps of a run that is stopped part-way (the Steps slider's end)


@pytest.fixture
def library(embedded, tmp_path, monkeypatch) -> Path:
    """A temporary adapter library holding one SC-Tuner of the embedded model, trigger word "sks"."""
    root = tmp_path / "library"
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(root))
    save_adapter(SCTuner.from_unet(embedded.pipe.unet), root / "stars.safetensors", trigger_words=["sks"])
    return root


def set_number(pg, elem_id: str, value) -> None:
    """Type into a slider's or number's box, as a user does (the value is sent when the box loses focus)."""
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def generate(pg, prompt: str = "a red circle on the left", steps: int = 2, n: int = 1, seed: int | None = None,
             wait: bool = True) -> None:
    pg.locator("#gen-prompt textarea").fill(prompt)
    set_number(pg, "gen-steps", steps)
    set_number(pg, "gen-n", n)
    if seed is not None:
        set_number(pg, "gen-seed", seed)
    pg.locator("#gen-button").click()
    if wait:
        expect(pg.locator("#gen-settings textarea")).to_have_value(re.compile(f"Steps: {steps},"), timeout=60_000)


def toast(pg, text: str):
    return expect(pg.locator(".toast-body").filter(has_text=text).first)


def no_error_badge(pg, elem_id: str) -> None:
    """No "Error" badge over the component (Gradio's status tracker puts one over an event's outputs)."""
    expect(pg.locator(f"#{elem_id} .wrap:not(.hide) .error")).to_have_count(0)


def gallery_sources(pg, elem_id: str = "gen-gallery") -> list[str]:
    return [img.get_attribute("src") for img in pg.locator(f"#{elem_id} img").all()]


# --- Sizes and ranges: what the boxes show is what runs ---------------------------------------------------------


def test_size_limits_and_presets_follow_the_native_size(embedded):
    assert size_limits(embedded.pipe) == (64, 16, 128)
    sd15 = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)), vae_scale_factor=8)
    sdxl = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=128)), vae_scale_factor=8)
    assert size_limits(sd15) == (512, 128, 1024) and size_limits(sdxl) == (1024, 256, 2048)
    assert [(w, h) for _, w, h in size_presets(512)] == [(512, 512), (768, 512), (512, 768), (256, 256)]
    assert all(w % 8 == 0 and h % 8 == 0 for native in (64, 512, 1024) for _, w, h in size_presets(native))


@pytest.mark.browser
def test_browser_an_out_of_range_size_or_steps_runs_as_the_box_shows(page):  # noqa: F811
    # Before: the width box offered 1024 on a 64-px model, and a refused 4096 left the box and the run apart.
    expect(page.locator("#gen-width input[type=number]")).to_have_value("64")
    expect(page.locator("#gen-width input[type=number]")).to_have_attribute("max", "128")
    set_number(page, "gen-width", 4096)
    set_number(page, "gen-steps", 0)
    page.locator("#gen-prompt textarea").fill("a red circle")
    page.locator("#gen-button").click()
    settings = page.locator("#gen-settings textarea")
    expect(settings).to_have_value(re.compile(r"Steps: \d+, .*Size: \d+x64"), timeout=60_000)
    shown_width = page.locator("#gen-width input[type=number]").input_value()
    shown_steps = page.locator("#gen-steps input[type=number]").input_value()
    assert (shown_width, shown_steps) == ("128", "1")  # clamped to the model's range in the box...
    assert f"Size: {shown_width}x64" in settings.input_value()  # ...and that is what ran
    assert f"Steps: {shown_steps}," in settings.input_value()
    page.locator("#gen-size-96x64").click()  # the presets are relative to the native size
    expect(page.locator("#gen-width input[type=number]")).to_have_value("96")
    expect(page.locator("#gen-height input[type=number]")).to_have_value("64")


def test_the_api_refuses_a_size_outside_the_model_range_by_name(app_url):  # noqa: F811
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="4096 is greater than maximum value 128"):
        client.predict("a red circle", "", 1, 2, 7.5, 4096, 64, "DDIM", 1, api_name="/generate")


# --- Every failure says why, and leaves the last results in place -----------------------------------------------


def test_adapter_scales_refuse_a_non_number_by_the_adapter_name():
    assert adapter_scales([["a", "sks", 0], ["b", "", "0.5"], ["c", "x", None], ["d", 2]]) == [("b", 0.5), ("d", 2.0)]
    with pytest.raises(ValueError, match=r"adapter 'a': scale 'lots' is not a number; type one such as 0.8"):
        adapter_scales([["a", "sks", "lots"]])
    with pytest.raises(ValueError, match=r"adapter 'a': scale nan is not a number"):
        adapter_scales([["a", "sks", float("nan")]])


@pytest.mark.browser
def test_browser_a_non_number_adapter_scale_says_why_and_keeps_the_images(page, library):  # noqa: F811
    page.reload()  # the library changed after the page loaded
    generate(page)
    before = gallery_sources(page)
    settings = page.locator("#gen-settings textarea").input_value()
    page.get_by_text("Adapters (from the library").click()
    page.locator("#gen-adapters").get_by_text("0", exact=True).filter(visible=True).dblclick()
    page.keyboard.type("lots")
    page.keyboard.press("Enter")
    expect(page.locator("#gen-adapters")).to_contain_text("lots", timeout=10_000)  # committed before the click
    page.locator("#gen-button").click()
    toast(page, "adapter 'stars': scale").to_be_visible(timeout=30_000)
    no_error_badge(page, "gen-gallery")
    assert gallery_sources(page) == before
    expect(page.locator("#gen-settings textarea")).to_have_value(settings)


@pytest.mark.browser
def test_browser_a_refused_rename_or_delete_says_why_and_keeps_the_table(page, library):  # noqa: F811
    page.get_by_role("tab", name="Adapters").click()
    table = page.locator("#adapters-table")
    expect(table).to_contain_text("stars", timeout=10_000)
    page.locator("#adapters-rename").click()
    toast(page, "no adapter chosen: pick one in the list first").to_be_visible(timeout=10_000)
    page.locator(".toast-close").first.click()
    expect(page.locator(".toast-body")).to_have_count(0, timeout=10_000)
    page.locator("#adapters-delete").click()
    toast(page, "no adapter chosen: pick one in the list first").to_be_visible(timeout=10_000)
    no_error_badge(page, "adapters-table")
    expect(table).to_contain_text("stars")
    table.get_by_text("stars", exact=True).filter(visible=True).click()  # chosen, but no new name
    page.locator("#adapters-rename").click()
    toast(page, "no new name for 'stars'").to_be_visible(timeout=10_000)
    expect(table).to_contain_text("stars")


@pytest.fixture
def corrupt_png(tmp_path) -> str:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 40)
    return str(path)


def test_a_corrupt_control_image_is_refused_with_its_reason(app_url, corrupt_png):  # noqa: F811
    # The browser's editor decodes an upload itself (and drops a corrupt one); the API hands it to the server.
    client = Client(app_url, verbose=False)
    editor = {"background": handle_file(corrupt_png), "layers": [], "composite": None}
    with pytest.raises(Exception, match="control image: the uploaded file is not a readable image"):
        client.predict("x", "", 0, 2, 7.5, 64, 64, "DDIM", 1, NO_ADAPTERS, "", editor, False, 1.0,
                       api_name="/generate")


@pytest.mark.browser
def test_browser_a_corrupt_png_in_png_info_says_why_and_keeps_the_last_reading(page, corrupt_png, tmp_path):  # noqa: F811
    good = made_png(tmp_path / "good.png")
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#png-info-image input[type=file]").set_input_files(good)
    text = page.locator("#png-info-text textarea")
    expect(text).to_have_value(re.compile("^a green star"), timeout=10_000)
    page.locator("#png-info-image input[type=file]").set_input_files(corrupt_png)
    toast(page, "not a readable image").to_be_visible(timeout=10_000)
    no_error_badge(page, "png-info-text")
    expect(text).to_have_value(re.compile("^a green star"))


@pytest.mark.browser
def test_browser_placeholders_read_as_hints_and_an_empty_prompt_says_so(page):  # noqa: F811
    # The results and the history are outputs: no "Drop Media Here" upload area where the images will appear.
    page.get_by_text("History (images").click()
    for gallery in ("#gen-gallery", "#gen-history"):
        expect(page.locator(gallery)).to_be_visible()
        expect(page.locator(f"{gallery} input[type=file]")).to_have_count(0)
        expect(page.locator(gallery)).not_to_contain_text("Drop Media Here")
    placeholder = page.locator("#gen-prompt textarea").get_attribute("placeholder")
    assert placeholder.startswith("Describe") and "e.g." in placeholder
    assert "optional" in page.locator("#gen-negative textarea").get_attribute("placeholder")
    generate(page, prompt="")
    toast(page, "Empty prompt: generating unconditionally").to_be_visible(timeout=10_000)


def test_a_library_refresh_never_sends_back_the_value_it_was_called_with():
    """Showing a tab re-reads the library; the artist may pick an adapter before that refresh returns. The update
    must then leave the pick alone (a value sent back undid it, and Add concept failed with a bare "Error" under
    load); it clears the value only when that adapter left the library."""
    choices = [("sks (lora)", "sks"), ("zkz (lora)", "zkz")]
    for current in (None, "", "sks"):
        update = refreshed_dropdown(choices, current)
        assert update.constructor_args == {"choices": choices}, current  # no value: the page keeps its own
    assert refreshed_dropdown(choices, "deleted").constructor_args == {"choices": choices, "value": None}
    assert refreshed_dropdown(["a", "b"], "b").constructor_args == {"choices": ["a", "b"]}
    assert refreshed_dropdown(["a", "b"], "c").constructor_args == {"choices": ["a", "b"], "value": None}
    # Generate's controller list has "none" as the value "": a controller that left the library goes back to it.
    controllers = [("none", ""), ("edges", "edges")]
    assert refreshed_dropdown(controllers, "gone", cleared="").constructor_args == {"choices": controllers, "value": ""}
    assert refreshed_dropdown(controllers, "", cleared="").constructor_args == {"choices": controllers}


def test_display_size_enlarges_small_images_by_a_whole_factor_with_nearest_neighbour():
    pixels = np.zeros((64, 48, 3), np.uint8)
    pixels[0, 0] = 255
    shown = display_size(Image.fromarray(pixels))
    assert shown.size == (192, 256)  # 48x64 times 4: the longer side reaches 256
    assert np.asarray(shown)[:4, :4].min() == 255 and np.asarray(shown)[4:, 4:].max() == 0  # sharp 4x4 blocks
    large = Image.new("RGB", (300, 10))
    assert display_size(large) is large and display_size(None) is None


def test_the_condition_map_preview_is_enlarged_for_display(app_url, library, tmp_path, embedded):  # noqa: F811
    save_adapter(CSCTuner.from_unet(embedded.pipe.unet, CSCTunerConfig(condition="canny")),
                 library / "edges.safetensors")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "white").save(photo)
    client = Client(app_url, verbose=False)
    editor = {"background": handle_file(str(photo)), "layers": [], "composite": None}
    shown = Image.open(client.predict("edges", editor, False, 64, 64, api_name="/control_preview"))
    assert shown.size == (256, 256)


@pytest.mark.browser
def test_browser_a_large_control_upload_says_it_is_shrunk_and_the_map_is_shown_enlarged(
        page, library, tmp_path, embedded):  # noqa: F811
    save_adapter(CSCTuner.from_unet(embedded.pipe.unet, CSCTunerConfig(condition="canny")),
                 library / "edges.safetensors")
    large = tmp_path / "large.png"
    Image.new("RGB", (600, 400), "white").save(large)
    page.reload()
    page.get_by_text("Control (a CSC-Tuner").click()
    page.locator("#gen-controller input").click()  # picked from the list once the page's library refresh has it
    page.get_by_role("option", name="edges").click()
    expect(page.locator("#gen-controller input")).to_have_value("edges")
    page.locator("#gen-control-image input[type=file]").set_input_files(str(large))
    toast(page, "The control image (600×400) is scaled down and center-cropped to the image size 64×64").to_be_visible(
        timeout=30_000)
    shown = page.locator("#gen-condition-map img")
    expect(shown).to_be_visible(timeout=30_000)
    assert shown.evaluate("img => img.naturalWidth") == 256


# --- Stop, and a closed browser tab --------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_stop_during_a_long_generation_returns_early_and_keeps_the_previous_images(page):  # noqa: F811
    generate(page, seed=3)
    before, settings = gallery_sources(page), page.locator("#gen-settings textarea").input_value()
    generate(page, steps=LONG, n=8, wait=False)
    expect(page.locator("#gen-status")).to_contain_text("denoising", timeout=30_000)  # progress, with its ETA
    started = time.monotonic()
    page.locator("#gen-stop").click()
    toast(page, re.compile(rf"Stopped at step \d+/{LONG}")).to_be_visible(timeout=30_000)
    assert time.monotonic() - started < 20
    assert gallery_sources(page) == before
    expect(page.locator("#gen-settings textarea")).to_have_value(settings)
    generate(page, steps=2)  # the queue is free again


@pytest.mark.browser
def test_closing_the_browser_tab_stops_its_generation(page, app_url):  # noqa: F811
    client = Client(app_url, verbose=False)
    started = time.monotonic()
    client.predict("a red circle", "", 1, LONG, 7.5, 64, 64, "DDIM", 8, api_name="/generate")
    full_run = time.monotonic() - started
    generate(page, steps=LONG, n=8, wait=False)
    expect(page.locator("#gen-status")).to_contain_text("denoising", timeout=30_000)
    page.close()
    started = time.monotonic()
    gallery, _ = client.predict("a red circle", "", 1, 2, 7.5, 64, 64, "DDIM", 1, api_name="/generate")
    assert len(gallery) == 1 and time.monotonic() - started < full_run / 2  # it did not wait for the whole run


def test_stop_ends_an_edit_at_its_next_step(app_url, tmp_path):  # noqa: F811
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "gray").save(image)
    client = Client(app_url, verbose=False)
    job = client.submit(handle_file(str(image)), "a gray square", "a red square", None, LONG, 7.5, 200, 0.5, 1,
                        "reference", 0.8, True, api_name="/edit")
    while not job.status().progress_data:  # a step done
        assert not job.done()
        time.sleep(0.1)
    started = time.monotonic()
    client.predict(api_name="/edit_stop")
    job.result()  # the stopped edit leaves the outputs as they were
    assert time.monotonic() - started < 10


# --- Seeds, per-image settings, PNG Info and send-to, History, adapters ----------------------------------------


@pytest.mark.browser
def test_browser_random_and_reuse_seed_buttons(page):  # noqa: F811
    generate(page, seed=-1)
    seed = re.search(r"Seed: (\d+)", page.locator("#gen-settings textarea").input_value()).group(1)
    page.locator("#gen-seed-reuse").click()
    expect(page.locator("#gen-seed input")).to_have_value(seed, timeout=10_000)
    page.locator("#gen-seed-random").click()
    expect(page.locator("#gen-seed input")).to_have_value("-1", timeout=10_000)


@pytest.mark.browser
def test_browser_a_clicked_image_shows_its_own_settings_and_seed(page):  # noqa: F811
    generate(page, seed=5, n=2)
    page.locator("#gen-gallery .thumbnail-item").nth(1).click()
    settings = page.locator("#gen-settings textarea")
    expect(settings).to_have_value(re.compile(r"^[^\n]+\n[^\n]+Seed: 6,[^\n]+$"), timeout=10_000)  # that one alone
    page.locator("#gen-seed-reuse").click()
    expect(page.locator("#gen-seed input")).to_have_value("6", timeout=10_000)


def made_png(path: Path) -> str:
    settings = GenerationSettings(prompt="a green star", negative_prompt="blurry", steps=7, sampler="Euler",
                                  guidance_scale=5.5, seed=1234, width=96, height=64, model_name="shapes-sd",
                                  model_hash="0", model_family="SD1",
                                  extra_params={"Adapters": "stars:0.7", "Adapters on uncond": "False"})
    return str(save_png(Image.new("RGB", (96, 64), "green"), settings, path))


def test_an_infotext_adapters_entry_sets_the_table_scales_and_names_the_missing():
    rows, missing = with_adapters([["a", "x", 0.5], ["b", "", 0]], "b:0.7, c:1")
    assert rows == [["a", "x", 0], ["b", "", 0.7]] and missing == ["c"]


@pytest.mark.browser
def test_browser_png_info_reads_the_settings_and_sends_them_to_generate(page, tmp_path, library):  # noqa: F811
    page.reload()  # the library changed after the page loaded
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#png-info-image input[type=file]").set_input_files(made_png(tmp_path / "star.png"))
    expect(page.locator("#png-info-text textarea")).to_have_value(
        re.compile(r"^a green star\nNegative prompt: blurry\nSteps: 7, Sampler: Euler"), timeout=10_000)
    expect(page.locator("#png-info-fields")).to_contain_text("1234")
    page.locator("#png-info-send").click()
    expect(page.locator("#gen-prompt textarea")).to_have_value("a green star", timeout=10_000)
    expect(page.locator("#gen-negative textarea")).to_have_value("blurry")
    expect(page.locator("#gen-seed input")).to_have_value("1234")
    expect(page.locator("#gen-steps input[type=number]")).to_have_value("7")
    expect(page.locator("#gen-guidance input[type=number]")).to_have_value("5.5")
    expect(page.locator("#gen-width input[type=number]")).to_have_value("96")
    expect(page.locator("#gen-height input[type=number]")).to_have_value("64")
    expect(page.locator("#gen-scheduler input")).to_have_value("Euler")
    page.get_by_text("Adapters (from the library").click()
    expect(page.locator("#gen-adapters").get_by_text("0.7", exact=True).filter(visible=True)).to_be_visible()
    expect(page.locator("#gen-adapters-uncond input")).not_to_be_checked()


@pytest.mark.browser
def test_browser_sends_the_selected_image_to_edit_and_to_control(page):  # noqa: F811
    generate(page)
    page.locator("#gen-send-control").click()
    expect(page.locator("#gen-control-image")).to_be_visible(timeout=10_000)  # the Control section opened
    expect(page.locator("#gen-control-image")).not_to_contain_text("Upload an image", timeout=10_000)
    page.locator("#gen-send-edit").click()
    expect(page.locator("#edit-image img")).to_be_visible(timeout=10_000)  # the Edit tab, holding the image
    expect(page.locator("#edit-button")).to_be_visible()


@pytest.mark.browser
def test_browser_history_survives_a_reload_and_shows_each_image_settings(page):  # noqa: F811
    generate(page, prompt="a blue square on the right", seed=11)
    page.reload()
    page.get_by_text("History (images").click()
    history = page.locator("#gen-history .thumbnail-item")
    expect(history.first).to_be_visible(timeout=10_000)
    history.first.click()  # the newest
    expect(page.locator("#gen-settings textarea")).to_have_value(
        re.compile(r"^a blue square on the right\nSteps: 2, .*Seed: 11,"), timeout=10_000)


@pytest.mark.browser
def test_browser_clicking_an_adapter_adds_its_trigger_word_and_uses_it(page, library):  # noqa: F811
    page.reload()
    page.locator("#gen-prompt textarea").fill("a star")
    page.get_by_text("Adapters (from the library").click()
    table = page.locator("#gen-adapters")
    expect(table).to_contain_text("sks", timeout=10_000)
    table.get_by_text("stars", exact=True).filter(visible=True).click()
    expect(page.locator("#gen-prompt textarea")).to_have_value("a star, sks", timeout=10_000)
    expect(table.get_by_text("1", exact=True).filter(visible=True)).to_be_visible()
    table.get_by_text("stars", exact=True).filter(visible=True).click()  # once is enough
    expect(page.locator("#gen-prompt textarea")).to_have_value("a star, sks")


def test_adapters_tab_exports_a_kohya_file_that_loads_as_the_same_lora(app_url, embedded, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    root = tmp_path / "library"
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(root))
    lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=2))
    perturb(lora, 3)
    save_adapter(lora, root / "sks.safetensors", trigger_words=["sks"])
    client = Client(app_url, verbose=False)
    exported = client.predict("sks", api_name="/adapters_export")
    assert Path(exported).name == "sks-kohya.safetensors"
    assert read_metadata(exported)["ss_network_dim"] == "2"
    unet = embedded.pipe.unet
    inputs = unet_inputs(unet, batch=1, seed=0)
    outputs = []
    for path in (root / "sks.safetensors", exported):  # ours, then the kohya file read as another tool's LoRA
        adapter = load_adapter(path, unet)
        try:
            with torch.no_grad():
                outputs.append(unet(**inputs).sample)
        finally:
            adapter.detach()
    ours, theirs = outputs
    assert torch.allclose(ours, theirs, atol=1e-5)
    with pytest.raises(Exception, match="no adapter chosen"):
        client.predict(None, api_name="/adapters_export")


# --- Export checkpoint (Adapters tab): the loaded model with an adapter merged, as one single file -------------------


@pytest.fixture
def lora_library(embedded, tmp_path, monkeypatch) -> Path:
    """A temporary adapter library with a LoRA "detail" (trigger word "sks") and an SC-Tuner "stars"."""
    root = tmp_path / "library"
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(root))
    lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=2))
    perturb(lora, 3)
    save_adapter(lora, root / "detail.safetensors", trigger_words=["sks"])
    save_adapter(SCTuner.from_unet(embedded.pipe.unet), root / "stars.safetensors", trigger_words=["sks"])
    return root


def test_the_api_exports_a_checkpoint_that_loads_as_the_model_with_the_lora_attached(app_url, embedded,  # noqa: F811
                                                                                      lora_library):
    client = Client(app_url, verbose=False)
    path, status = client.predict("detail", 0.8, "shapes-detail", api_name="/adapters_export_checkpoint")
    assert Path(path).name == "shapes-detail.safetensors"
    assert status.startswith("Wrote shapes-detail.safetensors") and "detail merged at 0.8" in status
    merged = json.loads(read_metadata(path)["studio.merged_adapters"])
    assert [(m["name"], m["scale"], m["method"]) for m in merged] == [("detail", 0.8, "lora")]

    inputs = unet_inputs(embedded.pipe.unet)
    with attached(embedded.pipe.unet, [(lora_library / "detail.safetensors", 0.8)]), torch.no_grad():
        reference = embedded.pipe.unet(**inputs).sample
    loaded = load_model(path, device="cpu", dtype=torch.float32, config=EMBEDDED_MODEL)
    with torch.no_grad():
        assert (loaded.pipe.unet(**inputs).sample - reference).abs().max() <= 1e-4

    # Bad input: no file, and the reason as the status line.
    for args, reason in [((None, 0.8, ""), "no adapter chosen: pick one in the list first"),
                         (("detail", 0.8, "shapes-detail"), "shapes-detail.safetensors exists in"),
                         (("detail", 0.8, "../up"), "checkpoint name '../up' is a path"),
                         (("stars", 0.8, ""), "adapter 'stars' (sc_tuner) changes activations, not weights")]:
        file, status = client.predict(*args, api_name="/adapters_export_checkpoint")
        assert file is None and status.startswith("Not exported: ") and reason in status, status


@pytest.mark.browser
def test_browser_exports_a_checkpoint_and_offers_it_for_download(page, lora_library):  # noqa: F811
    page.reload()  # the library changed after the page loaded
    page.get_by_role("tab", name="Adapters").click()
    table = page.locator("#adapters-table")
    expect(table).to_contain_text("detail", timeout=10_000)
    status = page.locator("#adapters-ckpt-status textarea")
    page.locator("#adapters-ckpt-export").click()  # nothing chosen yet
    expect(status).to_have_value(re.compile("^Not exported: no adapter chosen"), timeout=30_000)
    no_error_badge(page, "adapters-ckpt-status")

    table.get_by_text("detail", exact=True).filter(visible=True).click()
    set_number(page, "adapters-ckpt-scale", 0.8)
    page.locator("#adapters-ckpt-name textarea").fill("browser-detail")
    page.locator("#adapters-ckpt-export").click()
    expect(status).to_have_value(re.compile(r"^Wrote browser-detail\.safetensors .*detail merged at 0\.8"),
                                 timeout=60_000)
    expect(page.locator("#adapters-ckpt-file")).to_contain_text(re.compile(r"browser-detail\s*\.safetensors"))
    no_error_badge(page, "adapters-ckpt-status")
    href = page.locator("#adapters-ckpt-file a").first.get_attribute("href")
    assert href and "browser-detail.safetensors" in href  # a download link to the written file
