"""Export a model with adapters merged into one single-file checkpoint in the original Stable Diffusion layout.

    export_checkpoint(model, "out/shapes-sks.safetensors", adapters=[("runs/sks.safetensors", 0.8)])
    studio checkpoint export --model embedded --adapter sks:0.8 --out out/shapes-sks.safetensors

The file holds what A1111, ComfyUI and diffusers' `from_single_file` read: `model.diffusion_model.*` (the UNet in
the CompVis LDM naming), `first_stage_model.*` (the VAE) and `cond_stage_model.transformer.*` (SD 1.x's CLIP text
encoder, under its Hugging Face names as SD 1.x checkpoints store it). The adapters are merged with each one's
scale as its weight (adapters/fusion.py `merge_into`, W + Σ s_k ΔW_k), which is what attaching them at those
scales computes for weight-delta methods; a LoRA file of another tool also adapts the text encoder, whose deltas
are added here. The model itself is left exactly as it was.

Supported: SD 1.x-style models (one CLIP text encoder, any UNet/VAE widths and depths, e.g. the embedded model).
Refused with the reason: SD 2.x (its OpenCLIP text encoder is stored as `cond_stage_model.model.*` with fused
attention projections: that conversion is not written yet) and SDXL (two text encoders, `conditioner.*`).

The UNet and VAE mappings are our own, written from the two layouts (diffusers' loader
`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` is their inverse, which the tests use).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters import Adapter
from adapters.base import detect_family
from adapters.foreign import ForeignLoRA, link_pipeline
from adapters.fusion import merge_into
from adapters.io import write_safetensors

from .attach import AdapterUse, check_adapters, read_adapter
from .errors import InputError
from .loading import LoadedModel, file_hash

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."

# Inside a ResNet block: diffusers name -> LDM name (UNet `ResBlock`, VAE `ResnetBlock`).
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
               "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
# The VAE's mid-block attention: diffusers' Linear projections were LDM's 1x1 convolutions.
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


# ---------------------------------------------------------------------------------------------
# Layout mappings: pure functions of the component's config, diffusers prefix -> LDM prefix
# ---------------------------------------------------------------------------------------------
def unet_prefixes(config) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every block of a UNet2DConditionModel.

    LDM numbers blocks flat: input_blocks.0 is conv_in, then per down level `layers_per_block` blocks of
    [ResBlock, (SpatialTransformer)] and one downsampler; output_blocks hold `layers_per_block + 1` blocks per up
    level, the upsampler appended to the last one after its ResBlock (and its attention, if the level has one)."""
    per = config.layers_per_block
    if not isinstance(per, int):
        raise InputError(f"layers_per_block={per!r} differs per level: the LDM layout needs one number")
    levels = len(config.block_out_channels)
    pairs: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
    ]
    for i in range(levels):
        for j in range(per):
            block = (per + 1) * i + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {})]
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op.", {}))
        for j in range(per + 1):
            block = (per + 1) * i + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", {})]
        if i < levels - 1:
            slot = 2 if "CrossAttn" in config.up_block_types[i] else 1  # after the ResBlock (and attention)
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{slot}.", {}))
    return pairs


def vae_prefixes(config) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, renames inside it) for an AutoencoderKL; LDM numbers the decoder's up levels
    from the lowest resolution up, diffusers from the top down. Unlisted keys (conv_in/out, quant convs) keep their
    names."""
    levels, per = len(config.block_out_channels), config.layers_per_block
    pairs: list[tuple[str, str, dict[str, str]]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", {}), ("decoder.conv_norm_out.", "decoder.norm_out.", {})]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET) for j in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION))
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
                  for j in range(per)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
        up = levels - 1 - i
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET)
                  for j in range(per + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", {}))
    return pairs


def rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str, dict[str, str]]], prefix: str, *,
           keep_unlisted: bool) -> dict[str, torch.Tensor]:
    """`state` under the LDM names, each prefixed by `prefix`. Loud: a key no pair covers is an error unless
    `keep_unlisted` (then it keeps its name), and two keys landing on one name is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
        if match is None:
            if not keep_unlisted:
                raise InputError(f"the UNet weight {key!r} has no place in the original SD layout: "
                                 "only UNet2DConditionModel layouts of SD 1.x/2.x can be exported")
            name = key
        else:
            source, target, inner = match
            rest = key[len(source):]
            for old, new in inner.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = target + rest
        if prefix + name in out:
            raise InputError(f"two weights map to {prefix + name!r}: the layout is not an SD layout")
        out[prefix + name] = tensor
    return out


def text_encoder_key(key: str) -> str:
    """A CLIPTextModel weight's name in SD 1.x checkpoints: `cond_stage_model.transformer.text_model.<...>`. Recent
    transformers name the weights without the `text_model.` wrapper; the checkpoint layout always has it."""
    return SD1_TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)


