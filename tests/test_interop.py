"""LoRA files in and out (issue #21): kohya/A1111 (LoCon too), diffusers/peft and legacy diffusers files load as a
foreign LoRA on the UNet and text encoder, by encoded module names, with a key report and refusals; our LoRA exports
as kohya. Round trips compare outputs (UNet, text encoder, images), never key sets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import LoRA, LoRAConfig, SPMConfig, load_adapter, save_adapter
from adapters.foreign import ForeignLoRA, ForeignLoRAError, link_pipeline, load_foreign_lora
from adapters.kohya import adaptable_modules, export_kohya, kohya_name, ldm_path
from adapters.spm import SPM
from pipelines import EMBEDDED_MODEL, InputError, StudioError, generate
from pipelines.architectures import build_unet, tiny_sd15_pipeline, unet_inputs
from pipelines.interop import export_lora, inspect_lora, load_lora
from studio.cli import main
from studio.library import AdapterLibrary
from tests.adapter_helpers import bench_module

TOKENIZER = str(EMBEDDED_MODEL / "tokenizer")
FAST = dict(num_inference_steps=2, seed=3, guidance_scale=5.0)

bench = bench_module("interop")


def pipeline():
    """A fresh tiny SD 1.5-layout pipeline; every call gives the same weights (seed 0)."""
    pipe = tiny_sd15_pipeline(TOKENIZER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(unet, rank: int = 4, alpha: float = 2.0, target: str = "attn_conv", seed: int = 1) -> LoRA:
    """Our LoRA with random B (A keeps its random init), so it changes the outputs."""
    lora = LoRA.from_unet(unet, LoRAConfig(rank=rank, alpha=alpha, target=target))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_B.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lora


@torch.no_grad()
def unet_out(unet) -> torch.Tensor:
    return unet(**unet_inputs(unet)).sample


@torch.no_grad()
def text_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer("a red star", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


# -- 2. out: our LoRA as kohya --------------------------------------------------------------------------------------
def test_kohya_export_keeps_alpha_and_loads_back_with_the_same_unet_output(tmp_path):
    pipe = pipeline()
    unet = pipe.unet
    base = unet_out(unet)
    lora = random_lora(unet, rank=4, alpha=2.0)  # alpha != rank: a lost alpha would show as a factor 2
    lora.attach(unet)
    ours = unet_out(unet)
    lora.detach()
    path = export_kohya(lora, tmp_path / "sks.safetensors", trigger_words=["sks"])

    tensors = load_file(str(path))
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == len(lora.paths) and all(float(a) == 2.0 for a in alphas)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors  # LoCon: 3x3 down, 1x1 up
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape[2:] == (1, 1)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert not any(k.startswith("studio.") for k in meta)  # a plain kohya file
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("4", "2", "sd_v1")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.trigger_phrase"] == "sks"

    link_pipeline(pipe)
    loaded = load_adapter(path, unet)  # no studio.method: dispatched to the foreign LoRA
    assert isinstance(loaded, ForeignLoRA) and loaded.unet is unet
    assert not loaded.report.unmatched and len(loaded.report.matched) == len(lora.paths)
    assert max_diff(unet_out(unet), ours) <= 1e-5
    assert max_diff(ours, base) > 1e-2  # the LoRA does something
    loaded.detach()
    assert torch.equal(unet_out(unet), base)  # hooks removed: bit-identical


def test_kohya_export_loads_in_diffusers_with_the_same_images(tmp_path):
    ours_pipe, theirs_pipe = pipeline(), pipeline()
    lora = random_lora(ours_pipe.unet, rank=4, alpha=8.0)
    path = export_kohya(lora, tmp_path / "sks.safetensors")
    theirs_pipe.load_lora_weights(str(path))
    lora.attach(ours_pipe.unet)
    try:
        kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
        ours = ours_pipe("a red star", generator=torch.Generator().manual_seed(0), **kwargs).images
        theirs = theirs_pipe("a red star", generator=torch.Generator().manual_seed(0), **kwargs).images
        plain = pipeline()("a red star", generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        lora.detach()
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - plain).max() > 1e-3


def test_export_lora_and_the_cli_export_a_library_adapter(tmp_path, capsys):
    pipe = pipeline()
    lora = random_lora(pipe.unet, rank=2, alpha=1.0, target="attn")
    source = save_adapter(lora, tmp_path / "lib" / "sks.safetensors", trigger_words=["sks"])
    out = export_lora(source, tmp_path / "a.safetensors")
    assert load_file(str(out)).keys() == {f"{kohya_name('unet', p)}.{part}" for p in lora.paths.values()
                                          for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert main(["adapters", "export", "sks", "--format", "kohya", "--out", str(tmp_path / "b.safetensors"),
                 "--library", str(tmp_path / "lib")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b.safetensors")
    with pytest.raises(InputError, match="already another tool's file"):
        export_lora(out, tmp_path / "c.safetensors")


# -- 1. in: kohya from diffusers' converter, with the text encoder ------------------------------------------------
def test_a_kohya_file_from_diffusers_converter_matches_diffusers_loader_on_unet_and_text_encoder(tmp_path):
    path = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=4)
    adapter, diffs, effects = bench.compare(path)
    assert adapter.report.by_component() == {"unet": 128, "text_encoder": 12} and not adapter.report.unmatched
    assert max(diffs.values()) <= 1e-5
    assert min(effects.values()) > 1e-3  # both parts change what they adapt


def test_a1111_text_encoder_names_of_transformers_4_match_the_same_modules(tmp_path):
    """A1111 files name the text encoder `lora_te_text_model_encoder_...` (transformers 4 wrapped CLIP in
    `text_model`); diffusers' converter on transformers 5 writes `lora_te1_encoder_...`: both are encoded."""
    modern = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=4)
    tensors = load_file(str(modern))
    a1111 = write(tmp_path / "a.safetensors",
                  {k.replace("lora_te1_", "lora_te_text_model_"): v for k, v in tensors.items()})
    outs = []
    for path in (modern, a1111):
        pipe = pipeline()
        link_pipeline(pipe)
        adapter = load_foreign_lora(path, pipe.unet)
        assert adapter.report.by_component()["text_encoder"] == 12 and not adapter.report.unmatched
        outs.append((text_out(pipe), unet_out(pipe.unet)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_merge_equals_hooks_on_unet_and_text_encoder_and_unmerge_restores(tmp_path):
    path = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=4)
    pipe = pipeline()
    link_pipeline(pipe)
    text_base, unet_base = text_out(pipe), unet_out(pipe.unet)
    adapter = load_foreign_lora(path, pipe.unet)
    adapter.set_scale(0.7)
    text_hooked, unet_hooked = text_out(pipe), unet_out(pipe.unet)
    assert max_diff(text_hooked, text_base) > 1e-3
    adapter.merge()
    assert max_diff(text_out(pipe), text_hooked) <= 1e-4 and max_diff(unet_out(pipe.unet), unet_hooked) <= 1e-4
    adapter.unmerge()
    adapter.detach()
    # W + delta - delta rounds: equal to the base up to fp32 rounding (without merging, detach is exact: below).
    assert max_diff(text_out(pipe), text_base) <= 1e-5 and max_diff(unet_out(pipe.unet), unet_base) <= 1e-5


def test_hooks_leave_no_trace_bitwise(tmp_path):
    path = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=2)
    pipe = pipeline()
    link_pipeline(pipe)
    text_base, unet_base = text_out(pipe), unet_out(pipe.unet)
    adapter = load_foreign_lora(path, pipe.unet)
    adapter.detach()
    assert torch.equal(text_out(pipe), text_base) and torch.equal(unet_out(pipe.unet), unet_base)


