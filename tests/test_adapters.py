"""The adapter contract matrix (in the spirit of peft's tests/test_custom_models.py).

Every row of CASES runs on the tiny SD 1.5 and SDXL layouts (real block structure, shrunk channels)
through the same contracts: attach/detach identity, zero-init identity, scale, a scale per batch row,
gradients (only the declared trainable weights), weight deltas, merge, save/load round trip and base-model
checks. A new method adds a row.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from adapter_helpers import perturb, run
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from adapters import (
    REGISTRY,
    CallContext,
    CSCTunerConfig,
    LoRA,
    LoRAConfig,
    SaRAConfig,
    SCTuner,
    SCTunerConfig,
    SPMConfig,
    call_context,
    current_context,
    fuse_deltas,
    load_adapter,
    lora_from_deltas,
    read_metadata,
    save_adapter,
)
from adapters.base import FORMAT_VERSION, base_parameters
from adapters.skips import long_skips
from pipelines.architectures import build_unet, count_parameters, tiny_sd15_pipeline, unet_inputs

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "shapes-sd" / "tokenizer"
OTHER_LAYOUT = {"tiny-sd15": "tiny-sdxl", "tiny-sdxl": "tiny-sd15"}


@dataclass(frozen=True)
class Case:
    method: str
    config: Any
    mergeable: bool
    hint: bool = False  # CSC-Tuners run only with a control image (the call context's hints)
    row_scales: bool = True  # a scale per batch row

    @property
    def id(self) -> str:
        target = getattr(self.config, "target", "attn")
        return self.method if target == "attn" else f"{self.method}-{target}"


CASES = [
    Case("sc_tuner", SCTunerConfig(), mergeable=False),
    Case("lora", LoRAConfig(rank=4, alpha=8), mergeable=True),  # alpha != rank: a lost alpha shows
    Case("lora", LoRAConfig(rank=4, alpha=8, target="attn_conv"), mergeable=True),  # LoCon: conv A/B too
    Case("csc_tuner", CSCTunerConfig(), mergeable=False, hint=True),
    Case("sara", SaRAConfig(threshold=5e-3), mergeable=True, row_scales=False),  # one weight for every row
    Case("spm", SPMConfig(concepts=["triangle"]), mergeable=True),  # a rank-1 membrane in kohya keys
]


@pytest.fixture(params=CASES, ids=lambda case: case.id)
def case(request) -> Case:
    return request.param


@pytest.fixture(params=["tiny-sd15", "tiny-sdxl"])
def layout(request) -> str:
    return request.param


@pytest.fixture
def unet(layout):
    return build_unet(layout)


@pytest.fixture
def inputs(unet) -> dict:
    return unet_inputs(unet, batch=2)


def make(case: Case, unet):
    return REGISTRY[case.method].from_unet(unet, case.config)


def hinted(case: Case, unet):
    """The call context of a controller's UNet calls: a fixed random control image at the UNet's pixel size
    (latent size x 8); a plain block for the other cases."""
    if not case.hint:
        return contextlib.nullcontext()
    size = unet.config.sample_size * 8
    hint = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(7))
    return call_context(unet, CallContext.of_branches(["cond"] * 2, hints={case.config.condition: hint}))


@pytest.fixture(autouse=True)
def controlled_calls(request):
    """Every UNet call of a controller's test runs with its control image."""
    if "case" not in request.fixturenames or "unet" not in request.fixturenames:
        yield
        return
    with hinted(request.getfixturevalue("case"), request.getfixturevalue("unet")):
        yield


# -- the contract matrix ------------------------------------------------------------------------


def test_identity_at_init_and_after_detach(case, unet, inputs):
    base = run(unet, inputs)
    requires_grad = [p.requires_grad for p in unet.parameters()]
    modules = dict(unet.named_modules())
    adapter = make(case, unet)
    adapter.attach(unet)
    ours = {id(p) for p in adapter.parameters()}
    assert [p.requires_grad for p in unet.parameters() if id(p) not in ours] == requires_grad, "attach changes no flag"
    assert torch.equal(run(unet, inputs), base), "identity at init (SC-Tuner: W2 = b2 = 0; LoRA: B = 0)"
    perturb(adapter)
    assert not torch.equal(run(unet, inputs), base)
    adapter.detach()
    assert torch.equal(run(unet, inputs), base)
    assert dict(unet.named_modules()) == modules, "the original module objects are back, no wrapper left"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())
    assert not hasattr(unet, "peft_config")


