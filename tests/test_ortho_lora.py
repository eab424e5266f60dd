"""Orthogonal LoRA (adapters/ortho_lora.py): exactly orthogonal slots, a reproducible basis, only B trains, the slot
registry under concurrency, capacity, files (ours and diffusers'), and training through pipelines.train."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
import threading
from pathlib import Path

import pytest
import torch
from adapter_helpers import run
from safetensors.torch import load_file

from adapters import LoRA, OrthoLoRA, OrthoLoRAConfig, load_adapter, read_metadata, save_adapter
from adapters import ortho_lora as ortho_module
from adapters.ortho_lora import SlotRegistry, basis_checksum, check_orthogonal, orthogonal_basis
from pipelines.architectures import build_unet, tiny_sd15_pipeline, unet_inputs
from pipelines.loading import EMBEDDED_MODEL
from pipelines.train import TrainConfig, train
from studio.shapes.world import Scene, ShapeObject, render

TOKENIZER = str(EMBEDDED_MODEL / "tokenizer")


def ortho(unet, slot: int, **options) -> OrthoLoRA:
    return OrthoLoRA.from_unet(unet, OrthoLoRAConfig(slot=slot, **options))


def randomize_up(adapter: LoRA, seed: int = 0) -> None:
    """Give every B random values (A stays the basis columns)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for up in adapter.lora_B.values():
            up.weight.copy_(0.1 * torch.randn(up.weight.shape, generator=g))


@pytest.fixture
def unet():
    return build_unet("tiny-sd15")


# -- the basis and the slots ----------------------------------------------------------------------