# -- 1. in: kohya by hand (missing alpha, LoCon on a strided conv), peft, legacy -----------------------------------
def test_missing_alpha_is_rank_and_locon_follows_the_conv_stride(tmp_path):
    pipe = pipeline()
    unet = pipe.unet
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    layers = adaptable_modules(unet)
    picks = {  # path -> (rank, alpha or None)
        "down_blocks.0.downsamplers.0.conv": (3, None),  # 3x3, stride 2: the down conv must stride too
        "down_blocks.1.resnets.0.conv1": (2, 1.0),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, None),
        "down_blocks.0.attentions.0.proj_in": (2, 4.0),  # a 1x1 conv in SD 1.x
    }
    tensors, deltas = {}, {}
    for path, (rank, alpha) in picks.items():
        layer = layers[path]
        w = layer.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.2  # (r, in[, kh, kw])
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.2  # (out, r[, 1, 1])
        name = kohya_name("unet", path)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        delta = (up.flatten(1) @ down.flatten(1)).view(w.shape) * ((alpha if alpha is not None else rank) / rank)
        deltas[f"{path}.weight"] = delta
    path = write(tmp_path / "hand.safetensors", tensors)

    merged = pipeline().unet
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.get_submodule(name.removesuffix(".weight")).weight += delta
    adapter = load_foreign_lora(path, unet)
    assert len(adapter.report.matched) == 4 and not adapter.report.unmatched
    assert max_diff(unet_out(unet), unet_out(merged)) <= 1e-5
    adapter.detach()
    assert all(torch.equal(v, base_state[k]) for k, v in unet.state_dict().items())