def attached_off_init(case, unet, inputs) -> tuple:
    """(adapter attached and perturbed off its identity init, the base output, the tuned output)."""
    base = run(unet, inputs)
    adapter = make(case, unet)
    adapter.attach(unet)
    perturb(adapter)
    return adapter, base, run(unet, inputs)


def test_scale(case, unet, inputs):
    adapter, base, tuned = attached_off_init(case, unet, inputs)
    adapter.set_scale(0.0)
    assert torch.equal(run(unet, inputs), base)
    adapter.set_scale(2.0)  # not clamped at 1 (the SCEdit reference clamps; we do not)
    doubled = run(unet, inputs)
    assert not torch.equal(doubled, tuned) and torch.isfinite(doubled).all()
    adapter.set_scale(1.0)
    assert torch.equal(run(unet, inputs), tuned)


def test_only_adapter_parameters_get_gradients(case, unet, inputs):
    unet.requires_grad_(False)  # the training loop freezes the UNet before attaching
    adapter = make(case, unet)
    adapter.attach(unet)
    trainable, frozen = adapter.trainable_parameters(), adapter.frozen_parameters()
    assert trainable and {id(p) for p in trainable}.isdisjoint(id(p) for p in frozen)
    assert {id(p) for p in trainable} | {id(p) for p in frozen} == {id(p) for p in adapter.parameters()}
    unet(**inputs).sample.square().mean().backward()
    ours = {id(p) for p in adapter.parameters()}
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is None for p in unet.parameters() if id(p) not in ours)


def test_a_scale_per_batch_row(case, unet, inputs):
    """Row factors (1, 0): row 0 as tuned, row 1 as the base; methods whose delta is in the weights refuse."""
    adapter, base, tuned = attached_off_init(case, unet, inputs)
    if not case.row_scales:
        with pytest.raises(NotImplementedError, match="one scale per call"):
            adapter.set_row_scales(torch.tensor([1.0, 0.0]))
        return
    adapter.set_row_scales(torch.tensor([1.0, 0.0]))
    mixed = run(unet, inputs)
    torch.testing.assert_close(mixed[0], tuned[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-6, rtol=0)
    adapter.set_row_scales(None)
    assert torch.equal(run(unet, inputs), tuned)


def test_a_call_can_keep_adapters_off_the_unconditional_rows(case, unet, inputs):
    """adapters_on_uncond=False: the unconditional row is the base model's, the conditional one the adapter's, and
    after the call every row is tuned again; a method with one scale per call refuses before the UNet runs."""
    adapter, base, tuned = attached_off_init(case, unet, inputs)
    enclosing = current_context(unet)  # a controller's hint (controlled_calls)
    off = CallContext.of_branches(["uncond", "cond"], adapters_on_uncond=False,
                                  hints=enclosing.hints if enclosing is not None else {})
    if not case.row_scales:
        with pytest.raises(ValueError, match="cannot stay off the unconditional rows"), call_context(unet, off):
            pass
        return
    with call_context(unet, off):
        mixed = run(unet, inputs)
    torch.testing.assert_close(mixed[0], base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], tuned[1], atol=1e-6, rtol=0)
    assert not torch.allclose(base[1], tuned[1])
    assert torch.equal(run(unet, inputs), tuned)
    if case.mergeable:  # merged into the weights every row shares: refused, not silently applied to every row
        adapter.merge()
        with pytest.raises(ValueError, match="merged .* cannot stay off the unconditional rows"), \
                call_context(unet, off):
            pass


def test_delta_weights_are_what_merging_adds(case, unet):
    adapter = make(case, unet)
    if not case.mergeable:
        assert not adapter.is_weight_delta
        with pytest.raises(NotImplementedError, match="not a weight delta"):
            adapter.delta_weights()
        return
    assert adapter.is_weight_delta
    perturb(adapter)
    before = {name: p.detach().clone() for name, p in base_parameters(unet)}
    adapter.attach(unet)
    adapter.set_scale(0.5)
    deltas = adapter.delta_weights()
    assert deltas and set(deltas) <= set(before)
    adapter.merge()
    after = dict(base_parameters(unet))
    for name, delta in deltas.items():
        torch.testing.assert_close(after[name].detach(), before[name] + delta, atol=1e-6, rtol=0)
    adapter.unmerge()
    assert all(torch.equal(d, e) for d, e in zip(deltas.values(), adapter.delta_weights(scale=0.5).values()))
    torch.testing.assert_close(adapter.delta_weights(scale=1.0)[name], 2 * deltas[name])
    # One module's delta alone (the composer's regional deltas take them so), and None where nothing changes.
    assert all(torch.equal(adapter.delta_weight(name), delta) for name, delta in deltas.items())
    torch.testing.assert_close(adapter.delta_weight(name, scale=1.0), 2 * deltas[name])
    assert adapter.delta_weight(next(name for name in before if name not in deltas)) is None


