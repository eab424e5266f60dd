"""UAM editing: the uniform cross-attention processor, the DDIM maths, the edit pipeline on the tiny
SD 1.5 layout and the embedded Shapes model, the inversion cache, and image/mask normalisation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from adapter_helpers import perturb
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageFile

from adapters import LoRA, LoRAConfig
from adapters.context import Attachments, CallContext, call_context
from adapters.processors import ProcessorSwap, WrappingProcessor, attention_layers
from adapters.uniform_attention import UniformCrossAttnProcessor, attach_uniform_attention
from pipelines import EMBEDDED_MODEL
from pipelines.architectures import build_unet, tiny_sd15_pipeline, unet_inputs
from pipelines.edit import (
    INVERSION_CACHE,
    adaptive_keep_mask,
    blend_branches,
    ddim_denoising_step,
    ddim_inversion_step,
    ddim_reconstruct,
    ddim_schedule,
    edit,
    edit_without_uniform,
    invert,
    quantile_levels,
    reconstruct,
    restrict_edit,
)
from pipelines.errors import GenerationInterrupted, InputError
from pipelines.images import load_image, load_mask
from studio.shapes.world import Scene, ShapeObject, render

STEPS = 4  # timesteps 751, 501, 251, 1 with the models' "leading" spacing and offset 1
MASK_T = 600  # T_mask that makes the last three of the four steps blend
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe() -> StableDiffusionPipeline:
    """conftest's tiny SD 1.5 pipeline, shared by this module (editing leaves the pipe as it was)."""
    return tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))


@pytest.fixture(params=["tiny", "shapes"])
def pipe(request, tiny_pipe, embedded) -> StableDiffusionPipeline:
    return {"tiny": tiny_pipe, "shapes": embedded.pipe}[request.param]


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return render(Scene((ShapeObject("red", "circle", "center"),), "white"))


@pytest.fixture(autouse=True)
def empty_cache():
    INVERSION_CACHE.clear()
    yield
    INVERSION_CACHE.clear()


class RowCounter:
    """Counts UNet row-evaluations through a forward pre-hook (independent of the pipeline's own tally)."""

    def __init__(self, unet):
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]

    def remove(self):
        self._handle.remove()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# the processor
# ---------------------------------------------------------------------------------------------
def test_uniform_rows_are_the_analytic_constant_and_other_rows_the_normal_output():
    unet = build_unet("tiny-sd15")
    attn = next(iter(attention_layers(unet, "cross").values()))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, attn.query_dim, generator=g)
    context = torch.randn(3, 7, attn.cross_attention_dim, generator=g)
    state = Attachments()  # the registry a UNet would hold; its context says which rows are uniform
    state.context = CallContext.of_branches(["uniform", "cond", "uniform"])
    processor = UniformCrossAttnProcessor(AttnProcessor2_0(), state)
    with torch.no_grad():
        out = processor(attn, hidden, context)

        # uniform rows: to_out(to_v(mean_j c_j)) at every query position, exactly
        constant = attn.to_out[0](attn.to_v(context[[0, 2]].mean(dim=1, keepdim=True)))
        assert torch.equal(out[[0, 2]], constant.expand(2, 16, -1))
        # ... which is attention with an explicit uniform softmax (1/L over every token, every head)
        value = attn.to_v(context[[0, 2]])  # (2, L, inner)
        uniform_probs = torch.full((2, 16, context.shape[1]), 1 / context.shape[1])
        assert torch.allclose(out[[0, 2]], attn.to_out[0](uniform_probs @ value), atol=1e-6)

        # the other row: exactly the normal processor on that row, and the full-batch output up to rounding
        normal_row = AttnProcessor2_0()(attn, hidden[1:2], context[1:2])
        assert torch.equal(out[1:2], normal_row)
        assert torch.allclose(out[1], AttnProcessor2_0()(attn, hidden, context)[1], atol=1e-6)

        # a call without uniform rows is a pass-through; a context that does not describe the batch is refused
        state.context = CallContext.of_branches(["source", "target", "uncond"])
        assert torch.equal(processor(attn, hidden, context), AttnProcessor2_0()(attn, hidden, context))
        state.context = CallContext.of_branches(["uniform", "cond"])
        with pytest.raises(ValueError, match="the call context has 2 rows but the attention batch has 3 rows"):
            processor(attn, hidden, context)


