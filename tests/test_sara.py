"""SaRA (adapters/sara.py): selection, the sparse injection's gradients, re-selection, files and resume.

Everything runs on the tiny SD 1.5 layout (selection and attach/detach also on tiny SDXL) with random
weights, in seconds.
The nuclear-norm tests lower `rank_min_dim` because the tiny layout has one 2-D weight wider than 64.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from torch.nn.utils import parametrize

from adapters import SaRA, SaRAConfig, load_adapter, read_metadata, save_adapter
from adapters.sara import (
    SELECTION_RULE,
    auto_learning_rate,
    count_selected,
    naive_masked_parameters,
    small_entries,
)
from pipelines.architectures import build_unet, unet_inputs

THETA = 2e-3


def frozen_unet(layout: str = "tiny-sd15"):
    unet = build_unet(layout)
    unet.requires_grad_(False)  # the training loop freezes the UNet before attaching
    return unet


def attached(unet, **config) -> SaRA:
    adapter = SaRA.from_unet(unet, SaRAConfig(**config))
    adapter.attach(unet)
    return adapter


def loss_of(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample.square().mean()


def run(unet, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def perturb(adapter: SaRA, seed: int = 0, size: float = 1e-3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(size * torch.randn(p.shape, generator=g))


def bare_names(unet) -> dict[str, torch.Tensor]:
    """The UNet's stored tensors under the bare model's names (parametrize stores `x.weight` as
    `x.parametrizations.weight.original`)."""
    return {name.replace(".parametrizations.", ".").removesuffix(".original"): p for name, p in unet.named_parameters()}


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in bare_names(unet).items()}


def train(unet, adapter: SaRA, optimizer, steps: range, total: int) -> torch.Tensor:
    for step in steps:
        loss = loss_of(unet, unet_inputs(unet, batch=2, seed=step))
        regularization = adapter.regularization_loss()
        if regularization is not None:
            loss = loss + regularization
        loss.backward()  # `loss` stays alive into the next step, as in a real loop
        torch.nn.utils.clip_grad_norm_(adapter.trainable_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adapter.on_step_end(step, total, optimizer)
    return loss


# -- selection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tiny-sd15", "tiny-sdxl"])
def test_selection_is_the_global_threshold_over_every_tensor(layout):
    unet = frozen_unet(layout)
    adapter = SaRA.from_unet(unet, SaRAConfig(threshold=THETA))
    expected = {name: int((p.abs() < THETA).sum()) for name, p in unet.named_parameters()}
    assert adapter.num_selected == adapter.num_trainable == sum(expected.values()) > 0
    assert {t.name: t.num_selected for t in adapter.targets.values()} == {k: v for k, v in expected.items() if v}
    names = {t.name for t in adapter.targets.values()}
    assert {"time_embedding.linear_1.weight", "conv_in.bias"} <= names, "time MLP and biases are included"
    assert any(".norm" in n for n in names), "norm affines are included (random init: zero biases)"
    assert all(t.idx.dtype == torch.int32 for t in adapter.targets.values())
    assert all(bool((t.idx[1:] > t.idx[:-1]).all()) for t in adapter.targets.values()), "sorted flat indices"
    # The Train tab's presets count without building an adapter, and agree with one.
    counts = count_selected(unet, [THETA / 10, THETA])
    assert counts[THETA] == adapter.num_selected and counts[THETA / 10] < counts[THETA]


# -- training: the sparse injection -----------------------------------------------------------------


def test_training_changes_only_selected_entries_and_keeps_no_dense_state():
    unet = frozen_unet()
    before = snapshot(unet)
    masks = {name: small_entries(w, THETA) for name, w in before.items()}
    adapter = attached(unet, rank_min_dim=16, reselect_at=None)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3, weight_decay=1e-2)
    train(unet, adapter, optimizer, range(3), 3)

    after = snapshot(unet)
    for name, w in after.items():
        assert torch.equal(w[~masks[name]], before[name][~masks[name]]), f"{name}: an unselected entry moved"
    # Not all: at 1x1 resolution (the deepest tiny blocks) only the centre tap of a 3x3 conv gets gradient.
    assert sum(int((after[n] != before[n]).sum()) for n in after) > 0.6 * adapter.num_selected
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters()), "no dense .grad on W"
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert held == adapter.trainable_parameters() == list(adapter.parameters())
    assert all(p.ndim == 1 for p in held) and sum(p.numel() for p in held) == adapter.num_selected
    assert all(s["exp_avg"].shape == p.shape for p, s in optimizer.state.items()), "moments only for the values"


def test_gradients_equal_the_masked_dense_gradient():
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch=2)
    adapter = attached(unet, rank_weight=0.0)
    perturb(adapter)
    loss = loss_of(unet, inputs)
    loss.backward()

    dense = build_unet("tiny-sd15")  # the same base, every weight trainable, set to P0 + ΔP
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for t in adapter.targets.values():
            params[t.name].view(-1)[t.idx.long()] += t.delta
    dense_loss = loss_of(dense, inputs)
    assert torch.equal(dense_loss, loss)
    dense_loss.backward()
    for t in adapter.targets.values():
        torch.testing.assert_close(t.delta.grad, params[t.name].grad.view(-1)[t.idx.long()], rtol=1e-5, atol=1e-9)


def test_nuclear_norm_gradient_reaches_the_values():
    unet = frozen_unet()
    adapter = attached(unet, rank_weight=0.5, rank_min_dim=16)
    perturb(adapter)
    regularization = adapter.regularization_loss()
    regularization.backward()
    hit = [t for t in adapter.targets.values() if t.delta.grad is not None]
    assert len(hit) == 1 and len(hit[0].shape) == 2 and min(hit[0].shape) > 16, "one eligible 2-D weight"
    t = hit[0]
    dense = torch.zeros(math.prod(t.shape))
    dense[t.idx.long()] = t.base.float() + t.delta.detach()  # P ⊙ M: current values, not ΔP
    dense = dense.view(t.shape).requires_grad_()
    expected = 0.5 * torch.linalg.matrix_norm(dense, ord="nuc")
    expected.backward()
    torch.testing.assert_close(regularization, expected)
    torch.testing.assert_close(t.delta.grad, dense.grad.view(-1)[t.idx.long()])
    assert t.delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters()), "nothing leaks into a dense .grad (reference defect 1)"

    assert attached(frozen_unet(), rank_weight=0.0).regularization_loss() is None
    assert attached(frozen_unet(), rank_min_dim=10_000).regularization_loss() is None, "no eligible layer"


def test_gradient_accumulation_checkpointing_and_repeated_backward_match_one_batch():
    unet = frozen_unet()
    adapter = attached(unet, rank_weight=0.0)
    perturb(adapter)
    inputs = unet_inputs(unet, batch=2)
    loss_of(unet, inputs).backward()

    full = torch.cat([p.grad for p in adapter.trainable_parameters()])
    atol = 1e-4 * full.abs().max().item()  # fp32 sums in another order

    adapter.zero_grad(set_to_none=True)
    for row in range(2):  # two half-batches before one step
        half = {k: v[row:row + 1] if v.ndim else v for k, v in inputs.items()}
        (loss_of(unet, half) / 2).backward()
    torch.testing.assert_close(torch.cat([p.grad for p in adapter.trainable_parameters()]), full, rtol=1e-4, atol=atol)

    adapter.zero_grad(set_to_none=True)
    unet.enable_gradient_checkpointing()  # the blocks' forwards run again in backward: no second write of W
    unet.train()
    loss = loss_of(unet, inputs)
    loss.backward(retain_graph=True)
    loss.backward()  # a second backward through the same graph doubles the gradient
    torch.testing.assert_close(torch.cat([p.grad for p in adapter.trainable_parameters()]), 2 * full, rtol=1e-4,
                               atol=2 * atol)


def test_clip_grad_norm_acts_on_the_values():
    unet = frozen_unet()
    adapter = attached(unet)
    loss_of(unet, unet_inputs(unet, batch=2)).backward()
    params = adapter.trainable_parameters()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1e-4)
    assert norm > 1e-4
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    torch.testing.assert_close(clipped, torch.tensor(1e-4), rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", ["gather", "reference"])
def test_reselection_shrinks_the_set_and_migrates_adam_state(mode):
    unet = frozen_unet()
    adapter = attached(unet, rank_weight=0.0, reselect_at=0.5, reselect_mode=mode)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-3, weight_decay=1e-2)
    train(unet, adapter, optimizer, range(2), 6)  # T_p = 3: not yet
    assert adapter.reselected_at is None
    before = adapter.num_trainable

    loss = train(unet, adapter, optimizer, range(2, 3), 6)  # the third step ends with the re-selection
    assert adapter.reselected_at == 2
    assert adapter.num_selected == before and 0 < adapter.num_trainable < before
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert held == adapter.trainable_parameters(), "the new, smaller parameters replaced the old ones"
    weights = bare_names(unet)
    for t in adapter.targets.values():
        keep = (t.base.float() + t.delta.detach()).abs() < THETA
        assert keep.all(), "M2 = M1 ∧ |P| < θ"
        w = weights[t.name].detach().view(-1)
        assert torch.equal(w[t.frozen_idx.long()], (t.frozen_base.float() + t.frozen_delta).to(w.dtype))
        state = optimizer.state.get(t.delta)
        if mode == "reference":
            assert not state, "fresh moments"
        else:  # the exact values: test_gather_keeps_each_surviving_entrys_moments
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == t.delta.shape
            assert int(state["step"]) == 3
    frozen = {t.name: weights[t.name].detach().view(-1)[t.frozen_idx.long()].clone() for t in adapter.targets.values()}
    train(unet, adapter, optimizer, range(3, 4), 6)  # trains on M2 while the last step's `loss` is alive
    assert loss.grad_fn is not None
    for t in adapter.targets.values():
        assert torch.equal(weights[t.name].detach().view(-1)[t.frozen_idx.long()], frozen[t.name]), "M1 \\ M2 frozen"


def test_gather_keeps_each_surviving_entrys_moments():
    unet = frozen_unet()
    adapter = attached(unet, rank_weight=0.0, reselect_at=None)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-3)
    train(unet, adapter, optimizer, range(2), 2)
    old = {t.name: (t.delta, {k: v.clone() for k, v in optimizer.state[t.delta].items()},
                    (t.base.float() + t.delta.detach()).abs() < THETA) for t in adapter.targets.values()}
    adapter.reselect(optimizer, step=1)
    for t in adapter.targets.values():
        param, state, keep = old[t.name]
        assert t.delta is not param and param not in optimizer.state
        assert torch.equal(t.delta.detach(), param.detach()[keep])
        if t.delta.numel():
            new = optimizer.state[t.delta]
            assert torch.equal(new["exp_avg"], state["exp_avg"][keep])
            assert torch.equal(new["exp_avg_sq"], state["exp_avg_sq"][keep])
            assert torch.equal(new["step"], state["step"])
    with pytest.raises(ValueError, match="does not hold this SaRA adapter's parameters"):
        adapter.reselect(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), step=1)


# -- inference: attach, scale, merge ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tiny-sd15", "tiny-sdxl"])
def test_attach_detach_restores_the_unet_bit_for_bit(layout):
    unet = build_unet(layout)
    inputs = unet_inputs(unet, batch=2)
    base = run(unet, inputs)
    params = dict(unet.named_parameters())
    weights = {name: p.detach().clone() for name, p in params.items()}
    classes = {name: type(m) for name, m in unet.named_modules()}
    adapter = attached(unet)
    assert torch.equal(run(unet, inputs), base), "ΔP = 0 at init"
    perturb(adapter)
    assert not torch.equal(run(unet, inputs), base)
    adapter.detach()
    assert dict(unet.named_parameters()) == params, "the original Parameter objects, under their names"
    assert all(torch.equal(p, weights[name]) for name, p in unet.named_parameters())
    assert {name: type(m) for name, m in unet.named_modules()} == classes
    assert not any(parametrize.is_parametrized(m) for m in unet.modules())
    assert torch.equal(run(unet, inputs), base)


def test_scale():
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch=2)
    base = run(unet, inputs)
    adapter = attached(unet)
    perturb(adapter)
    tuned = run(unet, inputs)
    adapter.set_scale(0.0)
    assert torch.equal(run(unet, inputs), base)
    adapter.set_scale(0.5)
    half = run(unet, inputs)
    assert not torch.equal(half, base) and not torch.equal(half, tuned)
    adapter.set_scale(1.0)
    assert torch.equal(run(unet, inputs), tuned)


def test_merge_and_unmerge_are_exact():
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch=2)
    base_weights = {name: p.clone() for name, p in unet.named_parameters()}
    adapter = attached(unet)
    perturb(adapter)
    adapter.set_scale(0.7)
    tuned, injected = run(unet, inputs), snapshot(unet)
    adapter.merge()
    assert not any(parametrize.is_parametrized(m) for m in unet.modules()), "plain names for export"
    assert set(dict(unet.named_parameters())) == set(base_weights)
    assert torch.equal(run(unet, inputs), tuned)
    with pytest.raises(RuntimeError, match="unmerge"):
        adapter.set_scale(1.0)
    with pytest.raises(RuntimeError, match="already merged"):
        adapter.merge()
    adapter.unmerge()
    assert all(torch.equal(w, injected[name]) for name, w in snapshot(unet).items())
    assert torch.equal(run(unet, inputs), tuned)
    adapter.merge()
    adapter.detach()  # from the merged state too
    assert all(torch.equal(p, base_weights[name]) for name, p in unet.named_parameters())


# -- files ------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_refusal_of_another_base(tmp_path):
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch=2)
    adapter = attached(unet, reselect_at=0.5)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-3)
    train(unet, adapter, optimizer, range(2), 2)  # re-selected: the file keeps M1 and the trainable mask
    tuned = run(unet, inputs)
    path = save_adapter(adapter, tmp_path / "style.safetensors")
    meta = read_metadata(path)
    assert meta["studio.method"] == "sara" and meta["studio.sara.selection_rule"] == SELECTION_RULE
    assert int(meta["studio.sara.num_selected"]) == adapter.num_selected
    assert int(meta["studio.sara.num_trainable"]) == adapter.num_trainable < adapter.num_selected

    fresh = frozen_unet()
    loaded = load_adapter(path, fresh)
    assert torch.equal(run(fresh, inputs), tuned)
    assert loaded.num_selected == adapter.num_selected and loaded.num_trainable == adapter.num_trainable
    tensors = loaded.tensors()
    for key, value in adapter.tensors().items():
        assert torch.equal(tensors[key], value), key
    loaded.detach()

    half = frozen_unet().to(torch.bfloat16)  # the same base cast to bf16: accepted (its own checksum)
    load_adapter(path, half).detach()

    other = frozen_unet()
    target = next(iter(adapter.targets.values()))
    weight = dict(other.named_parameters())[target.name]
    with torch.no_grad():
        weight.view(-1)[int(target.selection()[0][0])] += 1e-6  # one base value at a stored index differs
    untouched = {name: p.clone() for name, p in other.named_parameters()}
    with pytest.raises(ValueError, match="trained on other base weights.*checksum"):
        load_adapter(path, other)
    assert not any(parametrize.is_parametrized(m) for m in other.modules())
    assert all(torch.equal(p, untouched[name]) for name, p in other.named_parameters())

    with pytest.raises(ValueError, match="not a SaRA adapter file"):
        SaRA(SaRAConfig()).load_tensors({"unet.x.lora_A.weight": torch.zeros(1)})
    broken = adapter.tensors()
    del broken["sara.generator_state"]
    with pytest.raises(ValueError, match="missing \\['sara.generator_state'\\]"):
        SaRA(SaRAConfig()).load_tensors(broken)


@pytest.mark.parametrize("resume_at, into", [(1, "fresh"), (3, "attached")])
def test_resume_reproduces_an_uninterrupted_run(resume_at, into):
    """Adapter tensors + optimizer state saved after `resume_at` steps, rebuilt, continued to 4 steps (re-selection
    after step 2, nuclear norm on random layers): bit-identical to 4 steps in one go. "fresh": from the file alone
    (from_shapes); "attached": the training loop's order (adapter from the UNet, attached, optimizer built, then the
    checkpoint loaded into both, across the re-selection)."""
    config = dict(rank_weight=1e-2, rank_min_dim=16, reselect_at=0.5, seed=3)
    steps = 4

    def start():
        unet = frozen_unet()
        adapter = attached(unet, **config)
        return unet, adapter, torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-3, weight_decay=1e-2)

    unet, adapter, optimizer = start()
    train(unet, adapter, optimizer, range(steps), steps)
    expected = adapter.tensors()

    unet, adapter, optimizer = start()
    train(unet, adapter, optimizer, range(resume_at), steps)
    saved_tensors = {k: v.clone() for k, v in adapter.tensors().items()}
    saved_optimizer = optimizer.state_dict()
    del unet, adapter, optimizer

    if into == "fresh":
        unet = frozen_unet()
        adapter = SaRA.from_shapes(SaRAConfig(**config), {k: tuple(v.shape) for k, v in saved_tensors.items()})
        adapter.load_tensors(saved_tensors)
        adapter.attach(unet)
        optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-3, weight_decay=1e-2)
    else:
        unet, adapter, optimizer = start()
        adapter.load_tensors(saved_tensors)
    optimizer.load_state_dict(saved_optimizer)
    train(unet, adapter, optimizer, range(resume_at, steps), steps)
    resumed = adapter.tensors()
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


# -- LoRA export --------------------------------------------------------------------------------------


def test_lora_export_reproduces_the_delta_at_full_rank():
    unet = frozen_unet()
    adapter = attached(unet)
    perturb(adapter)
    full = max(min(t.shape[0], math.prod(t.shape[1:])) for t in adapter.targets.values() if len(t.shape) > 1)
    export = adapter.export_lora(full)
    assert export.energy_kept == pytest.approx(1.0, abs=1e-6)
    assert export.dropped_entries == sum(t.num_selected for t in adapter.targets.values() if len(t.shape) == 1)
    for t in adapter.targets.values():
        if len(t.shape) == 1:
            continue
        module = t.name.removesuffix(".weight")
        lora_a, lora_b = export.tensors[f"unet.{module}.lora_A.weight"], export.tensors[f"unet.{module}.lora_B.weight"]
        assert lora_a.shape == (full, *t.shape[1:]) and lora_b.shape[:2] == (t.shape[0], full)
        delta = (lora_b.flatten(1) @ lora_a.flatten(1)).view(t.shape)
        torch.testing.assert_close(delta, t.delta_weight(), rtol=0, atol=1e-7)
    low = adapter.export_lora(2)
    assert 0 < low.energy_kept < 1
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        adapter.export_lora(0)


def test_exported_lora_gives_the_same_unet_output_in_peft():
    """Output-level round trip: with ΔP only on Linear/Conv weights, peft's LoRA (lora_alpha = r) equals SaRA."""
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch=2)
    adapter = attached(unet)
    perturb(adapter)
    with torch.no_grad():
        for t in adapter.targets.values():
            if len(t.shape) == 1:
                t.delta.zero_()
    tuned = run(unet, inputs)
    export = adapter.export_lora(128)
    adapter.detach()
    modules = sorted({key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in export.tensors})
    inject_adapter_in_model(LoraConfig(r=128, lora_alpha=128, target_modules=modules), unet)
    set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in export.tensors.items()})
    torch.testing.assert_close(run(unet, inputs), tuned, rtol=0, atol=1e-5)