def test_merge(case, unet, inputs):
    adapter = make(case, unet)
    adapter.attach(unet)
    perturb(adapter)
    if not case.mergeable:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            adapter.merge()
        return
    tuned = run(unet, inputs)  # SaRA writes P0 + s·ΔP into its weights when they are read
    weights = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    adapter.merge()
    torch.testing.assert_close(run(unet, inputs), tuned, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge"):
        adapter.set_scale(0.5)
    adapter.unmerge()
    torch.testing.assert_close(run(unet, inputs), tuned, atol=1e-5, rtol=0)
    for k, v in unet.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-5, rtol=0)


def test_merging_one_lora_leaves_another_on_the_same_layers_acting(unet, inputs):
    """peft runs only the base layer once any adapter is marked merged in it: a merge must not silence the other
    adapters' branches there."""
    first, second = LoRA.from_unet(unet), LoRA.from_unet(unet)
    perturb(first, seed=1)
    perturb(second, seed=2)
    first.attach(unet)
    second.attach(unet)
    both = run(unet, inputs)
    first.merge()
    torch.testing.assert_close(run(unet, inputs), both, atol=1e-5, rtol=0)
    first.unmerge()
    second.merge()
    torch.testing.assert_close(run(unet, inputs), both, atol=1e-5, rtol=0)


def test_save_load_round_trip(case, layout, unet, inputs, tmp_path):
    adapter = make(case, unet)
    adapter.attach(unet)
    perturb(adapter)
    tuned = run(unet, inputs)
    path = save_adapter(adapter, tmp_path / "style.safetensors", trigger_words=["sks", "shape"],
                        training={"steps": 10, "lr": 1e-4})
    assert list(tmp_path.iterdir()) == [path], "written atomically: no temporary file left"

    meta = read_metadata(path)
    assert meta["studio.method"] == case.method
    assert json.loads(meta["studio.config"]) == adapter.config_dict()
    assert meta["studio.base_family"] == {"tiny-sd15": "SD1", "tiny-sdxl": "SDXL"}[layout]
    assert json.loads(meta["studio.trigger_words"]) == ["sks", "shape"]
    assert json.loads(meta["studio.training"]) == {"steps": 10, "lr": 1e-4}
    assert meta["studio.version"] == FORMAT_VERSION
    assert meta["modelspec.architecture"].endswith("/" + case.method.replace("_", "-"))
    assert meta["modelspec.trigger_phrase"] == "sks, shape"

    fresh = build_unet(layout)
    loaded = load_adapter(path, fresh)
    assert type(loaded) is type(adapter) and loaded.unet is fresh
    with hinted(case, fresh):
        assert torch.equal(run(fresh, inputs), tuned)
    loaded.detach()
    assert load_adapter(path).unet is None  # without a UNet: built from the file alone


def test_loading_onto_another_family_fails(case, layout, unet, tmp_path):
    adapter = make(case, unet)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    other = build_unet(OTHER_LAYOUT[layout])
    want, have = adapter.base_family, {"tiny-sd15": "SD1", "tiny-sdxl": "SDXL"}[OTHER_LAYOUT[layout]]
    with pytest.raises(ValueError, match=f"trained on an {want} model .* UNet is {have} .* load an {want} model"):
        load_adapter(path, other)
    # Skipping the metadata check still refuses shapes that do not fit, before touching the UNet.
    with pytest.raises(ValueError, match="build one for this model"):
        load_adapter(path, other, strict=False)
    assert not any(isinstance(m, BaseTunerLayer) or m._forward_pre_hooks for m in other.modules())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_loading_onto_another_architecture_of_the_family_fails(case, tmp_path):
    path = save_adapter(make(case, build_unet("tiny-sd15")), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="fingerprint .* pass strict=False"):
        load_adapter(path, build_unet("sd15", device="meta"))  # full-size SD 1.5 layout


