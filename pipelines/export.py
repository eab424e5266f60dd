"""Export a model with adapters merged into one single-file checkpoint in the original Stable Diffusion layout.

    export_checkpoint(model, "out/shapes-sks.safetensors", adapters=[("runs/sks.safetensors", 0.8)])
    studio checkpoint export --model embedded --adapter sks:0.8 --out out/shapes-sks.safetensors

The file holds what A1111, ComfyUI and diffusers' `from_single_file` read, for each family:

- every family: `model.diffusion_model.*` (the UNet in the CompVis LDM naming; SDXL's added-condition embedding
  `add_embedding.linear_1/2` as `label_emb.0.0/0.2`) and `first_stage_model.*` (the VAE);
- SD 1.x: `cond_stage_model.transformer.text_model.*`, the CLIP text encoder under its Hugging Face names;
- SD 2.x: `cond_stage_model.model.*`, the OpenCLIP-H text tower under OpenCLIP's names: token_embedding,
  positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked in that order),
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final and text_projection;
- SDXL: `conditioner.embedders.0.transformer.text_model.*` (CLIP-L, Hugging Face names) and
  `conditioner.embedders.1.model.*` (OpenCLIP-bigG, OpenCLIP names as for SD 2.x).

OpenCLIP applies its projection as `x @ text_projection`, so the file holds the transpose of transformers'
`text_projection.weight` (SDXL). SD 2's text encoder in diffusers (a CLIPTextModel) has no projection: the file
gets an identity matrix there, which leaves the pooled output as diffusers computes it and gives OpenCLIP
readers the tensor they expect (diffusers' converter reads only its first dimension, the width).

SD 2's OpenCLIP-H tower has 24 blocks, but SD 2 conditions on the penultimate one's output, so diffusers' SD 2
text encoder keeps 23 blocks and its converter skips a `resblocks.23` found in a file. The 24th block's weights
are therefore gone; for a 23-block encoder the file gets an identity block 23 (zero attention and MLP output
projections: the block adds nothing to its input). A reader that runs all 24 blocks then computes exactly what
one stopping at the penultimate (A1111, ComfyUI and diffusers for SD 2) does, and no reader finds a missing key.
An encoder of another depth (a tiny test model) is written block for block, as it is.

The adapters are merged with each one's scale as its weight (adapters/fusion.py `merge_into`, W + Σ s_k ΔW_k),
which is what attaching them at those scales computes for weight-delta methods; a LoRA file of another tool also
adapts the text encoders (kohya `lora_te_`, SDXL's `lora_te1_` / `lora_te2_`), whose deltas are added to the
exported copy of each. The model itself is left exactly as it was.

Supported: SD 1.x, SD 2.x and SDXL text-to-image models (any UNet/VAE widths and depths with one
`layers_per_block`). Refused with the reason: a pipeline without the text encoders its family's layout holds (an
SDXL refiner), a UNet with weights the LDM layout has no place for (class embeddings of unCLIP/upscalers).

The mappings are our own, written from the two layouts (diffusers' loader `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` are their
inverse, which the tests use).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from adapters import Adapter
from adapters.base import detect_family
from adapters.foreign import ForeignLoRA, link_pipeline
from adapters.fusion import merge_into
from adapters.io import write_safetensors

from .attach import AdapterUse, check_adapters, read_adapter
from .errors import InputError
from .loading import LoadedModel, lora_hash

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
# Per family, each text encoder in the file: (pipeline attribute, prefix, layout: "hf" names or "openclip").
TEXT_ENCODERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "SD1": (("text_encoder", SD1_TEXT_PREFIX, "hf"),),
    "SD2": (("text_encoder", SD2_TEXT_PREFIX, "openclip"),),
    "SDXL": (("text_encoder", SDXL_TEXT_PREFIXES[0], "hf"), ("text_encoder_2", SDXL_TEXT_PREFIXES[1], "openclip")),
}
# OpenCLIP-H's depth; diffusers' SD 2 text encoder stops one block short (module docstring).
OPENCLIP_H_BLOCKS = 24

# Inside a ResNet block: diffusers name -> LDM name (UNet `ResBlock`, VAE `ResnetBlock`).
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
               "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
# The VAE's mid-block attention: diffusers' Linear projections were LDM's 1x1 convolutions.
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
# Inside a text transformer block: transformers name -> OpenCLIP name (q/k/v are stacked first, see openclip_layout).
OPENCLIP_BLOCK = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.in_proj_": "attn.in_proj_",
                  "self_attn.out_proj.": "attn.out_proj.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


# ---------------------------------------------------------------------------------------------
# Layout mappings: pure functions of the component's config, diffusers prefix -> LDM prefix
# ---------------------------------------------------------------------------------------------
def unet_prefixes(config) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every block of a UNet2DConditionModel.

    LDM numbers blocks flat: input_blocks.0 is conv_in, then per down level `layers_per_block` blocks of
    [ResBlock, (SpatialTransformer)] and one downsampler; output_blocks hold `layers_per_block + 1` blocks per up
    level, the upsampler appended to the last one after its ResBlock (and its attention, if the level has one).
    Inside blocks the names agree, linear projections (SD 2.x, SDXL: `use_linear_projection`) included: LDM's
    `use_linear_in_transformer` has Linear proj_in/proj_out of the same shapes. SDXL's added-condition MLP is
    LDM's `label_emb`."""
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
    if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + size ids
        pairs += [("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {})]
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
           keep_unlisted: bool, component: str = "UNet") -> dict[str, torch.Tensor]:
    """`state` under the LDM names, each prefixed by `prefix`. Loud: a key no pair covers is an error unless
    `keep_unlisted` (then it keeps its name), and two keys landing on one name is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
        if match is None:
            if not keep_unlisted:
                raise InputError(f"the {component} weight {key!r} has no place in the original SD layout: "
                                 "only the text-to-image layouts of SD 1.x/2.x and SDXL can be exported")
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


def text_encoder_state(encoder: torch.nn.Module, deltas: Mapping[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights (CPU copies) with `deltas` added (same keys as its state dict,
    summed in fp32), under the full names checkpoints use: `text_model.<...>` and `text_projection.weight`. Recent
    transformers name a CLIPTextModel's weights without the `text_model.` wrapper; the layouts always have it."""
    # copy=True: on CPU `.to` would alias the live weights, which must stay as they are
    state = {key: t.detach().to("cpu", copy=True) for key, t in encoder.state_dict().items()
             if not key.endswith("position_ids")}  # a buffer, rebuilt on load
    for key, delta in (deltas or {}).items():
        if key not in state:
            raise InputError(f"a text-encoder delta names {key!r}, which the text encoder does not have")
        state[key] = (state[key].float() + delta.cpu()).to(state[key].dtype)
    return {key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: t
            for key, t in state.items()}


def openclip_layout(state: dict[str, torch.Tensor], prefix: str, *, pad_to: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """`state` (text_encoder_state's names) under OpenCLIP's names, each prefixed by `prefix`: q, k, v stacked
    into `attn.in_proj_*`, the projection transposed (an identity where the encoder has none). `pad_to`: a depth
    to reach with identity blocks when the encoder is exactly one block short of it (SD 2, module docstring)."""
    state = dict(state)
    blocks = sorted({int(key.split(".")[3]) for key in state if key.startswith("text_model.encoder.layers.")})
    for i in blocks:
        block = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            state[f"{block}in_proj_{kind}"] = torch.cat([state.pop(f"{block}{p}_proj.{kind}") for p in "qkv"])
    if "text_projection.weight" in state:  # transformers computes x W^T, OpenCLIP x P: P = W^T
        state["text_projection.weight"] = state["text_projection.weight"].T.contiguous()
    else:
        width = state["text_model.final_layer_norm.weight"]
        state["text_projection.weight"] = torch.eye(len(width), dtype=width.dtype)
    if pad_to is not None and len(blocks) == pad_to - 1:
        last = f"text_model.encoder.layers.{blocks[-1]}."
        for key in [k for k in state if k.startswith(last)]:
            # Zero output projections (attention and MLP) make the residual block the identity; unit norms
            # keep its LayerNorms ordinary.
            unit = key.endswith("layer_norm1.weight") or key.endswith("layer_norm2.weight")
            padded = f"text_model.encoder.layers.{pad_to - 1}." + key[len(last):]
            state[padded] = torch.ones_like(state[key]) if unit else torch.zeros_like(state[key])
        blocks.append(pad_to - 1)
    pairs: list[tuple[str, str, dict[str, str]]] = [
        ("text_model.embeddings.token_embedding.", "token_embedding.", {}),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding", {}),
        ("text_model.final_layer_norm.", "ln_final.", {}),
        ("text_projection.weight", "text_projection", {}),
    ]
    pairs += [(f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPENCLIP_BLOCK) for i in blocks]
    return rename(state, pairs, prefix, keep_unlisted=False, component="text encoder")


def original_layout(pipe, text_deltas: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The pipe's UNet, VAE and text encoder(s) as one original-layout state dict (CPU copies, contiguous).
    `text_deltas`: component ("text_encoder", "text_encoder_2") -> deltas added to that encoder's copy."""
    family = check_family(pipe)
    unet = rename(pipe.unet.state_dict(), unet_prefixes(pipe.unet.config), UNET_PREFIX, keep_unlisted=False)
    vae_state = pipe.vae.state_dict()
    for key, tensor in vae_state.items():  # LDM's VAE attention projections are 1x1 convolutions
        if ".mid_block.attentions.0." in key and key.endswith("weight") and tensor.ndim == 2:
            vae_state[key] = tensor[:, :, None, None]
    vae = rename(vae_state, vae_prefixes(pipe.vae.config), VAE_PREFIX, keep_unlisted=True)
    text: dict[str, torch.Tensor] = {}
    for component, prefix, layout in TEXT_ENCODERS[family]:
        state = text_encoder_state(getattr(pipe, component), (text_deltas or {}).get(component))
        if layout == "hf":
            text.update({prefix + key: t for key, t in state.items()})
        else:
            text.update(openclip_layout(state, prefix, pad_to=OPENCLIP_H_BLOCKS if family == "SD2" else None))
    # copy=True: on CPU `.to` would alias the live weights, which the merge's restore puts back afterwards (the
    # text encoders' tensors are copies already)
    copied = {name: t.detach().to("cpu", copy=True) for name, t in {**unet, **vae}.items()}
    return {name: t.contiguous() for name, t in {**copied, **text}.items()}


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
    """The model's family (adapters.detect_family), once its pipeline is known to have the text encoders that
    family's checkpoint layout holds (an SDXL refiner, with only OpenCLIP-bigG, is refused)."""
    family = detect_family(pipe.unet)
    missing = [name for name, _, _ in TEXT_ENCODERS[family] if getattr(pipe, name, None) is None]
    if missing:
        raise InputError(f"this {family} pipeline has no {' or '.join(missing)}, which an {family} checkpoint holds "
                         "(an SDXL refiner's single-encoder layout is not written): export a text-to-image "
                         "pipeline, or save this one as a diffusers folder (pipe.save_pretrained)")
    return family


def export_checkpoint(model: LoadedModel, out: str | os.PathLike, adapters: Sequence[AdapterUse] = (), *,
                      overwrite: bool = False, title: str | None = None) -> Path:
    """Write `model` with `adapters` ((file or Adapter, scale) pairs) merged into `out`, one original-layout
    single-file `.safetensors`, through a temporary file and a rename; returns the path.

    Each adapter is merged at its scale (adapters/fusion.py: exact for weight-delta methods; the model's weights
    are restored bit for bit afterwards); text-encoder parts of other tools' LoRA files are merged into the
    matching encoder (SDXL: `lora_te1_` into CLIP-L, `lora_te2_` into OpenCLIP-bigG). Refused before any work: a
    bad `out`, a pipeline without its family's text encoders, missing files; before any weight changes: an adapter
    for another base or one that is not a weight delta (SC-Tuner, membranes, which change activations, not
    weights: attach them when generating instead).
    The header holds `modelspec.*`, an A1111-style `parameters` line with the adapters' short hashes, and
    `studio.merged_adapters` (JSON: name, hash, scale, method of each)."""
    # 1. Check everything that needs no weights
    out = check_export_target(out, overwrite)
    pipe = model.pipe
    family = check_family(pipe)
    check_adapters(adapters)
    link_pipeline(pipe)  # LoRA files of other tools adapt the text encoders too

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
        read.append((adapter, float(scale), name, lora_hash(Path(source)) if is_file else None))

    # 3. Merge: the UNet through merge_into (restored on exit), text-encoder deltas into the exported copies only
    text_deltas: dict[str, dict[str, torch.Tensor]] = {}
    encoders = {name for name, _, _ in TEXT_ENCODERS[family]}
    for adapter, scale, name, _ in read:
        if not isinstance(adapter, ForeignLoRA):
            continue
        for component, deltas in adapter.text_encoder_deltas(scale).items():
            if component not in encoders:
                raise InputError(f"adapter {name} adapts {component}, which an {family} model does not have")
            summed = text_deltas.setdefault(component, {})
            for key, delta in deltas.items():
                summed[key] = summed[key] + delta if key in summed else delta
    try:
        merged = merge_into(pipe.unet, [(a, s) for a, s, _, _ in read]) if read else contextlib.nullcontext()
        with merged:
            state = original_layout(pipe, text_deltas)
    except ValueError as e:  # merge_into's refusals: another base, non-finite weights
        raise InputError(str(e)) from e

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
    architecture, implementation = modelspec_architecture(model.family, prediction)
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction, prediction),
        "modelspec.date": datetime.date.today().isoformat(),
        "parameters": line,
        "studio.base_model": json.dumps({"name": model.name, "hash": model.hash, "family": model.family}),
        "studio.merged_adapters": json.dumps(merged),
        "studio.scheduler": json.dumps(dict(pipe.scheduler.config), default=str),
    }


def modelspec_architecture(family: str, prediction: str) -> tuple[str, str]:
    """SAI modelspec `architecture` and `implementation` of a full checkpoint of `family` (SD 2.x names its v- and
    epsilon-prediction variants apart, as the spec does)."""
    if family == "SDXL":
        return "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"
    if family == "SD2":
        variant = "768-v" if prediction == "v_prediction" else "512"
        return f"stable-diffusion-v2-{variant}", "https://github.com/Stability-AI/stablediffusion"
    return "stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion"
