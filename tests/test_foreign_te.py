"""The text-encoder part of a LoRA file of another tool (kohya `lora_te_` / `lora_te1_` / `lora_te2_`) outside
`generate`: UAM editing encodes its prompts with it as `generate` does, and LoRA-Composer encodes each concept's
region prompt with that concept's part only (pipelines/edit.py, pipelines/compose.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters import attached_adapters, current_context
from adapters.foreign import ForeignLoRA, link_pipeline, load_foreign_lora
from adapters.kohya import adaptable_modules, kohya_name
from adapters.processors import attention_layers
from pipelines.compose import ComposeRegion, compose
from pipelines.edit import edit
from pipelines.generate import encode_call
from studio.shapes.world import Scene, ShapeObject, render

RANK = 2


def kohya_file(path: Path, pipe, seed: int, text_encoder: bool = True) -> Path:
    """A kohya LoRA file (rank 2, alpha 1) with random factors on the UNet's cross-attention and on the self-attention
    projections of every text encoder (`lora_te_` on SD 1.x, `lora_te1_` / `lora_te2_` on SDXL). With
    `text_encoder=False` the text-encoder part is there but zero, and the UNet part is the same as with it."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    modules = [(kohya_name("unet", f"{path}.{name}"), layer)
               for path, attn in attention_layers(pipe.unet, "cross").items()
               for name, layer in (("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out.0", attn.to_out[0]))]
    for component, prefix in (("text_encoder", "lora_te1_" if sdxl else "lora_te_"), ("text_encoder_2", "lora_te2_")):
        layers = adaptable_modules(getattr(pipe, component)) if getattr(pipe, component, None) is not None else {}
        modules += [(prefix + p.replace(".", "_"), layer) for p, layer in layers.items()
                    if p.endswith(("self_attn.q_proj", "self_attn.v_proj"))]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in modules:
        up = torch.randn(layer.out_features, RANK, generator=g) * 0.5
        if name.startswith("lora_te") and not text_encoder:
            up.zero_()
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.5
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


