"""SPM membranes (adapters/spm.py): placement and size on the real SD 1.5 layout, facilitated transport per batch
row, the transport forms, several membranes with a LoRA, kohya files that diffusers loads as a plain LoRA, and the
checks on concepts. The contract matrix of tests/test_adapters.py covers the rest (identity, scale, merge...)."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_helpers import perturb, run
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from adapters import SPM, LoRA, SPMConfig, call_context, load_adapter, read_metadata, save_adapter
from adapters.base import base_parameters
from adapters.spm import check_texts, gamma_sources, membrane_layers
from pipelines import EMBEDDED_MODEL, generate, parse_infotext
from pipelines.architectures import build_unet, count_parameters, tiny_sd15_pipeline
from pipelines.generate import encode_call

LAYER_NAMES = ("proj_in", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out")


def membrane(pipe, concepts=("triangle",), seed: int = 0, **options) -> SPM:
    """A membrane for `pipe`'s UNet, moved off its zero init (seeded), not attached."""
    adapter = SPM.from_unet(pipe.unet, SPMConfig(concepts=list(concepts), **options))
    perturb(adapter, seed)
    return adapter


def unet_call(pipe, prompt: str, n: int = 1) -> tuple[dict, object]:
    """UNet inputs for `prompt` as `generate` batches it under CFG (n uncond rows, n cond rows), and its context."""
    embeds, context = encode_call(pipe, prompt, "", n, 7.5)
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2 * n, 4, 8, 8, generator=g), "timestep": torch.tensor(500),
              "encoder_hidden_states": context.text_embeds.detach()}
    return inputs, context