@pytest.mark.parametrize("layout", ["tiny-sd15", "tiny-sdxl"])
def test_attach_detach_restores_exact_processors_and_outputs(layout):
    unet = build_unet(layout)
    inputs = unet_inputs(unet, batch=2)
    before_processors = dict(unet.attn_processors)
    with torch.no_grad():
        before = unet(**inputs).sample

        handle = attach_uniform_attention(unet)
        cross = {f"{name}.processor" for name in attention_layers(unet, "cross")}
        assert cross and all(name.endswith("attn2.processor") for name in cross)
        for name, processor in unet.attn_processors.items():
            if name in cross:
                assert isinstance(processor, UniformCrossAttnProcessor)
                assert processor.base_processor is before_processors[name]
            else:  # self-attention untouched
                assert processor is before_processors[name]
        with call_context(unet, CallContext.of_branches(["uniform", "cond"])):
            mixed = unet(**inputs).sample
        assert not torch.allclose(mixed[0], before[0], atol=1e-3)  # the uniform row changed
        assert torch.allclose(mixed[1], before[1], atol=1e-5)  # the normal row did not
        with call_context(unet, CallContext.of_branches(["source", "target"])):
            assert torch.equal(unet(**inputs).sample, before)  # no uniform row: bit-identical pass-through

        with pytest.raises(RuntimeError, match="already attached"):
            attach_uniform_attention(unet)
        handle.detach()
        assert all(unet.attn_processors[name] is p for name, p in before_processors.items())
        assert torch.equal(unet(**inputs).sample, before)

        with attach_uniform_attention(unet):  # context manager form; outside a call context every row is uniform
            assert not torch.allclose(unet(**inputs).sample, before, atol=1e-3)
        assert all(unet.attn_processors[name] is p for name, p in before_processors.items())
        assert torch.equal(unet(**inputs).sample, before)


class _Doubling(WrappingProcessor):
    """A stand-in for the next processor swap (LoRA-Composer's): doubles what the processor it wraps returns."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * self.base_processor(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize("first_out", ["uniform", "doubling"])
def test_processor_swaps_detach_in_either_order(first_out):
    """Uniform attention, then another swap over the same layers; whichever is detached first, the other keeps
    acting, and once both are out every layer holds its original processor object and outputs are exact."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=2)
    before_processors = dict(unet.attn_processors)
    with torch.no_grad():
        before = unet(**inputs).sample
        uniform = attach_uniform_attention(unet)
        only_uniform = unet(**inputs).sample
        doubling = ProcessorSwap(attention_layers(unet, "cross"), lambda path, previous: _Doubling(previous))
        both = unet(**inputs).sample
        assert not torch.allclose(both, only_uniform, atol=1e-4)
        if first_out == "uniform":
            uniform.detach()
            reference = build_unet("tiny-sd15")  # the same weights, with only the doubling swap
            with ProcessorSwap(attention_layers(reference, "cross"), lambda path, previous: _Doubling(previous)):
                assert torch.equal(unet(**inputs).sample, reference(**inputs).sample)
            doubling.detach()
        else:
            doubling.detach()
            assert torch.equal(unet(**inputs).sample, only_uniform)
            uniform.detach()
        assert all(unet.attn_processors[name] is p for name, p in before_processors.items())
        assert torch.equal(unet(**inputs).sample, before)


def test_a_swap_replaced_by_a_foreign_processor_refuses_to_detach():
    unet = build_unet("tiny-sd15")
    swap = attach_uniform_attention(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="does not wrap the one installed here"):
        swap.detach()


