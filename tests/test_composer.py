"""LoRA-Composer's processors and maths (adapters/composer.py) on SD 1.5's block layout with random weights."""

import pytest
import torch

from adapters import CallContext, LoRA, LoRAConfig, Region, call_context
from adapters.composer import (
    Composer,
    ComposerLossWeights,
    box_cells,
    composer_loss,
    isolation_bias,
    map_size,
    reinitialise_latents,
)
from adapters.processors import attention_layers
from pipelines.architectures import build_unet, unet_inputs
from tests.adapter_helpers import bench_module, perturb, run

LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def _context(inputs: dict, regions: list[Region], size: int) -> CallContext:
    batch = inputs["sample"].shape[0]
    return CallContext.of_branches(["cond"] * batch, text_embeds=inputs["encoder_hidden_states"],
                                   image_size=(size, size), regions=regions)


def test_map_size_is_the_lowest_cross_attention_resolution_of_the_layout():
    # SD 1.5 at 512 px: 64x64 latents, maps at 16x16 (down_blocks.2); SDXL at 1024 px: 32x32.
    assert map_size(build_unet("sd15", device="meta"), (64, 64)) == (16, 16)
    assert map_size(build_unet("sdxl", device="meta"), (128, 128)) == (32, 32)


def test_boxes_take_the_cells_wholly_inside_them_and_isolation_blocks_only_box_to_other_box():
    assert box_cells(LEFT, 4, 4) == (0, 0, 4, 2)
    assert box_cells((0.3, 0.3, 0.6, 0.6), 10, 10) == (3, 3, 6, 6)
    bias = isolation_bias([Region(LEFT, "a"), Region((0.5, 0.0, 1.0, 0.5), "b")], 2, 2, torch.float32)
    # cells (row-major): 0 (0,0) left, 1 (0,1) box b, 2 (1,0) left, 3 (1,1) background
    blocked = bias < 0
    assert blocked[0, 1] and blocked[1, 0] and blocked[2, 1] and blocked[1, 2]
    assert not blocked[0, 2] and not blocked[0, 3] and not blocked[3].any() and not blocked[:, 3].any()


def test_the_touched_rule_gives_a_box_every_cell_it_reaches_and_edges_on_grid_lines_stay_put():
    box = (4 / 64, 16 / 64, 28 / 64, 48 / 64)  # the Compose tab's left box on a 64 px canvas
    assert box_cells(box, 4, 4) == (1, 1, 3, 2)  # inside: one column of the 4x4 grid
    assert box_cells(box, 4, 4, "touched") == (1, 0, 3, 2)
    assert box_cells(box, 16, 16, "touched") == (4, 1, 12, 7)
    assert box_cells(LEFT, 4, 4, "touched") == box_cells(LEFT, 4, 4) == (0, 0, 4, 2)
    with pytest.raises(ValueError, match="cells"):
        box_cells(LEFT, 4, 4, "corners")


def test_composer_passes_through_without_regions_and_detaches_exactly():
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=2)
    before = run(unet, inputs)
    processors = dict(unet.attn_processors)
    with Composer(unet, (2, 2)):
        assert torch.equal(run(unet, inputs), before)
        with call_context(unet, _context(inputs, [], 64)):  # a context without regions
            assert torch.equal(run(unet, inputs), before)
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(run(unet, inputs), before)


def test_a_region_with_the_global_prompt_and_no_concept_changes_nothing():
    """Inside the box the region branch recomputes the base attention on the same prompt: same output."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=2)
    before = run(unet, inputs)
    region = Region(LEFT, "same", text_embeds=inputs["encoder_hidden_states"])
    with Composer(unet, (2, 2), isolation=False), call_context(unet, _context(inputs, [region], 64)):
        assert torch.allclose(run(unet, inputs), before, atol=1e-5)


def test_the_concept_acts_inside_its_box_only_with_base_queries():
    """One attn2 layer: outside the box the base output on the global prompt; inside, the LoRA-adapted
    keys, values and output projection on the region prompt, with the base model's queries (sec. 3.2)."""
    unet = build_unet("tiny-sd15")
    lora = LoRA.from_unet(unet, LoRAConfig(rank=2))
    perturb(lora)
    path, attn = next(iter(attention_layers(unet, "cross").items()))
    g = torch.Generator().manual_seed(1)
    n = 64  # the first level of an 8x8 latent (a 64 px image)
    hidden = torch.randn(1, n, attn.to_q.in_features, generator=g)
    global_text, region_text = (torch.randn(1, 8, attn.to_k.in_features, generator=g) for _ in range(2))
    with torch.no_grad():
        base_global = attn(hidden, encoder_hidden_states=global_text)
        # The expected inside: the adapted layer, but with its query projection's LoRA switched off.
        lora.attach(unet)
        key = path.replace(".", "_") + "_to_q"
        saved = lora.lora_B[key].weight.clone()
        lora.lora_B[key].weight.zero_()
        adapted_region = attn(hidden, encoder_hidden_states=region_text)
        lora.lora_B[key].weight.copy_(saved)
        lora.detach()
        ctx = CallContext.of_branches(["cond"], text_embeds=global_text, image_size=(64, 64),
                                      regions=[Region(LEFT, "a sks", region_text, lora, (1,))])
        with Composer(unet, (2, 2)), call_context(unet, ctx):
            out = attn(hidden, encoder_hidden_states=global_text)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :4] = True
    inside = inside.flatten()
    assert torch.allclose(out[:, ~inside], base_global[:, ~inside], atol=1e-6)
    assert torch.allclose(out[:, inside], adapted_region[:, inside], atol=1e-5)
    assert not torch.allclose(out[:, inside], base_global[:, inside], atol=1e-3)


