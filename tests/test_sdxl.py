"""SDXL end to end on the tiny SDXL layout (pipelines/architectures.py's `tiny_sdxl_pipeline`: both text encoders,
the added size and pooled-text conditions, 9 long skips): generation, SC-Tuner, LoRA, SaRA, SPM membranes, fusion
and UAM editing each run through the same generic code as SD 1.x, and what SDXL cannot do yet is refused with the
reason. Every image is 64x64 from 2 steps, so the file runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_helpers import perturb, run, train_checking_added_conditions

from adapters import (
    SPM,
    LoRA,
    LoRAConfig,
    SaRA,
    SaRAConfig,
    SCTuner,
    SPMConfig,
    detect_family,
    fused_lora,
    load_adapter,
    merge_into,
    save_adapter,
)
from adapters.skips import long_skips
from pipelines import EMBEDDED_MODEL, generate
from pipelines.architectures import tiny_sdxl_pipeline
from pipelines.generate import encode_call

STEPS = 2
TOKENIZER = str(EMBEDDED_MODEL / "tokenizer")


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def sdxl_unet_call(pipe, prompt: str) -> dict:
    """UNet inputs for `prompt` as the SDXL pipeline batches them under CFG (uncond row, cond row): the text
    embeddings of both encoders and the added conditions (pooled text, size ids)."""
    embeds, context = encode_call(pipe, prompt, "", 1, 7.5)
    pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor(500),
            "encoder_hidden_states": context.text_embeds.detach(),
            "added_cond_kwargs": {"text_embeds": pooled.detach(), "time_ids": time_ids}}


def test_the_tiny_model_has_sdxl_s_layout(tiny_sdxl):
    unet = tiny_sdxl.unet
    assert detect_family(unet) == "SDXL"
    # The two encoders' widths concatenate to the cross-attention width; the second's projection is the pooled text.
    widths = tiny_sdxl.text_encoder.config.hidden_size + tiny_sdxl.text_encoder_2.config.hidden_size
    assert widths == unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    assert tiny_sdxl.text_encoder_2.config.projection_dim == pooled
    assert len(long_skips(unet)) == 9  # SDXL: 3 levels x 3 decoder resnets (SD 1.x: 12)


def test_generate_is_the_pipeline_s_own_image_seeded_and_recorded_as_sdxl(tiny_sdxl):
    result = generate(tiny_sdxl, "a red circle", seed=5, num_inference_steps=STEPS, scheduler="Euler")
    again = generate(tiny_sdxl, "a red circle", seed=5, num_inference_steps=STEPS, scheduler="Euler")
    assert np.array_equal(pixels(result), pixels(again))
    assert result.images[0].size == (64, 64) and result.settings[0].model_family == "SDXL"
    # encode_call hands the pipeline both encoders' embeddings and the pooled ones: the image is `pipe(prompt)`'s
    # (with the negative prompt "" encoded, as `generate` passes it, not the zeros diffusers uses for None).
    direct = tiny_sdxl("a red circle", negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(pixels(result)[0], np.asarray(direct, dtype=np.float32))


def test_the_call_context_carries_the_added_conditions(tiny_sdxl, tiny_sd15):
    """An adapter of an SDXL call reads what the UNet is conditioned on besides the text: the pooled text per row
    and the size ids (the same `add_time_ids` the pipeline computes)."""
    embeds, context = encode_call(tiny_sdxl, "a red circle", "a blue square", 2, 7.5)
    assert context.added_cond is not None
    pooled = context.added_cond["text_embeds"]
    assert pooled.shape == (4, tiny_sdxl.text_encoder_2.config.projection_dim)
    assert torch.equal(pooled[:2], embeds["negative_pooled_prompt_embeds"].expand(2, -1))
    assert torch.equal(pooled[2:], embeds["pooled_prompt_embeds"].expand(2, -1))
    expected = tiny_sdxl._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=pooled.dtype,
                                           text_encoder_projection_dim=pooled.shape[1])
    assert torch.equal(context.added_cond["time_ids"], expected.expand(4, -1)) and context.image_size == (64, 64)
    assert encode_call(tiny_sd15, "a", "", 1, 7.5)[1].added_cond is None  # one text encoder, no added conditions


@pytest.mark.parametrize("layout", ["tiny_sd15", "tiny_sdxl"])
def test_encoded_prompts_hold_no_text_encoder_graph(layout, request):
    """The embeddings live as long as the call (a composer holds one set per region): encoded with grad, they would
    keep every text encoder's activations for a backward that never comes."""
    pipe = request.getfixturevalue(layout)
    assert all(p.requires_grad for p in pipe.text_encoder.parameters())  # as diffusers loads them
    embeds, context = encode_call(pipe, "a red circle", "a blue square", 2, 7.5)
    held = [context.text_embeds, *embeds.values(), *(context.added_cond or {}).values()]
    assert all(tensor.grad_fn is None and not tensor.requires_grad for tensor in held)