# ---------------------------------------------------------------------------------------------
# the maths
# ---------------------------------------------------------------------------------------------
def test_schedule_follows_the_scheduler_config_and_uses_alpha_0_below_zero():
    reference = ddim_schedule({**SD_SCHEDULER_CONFIG, "steps_offset": 0}, 50)  # UAM's reference setup: 980, 960, ..., 0
    assert reference.timesteps[:2] == [980, 960] and reference.timesteps[-1] == 0
    assert reference.previous(49) == -1 and reference.alpha_bar(-1) == reference.alphas_cumprod[0]
    assert ddim_schedule(SD_SCHEDULER_CONFIG, STEPS).timesteps == [751, 501, 251, 1]


def test_inversion_step_inverts_the_denoising_step():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    alpha_prev, alpha_t = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    z_t = ddim_inversion_step(z, eps, alpha_prev, alpha_t)
    assert torch.allclose(ddim_denoising_step(z_t, eps, alpha_t, alpha_prev), z, rtol=0, atol=1e-12)

    # Whole schedule: ε depends only on the timestep (a mock UNet), so the P2P convention (ε at the
    # destination t when inverting, at the source t when denoising) makes the round trip exact.
    schedule = ddim_schedule(SD_SCHEDULER_CONFIG, 10)
    mock_eps = {t: torch.randn(4, 8, 8, generator=g, dtype=torch.float64) for t in schedule.timesteps}
    alphas = {t: schedule.alpha_bar(t).double() for t in [*schedule.timesteps, -1]}
    latents = z
    for i in reversed(range(10)):
        t = schedule.timesteps[i]
        latents = ddim_inversion_step(latents, mock_eps[t], alphas[schedule.previous(i)], alphas[t])
    for i, t in enumerate(schedule.timesteps):
        latents = ddim_denoising_step(latents, mock_eps[t], alphas[t], alphas[schedule.previous(i)])
    assert torch.allclose(latents, z, rtol=0, atol=1e-9)


def test_adaptive_keep_mask_threshold_modes_dilation_and_channels():
    target = torch.zeros(1, 2, 5, 5)
    source = torch.full((1, 2, 5, 5), 0.1)
    source[0, 0, 2, 2] = 1.0  # a strong edit in channel 0 at the centre
    source[0, 0, 0, 4] = 0.15  # a weak one: above λ, below 2λ
    level = 0.5  # λ = median |Δ| = 0.1

    reference = adaptive_keep_mask(source, target, level, threshold_mode="reference", dilation=1)
    expected = torch.ones(1, 2, 5, 5)
    expected[0, 0, 1:4, 1:4] = 0  # |Δ| > 2λ at the centre only; the edit region is dilated
    assert torch.equal(reference, expected)

    paper = adaptive_keep_mask(source, target, level, threshold_mode="paper", dilation=0)
    expected = torch.ones(1, 2, 5, 5)
    expected[0, 0, 2, 2] = expected[0, 0, 0, 4] = 0  # |Δ| > λ
    assert torch.equal(paper, expected)
    # dilating the keep region erodes isolated edits away
    assert torch.equal(adaptive_keep_mask(source, target, level, threshold_mode="paper", dilation=1),
                       torch.ones(1, 2, 5, 5))

    max_channels = adaptive_keep_mask(source, target, level, dilation=0, mask_channels="max")
    assert max_channels[0, :, 2, 2].tolist() == [0, 0] and reference[0, 1].min() == 1

    levels = quantile_levels(0.5, 50)
    assert levels[0] == 0 and levels[-1] == 0.5 and len(levels) == 50


def test_the_mask_floor_keeps_a_faint_shift_everywhere_and_still_edits_the_strong_change():
    """Guidance shifts the whole background a little (|Δ| 0.3 in every cell of channel 0): under the floor it is
    kept, while the object's change (|Δ| 2) is edited; floor 0 is the reference's rule, which edits the shift too."""
    target = torch.zeros(1, 2, 6, 6)
    source = torch.zeros(1, 2, 6, 6)
    source[0, 0] = 0.3  # the faint shift over channel 0
    source[0, :, 2:4, 2:4] = 2.0  # the object
    object_cells = torch.zeros(1, 2, 6, 6, dtype=torch.bool)
    object_cells[0, :, 2:4, 2:4] = True
    level = 0.25  # λ = 0: three quarters of |Δ| is 0, so 2λ = 0 and any change counts without a floor

    without = adaptive_keep_mask(source, target, level, dilation=0)
    assert (without[0, 0] == 0).all()  # the whole channel is edited, the shift with it
    floored = adaptive_keep_mask(source, target, level, dilation=0, floor=0.8)
    assert torch.equal(floored, (~object_cells).float())  # only the object is edited
    assert torch.equal(adaptive_keep_mask(source, target, level, dilation=0, floor=2.0), torch.ones(1, 2, 6, 6))


