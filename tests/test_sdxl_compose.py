"""LoRA-Composer on SDXL (pipelines/compose.py, adapters/composer.py) on the tiny SDXL layout: every UNet pass of the
composer's loop gets its rows' added conditions (the global prompt's pooled text and size ids), region prompts only
change cross-attention in their boxes, the maps are read where SDXL has attention, and each concept's LoRA acts
(mostly) in its own box. Images are 64 or 128 px from 2-4 steps, so the file runs in seconds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adapters import LoRA, LoRAConfig, current_context
from adapters.composer import map_size
from adapters.processors import attention_layers
from pipelines import InputError, LoadedModel, generate
from pipelines.compose import ComposeRegion, ComposerSettings, compose
from pipelines.generate import encode_call
from studio.ui import compose_tab
from studio.ui.common import unavailable_reason
from tests.adapter_helpers import perturb

FAST = dict(num_inference_steps=2, scheduler="Euler")  # SDXL's own scheduler family
LEFT, RIGHT = ComposeRegion((0, 0, 32, 64), "a sks"), ComposeRegion((32, 0, 64, 64), "a zkz dog", "blurry")


@pytest.fixture
def loras(tiny_sdxl) -> list[LoRA]:
    """Two concepts: LoRAs on the tiny SDXL UNet, moved off their identity init (seeds 0 and 1)."""
    out = []
    for seed in (0, 1):
        lora = LoRA.from_unet(tiny_sdxl.unet, LoRAConfig(rank=2))
        perturb(lora, seed)
        out.append(lora)
    return out


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def test_composer_runs_on_sdxl_is_seeded_and_leaves_the_pipeline_as_it_was(tiny_sdxl, loras):
    model = LoadedModel(pipe=tiny_sdxl, family="SDXL", source="test", name="tiny-sdxl", hash="0")
    assert unavailable_reason(compose_tab, model) is None  # the Compose tab offers both modes on SDXL
    before = pixels(generate(model, "a sks and a zkz dog", seed=3, **FAST))
    processors = dict(tiny_sdxl.unet.attn_processors)
    kwargs = dict(adapters=[(lora, None) for lora in loras], regions=[LEFT, RIGHT], seed=3, **FAST)
    first = compose(model, "a sks and a zkz dog", **kwargs)
    again = compose(model, "a sks and a zkz dog", **kwargs)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), before)
    settings = first.settings[0]
    assert settings.model_family == "SDXL" and settings.extra_params["Compose"] == "composer"
    assert settings.extra_params["Refined steps"] >= 1
    assert all(tiny_sdxl.unet.attn_processors[k] is v for k, v in processors.items())
    assert all(lora.unet is None and lora.scale == 1.0 for lora in loras)
    assert np.array_equal(pixels(generate(model, "a sks and a zkz dog", seed=3, **FAST)), before)


def test_every_pass_gets_its_rows_added_conditions_and_region_prompts_only_feed_cross_attention(tiny_sdxl, loras):
    """Under CFG the guided step runs [n unconditional, n conditional] rows with the global negative and prompt's
    pooled text; the re-initialisation and gradient passes run the n conditional rows with the prompt's. The size
    ids are the (non-square) canvas's. Region prompts are embedded by both encoders (the UNet's cross-attention
    width) on the same rows, their negative prompts on the unconditional ones; their pooled text is not used."""
    size, n = (128, 64), 2  # (width, height)
    regions = [ComposeRegion((0, 0, 64, 64), "a sks"), ComposeRegion((64, 0, 128, 64), "a zkz dog", "blurry")]
    calls = []

    def record(unet, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((args[0].shape[0], added["text_embeds"], added["time_ids"], kwargs["encoder_hidden_states"],
                      current_context(unet)))

    handle = tiny_sdxl.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        compose(tiny_sdxl, "two things", negative_prompt="ugly", adapters=[(lora, None) for lora in loras],
                regions=regions, seed=0, width=size[0], height=size[1], num_images_per_prompt=n, **FAST)
    finally:
        handle.remove()
    # re-initialisation, then per step: the gradient pass and the guided step
    assert [rows for rows, *_ in calls] == [n, n, 2 * n, n, 2 * n]
    pooled = encode_call(tiny_sdxl, "two things", "ugly", n, 7.5, size)[1].added_cond["text_embeds"]
    for rows, text_embeds, time_ids, hidden, ctx in calls:
        torch.testing.assert_close(text_embeds, pooled[-rows:], rtol=0, atol=0)  # the last n rows: conditional
        assert time_ids.tolist() == [[64.0, 128.0, 0.0, 0.0, 64.0, 128.0]] * rows
        assert torch.equal(hidden, ctx.text_embeds)
        for region, context_region in zip(regions, ctx.regions):
            embedded = encode_call(tiny_sdxl, region.prompt, region.negative_prompt, n, 7.5, size)[1]
            assert context_region.text_embeds.shape[-1] == tiny_sdxl.unet.config.cross_attention_dim
            torch.testing.assert_close(context_region.text_embeds, embedded.text_embeds[-rows:], rtol=0, atol=0)
            assert not torch.equal(embedded.added_cond["text_embeds"], pooled)  # so using it would show


def test_maps_are_read_at_sdxl_s_lowest_cross_attention_resolution(tiny_sdxl, loras, monkeypatch):
    """SDXL's first down block has no attention: the maps are read at latent / 4 (SD 1.5's resolution for the same
    latent), from the attention layers there (down_blocks.2 and up_blocks.0; the mid block excluded), never from
    the attention-free levels. A box smaller than one such cell is refused before any work."""
    import pipelines.compose as compose_module

    assert map_size(tiny_sdxl.unet, (8, 16)) == (2, 4)
    recorded = []

    def spy(maps, regions, size, weights, cells):
        recorded.append((len(maps.cross[0]), len(maps.self_attention), maps.cross[0][0].shape[1], size))
        return loss(maps, regions, size, weights, cells)

    loss = compose_module.composer_loss
    monkeypatch.setattr(compose_module, "composer_loss", spy)
    compose(tiny_sdxl, "two things", adapters=[(lora, None) for lora in loras], regions=[LEFT, RIGHT], seed=0, **FAST)
    lowest = [p for p in attention_layers(tiny_sdxl.unet, "cross") if p.startswith(("down_blocks.2.", "up_blocks.0."))]
    assert recorded and all(r == (len(lowest), len(lowest), 2 * 2, (2, 2)) for r in recorded)

    calls = []
    handle = tiny_sdxl.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(InputError, match="smaller than one attention cell \\(32x32 px\\)"):
        compose(tiny_sdxl, "two things", adapters=[(loras[0], None)], regions=[ComposeRegion((0, 0, 16, 64), "a sks")])
    handle.remove()
    assert not calls


def test_each_concept_s_lora_acts_mostly_in_its_own_box(tiny_sdxl, loras):
    """Concept k's LoRA made 100x stronger changes the image mostly inside box k. Not only there: the UNet's
    convolutions and group norms, and the VAE's attention, carry some of it out, hence boxes a canvas half apart
    (128 px, so that the tiny model's receptive field is smaller than the canvas). Without re-initialisation,
    which moves latent patches wherever the concept's maps peak."""
    boxes = [ComposeRegion((0, 0, 32, 128), "a sks"), ComposeRegion((96, 0, 128, 128), "a zkz dog")]
    kwargs = dict(regions=boxes, seed=1, width=128, height=128, num_inference_steps=4, scheduler="Euler",
                  composer=ComposerSettings(reinitialise=False))
    base = pixels(compose(tiny_sdxl, "two things", adapters=[(lora, None) for lora in loras], **kwargs))
    in_box = [(slice(None), slice(None), slice(0, 32)), (slice(None), slice(None), slice(96, 128))]
    for k in (0, 1):
        stronger = copy.deepcopy(loras[k])
        with torch.no_grad():
            for p in stronger.lora_B.parameters():
                p.mul_(100)
        changed = [(stronger if j == k else lora, None) for j, lora in enumerate(loras)]
        moved = np.abs(pixels(compose(tiny_sdxl, "two things", adapters=changed, **kwargs)) - base)
        inside, outside = moved[in_box[k]].mean(), moved[in_box[1 - k]].mean()
        assert inside > 2.0, (k, inside)  # grey levels: the concept does act
        assert inside > 2.5 * outside, (k, inside, outside)