@pytest.mark.parametrize("method", ["sc_tuner", "lora", "sara"])
def test_adapters_change_the_image_and_leave_the_model_as_it_was(tiny_sdxl, method, tmp_path):
    """Each tuner is sized from the SDXL UNet's own structure (SC-Tuner: one per long skip, 9), changes the image
    for the call it is passed to, leaves the model bit-identical afterwards, and round-trips through its file."""
    unet = tiny_sdxl.unet
    if method == "sc_tuner":
        adapter = SCTuner.from_unet(unet)
        assert len(adapter.tuners) == 9
    elif method == "lora":
        adapter = LoRA.from_unet(unet, LoRAConfig(rank=2, target="attn_conv"))
    else:
        adapter = SaRA.from_unet(unet, SaRAConfig(threshold=0.05, rank_weight=0.0))
    assert adapter.base_family == "SDXL"
    perturb(adapter, seed=1)
    kwargs = dict(seed=3, num_inference_steps=STEPS, scheduler="Euler")
    base = pixels(generate(tiny_sdxl, "a red circle", **kwargs))
    tuned = pixels(generate(tiny_sdxl, "a red circle", adapters=[(adapter, 1.0)], **kwargs))
    assert not np.array_equal(tuned, base)
    assert np.array_equal(pixels(generate(tiny_sdxl, "a red circle", **kwargs)), base)  # detached after the call

    # The file carries the SDXL base; loaded back into a fresh model it draws the same image.
    path = save_adapter(adapter, tmp_path / f"{method}.safetensors")
    fresh = tiny_sdxl_pipeline(TOKENIZER)
    loaded = pixels(generate(fresh, "a red circle", adapters=[(path, 1.0)], **kwargs))
    np.testing.assert_allclose(loaded, tuned, atol=1)