def test_blend_copies_the_auxiliary_branch_where_kept_and_the_user_mask_limits_the_edit():
    aux, source, target = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    keep = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    new_source, new_target = blend_branches(aux, source, target, keep, source_blend=True)
    assert new_target.flatten().tolist() == [0, 2, 0, 2]
    assert new_source.flatten().tolist() == [1, 0, 1, 0]  # the source's edit region takes the aux branch
    assert torch.equal(blend_branches(aux, source, target, keep, source_blend=False)[0], source)
    allowed = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert restrict_edit(keep, allowed).flatten().tolist() == [1, 0, 1, 1]  # edit = E ∧ U


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def test_edit_returns_image_sized_outputs_counts_rows_and_leaves_the_pipe_as_it_was(pipe, image):
    processors, scheduler = dict(pipe.unet.attn_processors), pipe.scheduler
    config = dict(scheduler.config)
    counter = RowCounter(pipe.unet)
    try:
        result = edit(pipe, image, "a red circle", "a blue circle", num_inference_steps=STEPS, mask_start_t=MASK_T)
        assert result.unet_rows == counter.rows == 2 * STEPS + 5 * STEPS  # inversion + [u, src×2, tgt×2]
        without_cfg = edit(pipe, image, "a red circle", "a blue circle", num_inference_steps=STEPS,
                           guidance_scale=1.0)
        assert without_cfg.unet_rows == counter.rows - result.unet_rows == 3 * STEPS  # cached; [u, src, tgt]
    finally:
        counter.remove()
    assert result.image.size == result.reconstruction.size == result.mask.size == image.size
    assert result.mask.mode == "L"
    assert result.inversion.unet_rows == 2 * STEPS
    assert all(pipe.unet.attn_processors[name] is p for name, p in processors.items())
    assert pipe.scheduler is scheduler and dict(scheduler.config) == config


def test_invert_then_reconstruct_is_the_edit_s_auxiliary_branch(tiny_pipe, image):
    inversion = invert(tiny_pipe, image, num_inference_steps=STEPS)
    assert inversion.unet_rows == 2 * STEPS
    assert inversion.image_latents.dtype == inversion.latents.dtype == torch.float32
    recon = reconstruct(tiny_pipe, inversion)
    assert recon.unet_rows == STEPS and recon.image.size == image.size
    result = edit(tiny_pipe, image, "a red circle", "a blue circle", num_inference_steps=STEPS)
    assert result.inversion.unet_rows == 0  # served from the cache
    assert np.abs(pixels(result.reconstruction) - pixels(recon.image)).max() <= 1


def test_second_edit_reuses_the_inversion_and_matches_an_uncached_edit(tiny_pipe, image):
    counter = RowCounter(tiny_pipe.unet)  # attached throughout: the cache key includes hooks
    try:
        first = edit(tiny_pipe, image, "a red circle", "a blue circle", num_inference_steps=STEPS, mask_start_t=MASK_T)
        rows_before = counter.rows
        second = edit(tiny_pipe, image, "a red circle", "a green square", num_inference_steps=STEPS,
                      mask_start_t=MASK_T)
        assert counter.rows - rows_before == second.unet_rows == 5 * STEPS  # no inversion rows
        assert first.unet_rows == 7 * STEPS
    finally:
        counter.remove()
    uncached = edit(tiny_pipe, image, "a red circle", "a green square", num_inference_steps=STEPS,
                    mask_start_t=MASK_T, use_cache=False)
    assert uncached.unet_rows == 7 * STEPS
    assert np.array_equal(pixels(second.image), pixels(uncached.image))
    assert np.array_equal(pixels(second.mask), pixels(uncached.mask))
    # another inversion setting is another entry
    assert invert(tiny_pipe, image, "a red circle", num_inference_steps=STEPS).unet_rows == 2 * STEPS