# -- configuration, learning rate, bench baseline ---------------------------------------------------


def test_auto_learning_rate():
    for theta, lr in ((2e-4, 9.3e-4), (8e-4, 7.6e-4), (2e-3, 5.0e-4)):
        assert auto_learning_rate(theta) == pytest.approx(lr, abs=0.05e-4)
    assert SaRA.default_learning_rate(SaRAConfig(threshold=8e-4)) == auto_learning_rate(8e-4)


@pytest.mark.parametrize("field, value", [
    ("threshold", 0.0), ("threshold", float("nan")), ("reselect_at", 1.0), ("reselect_at", 0),
    ("reselect_mode", "dense"), ("rank_weight", -1.0), ("rank_min_dim", 1.5), ("min_selected", -1), ("seed", True),
])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=f"SaRAConfig.{field} must"):
        SaRAConfig(**{field: value})


def test_naive_masked_baseline_trains_the_same_entries_densely():
    unet = frozen_unet()
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    params, handles = naive_masked_parameters(unet, THETA)
    assert sum(int(small_entries(p, THETA).sum()) for p in params) == SaRA.from_unet(unet).num_selected
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    loss_of(unet, unet_inputs(unet, batch=2)).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params), "dense gradients"
    optimizer.step()
    for name, p in unet.named_parameters():
        mask = small_entries(before[name], THETA)
        assert torch.equal(p.detach()[~mask], before[name][~mask])
    for handle in handles:
        handle.remove()
