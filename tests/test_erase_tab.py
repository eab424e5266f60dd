"""The Erase tab (studio/ui/erase_tab.py), served in-process on the embedded model: /erase trains a membrane into
the library and shows the before/after grid with each prompt's gamma; /erase_compare compares a library membrane;
bad input is a readable error. The Train tab offers only the methods that learn from images."""

from __future__ import annotations

import socket
import sys

import gradio as gr
import pytest
from gradio_client import Client
from PIL import Image

from adapters import SPM, SPMConfig, load_adapter, save_adapter
from pipelines import InputError, parse_infotext
from pipelines.train import image_methods
from studio.library import AdapterLibrary
from studio.ui import erase_tab


@pytest.fixture
def erase_url(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    monkeypatch.setattr(sys.modules["pipelines.erase"], "SAMPLING_STEPS", 6)  # x_t on a shorter schedule
    (tmp_path / "out").mkdir()
    with gr.Blocks() as demo:
        erase_tab.build(embedded, tmp_path / "out")
    demo.queue(default_concurrency_limit=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_erase_api_trains_into_the_library_and_compares_with_gamma(erase_url):
    client = Client(erase_url, verbose=False)
    # The membrane options of the accordion: eta, lambda, transport, similarity, facilitate factor.
    gallery, table, status, membrane = client.predict(
        "triangle", "", 1, "", "a red triangle\na blue circle", 1.0, 3, 2, 1.0, 1000.0, "squared", "no_padding", 1.4,
        api_name="/erase")
    assert status == "Done: 'erase-triangle' is in the adapter library (the Generate tab lists it)."
    assert [e.method for e in AdapterLibrary().list()] == ["spm"] and membrane["value"] == "erase-triangle"
    config = load_adapter(AdapterLibrary().get("erase-triangle").path).config
    assert (config.transport, config.similarity, config.facilitate_factor) == ("squared", "no_padding", 1.4)
    rows = table["data"] if isinstance(table, dict) else table
    assert rows[0] == ["a red triangle", 1.4] and 0 < rows[1][1] < 1
    captions = [item["caption"] for item in gallery]
    assert captions == ["a red triangle: before", "a red triangle: after, gamma 1.400", "a blue circle: before",
                        f"a blue circle: after, gamma {rows[1][1]:.3f}"]
    after = parse_infotext(Image.open(gallery[1]["image"]).text["parameters"])
    assert (after["SPM gamma"], after["Seed"], after["Adapters"]) == ("triangle: 1.400", "3", "erase-triangle:1")

    # The same membrane again from the library, at another strength.
    again, _ = client.predict("erase-triangle", "a red triangle", 0.5, 3, 2, api_name="/erase_compare")
    assert parse_infotext(Image.open(again[1]["image"]).text["parameters"])["Adapters"] == "erase-triangle:0.5"

    with pytest.raises(Exception, match="already holds 'erase-triangle': set another name"):
        client.predict("triangle", "", 1, "", "", 1.0, 0, 2, 1.0, 1000.0, "additive", "full", 1.0, api_name="/erase")
    with pytest.raises(Exception, match="no concept to erase: write one per line"):
        client.predict(" \n ", "", 1, "", "", 1.0, 0, 2, 1.0, 1000.0, "additive", "full", 1.0, api_name="/erase")
    with pytest.raises(Exception, match="less than minimum value 0"):  # the option's range, checked by the input
        client.predict("circle", "", 1, "", "", 1.0, 0, 2, 1.0, 1000.0, "additive", "full", -1.0, api_name="/erase")
    assert [e.name for e in AdapterLibrary().list()] == ["erase-triangle"]


def test_compare_refuses_missing_choices_and_other_architectures(embedded, tiny_sd15, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    with pytest.raises(InputError, match="no membrane chosen"):
        erase_tab.compare(embedded, None, ["a red triangle"], 1.0, 0, 2, tmp_path)
    save_adapter(SPM.from_unet(tiny_sd15.unet, SPMConfig(concepts=["triangle"])),
                 tmp_path / "library" / "tiny.safetensors")
    with pytest.raises(InputError, match="no prompts to compare"):
        erase_tab.compare(embedded, "tiny", [], 1.0, 0, 2, tmp_path)
    with pytest.raises(InputError, match="membrane: tiny.safetensors was trained on an SD1 UNet with fingerprint"):
        erase_tab.compare(embedded, "tiny", ["a red triangle"], 1.0, 0, 2, tmp_path)
    assert erase_tab.lines(" triangle \n\n van gogh, starry night \n") == ["triangle", "van gogh, starry night"]


def test_the_train_tab_offers_only_methods_that_learn_from_images():
    assert "spm" not in image_methods() and {"lora", "sc_tuner"} <= set(image_methods())