def test_the_cache_key_follows_attached_adapters_and_their_scale(tiny_pipe, image):
    """An adapter attached to the UNet changes what inversion computes: a new scale (or new weights) must not be
    served a stale inversion, and the same state again is a hit."""
    lora = LoRA.from_unet(tiny_pipe.unet, LoRAConfig(rank=2))
    perturb(lora)
    lora.attach(tiny_pipe.unet)
    try:
        first = invert(tiny_pipe, image, "", num_inference_steps=STEPS)
        assert first.unet_rows == 2 * STEPS
        lora.set_scale(0.5)
        rescaled = invert(tiny_pipe, image, "", num_inference_steps=STEPS)
        assert rescaled.unet_rows == 2 * STEPS, "another scale: inverted again, not served from the cache"
        assert not torch.equal(rescaled.uniform_latents, first.uniform_latents)
        with torch.no_grad():
            next(lora.parameters()).add_(0.01)  # trained further in place
        assert invert(tiny_pipe, image, "", num_inference_steps=STEPS).unet_rows == 2 * STEPS
        assert invert(tiny_pipe, image, "", num_inference_steps=STEPS).unet_rows == 0  # the same state: a hit
    finally:
        lora.detach()


def test_without_blending_the_target_branch_is_plain_ddim_editing(tiny_pipe, image):
    # T_mask = 0: no step blends, so the target is the P2P-setup DDIM edit
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5)
    result = edit(tiny_pipe, image, "a red circle", "a blue circle", mask_start_t=0, invert_with_source_prompt=True,
                  **kwargs)
    baseline = edit_without_uniform(tiny_pipe, image, "a red circle", "a blue circle", **kwargs)
    assert baseline.unet_rows == STEPS + 2 * STEPS
    assert np.abs(pixels(result.image) - pixels(baseline.image)).max() <= 1
    assert np.asarray(result.mask).min() == 255  # nothing was kept


def test_user_mask_limits_the_edit_and_an_empty_one_is_no_limit(tiny_pipe, image):
    kwargs = dict(num_inference_steps=STEPS, mask_start_t=MASK_T)
    free = edit(tiny_pipe, image, "a red circle", "a blue circle", **kwargs)
    left_half = np.zeros((32, 32), bool)  # another size: resized (nearest) to the image
    left_half[:, :16] = True
    limited = edit(tiny_pipe, image, "a red circle", "a blue circle", user_mask=left_half, **kwargs)
    mask = np.asarray(limited.mask)
    assert mask[:, 32:].max() == 0 and mask[:, :32].max() > 0
    assert np.asarray(free.mask)[:, 32:].max() > 0

    empty = edit(tiny_pipe, image, "a red circle", "a blue circle", user_mask=Image.new("L", (64, 64)), **kwargs)
    assert np.array_equal(pixels(empty.image), pixels(free.image))


def test_baselines_run_with_their_row_counts(embedded, image):  # a LoadedModel works as well as a pipe
    plain = ddim_reconstruct(embedded, image, num_inference_steps=STEPS)
    assert plain.image.size == image.size and plain.unet_rows == 2 * STEPS
    guided = ddim_reconstruct(embedded, image, "a red circle", 7.5, num_inference_steps=STEPS)
    assert guided.unet_rows == STEPS + 2 * STEPS
    edited = edit_without_uniform(embedded, image, "a red circle", "a blue circle", num_inference_steps=STEPS)
    assert edited.image.size == image.size and edited.unet_rows == 3 * STEPS


