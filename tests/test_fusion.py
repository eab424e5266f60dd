"""Merging weight-delta adapters (adapters/fusion.py): the merge computes what the adapters attached at those scales
compute, restores bit for bit, refuses what it cannot merge; the fused LoRA file equals the merge in our loader and in
diffusers (also diffusers' set_adapters); and why peft's "linear" combination must not fuse distinct concepts."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from adapter_helpers import perturb, run
from peft import LoraConfig, get_peft_model
from torch import nn

from adapters import (
    LoRA,
    LoRAConfig,
    OrthoLoRA,
    OrthoLoRAConfig,
    SaRA,
    SaRAConfig,
    SCTuner,
    fused_lora,
    load_adapter,
    merge_into,
    save_adapter,
)
from adapters.base import base_parameters
from pipelines.architectures import build_unet, tiny_sd15_pipeline, unet_inputs
from pipelines.loading import EMBEDDED_MODEL

TOKENIZER = str(EMBEDDED_MODEL / "tokenizer")
ROOT = Path(__file__).resolve().parents[1]


def ortho(unet, slot: int, seed: int) -> OrthoLoRA:
    """An orthogonal LoRA on basis slot `slot` with random B."""
    adapter = OrthoLoRA.from_unet(unet, OrthoLoRAConfig(slot=slot))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for up in adapter.lora_B.values():
            up.weight.copy_(0.1 * torch.randn(up.weight.shape, generator=g))
    return adapter


def lora(unet, seed: int, **options) -> LoRA:
    adapter = LoRA.from_unet(unet, LoRAConfig(**options))
    perturb(adapter, seed)
    return adapter


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in base_parameters(unet)}


def unchanged(unet, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[name]) for name, p in base_parameters(unet))


@pytest.fixture
def unet():
    return build_unet("tiny-sd15")


@pytest.fixture
def three(unet) -> list[tuple[LoRA, float]]:
    """Two orthogonal LoRAs and a LoRA with alpha != rank on attention + feed-forward (layers the others lack)."""
    return [(ortho(unet, 0, seed=1), 0.6), (ortho(unet, 1, seed=2), 0.6),
            (lora(unet, 3, rank=2, alpha=4, target="attn_ff"), 0.5)]


def attached_output(unet, weighted, inputs) -> torch.Tensor:
    for adapter, weight in weighted:
        adapter.attach(unet)
        adapter.set_scale(weight)
    out = run(unet, inputs)
    for adapter, _ in weighted:
        adapter.detach()
        adapter.set_scale(1.0)
    return out


# -- merge_into -------------------------------------------------------------------------------------------


def test_merge_computes_the_attached_adapters_and_restores_bit_for_bit(unet, three):
    inputs = unet_inputs(unet, batch=2)
    base, before = run(unet, inputs), snapshot(unet)
    expected = attached_output(unet, three, inputs)
    merged = merge_into(unet, three)
    torch.testing.assert_close(run(unet, inputs), expected, atol=1e-5, rtol=0)
    assert merged.orthogonality is not None and merged.orthogonality.orthogonal
    # Subtracting the delta again would not give every weight back exactly: why the originals are kept.
    per_adapter = [(a.delta_weights(scale=1.0), w) for a, w in three]
    params = dict(base_parameters(unet))
    assert not all(torch.equal(params[n] - sum(w * d.get(n, 0) for d, w in per_adapter), before[n])
                   for n in merged.originals)
    merged.restore()
    assert unchanged(unet, before) and torch.equal(run(unet, inputs), base)
    merged.restore()  # a second restore does nothing
    assert unchanged(unet, before)


def test_merge_works_next_to_attached_peft_layers_as_a_context(unet, three):
    inputs = unet_inputs(unet)
    other = lora(unet, 9)  # attached: the merged weights sit inside peft wrappers
    other.attach(unet)
    before, with_other = snapshot(unet), run(unet, inputs)
    with merge_into(unet, three) as merged:
        assert merged.active and not torch.allclose(run(unet, inputs), with_other, atol=1e-4)
    assert not merged.active and unchanged(unet, before) and torch.equal(run(unet, inputs), with_other)


def test_default_weights_are_0_6_for_orthogonal_loras_and_1_for_others(unet, three):
    adapters = [adapter for adapter, _ in three]
    with merge_into(unet, adapters) as merged:
        assert [w for _, w in merged.weights] == [0.6, 0.6, 1.0]
    with merge_into(unet, [(adapters[0], None), (adapters[2], 2.0)]) as merged:
        assert [w for _, w in merged.weights] == [0.6, 2.0]


def test_orthogonal_loras_sharing_columns_merge_with_a_warning(unet):
    same, again = ortho(unet, 0, seed=1), ortho(unet, 0, seed=2)
    with pytest.warns(UserWarning, match=r"share basis directions at input width\(s\) \[32, 64\]"):
        merged = merge_into(unet, [same, again])
    merged.restore()
    assert merged.orthogonality.shared == [32, 64]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_into(unet, [same, ortho(unet, 1, seed=3)]).restore()


def _nan_lora(unet) -> LoRA:
    bad = lora(unet, 1)
    with torch.no_grad():
        next(iter(bad.lora_B.values())).weight[0, 0] = float("nan")
    return bad


def _overflowing_lora(unet) -> LoRA:
    """Finite factors whose product does not fit in fp32 (1e30 * 1e30 on one element)."""
    big = lora(unet, 1)
    with torch.no_grad():
        next(iter(big.lora_A.values())).weight[0, 0] = 1e30
        next(iter(big.lora_B.values())).weight[0, 0] = 1e30
    return big


@pytest.mark.parametrize("make, message", [
    (lambda unet: SCTuner.from_unet(unet), r"adapters\[1\] \(SC-Tuner\) is not a weight delta.* attach it instead"),
    (lambda unet: lora(build_unet("tiny-sdxl"), 1),
     r"adapters\[1\] \(LoRA\) was built for another base .* load the base model it was trained on"),
    (_nan_lora, r"adapters\[1\] \(LoRA\) has non-finite .* leave it out"),
    (_overflowing_lora, r"the weighted sum of the deltas overflows; nothing was merged: lower the weights"),
    (lambda unet: (lora(unet, 1), float("inf")), r"the weight of adapters\[1\] \(LoRA\) must be a finite number"),
])
def test_merge_refuses_before_changing_anything(unet, make, message):
    before = snapshot(unet)
    with pytest.raises(ValueError, match=message):
        merge_into(unet, [(ortho(unet, 0, seed=1), 0.6), make(unet)])
    assert unchanged(unet, before)


def test_merge_refuses_an_adapter_attached_to_the_unet(unet):
    attached = lora(unet, 1)
    attached.attach(unet)
    with pytest.raises(ValueError, match=r"adapters\[0\] \(LoRA\) is attached to this UNet.* detach\(\) it first"):
        merge_into(unet, [attached])


# -- fused_lora -------------------------------------------------------------------------------------------


def test_fused_lora_file_equals_the_merge_in_our_loader_and_in_diffusers(three, tmp_path):
    inputs = unet_inputs(build_unet("tiny-sd15"), batch=2)
    pipe = tiny_sd15_pipeline(TOKENIZER)  # its UNet is the `unet` fixture's (same layout, same seed)
    with merge_into(pipe.unet, three):
        merged = run(pipe.unet, inputs)

    fused = fused_lora(three)
    assert type(fused) is LoRA and fused.config.rank == fused.config.alpha == 4 + 4 + 2
    assert set(fused.paths.values()) == set(three[2][0].paths.values())  # the union: attention + feed-forward
    path = save_adapter(fused, tmp_path / "cat-dog-style.safetensors")

    ours = build_unet("tiny-sd15")
    load_adapter(path, ours)
    torch.testing.assert_close(run(ours, inputs), merged, atol=1e-5, rtol=0)
    with_diffusers = tiny_sd15_pipeline(TOKENIZER)
    with_diffusers.load_lora_weights(str(path))
    torch.testing.assert_close(run(with_diffusers.unet, inputs), merged, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # two adapters: intended
def test_diffusers_set_adapters_computes_the_same_merge(three, tmp_path):
    inputs = unet_inputs(build_unet("tiny-sd15"), batch=2)
    pipe = tiny_sd15_pipeline(TOKENIZER)
    with merge_into(pipe.unet, three):
        merged = run(pipe.unet, inputs)
    for i, (adapter, _) in enumerate(three):
        pipe.load_lora_weights(str(save_adapter(adapter, tmp_path / f"{i}.safetensors")), adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(three))], adapter_weights=[w for _, w in three])
    torch.testing.assert_close(run(pipe.unet, inputs), merged, atol=1e-5, rtol=0)


def test_a_sara_joins_the_fused_lora_by_svd_and_says_what_it_keeps(unet):
    first, sara = ortho(unet, 0, seed=1), SaRA.from_unet(unet, SaRAConfig(threshold=5e-3))
    perturb(sara)
    with pytest.warns(UserWarning, match=r"adapters\[1\] \(SaRA\) is not a LoRA: fused as a rank-64 SVD .* keeping"):
        fused = fused_lora([(first, 0.6), (sara, 0.5)], svd_rank=64)
    assert fused.config.rank == 4 + 64
    sara_deltas, ortho_deltas = sara.delta_weights(scale=1.0), first.delta_weights(scale=0.6)
    fused_deltas = fused.delta_weights()
    carried = [name for name in fused_deltas if name.endswith(("to_q.weight", "ff.net.2.weight", "conv1.weight"))]
    assert carried
    for name in carried:  # rank 64 holds these tiny layers exactly
        expected = 0.5 * sara_deltas[name] + ortho_deltas.get(name, 0)
        torch.testing.assert_close(fused_deltas[name], expected, atol=1e-5, rtol=0)


def test_fused_lora_refuses_mixed_bases_and_non_deltas(unet):
    with pytest.raises(ValueError, match=r"adapters\[1\] \(LoRA\) was built for another base"):
        fused_lora([lora(unet, 1), lora(build_unet("tiny-sdxl"), 2)])
    with pytest.raises(ValueError, match="is not a weight delta"):
        fused_lora([SCTuner.from_unet(unet)])


# -- why never peft's "linear" -----------------------------------------------------------------------------


def test_peft_linear_combination_adds_cross_terms_that_the_exact_merge_has_not(unet):
    """Two orthogonal LoRAs' factors on one layer, combined by peft's add_weighted_adapter: "linear" gives
    (Σ√(w_i s_i) B_i)(Σ√(w_j s_j) A_j) = the exact sum + the cross terms √(w_i s_i w_j s_j) B_i A_j (i != j), which
    feed concept j's read subspace to concept i's update; "cat" and merge_into give the exact sum."""
    cat, dog = ortho(unet, 0, seed=1), ortho(unet, 1, seed=2)
    key = next(k for k, path in cat.paths.items() if path.endswith("attn1.to_q"))
    path = cat.paths[key]
    (a1, b1), (a2, b2) = ((x.lora_A[key].weight.detach(), x.lora_B[key].weight.detach()) for x in (cat, dog))
    w = 0.6  # s = alpha / r = 1

    model = get_peft_model(nn.Sequential(nn.Linear(a1.shape[1], b1.shape[0])),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["0"]), adapter_name="cat")
    model.add_adapter("dog", LoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name, (a, b) in (("cat", (a1, b1)), ("dog", (a2, b2))):
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    model.add_weighted_adapter(["cat", "dog"], [w, w], "linear", combination_type="linear")
    model.add_weighted_adapter(["cat", "dog"], [w, w], "cat_ranks", combination_type="cat")
    linear, concatenated = layer.get_delta_weight("linear").detach(), layer.get_delta_weight("cat_ranks").detach()

    exact = w * (b1 @ a1 + b2 @ a2)
    cross = w * (b1 @ a2 + b2 @ a1)  # √(w·w) = w
    torch.testing.assert_close(linear, exact + cross, atol=1e-6, rtol=0)
    torch.testing.assert_close(concatenated, exact, atol=1e-6, rtol=0)
    assert cross.norm() > 0.5 * exact.norm()  # not a rounding matter

    # Orthogonality's guarantee: an input cat reads (x in A_cat's row space) meets only cat's update...
    x = a1.T @ torch.randn(a1.shape[0], 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exact @ x, w * b1 @ a1 @ x, atol=1e-6, rtol=0)
    # ...which "linear" voids: dog's output map B_dog acts on cat's input.
    assert (linear @ x - exact @ x).norm() > 0.1 * (exact @ x).norm()
    # merge_into adds the exact sum.
    original = dict(base_parameters(unet))[f"{path}.weight"].detach().clone()
    with merge_into(unet, [(cat, w), (dog, w)]):
        torch.testing.assert_close(dict(base_parameters(unet))[f"{path}.weight"] - original, exact, atol=1e-6, rtol=0)


def test_the_studio_never_combines_adapters_with_peft_linear():
    calls = []
    for folder in ("adapters", "pipelines", "studio", "bench"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text(encoding="utf-8")
            calls += [(source, m.group(0)) for m in re.finditer(r"add_weighted_adapter\((?:[^()]|\([^()]*\))*\)", text)]
    assert not [call for call in calls if "linear" in call[1] or "combination_type" not in call[1]], calls