def original_layout(pipe) -> dict[str, torch.Tensor]:
    """The pipe's UNet, VAE and SD 1.x text encoder as one original-layout state dict (CPU, contiguous)."""
    unet = rename(pipe.unet.state_dict(), unet_prefixes(pipe.unet.config), UNET_PREFIX, keep_unlisted=False)
    vae_state = pipe.vae.state_dict()
    for key, tensor in vae_state.items():  # LDM's VAE attention projections are 1x1 convolutions
        if ".mid_block.attentions.0." in key and key.endswith("weight") and tensor.ndim == 2:
            vae_state[key] = tensor[:, :, None, None]
    vae = rename(vae_state, vae_prefixes(pipe.vae.config), VAE_PREFIX, keep_unlisted=True)
    text = {text_encoder_key(key): t for key, t in pipe.text_encoder.state_dict().items()
            if not key.endswith("position_ids")}  # a buffer, rebuilt on load
    # copy=True: on CPU `.to` would alias the live weights, which the merge's restore puts back afterwards
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in {**unet, **vae, **text}.items()}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def check_export_target(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a bad output path before any work: not .safetensors, or an existing file without `overwrite`."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"out={str(out)!r}: a checkpoint is written as .safetensors (the only format that cannot "
                         "run code when loaded): use e.g. model.safetensors")
    if out.exists() and not overwrite:
        raise InputError(f"out={str(out)!r} exists: pass overwrite=True (CLI: --overwrite) or choose another path")
    if out.exists() and out.is_dir():
        raise InputError(f"out={str(out)!r} is a folder: give a file path ending in .safetensors")
    return out


def check_family(pipe) -> str:
    family = detect_family(pipe.unet)
    if family == "SDXL":
        raise InputError("an SDXL model was given: SDXL checkpoints (two text encoders under conditioner.*) cannot be "
                         "exported yet; export SD 1.x-style models, or save the SDXL pipeline as a diffusers folder")
    if family == "SD2":
        raise InputError("an SD 2.x model was given: its OpenCLIP text encoder's original layout "
                         "(cond_stage_model.model.*, fused attention projections) is not written yet; save the "
                         "pipeline as a diffusers folder instead (pipe.save_pretrained)")
    return family


def export_checkpoint(model: LoadedModel, out: str | os.PathLike, adapters: Sequence[AdapterUse] = (), *,
                      overwrite: bool = False, title: str | None = None) -> Path:
    """Write `model` with `adapters` ((file or Adapter, scale) pairs) merged into `out`, one original-layout
    single-file `.safetensors`, through a temporary file and a rename; returns the path.

    Each adapter is merged at its scale (adapters/fusion.py: exact for weight-delta methods; the model's weights
    are restored bit for bit afterwards). Refused before any work: a bad `out`, an SD 2.x/SDXL model, missing
    files; before any weight changes: an adapter for another base or one that is not a weight delta (SC-Tuner,
    membranes, which change activations, not weights: attach them when generating instead).
    The header holds `modelspec.*`, an A1111-style `parameters` line with the adapters' short hashes, and
    `studio.merged_adapters` (JSON: name, hash, scale, method of each)."""
    # 1. Check everything that needs no weights
    out = check_export_target(out, overwrite)
    pipe = model.pipe
    check_family(pipe)
    check_adapters(adapters)
    link_pipeline(pipe)  # LoRA files of other tools adapt the text encoder too

    # 2. Read the adapters and refuse what cannot be merged
    read: list[tuple[Adapter, float, str, str | None]] = []  # adapter, scale, name, file hash
    for i, (source, scale) in enumerate(adapters):
        adapter = read_adapter(f"adapters[{i}]", source, pipe.unet)
        if not adapter.is_weight_delta:
            raise InputError(f"adapters[{i}] ({adapter.method}) changes activations, not weights, so it cannot be "
                             "merged into a checkpoint: leave it out and attach it when generating")
        if adapter.unet is pipe.unet:
            raise InputError(f"adapters[{i}] ({adapter.method}) is attached to this model: detach it first, or pass "
                             "its file")
        is_file = not isinstance(source, Adapter)
        name = Path(source).stem if is_file else adapter.method
        read.append((adapter, float(scale), name, file_hash([Path(source)]) if is_file else None))

    # 3. Merge (UNet through merge_into, restored on exit; text-encoder deltas added to the exported copy only)
    try:
        merged = merge_into(pipe.unet, [(a, s) for a, s, _, _ in read]) if read else contextlib.nullcontext()
        with merged:
            state = original_layout(pipe)
    except ValueError as e:  # merge_into's refusals: another base, non-finite weights
        raise InputError(str(e)) from e
    for adapter, scale, name, _ in read:
        if isinstance(adapter, ForeignLoRA):
            for component, deltas in adapter.text_encoder_deltas(scale).items():
                if component != "text_encoder":
                    raise InputError(f"adapter {name} adapts {component}, which an SD 1.x model does not have")
                for key, delta in deltas.items():
                    target = text_encoder_key(key)
                    state[target] = (state[target].float() + delta.cpu()).to(state[target].dtype)

    # 4. Header and atomic write
    metadata = checkpoint_metadata(model, read, title or out.stem)
    return write_safetensors(state, out, metadata)


def checkpoint_metadata(model: LoadedModel, adapters: list[tuple[Adapter, float, str, str | None]],
                        title: str) -> dict[str, str]:
    """safetensors header (strings only): SAI modelspec, an A1111 infotext-style `parameters` line and our own
    `studio.*` keys (docs: shared conventions, sections 2-3)."""
    pipe = model.pipe
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    merged = [{"name": name, "hash": digest, "scale": scale, "method": a.method} for a, scale, name, digest in adapters]
    params = {"Model": model.name, "Model hash": model.hash}
    if merged:
        params["Merged adapters"] = ", ".join(f"{m['name']}:{m['scale']:g}" for m in merged)
    hashes = [f"{m['name']}: {m['hash']}" for m in merged if m["hash"]]
    if hashes:
        params["Lora hashes"] = ", ".join(hashes)
    # A1111 quotes values holding commas or colons
    line = ", ".join(f'{k}: "{v}"' if ("," in v or ":" in v) else f"{k}: {v}" for k, v in params.items())
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/CompVis/stable-diffusion",
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction, prediction),
        "modelspec.date": datetime.date.today().isoformat(),
        "parameters": line,
        "studio.base_model": json.dumps({"name": model.name, "hash": model.hash, "family": model.family}),
        "studio.merged_adapters": json.dumps(merged),
        "studio.scheduler": json.dumps(dict(pipe.scheduler.config), default=str),
    }