def test_sd15_layout_has_192_membrane_layers_and_423936_parameters():
    unet = build_unet("sd15", device="meta")
    spm = SPM.from_unet(unet, SPMConfig(concepts=["snoopy"]))
    assert len(spm.paths) == 192 and count_parameters(spm) == 423_936  # 32 C + 1536 per block, 16 blocks
    blocks = {path.split(".transformer_blocks")[0].rsplit(".proj_", 1)[0] for path in spm.paths.values()}
    assert len(blocks) == 16
    assert all(sum(p.startswith(block + ".") for p in spm.paths.values()) == 12 for block in blocks)
    first = sorted(p for p in spm.paths.values() if p.startswith("down_blocks.0.attentions.0."))
    assert sorted(name for name in LAYER_NAMES) == sorted(
        p.removeprefix("down_blocks.0.attentions.0.").removeprefix("transformer_blocks.0.") for p in first)
    # SD 1.x's proj_in/proj_out are 1x1 convolutions: the down-projection copies the kernel, the up one is 1x1.
    key = "down_blocks_0_attentions_0_proj_in"
    assert isinstance(spm.lora_A[key], torch.nn.Conv2d) and spm.lora_A[key].weight.shape == (1, 320, 1, 1)
    assert spm.lora_B[key].weight.shape == (320, 1, 1, 1)
    assert spm.lora_A["down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].weight.shape == (1, 768)


def test_init_is_zero_up_and_kaiming_uniform_down(tiny_sd15):
    spm = SPM.from_unet(tiny_sd15.unet, SPMConfig(concepts=["triangle"]))
    assert all(not up.weight.any() for up in spm.lora_B.values())
    for down in spm.lora_A.values():
        bound = 1 / math.sqrt(down.weight[0].numel())  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert down.weight.abs().max() <= bound and down.weight.abs().max() > bound / 2


def test_selection_sees_through_another_adapters_peft_layers(tiny_sd15):
    unet = tiny_sd15.unet
    before = membrane_layers(unet)
    lora = LoRA.from_unet(unet)
    lora.attach(unet)
    after = membrane_layers(unet)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the base layers, no lora_A


def test_membrane_off_is_bit_identical_to_the_base_unet(tiny_sd15):
    inputs, context = unet_call(tiny_sd15, "a red triangle")
    base = run(tiny_sd15.unet, inputs)
    spm = membrane(tiny_sd15)
    spm.attach(tiny_sd15.unet)
    with call_context(tiny_sd15.unet, context):
        assert not torch.equal(run(tiny_sd15.unet, inputs), base)
        spm.set_scale(0.0)
        assert torch.equal(run(tiny_sd15.unet, inputs), base)
    spm.detach()
    assert torch.equal(run(tiny_sd15.unet, inputs), base)


def test_gamma_is_one_for_the_concept_and_lower_for_others_uncond_rows_following(tiny_sd15):
    spm = membrane(tiny_sd15)
    spm.fold = False  # the per-row branches; a call with one strength is folded instead (the test below)
    spm.attach(tiny_sd15.unet)
    _, context = unet_call(tiny_sd15, "a red triangle", n=2)
    spm.prepare(context)
    assert spm.row_scales.tolist() == [1.0] * 4 and spm.last_gammas == {"a red triangle": 1.0}

    # Rows of two prompts: each unconditional row takes the gamma of the conditional row CFG pairs it with.
    prompts = ["a red triangle", "a blue circle"]
    encoding = context.text_encoding
    embeds, ids = encoding.encode(["", "", *prompts])
    rows = [context.rows[0]] * 2 + [type(context.rows[0])(p, "cond") for p in prompts]
    mixed = type(context)(rows=rows, text_embeds=embeds, token_ids=ids, text_encoding=encoding)
    spm.prepare(mixed)
    triangle, circle = spm.last_gammas["a red triangle"], spm.last_gammas["a blue circle"]
    assert triangle == 1.0 and 0 < circle < 1
    assert spm.row_scales.tolist() == pytest.approx([triangle, circle, triangle, circle])
    assert gamma_sources(rows) == [2, 3, 2, 3]

    # Without embeddings in the context (the edit pipeline's), the prompts are encoded: the same gammas.
    spm.prepare(type(context)(rows=rows, text_encoding=encoding))
    assert spm.last_gammas == pytest.approx({"a red triangle": triangle, "a blue circle": circle})

    spm.prepare(None)  # the call ended: static again, the gammas still readable
    assert spm.row_scales is None and spm.infotext_params() == {"SPM gamma": f"triangle: 1.000, triangle: {circle:.3f}"}


def test_no_padding_similarity_and_facilitate_factor(embedded):
    """On the Shapes model the flattened cosine puts an unrelated prompt near 0.94 (shared BOS and padding
    positions); leaving those out brings it down. The factor scales gamma."""
    pipe = embedded.pipe
    _, context = unet_call(pipe, "a blue circle")
    gammas = {}
    for similarity in ("full", "no_padding"):
        spm = SPM.from_unet(pipe.unet, SPMConfig(concepts=["triangle"], similarity=similarity))
        spm.prepare(context)
        gammas[similarity] = spm.last_gammas["a blue circle"]
    print(f"gamma of 'a blue circle' for 'triangle': {gammas}")
    assert gammas["no_padding"] < gammas["full"] - 0.2
    half = SPM.from_unet(pipe.unet, SPMConfig(concepts=["triangle"], facilitate_factor=0.5))
    half.prepare(context)
    assert half.last_gammas["a blue circle"] == pytest.approx(gammas["full"] / 2)


@pytest.mark.parametrize("transport, power", [("additive", 1), ("squared", 2), ("off", 0)])
def test_transport_forms_scale_the_membrane_by_gamma_or_its_square(tiny_sd15, transport, power):
    unet = tiny_sd15.unet
    inputs, context = unet_call(tiny_sd15, "a blue circle")
    spm = membrane(tiny_sd15, transport=transport)
    spm.attach(unet)
    gamma = SPM.from_unet(unet, SPMConfig(concepts=["triangle"]))
    gamma.prepare(context)
    gamma = gamma.last_gammas["a blue circle"]
    assert 0 < gamma < 1
    with call_context(unet, context):
        transported = run(unet, inputs)
    spm.set_scale(gamma**power)  # the same membrane, static at gamma (or gamma^2, or 1)
    static = run(unet, inputs)
    # One prompt folds the membrane into the weights, which sums in another order than its branch: fp32 rounding
    # reaches 1.4e-6 on one CPU thread. Another power of gamma moves the output far more (asserted below).
    torch.testing.assert_close(static, transported, atol=1e-5, rtol=0)
    spm.set_scale(gamma ** (power + 1))
    assert (run(unet, inputs) - transported).abs().max() > 1e-3


def test_two_membranes_and_a_lora_at_once(tiny_sd15):
    """A prompt naming one concept opens that membrane fully (gamma 1) and the other partly; the result is the
    three adapters applied statically at those strengths, and generate records both gammas."""
    unet = tiny_sd15.unet
    inputs, context = unet_call(tiny_sd15, "a red triangle")
    triangle, circle = membrane(tiny_sd15, ["triangle"], seed=1), membrane(tiny_sd15, ["circle"], seed=2)
    lora = LoRA.from_unet(unet)
    perturb(lora, seed=3)
    for adapter in (triangle, lora, circle):
        adapter.attach(unet)
    with call_context(unet, context):
        together = run(unet, inputs)
    gamma = circle.last_gammas["a red triangle"]
    assert triangle.last_gammas["a red triangle"] == 1.0 and 0 < gamma < 1
    circle.set_scale(gamma)
    torch.testing.assert_close(run(unet, inputs), together, atol=1e-5, rtol=0)
    circle.set_scale(1.0)

    result = generate(tiny_sd15, "a red triangle", seed=0, num_inference_steps=2)
    assert parse_infotext(result.settings[0].infotext())["SPM gamma"] == f"triangle: 1.000, circle: {gamma:.3f}"


def test_a_call_with_one_strength_folds_the_membranes_and_puts_the_very_weights_back(tiny_sd15):
    """One prompt gives every row one gamma: both membranes fold into the weights for the call, beside a LoRA that
    keeps its branch, and compute what their branches compute; after the call every weight is its own tensor
    again, bit for bit. A batch of two prompts keeps the per-row branches."""
    unet = tiny_sd15.unet
    inputs, context = unet_call(tiny_sd15, "a blue circle")
    own = {name: (p.data_ptr(), p.detach().clone()) for name, p in base_parameters(unet)}
    triangle, circle = membrane(tiny_sd15, ["triangle"], seed=1), membrane(tiny_sd15, ["circle"], seed=2)
    lora = LoRA.from_unet(unet)
    perturb(lora, seed=3)
    for adapter in (triangle, lora, circle):
        adapter.attach(unet)
    triangle.fold = circle.fold = False
    with call_context(unet, context):
        branches = run(unet, inputs)
    triangle.fold = circle.fold = True
    with call_context(unet, context):
        folded = [name for name, p in base_parameters(unet) if p.data_ptr() != own[name][0]]
        assert sorted(folded) == sorted(f"{path}.weight" for path in triangle.paths.values())
        torch.testing.assert_close(run(unet, inputs), branches, atol=1e-5, rtol=0)
    assert all(p.data_ptr() == own[name][0] and torch.equal(p, own[name][1]) for name, p in base_parameters(unet))

    encoding = context.text_encoding
    embeds, ids = encoding.encode(["", "", "a red triangle", "a blue circle"])
    rows = [context.rows[0]] * 2 + [type(context.rows[0])(p, "cond") for p in ("a red triangle", "a blue circle")]
    with call_context(unet, type(context)(rows=rows, text_embeds=embeds, token_ids=ids, text_encoding=encoding)):
        assert all(p.data_ptr() == own[name][0] for name, p in base_parameters(unet))
        assert triangle.row_scales is not None and circle.row_scales is not None
    for adapter in (triangle, lora, circle):
        adapter.detach()
    assert all(torch.equal(p, own[name][1]) for name, p in base_parameters(unet))


def test_peft_layers_are_built_only_when_a_branch_runs(tiny_sd15):
    """A folded call needs no branch, so an attached membrane builds peft's layers at the first UNet call that is
    not folded (here one outside any pipeline call), where it then acts as the static membrane."""
    unet = tiny_sd15.unet
    inputs, context = unet_call(tiny_sd15, "a red triangle")  # gamma 1
    spm = membrane(tiny_sd15)
    spm.attach(unet)
    with call_context(unet, context):
        folded = run(unet, inputs)
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    torch.testing.assert_close(run(unet, inputs), folded, atol=1e-5, rtol=0)
    assert any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    spm.detach()
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def test_a_membrane_merged_during_a_folded_call_stays_merged_and_unmerges(tiny_sd15):
    unet = tiny_sd15.unet
    inputs, context = unet_call(tiny_sd15, "a red triangle")  # gamma 1: folded at its scale
    own = {name: p.detach().clone() for name, p in base_parameters(unet)}
    spm = membrane(tiny_sd15)
    spm.attach(unet)
    static = run(unet, inputs)
    with call_context(unet, context):
        spm.merge()
        torch.testing.assert_close(run(unet, inputs), static, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(unet, inputs), static, atol=1e-5, rtol=0)  # the call's end kept the merge
    spm.unmerge()
    spm.detach()
    for name, p in base_parameters(unet):
        torch.testing.assert_close(p, own[name], atol=1e-6, rtol=0)


def test_kohya_file_round_trip_and_header(tiny_sd15, tmp_path):
    unet = tiny_sd15.unet
    inputs, context = unet_call(tiny_sd15, "a blue circle")
    spm = membrane(tiny_sd15, ["triangle", "star"], surrogate="circle", eta=2.0, anchor_weight=10.0,
                   transport="squared", facilitate_factor=0.8)
    spm.attach(unet)
    with call_context(unet, context):
        ours = run(unet, inputs)
    path = save_adapter(spm, tmp_path / "no-triangle.safetensors")
    tensors = load_file(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= tensors.keys()
    assert len(tensors) == 3 * len(spm.paths) and tensors[f"{key}.alpha"].item() == 1.0
    assert read_metadata(path)["ss_network_dim"] == "1"
    spm.detach()

    fresh = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"), seed=1)  # a "derived checkpoint": other weights
    inputs_fresh, context_fresh = unet_call(fresh, "a blue circle")
    loaded = load_adapter(path, fresh.unet)
    assert loaded.config == spm.config and loaded.paths == spm.paths
    assert all(torch.equal(loaded.tensors()[k], spm.tensors()[k]) for k in tensors)
    with call_context(fresh.unet, context_fresh):
        assert not torch.equal(run(fresh.unet, inputs_fresh), run(unet, inputs_fresh))
    loaded.detach()
    loaded = load_adapter(path, unet)
    with call_context(unet, context):
        assert torch.equal(run(unet, inputs), ours)  # squared transport and factor restored from the header


def test_kohya_file_loads_in_diffusers_as_a_static_lora(tiny_sd15, tmp_path):
    unet = tiny_sd15.unet
    inputs, _ = unet_call(tiny_sd15, "a red triangle")
    base = run(unet, inputs)
    spm = membrane(tiny_sd15, transport="off")
    spm.attach(unet)
    ours = run(unet, inputs)
    assert not torch.allclose(ours, base, atol=1e-3)
    path = save_adapter(spm, tmp_path / "membrane.safetensors")

    other = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    other.load_lora_weights(str(path))
    torch.testing.assert_close(run(other.unet, inputs), ours, atol=1e-5, rtol=0)


def test_membrane_from_another_architecture_is_refused(tiny_sd15, embedded, tmp_path):
    path = save_adapter(membrane(tiny_sd15), tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="fingerprint .* load the base model it was trained on"):
        load_adapter(path, build_unet("sd15", device="meta"))
    with pytest.raises(Exception, match=r"adapters\[0\]: tiny.safetensors was trained on an SD1 UNet with fingerprint"):
        generate(embedded, "a red triangle", adapters=[(path, 1.0)], num_inference_steps=1, seed=0)


@pytest.mark.parametrize("concepts, message", [
    ([], "must be a non-empty list of concept names"),
    ("triangle", "must be a non-empty list of concept names"),
    (["triangle", "  "], r"concepts\[1\]='  ' is empty; give a word or phrase"),
])
def test_config_refuses_missing_or_empty_concepts(concepts, message):
    with pytest.raises(ValueError, match=message):
        SPMConfig(concepts=concepts)


def test_texts_the_text_encoder_cannot_read_whole_are_refused(tiny_sd15):
    tokenizer = tiny_sd15.tokenizer
    check_texts(tokenizer, ["triangle", ""])  # "" is a valid surrogate
    with pytest.raises(ValueError, match=r"is 34 tokens but the text encoder reads 32 .* shorten it"):
        check_texts(tokenizer, [" ".join(["red"] * 32)])
    tokenizer.unk_token_id = tokenizer.convert_tokens_to_ids("z</w>")  # a tokenizer that does not know "z"
    with pytest.raises(ValueError, match="concept 'z': the tokenizer reads no word in it .* spell it in words"):
        check_texts(tokenizer, ["z"])