def test_adapters_coexist(unet, inputs):
    """SC-Tuner and two LoRAs at once, each detachable in any order."""
    base = run(unet, inputs)
    first, sc, second = LoRA.from_unet(unet), SCTuner.from_unet(unet), LoRA.from_unet(unet)
    first.attach(unet)
    perturb(first, seed=1)
    only_first = run(unet, inputs)
    for adapter, seed in ((sc, 2), (second, 3)):
        adapter.attach(unet)
        perturb(adapter, seed)
    assert not torch.allclose(run(unet, inputs), only_first, atol=1e-3)
    sc.detach()
    second.detach()
    torch.testing.assert_close(run(unet, inputs), only_first, atol=1e-5, rtol=0)
    first.detach()
    assert torch.equal(run(unet, inputs), base)


def test_lora_dropout_follows_the_adapters_mode():
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet)
    lora = LoRA.from_unet(unet, LoRAConfig(dropout=0.5))
    lora.attach(unet)
    perturb(lora)
    lora.eval()  # as the training loop does for preview samples
    assert torch.equal(run(unet, inputs), run(unet, inputs))
    lora.train()
    assert not torch.equal(run(unet, inputs), run(unet, inputs))


# -- SC-Tuner specifics -------------------------------------------------------------------------

SKIP_WIDTHS = {  # decoder order, up_blocks.b.resnets.r (one SC-Tuner per long skip: docs/methods.md)
    "sd15": [1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 320],
    "sdxl": [1280, 1280, 640, 640, 640, 320, 320, 320, 320],
    "tiny-sd15": [64, 64, 64, 64, 64, 32, 32, 32, 32, 32, 32, 32],
    "tiny-sdxl": [64, 64, 64, 64, 64, 32, 32, 32, 32],
}


@pytest.mark.parametrize("layout", list(SKIP_WIDTHS))
def test_sc_tuner_skips(layout):
    unet = build_unet(layout, device="cpu" if layout.startswith("tiny") else "meta")
    tuner = SCTuner.from_unet(unet)
    assert [skip.channels for skip in long_skips(unet)] == SKIP_WIDTHS[layout]
    assert list(tuner.tuners) == [f"up_blocks_{s.block}_resnets_{s.resnet}" for s in long_skips(unet)]
    assert count_parameters(tuner) == sum(2 * c * c + 2 * c for c in SKIP_WIDTHS[layout])  # 2C^2 + 2C per tuner


def test_full_size_parameter_counts():
    sd15, sdxl = build_unet("sd15", device="meta"), build_unet("sdxl", device="meta")
    assert count_parameters(SCTuner.from_unet(sd15)) == 19_680_000  # 19.68 M (SCEdit paper)
    assert count_parameters(SCTuner.from_unet(sdxl)) == 9_841_920  # 9.84 M
    # The paper's LoRA baseline: r = 64 on q/k/v/out + FF, 23.94 M.
    assert count_parameters(LoRA.from_unet(sd15, LoRAConfig(rank=64, target="attn_ff"))) == 23_937_024


def test_sc_tuner_step0_gradients_reach_only_the_last_layer(unet, inputs):
    unet.requires_grad_(False)
    tuner = SCTuner.from_unet(unet)
    tuner.attach(unet)
    unet(**inputs).sample.square().mean().backward()
    for mlp in tuner.tuners.values():
        assert mlp.fc2.weight.grad.abs().sum() > 0 and mlp.fc2.bias.grad.abs().sum() > 0
        assert not mlp.fc1.weight.grad.any() and not mlp.fc1.bias.grad.any()  # W1's gradient passes W2 = 0


def test_sc_tuner_records_no_graph_in_encoder_or_mid_block(unet, inputs):
    unet.requires_grad_(False)
    SCTuner.from_unet(unet).attach(unet)
    outputs: dict[str, list[torch.Tensor]] = {"down": [], "mid": [], "up": []}

    def keep(part):
        def hook(module, args, output):
            stack = [output]
            while stack:
                item = stack.pop()
                if isinstance(item, torch.Tensor):
                    outputs[part].append(item)
                elif isinstance(item, (tuple, list)):
                    stack.extend(item)
        return hook

    for block in unet.down_blocks:
        block.register_forward_hook(keep("down"))
    unet.mid_block.register_forward_hook(keep("mid"))
    for block in unet.up_blocks:
        block.register_forward_hook(keep("up"))
    unet(**inputs)
    assert outputs["down"] and outputs["mid"] and outputs["up"]
    assert all(not t.requires_grad and t.grad_fn is None for t in outputs["down"] + outputs["mid"])
    assert all(t.grad_fn is not None for t in outputs["up"])


