"""Fixtures shared by every test file: the embedded model (loaded once) and tiny SD 1.5, SD 2.x and SDXL pipelines.

Tests never touch the network: the hub is set offline before anything imports huggingface_hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines import EMBEDDED_MODEL, LoadedModel, load_model  # noqa: E402
from pipelines.architectures import tiny_sd2_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The embedded Shapes model on CPU in fp32, shared by the session: restore anything you change on it."""
    return load_model(device="cpu", dtype=torch.float32)


@pytest.fixture
def tiny_sd15():
    """A fresh random-weight StableDiffusionPipeline with SD 1.5's layouts (64x64 images), yours to modify."""
    return tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))


@pytest.fixture
def tiny_sdxl():
    """A fresh random-weight StableDiffusionXLPipeline with SDXL's layouts (two text encoders, added size and
    pooled-text conditions; 64x64 images), yours to modify."""
    return tiny_sdxl_pipeline(str(EMBEDDED_MODEL / "tokenizer"))


@pytest.fixture
def tiny_sd2():
    """A fresh random-weight StableDiffusionPipeline with SD 2.x's layouts (1024-wide context, linear projections,
    v-prediction; 64x64 images), yours to modify."""
    return tiny_sd2_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