def test_isolation_keeps_self_attention_of_a_box_out_of_the_other_box():
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=1)
    regions = [Region(LEFT, "a", inputs["encoder_hidden_states"], None, (1,)),
               Region(RIGHT, "b", inputs["encoder_hidden_states"], None, (1,))]
    with Composer(unet, (4, 4)) as composer, call_context(unet, _context(inputs, regions, 64)):
        with composer.recording(2) as maps, torch.no_grad():
            unet(**inputs)
    s = torch.stack(maps.self_attention).mean(0)[0]  # (16, 16) at the 4x4 level
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    left = left.flatten()
    assert s[left][:, ~left].max() < 1e-6 and s[~left][:, left].max() < 1e-6
    assert len(maps.cross[0]) > 0 and maps.cross[0][0].shape == (1, 16, 1)
    # A region's token map covers the whole image, as the reference records it: re-initialisation searches there.
    assert (maps.cross[0][0][0, ~left] > 0).all()
    # Queries outside the boxes are free: with no background here, check rows still sum to one.
    assert torch.allclose(s.sum(-1), torch.ones(16), atol=1e-5)


def test_a_gradient_step_on_the_latent_lowers_the_composer_loss():
    torch.manual_seed(0)
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=1)
    regions = [Region(LEFT, "a", inputs["encoder_hidden_states"], None, (1, 2)),
               Region((0.5, 0.5, 1.0, 1.0), "b", inputs["encoder_hidden_states"], None, (3,))]
    weights = ComposerLossWeights()

    def loss_at(z: torch.Tensor) -> torch.Tensor:
        with composer.recording(2) as maps, call_context(unet, _context(inputs, regions, 64)):
            unet(z, inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"])
        return composer_loss(maps, regions, (4, 4), weights)

    with Composer(unet, (4, 4)) as composer:
        z = inputs["sample"].clone().requires_grad_(True)
        loss = loss_at(z)
        (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            lower = loss_at(z - 0.5 * grad / grad.norm())
    assert loss.item() > 0 and lower.item() < loss.item()


def test_reinitialisation_moves_the_strongest_patch_into_the_box_and_keeps_the_statistics():
    from adapters.composer import AttentionMaps

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = AttentionMaps(1)
    token_map = torch.zeros(1, 4, 4, 1)
    token_map[0, 2:4, 2:4] = 1.0  # the concept's tokens peak in the bottom-right quarter
    maps.cross[0].append(token_map.reshape(1, 16, 1))
    box = Region((0.0, 0.0, 0.5, 0.5), "a")  # the top-left quarter
    out = reinitialise_latents(latents, maps, [box], (4, 4))
    moved = latents.clone()
    moved[:, :, :4, :4] = latents[:, :, 4:, 4:]
    expected = (moved - moved.mean()) / moved.std() * latents.std() + latents.mean()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.std(), latents.std()) and torch.allclose(out.mean(), latents.mean(), atol=1e-6)


@pytest.mark.parametrize("bad", [dict(concept=-1.0), dict(top_k_ratio=0.0), dict(fill=float("nan"))])
def test_loss_weights_are_validated(bad):
    with pytest.raises(ValueError):
        ComposerLossWeights(**bad)


def test_every_delta_adds_a_concepts_other_deltas_inside_its_box_on_the_adapter_rows_only():
    """ComposerSettings(every_delta=True): a feed-forward delta acts at the box's tokens, nowhere else, and (the
    call keeping adapters off guidance's unconditional rows) not on those rows; removing the hooks restores it."""
    unet = build_unet("tiny-sd15")
    lora = LoRA.from_unet(unet, LoRAConfig(rank=2, target="attn_ff"))
    perturb(lora)
    path = next(name.removesuffix(".weight") for name in lora.delta_weights() if ".ff.net.0.proj." in name)
    layer = dict(unet.named_modules())[path]
    delta = lora.delta_weights()[f"{path}.weight"]
    hidden = torch.randn(2, 64, layer.in_features, generator=torch.Generator().manual_seed(1))  # an 8x8 grid
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :4] = True
    inside = inside.flatten()
    ctx = CallContext.of_branches(["uncond", "cond"], image_size=(64, 64), adapters_on_uncond=False,
                                  regions=[Region(LEFT, "a sks", None, lora, (1,))])
    with torch.no_grad():
        base = layer(hidden)
        with Composer(unet, (2, 2), every_delta=[lora]), call_context(unet, ctx):
            out = layer(hidden)
        after = layer(hidden)
    expected = base[1] + hidden[1] @ delta.T
    assert torch.allclose(out[1, inside], expected[inside], atol=1e-5)
    assert not torch.allclose(out[1, inside], base[1, inside], atol=1e-3)
    assert torch.equal(out[1, ~inside], base[1, ~inside])
    assert torch.equal(out[0], base[0])  # the unconditional row: adapters off it
    assert torch.equal(after, base)
    # In a gradient pass (the latent update) the regional delta is a constant: the base layer's gradient alone.
    x = hidden.clone().requires_grad_(True)
    with Composer(unet, (2, 2), every_delta=[lora]), call_context(unet, ctx):
        out = layer(x)
        (grad,) = torch.autograd.grad(out[1].sum(), x)
    assert not torch.allclose(out[1, inside], base[1, inside], atol=1e-3)  # the delta still acts
    x_ref = hidden.clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(layer(x_ref)[1].sum(), x_ref)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_every_delta_adds_a_convolutions_delta_inside_its_box():
    unet = build_unet("tiny-sd15")
    lora = LoRA.from_unet(unet, LoRAConfig(rank=2, target="attn_conv"))
    perturb(lora)
    modules = dict(unet.named_modules())
    path = next(name.removesuffix(".weight") for name in lora.delta_weights()
                if isinstance(modules[name.removesuffix(".weight")], torch.nn.Conv2d))
    conv = modules[path]
    delta = lora.delta_weights()[f"{path}.weight"]
    x = torch.randn(1, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = CallContext.of_branches(["cond"], image_size=(64, 64), regions=[Region(LEFT, "a sks", None, lora, (1,))])
    with torch.no_grad():
        base = conv(x)
        with Composer(unet, (2, 2), every_delta=[lora]), call_context(unet, ctx):
            out = conv(x)
        expected = base + torch.nn.functional.conv2d(x, delta, None, conv.stride, conv.padding)
    left = slice(0, base.shape[-1] // 2)
    assert torch.allclose(out[..., left], expected[..., left], atol=1e-5)
    assert not torch.allclose(out[..., left], base[..., left], atol=1e-3)
    assert torch.equal(out[..., base.shape[-1] // 2:], base[..., base.shape[-1] // 2:])


def test_a_call_keeping_adapters_off_the_unconditional_rows_injects_the_region_prompt_without_the_concept_there():
    unet = build_unet("tiny-sd15")
    lora = LoRA.from_unet(unet, LoRAConfig(rank=2))
    perturb(lora)
    path, attn = next(iter(attention_layers(unet, "cross").items()))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 64, attn.to_q.in_features, generator=g).expand(2, -1, -1)
    global_text, region_text = (torch.randn(1, 8, attn.to_k.in_features, generator=g).expand(2, -1, -1)
                                for _ in range(2))
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :4] = True
    inside = inside.flatten()
    with torch.no_grad():
        base_region = attn(hidden, encoder_hidden_states=region_text)
        outs = {}
        for on_uncond in (True, False):
            ctx = CallContext.of_branches(["uncond", "cond"], text_embeds=global_text, image_size=(64, 64),
                                          adapters_on_uncond=on_uncond,
                                          regions=[Region(LEFT, "a sks", region_text, lora, (1,))])
            with Composer(unet, (2, 2)), call_context(unet, ctx):
                outs[on_uncond] = attn(hidden, encoder_hidden_states=global_text)
    assert torch.allclose(outs[False][0, inside], base_region[0, inside], atol=1e-5)  # no concept on uncond
    assert not torch.allclose(outs[True][0, inside], base_region[0, inside], atol=1e-3)
    assert torch.allclose(outs[False][1], outs[True][1], atol=1e-6)  # the conditional row keeps its concept


def test_between_passes_the_composer_keeps_nothing_per_region_prompt():
    """The region prompts' keys and values are computed at each pass, as the base computes the global prompt's:
    kept for the call, they grew its memory by a copy per region, layer and batch. After a pass, four regions
    leave alive no more than one does but for their boxes' cells."""
    tensor_memory = bench_module("tensor_memory")
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=2)
    quarters = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)]
    held = {}
    for count in (1, 4):
        regions = [Region(box, "a", inputs["encoder_hidden_states"], None, (1,)) for box in quarters[:count]]
        with Composer(unet, (2, 2)), call_context(unet, _context(inputs, regions, 64)), torch.no_grad():
            with tensor_memory.TensorPeak() as memory:
                unet(**inputs)
            held[count] = memory.live
    text = inputs["encoder_hidden_states"]
    inner = min(attn.to_k.out_features for attn in attention_layers(unet, "cross").values())
    one_layers_key_value = 2 * text.shape[0] * text.shape[1] * inner * text.element_size()
    assert held[4] - held[1] < one_layers_key_value