def test_a_peft_file_takes_alpha_from_lora_adapter_metadata(tmp_path):
    pipe = pipeline()
    unet = pipe.unet
    lora = random_lora(unet, rank=4, alpha=1.0, target="attn")
    lora.attach(unet)
    ours = unet_out(unet)
    lora.detach()
    full = save_adapter(lora, tmp_path / "ours.safetensors")
    meta = {"lora_adapter_metadata": safe_open(str(full), framework="pt").metadata()["lora_adapter_metadata"]}
    peft_file = write(tmp_path / "peft.safetensors", load_file(str(full)), meta)  # no studio.* entries
    adapter = load_adapter(peft_file, unet)
    assert adapter.report.formats == ("peft",) and not adapter.report.unmatched
    assert max_diff(unet_out(unet), ours) <= 1e-5
    adapter.detach()

    # Without the metadata diffusers and peft take alpha = r: the same as our LoRA with alpha = rank.
    bare = write(tmp_path / "bare.safetensors", load_file(str(full)))
    lora.config.alpha = 4.0
    lora.attach(unet)
    at_rank = unet_out(unet)
    lora.detach()
    adapter = load_adapter(bare, unet)
    assert max_diff(unet_out(unet), at_rank) <= 1e-5
    adapter.detach()

    # alpha_pattern (peft's own pattern rule) overrides lora_alpha where it matches.
    fields = json.loads(meta["lora_adapter_metadata"])
    fields["unet.alpha_pattern"] = {"attn1.to_q": 8.0}
    adapter = load_adapter(write(tmp_path / "pattern.safetensors", load_file(str(full)),
                                 {"lora_adapter_metadata": json.dumps(fields)}), unet)
    alphas = {t.path: t.alpha for t in adapter.targets}
    adapter.detach()
    assert {a for p, a in alphas.items() if p.endswith("attn1.to_q")} == {8.0}
    assert {a for p, a in alphas.items() if not p.endswith("attn1.to_q")} == {1.0}


def test_legacy_attention_processor_keys(tmp_path):
    pipe = pipeline()
    unet = pipe.unet
    lora = random_lora(unet, rank=4, alpha=4.0, target="attn")  # legacy files carry no alpha: alpha = rank
    lora.attach(unet)
    ours = unet_out(unet)
    lora.detach()
    legacy = {}
    for path in lora.paths.values():
        attn, _, proj = path.partition(".to_")
        key = f"unet.{attn}.processor.to_{proj.removesuffix('.0')}_lora"
        for part, down_up in (("lora_A", "down"), ("lora_B", "up")):
            legacy[f"{key}.{down_up}.weight"] = lora.tensors()[f"unet.{path}.{part}.weight"]
    adapter = load_adapter(write(tmp_path / "legacy.safetensors", legacy), unet)
    assert adapter.report.formats == ("legacy diffusers",) and len(adapter.report.matched) == len(lora.paths)
    assert max_diff(unet_out(unet), ours) <= 1e-5
    adapter.detach()