def test_an_sdxl_lora_file_loads_in_diffusers_and_draws_the_same(tiny_sdxl, tmp_path):
    lora = LoRA.from_unet(tiny_sdxl.unet, LoRAConfig(rank=2, alpha=1))
    perturb(lora, seed=2)
    ours = pixels(generate(tiny_sdxl, "a red circle", adapters=[(lora, 1.0)], seed=1, num_inference_steps=STEPS,
                           scheduler="Euler"))
    path = save_adapter(lora, tmp_path / "lora.safetensors")
    with_diffusers = tiny_sdxl_pipeline(TOKENIZER)
    with_diffusers.load_lora_weights(str(path))
    theirs = with_diffusers("a red circle", negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5,
                            generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(np.asarray(theirs[0], dtype=np.float32), ours[0], atol=1)


def test_an_sd15_adapter_is_refused_on_sdxl(tiny_sdxl, tiny_sd15, tmp_path):
    path = save_adapter(LoRA.from_unet(tiny_sd15.unet, LoRAConfig(rank=2)), tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match="SD1"):
        load_adapter(path, tiny_sdxl.unet)


def test_membrane_strength_follows_the_prompt_on_sdxl(tiny_sdxl):
    """Facilitated transport reads the SDXL call's own text encoding (both encoders): the erased concept gets
    gamma 1, another prompt less, and the membrane changes the image of the concept."""
    spm = SPM.from_unet(tiny_sdxl.unet, SPMConfig(concepts=["triangle"]))
    perturb(spm, seed=0)
    kwargs = dict(seed=0, num_inference_steps=STEPS, scheduler="Euler")
    base = pixels(generate(tiny_sdxl, "a red triangle", **kwargs))
    erased = generate(tiny_sdxl, "a red triangle", adapters=[(spm, 1.0)], **kwargs)
    assert not np.array_equal(pixels(erased), base)
    assert spm.last_gammas == {"a red triangle": 1.0}
    generate(tiny_sdxl, "a blue circle", adapters=[(spm, 1.0)], **kwargs)
    assert 0 < spm.last_gammas["a blue circle"] < 1


def test_merging_two_sdxl_loras_computes_what_they_compute_attached(tiny_sdxl, tmp_path):
    unet = tiny_sdxl.unet
    inputs = sdxl_unet_call(tiny_sdxl, "a red circle")
    first, second = LoRA.from_unet(unet, LoRAConfig(rank=2)), LoRA.from_unet(unet, LoRAConfig(rank=2, alpha=4))
    perturb(first, seed=1)
    perturb(second, seed=2)
    base = run(unet, inputs)
    for adapter, weight in ((first, 0.7), (second, 0.5)):
        adapter.attach(unet)
        adapter.set_scale(weight)
    attached = run(unet, inputs)
    first.detach()
    second.detach()
    with merge_into(unet, [(first, 0.7), (second, 0.5)]):
        torch.testing.assert_close(run(unet, inputs), attached, atol=1e-5, rtol=0)
    assert torch.equal(run(unet, inputs), base)

    path = save_adapter(fused_lora([(first, 0.7), (second, 0.5)]), tmp_path / "fused.safetensors")
    fresh = tiny_sdxl_pipeline(TOKENIZER).unet
    load_adapter(path, fresh)
    torch.testing.assert_close(run(fresh, inputs), attached, atol=1e-5, rtol=0)


def test_compose_merge_mode_on_sdxl_equals_the_adapters_attached_at_their_weights(tiny_sdxl):
    """Merge mode on SDXL (composer mode: tests/test_sdxl_compose.py)."""
    from pipelines.compose import compose

    loras = [LoRA.from_unet(tiny_sdxl.unet, LoRAConfig(rank=2)) for _ in range(2)]
    for i, lora in enumerate(loras):
        perturb(lora, seed=i)
    kwargs = dict(seed=1, num_inference_steps=STEPS, scheduler="Euler")
    merged = compose(tiny_sdxl, "two things", adapters=[(loras[0], 0.7), (loras[1], 0.4)], mode="merge", **kwargs)
    attached = generate(tiny_sdxl, "two things", adapters=[(loras[0], 0.7), (loras[1], 0.4)], **kwargs)
    np.testing.assert_allclose(pixels(merged), pixels(attached), atol=1)


def test_uam_editing_runs_on_sdxl_with_each_row_s_added_conditions(tiny_sdxl):
    """The edit's own loop passes the UNet every row's pooled text and size ids from its call context: each UNet
    call gets as many added-condition rows as latent rows, the target's conditional row the target's pooled text."""
    from pipelines.edit import INVERSION_CACHE, edit, encode_pooled
    from studio.shapes.world import Scene, ShapeObject, render

    image = render(Scene((ShapeObject("red", "circle", "center"),), "white")).resize((64, 64))
    calls = []

    def record(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((args[0].shape[0], added["text_embeds"].shape[0], added["time_ids"], added["text_embeds"]))

    processors = dict(tiny_sdxl.unet.attn_processors)
    handle = tiny_sdxl.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = edit(tiny_sdxl, image, "a red circle", "a blue circle", num_inference_steps=STEPS, mask_start_t=600,
                      use_cache=False)
    finally:
        handle.remove()
        INVERSION_CACHE.clear()
    assert result.image.size == result.reconstruction.size == (64, 64)
    assert all(processors[name] is p for name, p in tiny_sdxl.unet.attn_processors.items())
    assert [c[0] for c in calls] == [2] * STEPS + [5] * STEPS  # inversion [u, src], edit [u, src x2, tgt x2]
    assert all(rows == pooled_rows for rows, pooled_rows, _, _ in calls)
    assert all(ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(ids) for _, _, ids, _ in calls)
    target = encode_pooled(tiny_sdxl, ["a blue circle"])
    torch.testing.assert_close(calls[-1][3][-1:], target)  # rows [u, src_uncond, tgt_uncond, src, tgt]


@pytest.mark.parametrize("method", ["lora", "sc_tuner", "sara"])
def test_training_on_sdxl_passes_each_caption_s_added_conditions(tiny_sdxl, method, tmp_path):
    """The denoising objective caches each caption's pooled text with its embeddings and passes the UNet the added
    conditions from the call context: a 2-step run has finite losses, every UNet call (training and the samples)
    gets one pooled-text row per latent row, and the adapter file loads back as built for SDXL."""
    from pipelines.train import TrainConfig
    from studio.shapes.world import Scene, ShapeObject, render

    data = tmp_path / "data"
    data.mkdir()
    for i, color in enumerate(("red", "blue")):
        render(Scene((ShapeObject(color, "star", "center"),), "white")).save(data / f"{i}.png")
    options = {"sara": {"threshold": 0.05, "rank_weight": 0.0}}.get(method, {})
    config = TrainConfig(data_dir=data, output_dir=tmp_path / "out", method=method, trigger="sks", steps=2,
                         batch_size=2, learning_rate=1e-2, checkpoint_every=0, sample_steps=2, method_options=options)
    result = train_checking_added_conditions(tiny_sdxl, config)
    adapter = load_adapter(result.adapter_path, tiny_sdxl.unet)
    assert adapter.base_family == "SDXL"
    adapter.detach()


def _built_ids(model, tmp_path) -> dict:
    from studio.ui import build_app

    demo = build_app(model, tmp_path)
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_the_studio_on_sdxl_builds_every_tab(tiny_sdxl, tmp_path):
    """Every objective passes SDXL's added conditions, so no tab is replaced by a note on an SDXL model."""
    from pipelines import LoadedModel
    from pipelines.train import training_refusal

    by_id = _built_ids(LoadedModel(pipe=tiny_sdxl, family="SDXL", source="test", name="tiny-sdxl", hash="0"), tmp_path)
    assert training_refusal(tiny_sdxl, "erase") is None and training_refusal(tiny_sdxl) is None
    assert not [key for key in by_id if key.endswith("-unavailable")]
    assert {"gen-prompt", "erase-concepts"} <= set(by_id) and any(key.startswith("edit-") for key in by_id)


def test_a_tab_that_cannot_serve_the_model_says_why_in_its_place(tiny_sd15, tmp_path):
    """An inpainting UNet (9 input channels) cannot be trained on: Train and Erase show the training loop's own
    reason instead of their inputs; Generate is built as usual."""
    import gradio as gr

    from pipelines import LoadedModel
    from pipelines.train import training_refusal

    tiny_sd15.unet.register_to_config(in_channels=9)  # what the tabs read; no weights are run here
    reason = training_refusal(tiny_sd15)
    assert reason is not None and "9 input channels" in reason
    by_id = _built_ids(LoadedModel(pipe=tiny_sd15, family="SD1", source="test", name="inpaint", hash="0"), tmp_path)
    for tab in ("train", "erase"):
        note = by_id[f"{tab}-unavailable"]
        assert isinstance(note, gr.Markdown) and reason in note.value
    assert "erase-concepts" not in by_id and "gen-prompt" in by_id and "generate-unavailable" not in by_id
