"""The Compose tab (studio/ui/compose_tab.py): its pure helpers (the concept table, the canvas's layers, the box
preview), the /compose API, and a real browser composing two library LoRAs side by side."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from playwright.sync_api import expect

from adapters import LoRA, LoRAConfig, SCTuner, save_adapter
from pipelines import InputError, parse_infotext
from pipelines.compose import ComposeRegion, check_compose_inputs
from studio.library import AdapterLibrary
from studio.ui.compose_tab import (
    PALETTE,
    add_concept,
    boxes_from_layers,
    concepts_from_rows,
    default_box,
    draw_preview,
    in_table_terms,
    layer_box,
    table_rows,
)
from tests.adapter_helpers import perturb
from tests.test_ui import app_url, page  # noqa: F401  (fixtures: the served studio, a Chromium page on it)

SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "compose_tab.png"
SIZE = (64, 64)  # the embedded model's native size


@pytest.fixture
def library(embedded, tmp_path, monkeypatch) -> AdapterLibrary:
    """A temporary library ($STUDIO_ADAPTER_DIR) holding two small LoRAs, "sks" and "zkz" (their trigger words),
    and an SC-Tuner "style", which does not change the weights."""
    root = tmp_path / "library"
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(root))
    for seed, trigger in enumerate(("sks", "zkz")):
        lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=2))
        perturb(lora, seed)  # off the identity init, so each concept changes the image
        save_adapter(lora, root / f"{trigger}.safetensors", trigger_words=[trigger])
    save_adapter(SCTuner.from_unet(embedded.pipe.unet), root / "style.safetensors", trigger_words=["style"])
    return AdapterLibrary()


# -- pure helpers --------------------------------------------------------------------------------------------------


def _layer(size: tuple[int, int], painted: tuple[slice, slice] | None, soft_edge: bool = False) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 4), np.uint8)
    if soft_edge:  # a faint halo around the stroke, as a soft brush leaves
        pixels[:, :, 3] = 40
    if painted is not None:
        pixels[painted] = (230, 25, 75, 255)
    return Image.fromarray(pixels, "RGBA")


def test_layer_box_is_the_bounding_box_of_the_painted_pixels_in_canvas_pixels():
    assert layer_box(_layer(SIZE, None), SIZE) is None
    # rows 10..29, columns 5..19 painted: the box ends are exclusive, as PIL crops and ComposeRegion's are
    assert layer_box(_layer(SIZE, (slice(10, 30), slice(5, 20))), SIZE) == (5, 10, 20, 30)
    assert layer_box(_layer(SIZE, (slice(10, 30), slice(5, 20)), soft_edge=True), SIZE) == (5, 10, 20, 30)
    # a layer sent at twice the canvas's size maps back to canvas pixels
    assert layer_box(_layer((128, 128), (slice(0, 64), slice(64, 128))), SIZE) == (32, 0, 64, 32)


def test_layer_k_sets_the_box_of_row_k_and_empty_layers_keep_the_rows_box():
    rows = add_concept(add_concept([], "sks", ["sks"], SIZE), "zkz", ["zkz"], SIZE)
    layers = [_layer(SIZE, None), _layer(SIZE, (slice(8, 40), slice(36, 60))), _layer(SIZE, (slice(0, 9),) * 2)]
    drawn = boxes_from_layers(rows, layers, SIZE)
    assert [row[3:] for row in drawn] == [[4, 16, 28, 48], [36, 8, 60, 40]]  # the third layer has no row
    assert rows[1][3:] == [36, 16, 60, 48]  # the table passed in is not changed


def test_added_concepts_get_trigger_prompts_and_boxes_inside_equal_strips_and_drawn_boxes_stay():
    rows = add_concept([], "sks", ["sks", "star"], SIZE)
    assert rows == [["sks", "", "a sks", 8, 16, 56, 48]]  # in the middle: no place said
    rows = add_concept(rows, "zkz", [], SIZE)  # no trigger word: the adapter's name
    # each box inside its half, the rest of the canvas left to the global prompt (boxes that tile it draw one object);
    # a default prompt says where its box is, and follows it when the box moves
    assert rows == [["sks", "", "a sks on the left", 4, 16, 28, 48], ["zkz", "", "a zkz on the right", 36, 16, 60, 48]]
    rows[0][3:] = [2, 4, 20, 60]  # the artist's box
    rows = add_concept(rows, "sks", ["sks"], SIZE)
    assert [row[3:] for row in rows] == [[2, 4, 20, 60], [24, 16, 40, 48], [45, 16, 61, 48]]
    assert [row[2] for row in rows] == ["a sks on the left", "a zkz", "a sks on the right"]
    assert default_box(2, 3, SIZE) == (45, 16, 61, 48)


def test_a_drawn_box_carries_a_default_prompts_place_and_leaves_a_typed_prompt_alone():
    rows = add_concept(add_concept([], "sks", ["sks"], SIZE), "zkz", ["zkz"], SIZE)
    rows[1][2] = "a zkz dog, red"  # typed by the artist
    top, bottom = _layer(SIZE, (slice(0, 20), slice(8, 56))), _layer(SIZE, (slice(44, 64), slice(8, 56)))
    drawn = boxes_from_layers(rows, [top, bottom], SIZE)
    assert [row[2] for row in drawn] == ["a sks on the top", "a zkz dog, red"]
    assert [row[3:] for row in drawn] == [[8, 0, 56, 20], [8, 44, 56, 64]]


def test_table_rows_become_adapters_and_regions_with_their_boxes(library):
    table = {"headers": ["Adapter", "Weight", "Region prompt", "x0", "y0", "x1", "y1"],
             "data": [["sks", "", "a sks", 0, 0, 32, 64], ["zkz", "0.5", " a zkz dog ", "32", 8.0, 64, "56"],
                      ["", None, "", None, None, None, None]]}  # a blank row, as a cleared table sends
    adapters, regions = concepts_from_rows(table, library)
    assert adapters == [(library.get("sks").path, None), (library.get("zkz").path, 0.5)]
    assert regions == [ComposeRegion((0, 0, 32, 64), "a sks"), ComposeRegion((32, 8, 64, 56), "a zkz dog")]
    assert all(type(v) is int for region in regions for v in region.box)


GOOD = ["sks", "", "a sks", 0, 0, 32, 64]


@pytest.mark.parametrize("row, message", [
    (["", "", "a zkz", 32, 0, 64, 64], "row 2, column Adapter is empty"),
    (["nope", "", "a zkz", 32, 0, 64, 64], "row 2, column Adapter: no adapter named 'nope'"),
    (["style", "", "a zkz", 32, 0, 64, 64], "row 2, column Adapter: 'style' is a sc_tuner adapter"),
    (["zkz", "strong", "a zkz", 32, 0, 64, 64], "row 2, column Weight: 'strong' is not a number"),
    (["zkz", "", "a zkz", 32, 0, 63.5, 64], "row 2, column x1 is 63.5, not a whole number"),
    (["zkz", "", "a zkz", 32, "top", 64, 64], "row 2, column y0 is 'top', not a whole number"),
    (["zkz", "", "a zkz", 32, 0, 64, ""], "row 2, column y1 is empty"),
    (["zkz", "", "  ", 32, 0, 64, 64], "row 2, column Region prompt is empty"),
])
def test_bad_table_rows_are_refused_naming_the_row_and_the_column(library, row, message):
    with pytest.raises(InputError, match=re.escape(message)):
        concepts_from_rows([GOOD, row], library)


def test_an_empty_table_is_refused(library):
    with pytest.raises(InputError, match="the concept table is empty"):
        concepts_from_rows([["", "", "", None, None, None, None]], library)
    assert table_rows([]) == table_rows(None) == []


def test_composes_messages_name_table_rows(library):
    overlapping = [ComposeRegion((0, 0, 40, 64), "a sks"), ComposeRegion((32, 0, 64, 64), "a zkz")]
    adapters = [(library.get(name).path, None) for name in ("sks", "zkz")]
    with pytest.raises(InputError) as refused:
        check_compose_inputs(adapters, overlapping, "composer", SIZE, (8, 8))
    assert in_table_terms(str(refused.value)).startswith("row 1 (0, 0, 40, 64) and row 2 (32, 0, 64, 64) overlap")
    assert in_table_terms("regions[1].box=(0, 0, 4, 4) is 4x4 px") == "row 2's box (0, 0, 4, 4) is 4x4 px"
    assert in_table_terms("regions[0].prompt is empty") == "row 1's region prompt is empty"


def test_the_preview_draws_each_box_in_its_concepts_colour_scaled_up_to_be_readable():
    rows = [["sks", "", "a sks", 0, 0, 32, 64], ["zkz", "", "a zkz", 40, 8, 64, 56], ["x", "", "a x", 1, 2, "?", 4]]
    image = draw_preview(rows, SIZE)
    assert image.size == (256, 256)  # x4, nearest-neighbour
    pixels = np.asarray(image)
    red, green = (np.array(Image.new("RGB", (1, 1), c).getpixel((0, 0))) for c in PALETTE[:2])
    assert (pixels[200, 0] == red).all() and (pixels[200, 127] == red).all()  # row 1's left and right edges
    assert (pixels[200, 160] == green).all() and (pixels[32, 200] == green).all()  # row 2's left and top edges
    assert (pixels[150, 80] == 255).all() and (pixels[250, 140] == 255).all()  # inside and outside: the canvas
    strokes = Image.new("RGB", SIZE, "black")
    assert np.asarray(draw_preview([], SIZE, strokes)).max() < 255  # the drawing shows under the boxes, faded


# -- served: the API and a browser -----------------------------------------------------------------------------------


def test_compose_api_returns_both_results_for_one_seed_each_png_with_its_settings(app_url, library):  # noqa: F811
    table = {"headers": ["Adapter", "Weight", "Region prompt", "x0", "y0", "x1", "y1"],
             "data": [["sks", "", "a sks", 0, 0, 32, 64], ["zkz", 0.5, "a zkz", 32, 0, 64, 64]]}
    client = Client(app_url, verbose=False)
    # The options beyond the paper on (every delta, touched cells) and the adapters off the negative prompt.
    by_region, merged, settings = client.predict(table, "a sks and a zkz", "", 7, 2, 7.5, 8, 2, 10, 20, 25, 5,
                                                 True, True, True, "touched", False, api_name="/compose")
    params = [parse_infotext(Image.open(gallery[0]["image"]).text["parameters"]) for gallery in (by_region, merged)]
    assert [p["Compose"] for p in params] == ["composer", "merge"]
    assert [p["Seed"] for p in params] == ["7", "7"]
    assert [p["Adapters"] for p in params] == ["sks:1, zkz:0.5"] * 2
    assert [json.loads(p["Regions"]) for p in params] == [[[0, 0, 32, 64, "a sks"], [32, 0, 64, 64, "a zkz"]]] * 2
    assert "concept 8, fill 2, region 10, step 20, refine 25, early stop from 5" in params[0]["Composer"]
    assert params[0]["Composer"].endswith("cells touched, every delta in its box")
    assert [p["Adapters on uncond"] for p in params] == ["False"] * 2
    assert settings.startswith("LoRA-Composer (by region):\na sks and a zkz\n") and "\n\nMerged weights:\n" in settings


def test_stop_ends_a_composition_at_its_next_step_and_keeps_the_previous_results(app_url, library):  # noqa: F811
    table = {"headers": ["Adapter", "Weight", "Region prompt", "x0", "y0", "x1", "y1"],
             "data": [["sks", "", "a sks", 0, 0, 32, 64], ["zkz", 0.5, "a zkz", 32, 0, 64, 64]]}
    client = Client(app_url, verbose=False)
    job = client.submit(table, "a sks and a zkz", "", 7, 150, 7.5, 8, 2, 10, 20, 25, 5, True, True, False,
                        "inside", True, api_name="/compose")
    while not job.status().progress_data:  # a step done
        assert not job.done()
        time.sleep(0.1)
    started = time.monotonic()
    client.predict(api_name="/compose_stop")
    by_region, merged, settings = job.result()
    assert time.monotonic() - started < 10  # 300 steps in all would take minutes
    assert [by_region, merged, settings] == [{"__type__": "update"}] * 3  # gr.skip(): the tab keeps what it showed


def _add_concept(tab, label: str) -> None:
    """Pick `label` in the "Add concept" dropdown and press Add, as an artist does."""
    tab.locator("#compose-add-choice input").fill(label)
    # Click the listed choice rather than press Enter: on a busy machine Enter can land before the list filters,
    # and the typed label, not the adapter's name, is then the dropdown's value.
    tab.get_by_role("option", name=label, exact=True).click()
    tab.locator("#compose-add").click()
    expect(tab.locator("#compose-table")).to_contain_text(label.split()[0], timeout=10_000)


def _cell(tab, row: int, column: int):
    """The text of a cell of the concept table (0-based row and column), without its menu buttons."""
    return tab.locator(f"#compose-table [data-testid=cell-{row}-{column}] span").first


def _type_cell(tab, row: int, column: int, text: str) -> None:
    """Type `text` into a cell of the concept table, as an artist does: double-click, type, Enter."""
    tab.locator(f"#compose-table [data-testid=cell-{row}-{column}]").dblclick()
    tab.keyboard.press("Control+A")
    tab.keyboard.type(text)
    tab.keyboard.press("Enter")


@pytest.mark.browser
def test_browser_composes_two_library_concepts_side_by_side(library, page):  # noqa: F811
    page.get_by_role("tab", name="Compose").click()  # showing the tab re-reads the library
    _add_concept(page, "sks (lora)")
    _add_concept(page, "zkz (lora)")
    expect(_cell(page, 1, 3)).to_have_text("36")  # the default boxes, each inside its half
    page.locator("#compose-prompt textarea").fill("a sks on the left and a zkz on the right")
    page.locator("#compose-seed input").fill("3")
    steps = page.locator("#compose-steps input[type=number]")
    steps.fill("4")  # few steps: the test is about the wiring, not the images
    steps.blur()
    page.locator("#compose-button").click()
    for gallery in ("#compose-composer", "#compose-merge"):
        expect(page.locator(f"{gallery} img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#compose-settings textarea")).to_have_value(
        re.compile(r"^LoRA-Composer \(by region\):\na sks on the left.*Compose: composer.*Merged weights:.*"
                   r"Compose: merge", re.S), timeout=10_000)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # A refused table says why and leaves the results in place.
    _type_cell(page, 0, 5, "40")
    page.locator("#compose-button").click()
    expect(page.get_by_text("row 1 (4, 16, 40, 48) and row 2 (36, 16, 60, 48) overlap")).to_be_visible(
        timeout=30_000)
    expect(page.locator("#compose-composer img").first).to_be_attached()
    expect(page.locator("#compose-merge img").first).to_be_attached()


@pytest.mark.browser
def test_browser_shows_why_a_box_is_refused(library, page):  # noqa: F811
    page.get_by_role("tab", name="Compose").click()
    _add_concept(page, "sks (lora)")
    _add_concept(page, "zkz (lora)")
    _type_cell(page, 1, 3, "20")  # row 2 now starts inside row 1's box
    expect(_cell(page, 1, 3)).to_have_text("20")
    page.locator("#compose-button").click()
    expect(page.get_by_text(re.compile(r"row 1 \(4, 16, 28, 48\) and row 2 \(20, 16, 60, 48\) overlap: .* make "
                                       r"the boxes disjoint"))).to_be_visible(timeout=30_000)
    page.locator("#compose-clear").click()
    page.locator("#compose-button").click()
    expect(page.get_by_text("the concept table is empty")).to_be_visible(timeout=30_000)