# -- configs, registry, files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: SCTunerConfig(hidden_ratio=0), "hidden_ratio"),
        (lambda: SCTunerConfig(hidden_ratio=float("nan")), "hidden_ratio"),
        (lambda: LoRAConfig(rank=0), "rank"),
        (lambda: LoRAConfig(alpha=float("inf")), "alpha"),
        (lambda: LoRAConfig(target="mlp"), "target"),
        (lambda: LoRAConfig(dropout=1.0), "dropout"),
    ],
)
def test_configs_refuse_bad_values(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_config_defaults():
    assert LoRAConfig(rank=8).alpha == 8  # missing alpha = rank, as kohya and peft read it
    with pytest.raises(ValueError, match="without hidden units"):
        SCTuner(SCTunerConfig(hidden_ratio=0.01), {"0.0": 32})


def test_registry_knows_the_methods():
    assert {"sc_tuner", "lora"} <= set(REGISTRY)


def test_unknown_method_is_refused_with_the_known_ones(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"studio.method": "nope", "studio.version": FORMAT_VERSION})
    with pytest.raises(ValueError, match=r"'nope'.*known: \[.*'lora'.*'sc_tuner'"):
        load_adapter(path)


def test_save_refuses_bad_header_input(tmp_path):
    adapter = SCTuner.from_unet(build_unet("tiny-sd15"))
    with pytest.raises(TypeError, match="wrap it in a list"):
        save_adapter(adapter, tmp_path / "a.safetensors", trigger_words="sks")
    with pytest.raises(ValueError, match="studio.method"):
        save_adapter(adapter, tmp_path / "a.safetensors", extra={"studio.method": "lora"})
    assert not list(tmp_path.iterdir())


# -- diffusers interop --------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["attn_ff", "attn_conv"])
def test_lora_file_loads_in_diffusers_and_back(target, tmp_path):
    def generate(pipe) -> np.ndarray:
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    pipe = tiny_sd15_pipeline(str(TOKENIZER))
    base = generate(pipe)
    # alpha != rank: diffusers must read our header; the feed-forward paths and the convs must map too.
    lora = LoRA.from_unet(pipe.unet, LoRAConfig(rank=4, alpha=2, target=target))
    lora.attach(pipe.unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for up in lora.lora_B.values():
            up.weight.copy_(torch.randn(up.weight.shape, generator=g))
    ours = generate(pipe)
    assert not np.allclose(ours, base, atol=1e-3)
    path = save_adapter(lora, tmp_path / "lora.safetensors")

    with_diffusers = tiny_sd15_pipeline(str(TOKENIZER))
    with_diffusers.load_lora_weights(str(path))
    np.testing.assert_allclose(generate(with_diffusers), ours, atol=1e-5)

    with_studio = tiny_sd15_pipeline(str(TOKENIZER))
    load_adapter(path, with_studio.unet)
    np.testing.assert_allclose(generate(with_studio), ours, atol=1e-5)


def test_two_loras_fuse_into_one_exported_lora():
    """Fusion on delta_weights: the weighted sum of two LoRAs' deltas, exported by SVD at full rank and loaded
    as one plain LoRA file, computes what the two attached LoRAs at those scales compute."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, batch=2)
    first, second = LoRA.from_unet(unet, LoRAConfig(rank=2)), LoRA.from_unet(unet, LoRAConfig(rank=2, alpha=4))
    perturb(first, seed=1)
    perturb(second, seed=2)
    fused = fuse_deltas([(first.delta_weights(scale=0.7), 1.0), (second.delta_weights(), 0.5)])
    export = lora_from_deltas(fused, rank=4)  # rank 2 + 2: exact
    assert export.energy_kept == pytest.approx(1.0) and export.dropped_entries == 0
    for adapter, scale in ((first, 0.7), (second, 0.5)):
        adapter.attach(unet)
        adapter.set_scale(scale)
    both = run(unet, inputs)
    first.detach()
    second.detach()
    one = LoRA.from_shapes(LoRAConfig(rank=4), {k: tuple(v.shape) for k, v in export.tensors.items()})
    one.load_tensors(export.tensors)
    one.attach(unet)
    torch.testing.assert_close(run(unet, inputs), both, atol=1e-5, rtol=0)
