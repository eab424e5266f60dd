"""kohya/A1111 LoRA names and files: `lora_unet_<module path, "." -> "_">.lora_down.weight` / `.lora_up.weight` /
`.alpha`, text encoders under `lora_te_` (SD 1.x/2.x), `lora_te1_` / `lora_te2_` (SDXL).

Names are matched by *encoding*: every real module path of the loaded model is turned into its kohya name and
looked up exactly (`module_names`). Decoding a name back into a path cannot be done in general (`to_q`,
`down_blocks` and `text_model` hold underscores of their own), so it is never done for foreign files. kohya trains
SDXL on the original (LDM/sgm) UNet, whose module names differ (`input_blocks_4_1_...`): `ldm_path` spells a
diffusers path the LDM way, so those names are encoded too, and still only matched.

`export_kohya` writes an adapter of this studio as a kohya file (alpha kept as `.alpha` tensors; `ss_*` and
`modelspec.*` header strings) that A1111, ComfyUI and diffusers' `load_lora_weights` read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .base import Adapter
from .deltas import lora_from_deltas
from .io import write_safetensors
from .lora import LoRA

# Model component (a pipeline attribute) -> the kohya prefixes of its modules; the first is what we write.
# SD 1.x/2.x files name their one text encoder `lora_te_`; SDXL files `lora_te1_` (CLIP-L) and `lora_te2_`
# (OpenCLIP-G); diffusers' converter writes `lora_te1_` for any `text_encoder`, so both are read for it.
PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
# <module name>.<part>: the parts of a plain kohya LoRA (LoCon included: a conv down/up pair is still lora_down /
# lora_up). LyCORIS' other parts (hada_*, lokr_*, lora_mid, dora_scale) are recognised to be reported, not loaded.
KOHYA_KEY = re.compile(r"(lora_(?:unet|te[12]?)_\w+)\.([\w.]+)")
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# What sd-scripts writes in `ss_base_model_version`, per family.
SS_BASE_MODEL_VERSION = {"SD1": "sd_v1", "SD2": "sd_v2", "SDXL": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"SD1": "stable-diffusion-v1", "SD2": "stable-diffusion-v2",
                          "SDXL": "stable-diffusion-xl-v1-base"}


def kohya_name(component: str, path: str) -> str:
    """The kohya name of a module: `lora_unet_down_blocks_0_attentions_0_proj_in` (the name we write)."""
    return PREFIXES[component][0] + path.replace(".", "_")


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every Linear and Conv2d of `model` (what a LoRA can adapt), seen through peft wrappers that
    another adapter left there (the path is the wrapper's, the layer its base layer; its own lora_A/B are skipped)."""
    found: dict[str, nn.Module] = {}
    wrapped: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if wrapped and path.startswith(wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            found[path] = module.get_base_layer()
            wrapped += (f"{path}.",)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and path:
            found[path] = module
    return found


def _resnet_ldm(rest: str) -> str | None:
    """A diffusers ResnetBlock2D's inner name, the LDM way (None: a name LDM spells the same, or none)."""
    return {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
            "conv_shortcut": "skip_connection"}.get(rest)


def ldm_path(path: str, config: Any) -> str | None:
    """The UNet module `path` spelled as the original (LDM/sgm) UNet names it, which kohya uses for SDXL
    (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`); None where there is no such module.

    The block arithmetic is the LDM UNet's: `input_blocks` holds conv_in, then per down block `layers` blocks of
    (resnet[, attention]) and a downsampler; `output_blocks` holds `layers + 1` per up block, the last with the
    upsampler (after the attention, if any); `middle_block` is resnet, attention, resnet."""
    layers = config.layers_per_block
    if not isinstance(layers, int):
        return None  # per-block layer counts: no published model uses them with kohya names
    simple = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}
    if path in simple:
        return simple[path]
    parts = path.split(".")
    if parts[0] == "down_blocks" and len(parts) >= 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op" if rest == "conv" else None
        head = f"input_blocks.{1 + block * (layers + 1) + index}"
    elif parts[0] == "up_blocks" and len(parts) >= 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        last = f"output_blocks.{block * (layers + 1) + layers}"
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config.up_block_types[block]
            return f"{last}.{2 if has_attention else 1}.conv" if rest == "conv" else None
        head = f"output_blocks.{block * (layers + 1) + index}"
    elif parts[0] == "mid_block" and len(parts) >= 3:
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        position = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, index))
        if position is None:
            return None
        return f"middle_block.{position}.{_resnet_ldm(rest) or rest}" if rest else None
    else:
        return None
    if kind == "resnets":
        inner = _resnet_ldm(rest)
        return f"{head}.0.{inner}" if inner else None
    if kind == "attentions":
        return f"{head}.1.{rest}" if rest else None
    return None


def spellings(component: str, path: str, model: nn.Module) -> list[str]:
    """Every dotted name other tools use for the module `path` of `model`: its own; a UNet module's LDM name
    (`ldm_path`); a text encoder's name under `text_model.`, where transformers 4 had it (its CLIP text models
    wrapped everything but the projection in `text_model`, which kohya and diffusers files of that time name and
    transformers 5 dropped)."""
    found = [path]
    if component == "unet":
        if (ldm := ldm_path(path, model.config)) is not None:
            found.append(ldm)
    elif not hasattr(model, "text_model") and not path.startswith("text_projection"):
        found.append(f"text_model.{path}")
    return found