@pytest.fixture(params=["tiny_sd15", "tiny_sdxl"])
def pipe(request):
    pipe = request.getfixturevalue(request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_edit_encodes_its_prompts_with_the_text_encoder_part_as_generate_does(pipe, tmp_path):
    """The same file with its text-encoder part zeroed edits differently (the UNet parts are equal), and the edit with
    the file at 0.8 is the edit of a model with the file attached by hand at 0.8 (UNet and text-encoder hooks),
    which is what `generate` runs; the edit leaves the text encoders as they were."""
    full, zeroed = (kohya_file(tmp_path / f"{name}.safetensors", pipe, seed=0, text_encoder=te)
                    for name, te in (("full", True), ("zeroed", False)))
    image = render(Scene((ShapeObject("red", "circle", "left"),), "white")).resize((64, 64))
    kwargs = dict(num_inference_steps=2, mask_start_t=600, use_cache=False)
    text = encode_call(pipe, "a blue circle", "", 1, 7.5)[1].text_embeds
    with_te = edit(pipe, image, "a red circle", "a blue circle", adapters=[(full, 0.8)], **kwargs)
    without_te = edit(pipe, image, "a red circle", "a blue circle", adapters=[(zeroed, 0.8)], **kwargs)
    assert np.abs(pixels(with_te.image) - pixels(without_te.image)).max() > 2
    assert with_te.settings.extra_params["Adapters"] == "full:0.8"
    assert not attached_adapters(pipe.unet)
    assert torch.equal(encode_call(pipe, "a blue circle", "", 1, 7.5)[1].text_embeds, text)

    link_pipeline(pipe)
    lora = load_foreign_lora(full, pipe.unet)
    assert isinstance(lora, ForeignLoRA) and lora.adapts_text_encoders and not lora.report.unmatched
    lora.set_scale(0.8)
    try:
        by_hand = edit(pipe, image, "a red circle", "a blue circle", **kwargs)
    finally:
        lora.detach()
    assert np.array_equal(pixels(with_te.image), pixels(by_hand.image))


def test_the_composer_encodes_each_region_prompt_with_its_own_concept_s_text_encoder_part(pipe, tmp_path):
    """Recorded in the guided step's call context: region k's embeddings are its prompt (and negative prompt)
    encoded with concept k's text-encoder part at concept k's weight, attached by hand; the global prompt's (and on
    SDXL its pooled text) are encoded with none. No key of the files is left out with a warning."""
    files = [kohya_file(tmp_path / f"c{k}.safetensors", pipe, seed=k) for k in (0, 1)]
    weights = (0.8, 0.6)
    regions = [ComposeRegion((0, 0, 32, 64), "a sks"), ComposeRegion((32, 0, 64, 64), "a zkz dog", "blurry")]
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda unet, *_: seen.append(current_context(unet)))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compose(pipe, "two things", adapters=list(zip(files, weights)), regions=regions, seed=0,
                    num_inference_steps=1)
    finally:
        handle.remove()
    assert not [w for w in caught if "left out" in str(w.message)]
    guided = seen[-1]

    def encoded(prompt: str, negative: str, file: Path | None = None, weight: float = 1.0):
        if file is None:
            return encode_call(pipe, prompt, negative, 1, 7.5, (64, 64))[1]
        lora = load_foreign_lora(file, pipe.unet)
        lora.set_scale(weight)
        try:
            return encode_call(pipe, prompt, negative, 1, 7.5, (64, 64))[1]
        finally:
            lora.detach()

    for k, region in enumerate(regions):
        own = encoded(region.prompt, region.negative_prompt, files[k], weights[k]).text_embeds
        other = encoded(region.prompt, region.negative_prompt, files[1 - k], weights[1 - k]).text_embeds
        plain = encoded(region.prompt, region.negative_prompt).text_embeds
        torch.testing.assert_close(guided.regions[k].text_embeds, own, rtol=0, atol=0)
        assert (own - plain).abs().max() > 1e-2 and (own - other).abs().max() > 1e-2  # so the check can fail
    plain_global = encoded("two things", "")
    torch.testing.assert_close(guided.text_embeds, plain_global.text_embeds, rtol=0, atol=0)
    if plain_global.added_cond is not None:  # SDXL: the pooled text is the global prompt's, without any part
        torch.testing.assert_close(guided.added_cond["text_embeds"], plain_global.added_cond["text_embeds"],
                                   rtol=0, atol=0)


def test_merge_mode_says_it_leaves_the_text_encoder_part_out(tiny_sd15, tmp_path):
    """compose's merge mode sums UNet weights only: a file's text-encoder part is not dropped silently."""
    file = kohya_file(tmp_path / "c0.safetensors", tiny_sd15, seed=0)
    with pytest.warns(UserWarning, match=r"adapters\[0\]: merge mode .* text-encoder part of c0.safetensors"):
        compose(tiny_sd15, "a thing", adapters=[(file, None)], mode="merge", seed=0, num_inference_steps=1)


def test_a_kohya_file_gives_one_modules_delta_alone_as_its_full_set_does(pipe, tmp_path):
    """`delta_weight(name)`, which the composer's regional deltas read module by module, is `delta_weights()`'s
    entry; a text-encoder weight is not a UNet delta."""
    link_pipeline(pipe)
    lora = load_foreign_lora(kohya_file(tmp_path / "k.safetensors", pipe, seed=0), pipe.unet)
    try:
        deltas = lora.delta_weights(scale=0.7)
        assert deltas and all(torch.equal(lora.delta_weight(name, scale=0.7), d) for name, d in deltas.items())
        te_names = {name for part in lora.text_encoder_deltas().values() for name in part}
        assert te_names - set(deltas)
        assert all(lora.delta_weight(name) is None for name in te_names - set(deltas))
    finally:
        lora.detach()
