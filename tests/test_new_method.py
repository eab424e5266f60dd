"""A new method touches one file: a test-only adapter, registered here, reaches every surface unchanged.

`ChannelShift` adds a learned per-channel offset to conv_in's output (a forward hook), scaled per call and
per batch row. Registered from this test, with no line changed anywhere else, it trains through
pipelines.train, saves and loads through adapters/io.py, generates through `generate`, shows its options in
the Train tab and the CLI's help, and its per-call context is the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from adapters import REGISTRY, Adapter, CallContext, load_adapter, option, register
from pipelines import EMBEDDED_MODEL, generate
from pipelines.architectures import tiny_sd15_pipeline
from pipelines.train import TrainConfig, train
from studio.shapes.world import Scene, ShapeObject, render


@dataclass
class ChannelShiftConfig:
    init: float = option(0.0, "initial offset of every channel", minimum=-1.0, maximum=1.0, ui=True)


class ChannelShift(Adapter):
    method = "channel_shift"
    config_class = ChannelShiftConfig
    label = "Channel shift (test)"
    summary = "a per-channel offset after conv_in"

    def __init__(self, config: ChannelShiftConfig, channels: int):
        super().__init__(config)
        self.shift = nn.Parameter(torch.full((channels,), float(config.init)))
        self.seen: list[CallContext | None] = []

    @classmethod
    def from_unet(cls, unet, config=None):
        adapter = cls(config or ChannelShiftConfig(), unet.conv_in.out_channels)
        adapter.record_base(unet)
        return adapter

    @classmethod
    def from_shapes(cls, config, shapes):
        return cls(config, shapes["shift"][0])

    def _attach(self, unet):
        self.handle = unet.conv_in.register_forward_hook(
            lambda module, args, out: out + self.scale_for(out) * self.shift.view(1, -1, 1, 1).to(out.dtype))

    def _detach(self):
        self.handle.remove()

    def prepare(self, context):
        self.seen.append(context)


@pytest.fixture
def registered():
    register(ChannelShift)
    yield ChannelShift
    REGISTRY.pop(ChannelShift.method)


def test_a_method_registered_from_a_test_reaches_training_files_generation_and_its_context(registered, tmp_path):
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate(("red", "blue")):
        render(Scene((ShapeObject(color, "star"),))).save(data / f"{i}.png")
    result = train(pipe, TrainConfig(data_dir=data, output_dir=tmp_path / "run", method="channel_shift",
                                     method_options={"init": 0.1}, trigger="sks", steps=2, learning_rate=1e-2,
                                     checkpoint_every=0))
    adapter = load_adapter(result.adapter_path, pipe.unet)
    assert isinstance(adapter, ChannelShift) and not torch.allclose(adapter.shift, torch.full_like(adapter.shift, 0.1))

    shifted = generate(pipe, "sks", seed=0, num_inference_steps=2, num_images_per_prompt=2)
    context = adapter.seen[-2]  # the generation's context; the last entry is its end (None)
    assert adapter.seen[-1] is None
    assert [(row.prompt, row.branch) for row in context.rows] == [("", "uncond")] * 2 + [("sks", "cond")] * 2
    assert context.text_embeds.shape[0] == 4 and context.image_size == (64, 64)
    adapter.detach()
    plain = generate(pipe, "sks", seed=0, num_inference_steps=2, num_images_per_prompt=2)
    assert not np.array_equal(np.asarray(shifted.images[0]), np.asarray(plain.images[0]))


def test_its_options_appear_in_the_train_tab_and_the_cli_help(registered):
    from studio.train_cli import method_options_help
    from studio.ui.train_tab import option_inputs

    assert ("channel_shift", "init") in [(m, f.name) for m, f in option_inputs()]
    assert "channel_shift (Channel shift (test)): a per-channel offset" in method_options_help()
    assert "init: initial offset of every channel (>= -1; <= 1; default 0.0)" in method_options_help()