def test_two_slots_are_exactly_orthogonal_and_so_are_their_deltas(unet):
    first, second = ortho(unet, 0), ortho(unet, 1)
    for key in first.paths:
        a0, a1 = first.lora_A[key].weight.double(), second.lora_A[key].weight.double()
        assert (a0 @ a1.T).abs().max() < 1e-6
        torch.testing.assert_close(a0 @ a0.T, torch.eye(a0.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    randomize_up(first, seed=1)
    randomize_up(second, seed=2)
    d0, d1 = first.delta_weights(), second.delta_weights()
    for name in d0:
        cross = d0[name].double() @ d1[name].double().T  # ΔW_i ΔW_jᵀ = B_i A_i A_jᵀ B_jᵀ = 0
        assert cross.abs().max() < 1e-6 * d0[name].norm() * d1[name].norm()
    assert check_orthogonal([first, second]).orthogonal


def test_the_same_seed_rebuilds_the_same_basis_and_checksum(unet):
    before = ortho(unet, 3)
    ortho_module._cached_basis.cache_clear()  # rebuild from scratch, not from the cache
    again = ortho(build_unet("tiny-sd15"), 3)
    assert all(torch.equal(before.lora_A[k].weight, again.lora_A[k].weight) for k in before.paths)
    assert before.widths == again.widths
    basis = orthogonal_basis(64, seed=0)
    torch.testing.assert_close(basis.T @ basis, torch.eye(64, dtype=torch.float64), atol=1e-12, rtol=0)
    # The checksum ignores last-bit differences (another LAPACK build) but not another seed.
    assert basis_checksum(basis + 1e-15) == basis_checksum(basis) == before.widths[64].checksum
    assert basis_checksum(orthogonal_basis(64, seed=1)) != basis_checksum(basis)
    other_seed = ortho(unet, 3, seed=1)
    assert other_seed.widths[64].checksum != before.widths[64].checksum


def test_past_capacity_a_width_falls_back_to_random_columns_and_is_recorded_partial(unet):
    """Rank 4 on the tiny layout: width 32 holds 8 slots, width 64 holds 16; slot 8 is past 32's capacity."""
    first, late = ortho(unet, 0), ortho(unet, 8)
    assert {n: (b.capacity, b.partial) for n, b in late.widths.items()} == {32: (8, True), 64: (16, False)}
    assert not any(b.partial for b in first.widths.values())
    report = check_orthogonal([first, late])
    assert report.overlap[64] < 1e-6  # still its own block at width 64
    for key in late.paths:  # random columns of O_32 are still orthonormal rows
        a = late.lora_A[key].weight.double()
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    header = json.loads(late.header_metadata()["studio.ortho"])
    assert header["widths"]["32"]["partial"] and not header["widths"]["64"]["partial"]


def test_random_columns_are_recorded_partial(unet):
    adapter = OrthoLoRA.from_unet(unet, OrthoLoRAConfig(columns="random", slot=5))
    assert all(b.partial for b in adapter.widths.values())
    assert OrthoLoRA.from_unet(unet, OrthoLoRAConfig(columns="random")).widths  # blank slot: the draw of slot 0


# -- training: only B ---------------------------------------------------------------------------------


def test_only_B_gets_gradients_and_is_trainable(unet):
    unet.requires_grad_(False)
    adapter = ortho(unet, 0)
    other = LoRA.from_unet(unet)  # another LoRA in the same peft layers: peft's set_adapter must not unfreeze A
    other.attach(unet)
    adapter.attach(unet)
    downs = [a.weight for a in adapter.lora_A.values()]
    ups = [b.weight for b in adapter.lora_B.values()]
    assert [id(p) for p in adapter.trainable_parameters()] == [id(p) for p in ups]
    assert [id(p) for p in adapter.frozen_parameters()] == [id(p) for p in downs]
    assert not any(p.requires_grad for p in downs)
    unet(**unet_inputs(unet)).sample.square().mean().backward()
    assert all(p.grad is None for p in downs) and all(p.grad is not None for p in ups)
    other.detach()
    adapter.detach()
    assert not any(p.requires_grad for p in downs)


# -- the slot registry ----------------------------------------------------------------------------------


def test_registry_gives_each_owner_its_own_slot_and_the_same_one_again(tmp_path):
    registry = SlotRegistry(tmp_path)
    assert registry.claim(0, "cat") == 0 and registry.claim(0, "dog") == 1
    assert registry.claim(0, "cat") == 0  # idempotent per owner: a resumed run keeps its slot
    assert registry.claim(7, "dog") == 0  # each basis seed has its own slots
    assert registry.claims(0) == {0: "cat", 1: "dog"} and registry.claims(7) == {0: "dog"}
    assert sorted(p.name for p in (tmp_path / ".ortho-slots" / "seed-0").iterdir()) == ["slot-0.json", "slot-1.json"]


def test_concurrent_claims_in_threads_never_share_a_slot(tmp_path):
    registry = SlotRegistry(tmp_path)
    owners = [f"owner-{i}" for i in range(8)] + ["same"] * 4  # 8 concepts, and one run claiming 4 times at once
    barrier = threading.Barrier(len(owners))
    got: list[tuple[str, int]] = []

    def claim(owner: str) -> None:
        barrier.wait()
        got.append((owner, registry.claim(0, owner)))

    threads = [threading.Thread(target=claim, args=(owner,)) for owner in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots = {owner: {slot for who, slot in got if who == owner} for owner in set(owners)}
    assert all(len(s) == 1 for s in slots.values()), "one owner, one slot"
    assert sorted(s.pop() for s in slots.values()) == list(range(9)), "distinct owners, distinct slots"
    assert sorted(registry.claims(0)) == list(range(9))


def _claim_in_process(root: Path, owner: str, barrier, results) -> None:
    barrier.wait()
    results.put((owner, SlotRegistry(root).claim(0, owner)))


def test_concurrent_claims_in_processes_never_share_a_slot(tmp_path):
    context = multiprocessing.get_context("fork")  # the children only touch files
    owners = [f"owner-{i}" for i in range(6)]
    barrier, results = context.Barrier(len(owners)), context.Queue()
    processes = [context.Process(target=_claim_in_process, args=(tmp_path, owner, barrier, results))
                 for owner in owners]
    for p in processes:
        p.start()
    got = dict(results.get(timeout=60) for _ in owners)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(got.values()) == list(range(len(owners)))
    assert SlotRegistry(tmp_path).claims(0) == {slot: owner for owner, slot in got.items()}


def test_config_for_run_claims_only_a_blank_slot(tmp_path):
    blank = OrthoLoRAConfig()
    assert OrthoLoRA.config_for_run(blank, owner="cat", library=tmp_path).slot == 0
    assert OrthoLoRA.config_for_run(blank, owner="dog", library=tmp_path).slot == 1
    assert OrthoLoRA.config_for_run(blank, owner="cat", library=tmp_path).slot == 0
    for given in (OrthoLoRAConfig(slot=5), OrthoLoRAConfig(columns="random")):
        assert OrthoLoRA.config_for_run(given, owner="eel", library=tmp_path) == given
    assert SlotRegistry(tmp_path).claims(0) == {0: "cat", 1: "dog"}


# -- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"target": "attn_conv"}, "target must be one of .*Linear layers.*plain LoRA"),
    ({"columns": "gaussian"}, "columns must be one of"),
    ({"slot": -1}, "slot must be an integer >= 0"),
    ({"seed": 1.5}, "seed must be an integer >= 0"),
    ({"rank": 0}, "rank must be an integer >= 1"),
])
def test_config_refuses_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        OrthoLoRAConfig(**options)


def test_defaults_and_refusals_when_building(unet):
    config = OrthoLoRAConfig()
    assert (config.rank, config.alpha, config.target, config.columns, config.slot) == (4, 4, "attn", "slot", None)
    with pytest.raises(ValueError, match=r"slot is blank: training claims one .* SlotRegistry"):
        OrthoLoRA.from_unet(unet)
    with pytest.raises(ValueError, match="rank 40 exceeds the input width 32"):
        ortho(unet, 0, rank=40)


# -- files ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_needs_no_basis(unet, tmp_path, monkeypatch):
    inputs = unet_inputs(unet, batch=2)
    adapter = ortho(unet, 2, seed=5)
    randomize_up(adapter)
    adapter.attach(unet)
    tuned = run(unet, inputs)
    path = save_adapter(adapter, tmp_path / "cat.safetensors")

    meta = read_metadata(path)
    header = json.loads(meta["studio.ortho"])
    assert {k: header[k] for k in ("seed", "columns", "slot", "rank")} == {"seed": 5, "columns": "slot", "slot": 2,
                                                                            "rank": 4}
    assert header["widths"] == {str(n): dataclasses.asdict(b) for n, b in adapter.widths.items()}

    def no_basis(*args):
        raise AssertionError("loading must not build a basis")

    monkeypatch.setattr(ortho_module, "_cached_basis", no_basis)
    fresh = build_unet("tiny-sd15")
    loaded = load_adapter(path, fresh)
    assert isinstance(loaded, OrthoLoRA) and loaded.config == adapter.config and loaded.widths == adapter.widths
    assert torch.equal(run(fresh, inputs), tuned)
    assert not any(p.requires_grad for p in loaded.frozen_parameters())


def test_the_file_is_a_plain_lora_file_for_diffusers(tmp_path):
    pipe = tiny_sd15_pipeline(TOKENIZER)
    inputs = unet_inputs(pipe.unet, batch=2)
    adapter = ortho(pipe.unet, 1, rank=2)
    randomize_up(adapter)
    adapter.attach(pipe.unet)
    ours = run(pipe.unet, inputs)
    path = save_adapter(adapter, tmp_path / "cat.safetensors")

    keys = load_file(path).keys()
    assert keys and all(re.fullmatch(r"unet\..+\.lora_[AB]\.weight", k) for k in keys)
    assert "lora_adapter_metadata" in read_metadata(path)
    with_diffusers = tiny_sd15_pipeline(TOKENIZER)
    with_diffusers.load_lora_weights(str(path))
    torch.testing.assert_close(run(with_diffusers.unet, inputs), ours, atol=1e-5, rtol=0)


# -- training through pipelines.train -------------------------------------------------------------------------


def write_images(folder: Path, colors: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    for color in colors:
        render(Scene((ShapeObject(color, "star"),))).save(folder / f"{color}.png")
    return folder


def test_training_keeps_A_trains_B_and_claims_a_slot_per_concept(tmp_path):
    library = tmp_path / "library"
    settings = dict(method="ortho_lora", trigger="sks", steps=2, learning_rate=1e-2, checkpoint_every=2,
                    library_dir=library)
    cat = TrainConfig(data_dir=write_images(tmp_path / "cat", ("red", "blue")), output_dir=tmp_path / "cat-run",
                      **settings)
    pipe = tiny_sd15_pipeline(TOKENIZER)
    result = train(pipe, cat)

    trained = load_adapter(result.adapter_path)
    assert trained.config.slot == 0
    built = ortho(pipe.unet, 0)  # what slot 0 on seed 0 gives
    assert all(torch.equal(trained.lora_A[k].weight, built.lora_A[k].weight) for k in built.paths), "A unchanged"
    assert any(up.weight.abs().max() > 0 for up in trained.lora_B.values()), "B trained"
    assert "library_dir" not in json.loads(read_metadata(result.adapter_path)["studio.training"])
    assert list(SlotRegistry(library).claims(0)) == [0]

    resumed = train(pipe, dataclasses.replace(cat, steps=3, resume="latest"))  # the same run: the same slot
    assert resumed.step == 3 and load_adapter(resumed.adapter_path).config.slot == 0
    assert list(SlotRegistry(library).claims(0)) == [0]

    dog = dataclasses.replace(cat, data_dir=write_images(tmp_path / "dog", ("green",)), output_dir=tmp_path / "dog-run")
    other = load_adapter(train(pipe, dog).adapter_path)
    assert other.config.slot == 1 and list(SlotRegistry(library).claims(0)) == [0, 1]
    assert check_orthogonal([trained, other]).orthogonal