def module_names(models: Mapping[str, nn.Module]) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Every kohya name of every adaptable module of `models` (component -> model: unet, text_encoder,
    text_encoder_2) -> (component, module path), each of its `spellings` encoded; and the names that two modules
    would share (left out, reported as ambiguous)."""
    names: dict[str, tuple[str, str]] = {}
    ambiguous: set[str] = set()
    for component, model in models.items():
        for path in adaptable_modules(model):
            for spelling in spellings(component, path, model):
                for prefix in PREFIXES[component]:
                    name = prefix + spelling.replace(".", "_")
                    if name in names and names[name] != (component, path):
                        ambiguous.add(name)
                    names[name] = (component, path)
    for name in ambiguous:
        del names[name]
    return names, ambiguous


# -- the words that are known to hold underscores in our own (SPM) files -----------------------------------------
# Only for files this studio wrote from a diffusers UNet's Transformer2DModel blocks, whose tensor names have to be
# read without a UNet (Adapter.from_shapes): foreign files are never decoded (see the module docstring).
_UNET_WORDS = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
               "proj_in", "proj_out")


def decode_own_unet_name(name: str) -> str:
    """The UNet path of a kohya name *this studio wrote* ("down_blocks_0_attentions_0_proj_in" ->
    "down_blocks.0.attentions.0.proj_in"); refused unless encoding the result gives the name back."""
    path = name.replace("_", ".")
    for word in _UNET_WORDS:
        path = path.replace(word.replace("_", "."), word)
    if path.replace(".", "_") != name:
        raise ValueError(f"cannot read the module path of the kohya name {name!r}")
    return path


# -- writing ---------------------------------------------------------------------------------------------------------
def kohya_tensors(adapter: Adapter, rank: int | None = None) -> tuple[dict[str, torch.Tensor], int, float]:
    """(kohya tensors, rank, alpha) of a UNet adapter. A LoRA (or membrane, orthogonal LoRA) keeps its own factors
    and alpha; another weight-delta method (SaRA) is factored by truncated SVD at `rank` with alpha = rank."""
    if isinstance(adapter, LoRA):
        if rank is not None and rank != adapter.config.rank:
            raise ValueError(f"this LoRA has rank {adapter.config.rank}; export it at its own rank (rank=None)")
        alpha = float(adapter.config.alpha)
        tensors = {}
        for key, path in adapter.paths.items():
            name = kohya_name("unet", path)
            tensors[f"{name}.lora_down.weight"] = adapter.lora_A[key].weight.detach()
            tensors[f"{name}.lora_up.weight"] = adapter.lora_B[key].weight.detach()
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        return tensors, adapter.config.rank, alpha
    if not adapter.is_weight_delta:
        raise ValueError(f"a {adapter.method} adapter is not a weight delta: it has no LoRA form to export")
    if rank is None:
        raise ValueError(f"a {adapter.method} adapter is exported by SVD: give the LoRA rank to keep (e.g. rank=16)")
    export = lora_from_deltas(adapter.delta_weights(scale=1.0), rank)
    tensors = {}
    for key, t in export.tensors.items():
        m = re.fullmatch(r"unet\.(.+)\.lora_([AB])\.weight", key)
        name = kohya_name("unet", m[1])
        tensors[f"{name}.{'lora_down' if m[2] == 'A' else 'lora_up'}.weight"] = t
        tensors[f"{name}.alpha"] = torch.tensor(float(export.rank))
    return tensors, export.rank, float(export.rank)


def kohya_header(family: str, *, rank: int, alpha: float, title: str, trigger_words: Iterable[str] = (),
                 resolution: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The header strings A1111 and ComfyUI show for a LoRA: kohya's `ss_*` and SAI's `modelspec.*`."""
    words = list(trigger_words)
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": SS_BASE_MODEL_VERSION[family],
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[family]}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if words:
        header["modelspec.trigger_phrase"] = ", ".join(words)
        # A1111 shows the training tags as a cloud; the trigger words are the tags we know of.
        header["ss_tag_frequency"] = json.dumps({"trigger words": {w: 1 for w in words}})
    if resolution is not None:
        header["modelspec.resolution"] = f"{resolution}x{resolution}"
    header.update(extra or {})
    return header


def export_kohya(adapter: Adapter, path: str | os.PathLike, *, trigger_words: Iterable[str] = (),
                 rank: int | None = None, resolution: int | None = None,
                 extra: Mapping[str, str] | None = None) -> Path:
    """Write `adapter` (a LoRA, membrane or orthogonal LoRA as it is; another weight delta by SVD at `rank`) as a
    kohya/A1111 LoRA file, atomically. The file has no `studio.*` entries: it is a plain kohya LoRA everywhere,
    this studio included (it loads back as a foreign LoRA). `extra`: more header strings (e.g. `ss_*`)."""
    if isinstance(trigger_words, str):
        raise TypeError(f"trigger_words must be a list of strings, got the string {trigger_words!r}")
    family = adapter.base_family
    if family is None:
        raise ValueError(f"this {adapter.method} adapter has no base model recorded; build it with from_unet(unet) "
                         "or load it from its file before exporting")
    tensors, r, alpha = kohya_tensors(adapter, rank)
    path = Path(path)
    header = kohya_header(family, rank=r, alpha=alpha, title=path.stem, trigger_words=trigger_words,
                          resolution=resolution, extra=extra)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return write_safetensors(tensors, path, header)