def test_sdxl_ldm_names_are_diffusers_own_mapping(tmp_path):
    """kohya names SDXL's UNet the LDM way (`input_blocks_4_1_...`): our encoding of every module agrees with
    diffusers' own SGM -> diffusers mapping, and an LDM-named file loads onto a tiny SDXL UNet."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet = build_unet("tiny-sdxl")
    resnet = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
              "skip_connection": "conv_shortcut"}
    checked = 0
    for path in adaptable_modules(unet):
        ldm = ldm_path(path, unet.config)
        if ldm is None or not ldm.startswith(("input_blocks", "middle_block", "output_blocks")) or ldm.startswith(
                "input_blocks.0.0"):
            continue
        key = f"lora_unet_{ldm.replace('.', '_')}.lora_down.weight"
        mapped = next(iter(_maybe_map_sgm_blocks_to_diffusers({key: torch.zeros(1)}, unet.config)))
        # The block words are renamed later, in diffusers' _convert_unet_lora_key.
        blocks = (("input_blocks", "down_blocks"), ("middle_block", "mid_block"), ("output_blocks", "up_blocks"))
        for old, new in blocks:
            mapped = mapped.replace(f"lora_unet_{old}_", f"lora_unet_{new}_")
        for old, new in resnet.items():
            mapped = mapped.replace(f"_{old}.", f"_{new}.")
        if "_op." in mapped:  # diffusers renames the downsampler's op later, in _convert_unet_lora_key
            mapped = mapped.replace("_op.", "_conv.")
        assert mapped == f"{kohya_name('unet', path)}.lora_down.weight", (path, ldm)
        checked += 1
    assert checked > 100

    lora = random_lora(unet, rank=2, alpha=2.0, target="attn_conv")
    lora.attach(unet)
    ours = unet_out(unet)
    lora.detach()
    diffusers_named = load_file(str(export_kohya(lora, tmp_path / "x.safetensors")))
    rename = {kohya_name("unet", p): kohya_name("unet", ldm_path(p, unet.config)) for p in lora.paths.values()}
    ldm_named = {}
    for key, t in diffusers_named.items():
        name, _, part = key.partition(".")
        ldm_named[f"{rename[name]}.{part}"] = t
    assert not set(ldm_named) & set(diffusers_named)
    adapter = load_foreign_lora(write(tmp_path / "ldm.safetensors", ldm_named,
                                      {"ss_base_model_version": "sdxl_base_v1-0"}), unet)
    assert len(adapter.report.matched) == len(lora.paths) and not adapter.report.unmatched
    assert max_diff(unet_out(unet), ours) <= 1e-5
    adapter.detach()


# -- refusals and the report ----------------------------------------------------------------------------------------
def _one_module(pipe, width: int | None = None) -> dict[str, torch.Tensor]:
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = pipe.unet.get_submodule(path)
    name = kohya_name("unet", path)
    return {f"{name}.lora_down.weight": torch.randn(2, width or layer.in_features),
            f"{name}.lora_up.weight": torch.randn(layer.out_features, 2)}


def test_refusals_name_the_file_and_the_reason(tmp_path):
    pipe = pipeline()
    cases = {
        "nothing.safetensors": ({"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 4),
                                 "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, None,
                                "none of its 2 keys names a module"),
        "wide.safetensors": (_one_module(pipe, width=2048), None, "cross-attention layers read text 2048 wide"),
        "ss.safetensors": (_one_module(pipe), {"ss_base_model_version": "sdxl_base_v1-0"}, "a LoRA for SDXL"),
        "spec.safetensors": (_one_module(pipe), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
                             "a LoRA for SDXL"),
        "flux.safetensors": (_one_module(pipe), {"modelspec.architecture": "flux-1-dev/lora"}, "a LoRA for flux-1-dev"),
        "none.safetensors": ({"weight": torch.zeros(2)}, None, "none of its 1 tensors is a LoRA key"),
    }
    for file, (tensors, meta, reason) in cases.items():
        path = write(tmp_path / file, tensors, meta)
        with pytest.raises(StudioError, match=rf"{file}: .*{reason}"):
            inspect_lora(path, pipe)
        if file != "none.safetensors":  # (a file of no known format is refused as no studio adapter at all)
            with pytest.raises(InputError, match=rf"adapters\[0\]: {file}: .*{reason}"):
                generate(pipe, "a red star", adapters=[(path, 1.0)], **FAST)
    # strict=False skips the header's word, not the shapes.
    assert inspect_lora(tmp_path / "ss.safetensors", pipe, strict=False).matched
    with pytest.raises(ForeignLoRAError):
        load_foreign_lora(tmp_path / "wide.safetensors", pipe.unet, strict=False)


def test_the_report_lists_unmatched_keys_with_reasons_and_warns(tmp_path):
    pipe = pipeline()
    tensors = {**_one_module(pipe),
               "lora_unet_mid_block_attentions_9_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_mid_block_attentions_9_proj_in.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)}
    path = write(tmp_path / "mixed.safetensors", tensors)
    link_pipeline(pipe)
    with pytest.warns(UserWarning, match="5 keys left out"):
        adapter = load_foreign_lora(path, pipe.unet)
    report = adapter.report
    assert len(report.matched) == 1 and report.matched_keys == 2 and len(report.unmatched) == 5
    assert "no module of the loaded model's unet" in report.unmatched[
        "lora_unet_mid_block_attentions_9_proj_in.lora_down.weight"]
    assert "LyCORIS" in report.unmatched["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"]
    assert "no text_encoder_2" in report.unmatched["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    text = "\n".join(report.lines())
    assert "matched: 1 modules, 2 keys (unet 1)" in text and "unmatched: 5 keys" in text
    adapter.detach()


# -- usable everywhere: generate, the library, the CLI ---------------------------------------------------------------
def test_generate_takes_a_kohya_file_with_a_text_encoder_part_and_restores_the_pipeline(tmp_path):
    path = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=4)
    pipe = pipeline()
    before = np.asarray(generate(pipe, "a red star", **FAST).images[0])
    result = generate(pipe, "a red star", adapters=[(path, 0.8)], **FAST)
    assert result.settings[0].extra_params["Adapters"] == "d:0.8"
    after = np.asarray(generate(pipe, "a red star", **FAST).images[0])
    assert np.array_equal(after, before)

    other = pipeline()  # the same LoRA attached by hand at 0.8, on an identical pipeline
    link_pipeline(other)
    adapter = load_lora(path, other, scale=0.8)
    try:
        by_hand = np.asarray(other("a red star", num_inference_steps=2, guidance_scale=5.0, output_type="pil",
                                   generator=torch.Generator().manual_seed(3)).images[0])
    finally:
        adapter.detach()
    assert np.abs(np.asarray(result.images[0]).astype(int) - by_hand.astype(int)).max() <= 1
    assert np.abs(np.asarray(result.images[0]).astype(int) - before.astype(int)).max() > 0


def test_the_library_lists_a_kohya_file_and_the_cli_shows_and_inspects_it(embedded, tmp_path, capsys):
    unet = embedded.pipe.unet
    lora = random_lora(unet, rank=2, alpha=1.0, target="attn")
    lib = tmp_path / "lib"
    path = export_kohya(lora, lib / "detail.safetensors", trigger_words=["sks", "star"])
    entries = {e.name: e for e in AdapterLibrary(lib).list()}
    entry = entries["detail"]
    assert (entry.method, entry.base_family, entry.trigger_words) == ("lora", "SD1", ("sks", "star"))
    assert entry.usable

    assert main(["adapters", "show", "detail", "--library", str(lib)]) == 0
    shown = capsys.readouterr().out
    assert "ss_network_alpha: 1" in shown and "modelspec.architecture: stable-diffusion-v1/lora" in shown

    assert main(["adapters", "inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"matched: {len(lora.paths)} modules" in printed and "unmatched: 0 keys" in printed
    bad = write(tmp_path / "sdxl.safetensors", load_file(str(path)), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert main(["adapters", "inspect", str(bad)]) == 2
    assert "sdxl.safetensors: it is a LoRA for SDXL" in capsys.readouterr().err


def test_library_reads_the_family_from_shapes_and_a1111_sidecar_words(tmp_path):
    pipe = pipeline()
    lib = tmp_path / "lib"
    tensors = _one_module(pipe, width=768)  # 768-wide cross-attention: an SD 1.x LoRA, no header needed
    write(lib / "old.safetensors", tensors)
    (lib / "old.json").write_text(json.dumps({"activation text": "oldstyle, ink"}))
    entry = AdapterLibrary(lib).get("old")
    assert (entry.method, entry.base_family, entry.trigger_words) == ("lora", "SD1", ("oldstyle", "ink"))


# -- the SPM membrane's kohya keys go through the shared helpers -------------------------------------------------
def test_a_membrane_file_is_a_kohya_lora_to_the_foreign_loader(tmp_path):
    pipe = pipeline()
    unet = pipe.unet
    membrane = SPM.from_unet(unet, SPMConfig(concepts=["star"], transport="off"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in membrane.lora_B.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    membrane.attach(unet)
    ours = unet_out(unet)
    membrane.detach()
    path = save_adapter(membrane, tmp_path / "m.safetensors")
    again = load_adapter(path)  # SPM.from_shapes: the shared pairing and our own names read back
    assert again.paths == membrane.paths
    tensors = load_file(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter = load_foreign_lora(write(tmp_path / "plain.safetensors", tensors), unet)
    assert max_diff(unet_out(unet), ours) <= 1e-5
    adapter.detach()


def test_fusion_merges_a_foreign_lora_like_its_hooks(tmp_path):
    from adapters import merge_into

    pipe = pipeline()
    unet = pipe.unet
    base = unet_out(unet)
    path = export_kohya(random_lora(unet, rank=4, alpha=2.0), tmp_path / "k.safetensors")
    adapter = load_foreign_lora(path, unet)
    hooked = unet_out(unet)
    adapter.detach()
    merged = merge_into(unet, [(adapter, 1.0)])
    try:
        assert max_diff(unet_out(unet), hooked) <= 1e-4
    finally:
        merged.restore()
    assert torch.equal(unet_out(unet), base)


def test_legacy_text_encoder_keys_and_peft_text_encoder_keys_give_the_same_text_encoder(tmp_path):
    """The old diffusers text-encoder patch (`self_attn.to_q_lora.down`, `mlp.fc1.lora_linear_layer.down`, under
    transformers 4's `text_model.`) and peft keys (`text_encoder.<path>.lora_A`) reach the same modules as kohya's."""
    kohya = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=4)
    pipe = pipeline()
    link_pipeline(pipe)
    reference = load_foreign_lora(kohya, pipe.unet)
    want = text_out(pipe)
    pairs = [(t.path, reference.down[i].detach(), reference.up[i].detach())
             for i, t in enumerate(reference.targets) if t.component == "text_encoder"]
    reference.detach()
    clip = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    legacy, peft = {}, {}
    for path, down, up in pairs:
        stem, _, leaf = path.rpartition(".")
        old = (f"text_encoder.text_model.{stem}.{clip[leaf]}_lora" if leaf in clip
               else f"text_encoder.text_model.{path}.lora_linear_layer")
        legacy[f"{old}.down.weight"], legacy[f"{old}.up.weight"] = down, up
        peft[f"text_encoder.{path}.lora_A.weight"], peft[f"text_encoder.{path}.lora_B.weight"] = down, up
    for name, tensors in (("legacy", legacy), ("peft", peft)):
        adapter = load_foreign_lora(write(tmp_path / f"{name}.safetensors", tensors), pipe.unet)
        assert adapter.report.by_component() == {"text_encoder": 12} and not adapter.report.unmatched, name
        assert max_diff(text_out(pipe), want) <= 1e-6, name
        adapter.detach()