def test_progress_callback_counts_both_phases_and_can_stop(tiny_pipe, image):
    seen = []
    edit(tiny_pipe, image, "a red circle", "a blue circle", num_inference_steps=STEPS,
         callback=lambda step, total: seen.append((step, total)))
    assert seen == [(step, 2 * STEPS) for step in range(1, 2 * STEPS + 1)]
    seen.clear()  # the inversion is cached now: only the edit's steps
    edit(tiny_pipe, image, "a red circle", "a green circle", num_inference_steps=STEPS,
         callback=lambda step, total: seen.append((step, total)))
    assert seen == [(step, STEPS) for step in range(1, STEPS + 1)]
    processors = dict(tiny_pipe.unet.attn_processors)
    with pytest.raises(GenerationInterrupted):
        edit(tiny_pipe, image, "a red circle", "a blue square", num_inference_steps=STEPS,
             callback=lambda step, total: step == 2)
    assert all(tiny_pipe.unet.attn_processors[name] is p for name, p in processors.items())  # restored on error


def test_edit_refuses_bad_arguments_before_any_work(tiny_pipe, image):
    counter = RowCounter(tiny_pipe.unet)
    try:
        with pytest.raises(InputError, match="threshold_mode='soft'"):
            edit(tiny_pipe, image, "a", "b", num_inference_steps=STEPS, threshold_mode="soft")
        with pytest.raises(InputError, match="quantile=1.5"):
            edit(tiny_pipe, image, "a", "b", num_inference_steps=STEPS, quantile=1.5)
        with pytest.raises(InputError, match="height=60 is not a multiple of 8"):
            edit(tiny_pipe, image, "a", "b", num_inference_steps=STEPS, height=60)
        with pytest.raises(InputError, match="num_inference_steps=0"):
            invert(tiny_pipe, image, num_inference_steps=0)
    finally:
        counter.remove()
    assert counter.rows == 0


# ---------------------------------------------------------------------------------------------
# image and mask normalisation
# ---------------------------------------------------------------------------------------------
def test_transparent_grey_and_palette_images_become_rgb_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    out = load_image(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert out.getpixel((1, 0)) == (255, 127, 127)  # half-transparent red over white

    assert load_image(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (1, 1), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    assert load_image(palette).getpixel((0, 0)) == (10, 20, 30)
    palette.info["transparency"] = 1
    assert load_image(palette).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    grey16.save(tmp_path / "grey16.png")
    for source in (grey16, tmp_path / "grey16.png"):
        assert [load_image(source).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    image.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "phone.png", exif=exif)
    upright = load_image(tmp_path / "phone.png")
    assert upright.size == (2, 4) and upright.getpixel((1, 0)) == (0, 0, 255)


def test_resize_policy_covers_the_target_then_center_crops():
    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    wide.paste((0, 255, 0), (0, 0, 20, 50))  # a green band on the left: outside the centre crop
    out = load_image(wide, size=(64, 64))
    assert out.size == (64, 64)
    assert np.asarray(out)[..., 1].max() < 60  # scaled to 128x64, cropped to x in [32, 96): no green left


def forged_png(path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height (its pixel data could never be decoded as such)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts after signature, length and type
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    forged_png(tmp_path / "big.png", 9000, 9000)  # 81 MP: above our 50 MP limit, below PIL's hard one
    with pytest.raises(InputError, match="81,000,000 pixels"):
        load_image(tmp_path / "big.png")
    forged_png(tmp_path / "bomb.png", 40000, 40000)  # PIL's own guard refuses it at open
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "bomb.png")
    forged_png(tmp_path / "small.png", 64, 64)
    with pytest.raises(InputError, match="limit of 1,000"):
        load_image(tmp_path / "small.png", max_pixels=1000)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot be opened as an image"):
        load_image(tmp_path / "notes.png")


def test_masks_become_binary_image_sized_or_none_when_empty():
    drawn = Image.new("RGB", (32, 32), (0, 0, 0))
    drawn.paste((255, 255, 255), (0, 0, 16, 32))
    mask = load_mask(drawn, (64, 64))
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert mask[:, :32].all() and not mask[:, 32:].any()  # nearest: stays binary

    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # a painted layer: its alpha is the mask
    layer.paste((255, 0, 0, 255), (0, 0, 8, 8))
    assert load_mask(layer, (64, 64)).sum() == 64

    assert load_mask(Image.new("L", (64, 64), 0), (64, 64)) is None
    assert load_mask(np.zeros((64, 64), bool), (64, 64)) is None
    assert load_mask(None, (64, 64)) is None
