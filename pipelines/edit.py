"""Real-image editing with uniform attention maps (UAM; Mo et al., WACV 2025, arXiv 2411.19652).

See docs/methods.md ("Uniform attention maps (UAM) for editing") for the algorithm, its defaults and where the
reference code departs from the paper.

    image ─VAE─> z0 ─DDIM inversion, one 2-row batch─> z^u_T (uniform attention, "")
                                                      z_T   (normal attention, "" or the source prompt)
    denoise three branches in one batch per step:
        u    z^u_T  uniform, "",     no CFG  -> x̂0_u, the high-fidelity reconstruction
        src  z_T    normal,  source, CFG     -> x̂0_src ┐ Δ = x̂0_src − x̂0_tgt -> keep mask M
        tgt  z_T    normal,  target, CFG     -> x̂0_tgt ┘ on 0 < t < T_mask: x̂0_tgt <- M·x̂0_u + (1−M)·x̂0_tgt

The maths are pure module-level functions (tested alone); the public entry points are `invert`,
`reconstruct`, `edit` (with `save_edit`) and the baselines `ddim_reconstruct` and `edit_without_uniform`. All latent
arithmetic runs in fp32 whatever the model's dtype. The pipe is left as it was: its scheduler is only
read (a DDIM schedule is built from its config), the attention processors are restored, and the adapters `edit`
attaches for its call (as `generate` does, their text-encoder parts included) are detached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from adapters import Adapter, read_metadata
from adapters.base import unet_fingerprint
from adapters.checks import is_number
from adapters.context import CallContext, Row, attached_adapters, call_context, current_context
from adapters.foreign import link_pipeline
from adapters.uniform_attention import attach_uniform_attention

from .attach import AdapterUse, adapter_params, attached, check_adapters
from .control import is_controller
from .errors import GenerationInterrupted, InputError, NonFiniteError
from .generate import (
    GenerationSettings,
    ProgressCallback,
    added_conditions,
    check_guidance,
    check_steps,
    model_identity,
    non_finite_message,
    save_png,
)
from .images import ImageInput, load_image, load_mask, write_png
from .loading import LoadedModel

ThresholdMode = Literal["paper", "reference"]
MaskChannels = Literal["per_channel", "max"]
Model = LoadedModel | StableDiffusionPipeline


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps of one DDIM run and the ᾱ they index; both inversion and denoising walk it."""

    timesteps: list[int]  # denoising order, e.g. 981, 961, ..., 1 for 50 "leading" steps with offset 1
    alphas_cumprod: torch.Tensor  # ᾱ for every training timestep, fp32

    def alpha_bar(self, t: int) -> torch.Tensor:
        """ᾱ_t, and ᾱ_0 = alphas_cumprod[0] for t < 0 (the P2P/MasaCtrl convention of UAM's reference code)."""
        return self.alphas_cumprod[max(t, 0)]

    def previous(self, i: int) -> int:
        """The timestep that denoising step i lands on: the next one in the schedule, −1 after the last."""
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1


def ddim_schedule(scheduler_config: dict, num_inference_steps: int) -> DDIMSchedule:
    """A DDIM schedule from any diffusers scheduler config (its betas, timestep spacing and offset),
    built on a fresh `DDIMScheduler` so that the pipe's own scheduler is never touched."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    return DDIMSchedule([int(t) for t in scheduler.timesteps], scheduler.alphas_cumprod.float())


# ---------------------------------------------------------------------------------------------
# Maths (UAM, arXiv 2411.19652, sec. 3.1 and 3.3; docs/methods.md); tensors in, tensors out
# ---------------------------------------------------------------------------------------------
def predict_x0(sample: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t, DDIM's predicted clean latent (Song et al. 2021, Eq. 12)."""
    return (sample - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def model_output_to_epsilon(sample: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor | float,
                            prediction_type: str) -> torch.Tensor:
    """ε from the UNet's output at level ᾱ, by the scheduler's `prediction_type`; x̂0 = `predict_x0(sample, ε, ᾱ)`
    then equals the prediction type's own x̂0 exactly, so the rest of the maths reads ε alone.

    - "epsilon":      ε = output.
    - "v_prediction": v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022, sec. 4), so ε = √(1−ᾱ)·z_t + √ᾱ·v and
                      x0 = √ᾱ·z_t − √(1−ᾱ)·v (SD 2.x-768).
    - "sample":       output = x0, so ε = (z_t − √ᾱ·x0) / √(1−ᾱ).

    The map is affine in `output` for a fixed `sample`, so classifier-free guidance may combine the raw outputs first.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return (1 - alpha_bar) ** 0.5 * sample + alpha_bar**0.5 * output
    if prediction_type == "sample":
        return (sample - alpha_bar**0.5 * output) / (1 - alpha_bar) ** 0.5
    raise InputError(f"prediction_type={prediction_type!r} is unknown: the scheduler must use one of "
                     f"{PREDICTION_TYPES}")


def ddim_renoise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """z = √ᾱ·x̂0 + √(1−ᾱ)·ε: the deterministic (η = 0) half of DDIM's Eq. 12 that moves x̂0 to level ᾱ."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps


def ddim_denoising_step(sample: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor | float,
                        alpha_prev: torch.Tensor | float) -> torch.Tensor:
    """z_{t_prev} = √ᾱ_{t_prev}·x̂0 + √(1−ᾱ_{t_prev})·ε with x̂0 from z_t (DDIM, η = 0; UAM sec. 3.1)."""
    return ddim_renoise(predict_x0(sample, eps, alpha_t), eps, alpha_prev)


def ddim_inversion_step(sample: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor | float,
                        alpha_t: torch.Tensor | float) -> torch.Tensor:
    """z_t = √ᾱ_t·x̂0 + √(1−ᾱ_t)·ε with x̂0 = (z_{t_prev} − √(1−ᾱ_{t_prev})·ε)/√ᾱ_{t_prev} (UAM sec. 3.1).

    ε = ε_θ(z_{t_prev}, t) is predicted at the *destination* timestep (P2P/MasaCtrl convention), so
    for the same ε this is the exact inverse of `ddim_denoising_step`.
    """
    return ddim_renoise(predict_x0(sample, eps, alpha_prev), eps, alpha_t)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε = ε_∅ + w·(ε_c − ε_∅) (Ho & Salimans 2022)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def quantile_levels(quantile: float, num_steps: int) -> torch.Tensor:
    """q_i = linspace(0, q, steps)[i]: the threshold's quantile level ramps up towards q (UAM sec. 3.3.2)."""
    return torch.linspace(0, quantile, num_steps)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a (B, C, H, W) 0/1 mask by a (2r+1)² square, per channel: a stride-1 max-pool."""
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius) if radius > 0 else mask


def adaptive_keep_mask(x0_source: torch.Tensor, x0_target: torch.Tensor, level: float, *,
                       threshold_mode: ThresholdMode = "reference", dilation: int = 1,
                       mask_channels: MaskChannels = "per_channel", floor: float = 0.0) -> torch.Tensor:
    """The keep mask M (1 = copy the auxiliary branch) from where the branches disagree (UAM sec. 3.3.2; the
    reference code's variant: docs/methods.md, UAM).

    Δ = x̂0_src − x̂0_tgt element-wise; λ = quantile(|Δ|, level) per sample over all C·H·W elements.

    - "paper":     E = 1[|Δ| > λ],  M = dilate(1 − E): the keep region grows.
    - "reference": E = 1[|Δ| > 2λ], M = 1 − dilate(E): the code soft-thresholds first and tests
      |Δ − clamp(Δ, ±λ)| > λ, which is |Δ| > 2λ; the edit region grows.

    mask_channels "per_channel" keeps one mask per latent channel (the reference); "max" marks a position
    edited in every channel once any channel is (our extension). `floor` (our extension): |Δ| at or below it
    never counts as edited, whatever λ; in scaled-latent units, whose variance the VAE's scaling factor sets
    to about 1 on every SD family. x0_*: (B, C, H, W) -> M: (B, C, H, W).
    """
    delta = (x0_source - x0_target).abs().float()
    lam = torch.quantile(delta.flatten(1), level, dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    edit = delta > (2 * lam if threshold_mode == "reference" else lam).clamp(min=floor)
    if mask_channels == "max":
        edit = edit.any(dim=1, keepdim=True).expand_as(edit)
    edit = edit.float()
    if threshold_mode == "reference":
        return 1 - dilate(edit, dilation)
    return dilate(1 - edit, dilation)


def restrict_edit(keep: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Edit only inside the user's mask U: E' = E ∧ U, i.e. M' = 1 − (1 − M)·U (U: (1, 1, h, w) 0/1)."""
    return 1 - (1 - keep) * allowed


def blend_branches(x0_aux: torch.Tensor, x0_source: torch.Tensor, x0_target: torch.Tensor, keep: torch.Tensor,
                   source_blend: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0_tgt <- M⊙x̂0_u + (1−M)⊙x̂0_tgt, and with `source_blend` x̂0_src <- (1−M)⊙x̂0_u + M⊙x̂0_src
    (UAM sec. 3.3.2; the reference code copies the auxiliary branch into the source's *edit* region)."""
    target = keep * x0_aux + (1 - keep) * x0_target
    source = (1 - keep) * x0_aux + keep * x0_source if source_blend else x0_source
    return source, target


# ---------------------------------------------------------------------------------------------
# Model plumbing: image/prompt encoding and one batched UNet call over several branches
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Branches:
    """The branches (latent rows) evaluated together in one UNet call per step.

    An unguided branch takes one row with its embedding; a guided one an (uncond, cond) pair that
    classifier-free guidance combines. Rows are laid out [unguided..., uncond of guided..., cond of
    guided...]: for the edit that is [u, src_uncond, tgt_uncond, src_cond, tgt_cond].
    """

    embeds: torch.Tensor  # (n, L, D) conditional embedding per branch
    # per branch, its row in the call context: prompt and branch name ("uniform": uniform cross-attention)
    names: tuple[Row, ...]
    guided: tuple[bool, ...]  # classifier-free guidance per branch
    uncond: torch.Tensor | None = None  # (1, L, D) embedding of "" for the unconditional rows
    guidance_scale: float = 1.0

    @property
    def rows(self) -> int:
        """UNet batch rows per step."""
        return len(self.guided) + sum(self.guided)

    @property
    def uniform(self) -> bool:
        return any(row.branch == "uniform" for row in self.names)

    def context(self, image_size: tuple[int, int]) -> CallContext:
        """The call context of every step: the rows in the order `_predict_noise` lays them out."""
        free = [row for row, guided in zip(self.names, self.guided) if not guided]
        guided = [row for row, g in zip(self.names, self.guided) if g]
        return CallContext(rows=free + [Row("", "uncond")] * len(guided) + guided, image_size=image_size)


def _predict_noise(pipe: StableDiffusionPipeline, branches: _Branches, latents: torch.Tensor, t: int,
                   alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε per branch (n, C, h, w) in fp32 from one UNet call over `branches.rows` rows, laid out as
    `branches.context` describes them (which rows are uniform is read from there).

    The output is read by the scheduler's prediction type at `alpha_bar` = ᾱ_t, the level the UNet was told
    (`model_output_to_epsilon`); every ε and x̂0 of this module comes through here."""
    guided = torch.tensor(branches.guided)  # CPU masks: row bookkeeping never waits for the accelerator
    free = ~guided
    parts = [(latents[free], branches.embeds[free])]
    if any(branches.guided):
        uncond = branches.uncond.expand(int(guided.sum()), -1, -1)
        parts += [(latents[guided], uncond), (latents[guided], branches.embeds[guided])]
    sample, context = (torch.cat(part) for part in zip(*parts))
    dtype = pipe.unet.dtype
    # SDXL's pooled text and size ids, per row in the same layout: the loop's call context carries them.
    ctx = current_context(pipe.unet)
    added = {k: v.to(dtype) for k, v in ctx.added_cond.items()} if ctx is not None and ctx.added_cond else None
    out = pipe.unet(sample.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added,
                    return_dict=False)[0].float()

    n_free = int(free.sum())
    eps = torch.empty_like(latents)
    eps[free] = out[:n_free]
    if any(branches.guided):  # CFG on the raw outputs: the conversion to ε is affine, so the order does not matter
        eps_uncond, eps_cond = out[n_free:].chunk(2)
        eps[guided] = classifier_free_guidance(eps_uncond, eps_cond, branches.guidance_scale)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    return model_output_to_epsilon(latents, eps, alpha_bar, prediction_type)


@contextlib.contextmanager
def _denoising_loop(pipe: StableDiffusionPipeline, branches: _Branches, latents: torch.Tensor) -> Iterator[None]:
    """The loop's call context, and uniform attention attached for the loop only when some branch uses it
    (both undone on exit)."""
    size = (latents.shape[-1] * pipe.vae_scale_factor, latents.shape[-2] * pipe.vae_scale_factor)
    with contextlib.ExitStack() as stack:
        if branches.uniform:
            stack.enter_context(attach_uniform_attention(pipe.unet))
        context = branches.context(size)
        # The UNet's added conditions (SDXL) of each row's prompt, rows laid out as `_predict_noise` stacks them.
        pooled = encode_pooled(pipe, [row.prompt for row in context.rows])
        context = dataclasses.replace(context, added_cond=added_conditions(pipe.unet, pooled, size))
        stack.enter_context(call_context(pipe.unet, context))
        yield


def _run_inversion(pipe: StableDiffusionPipeline, branches: _Branches, latents: torch.Tensor, schedule: DDIMSchedule,
                   callback: ProgressCallback | None = None) -> tuple[torch.Tensor, int]:
    """DDIM inversion z0 -> z_T of the stacked branch latents (n, C, h, w); returns (z_T, UNet rows run)."""
    num_steps = len(schedule.timesteps)
    with _denoising_loop(pipe, branches, latents):
        for step, i in enumerate(reversed(range(num_steps))):
            t, t_prev = schedule.timesteps[i], schedule.previous(i)
            eps = _predict_noise(pipe, branches, latents, t, schedule.alpha_bar(t))  # ε_θ(z_{t_prev}, t): destination t
            latents = ddim_inversion_step(latents, eps, schedule.alpha_bar(t_prev), schedule.alpha_bar(t))
            _report(callback, step + 1, num_steps)
    return latents, branches.rows * num_steps


def _run_denoising(pipe: StableDiffusionPipeline, branches: _Branches, latents: torch.Tensor, schedule: DDIMSchedule,
                   guide: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
                   callback: ProgressCallback | None = None) -> tuple[torch.Tensor, int]:
    """DDIM sampling (η = 0) of the stacked branch latents; returns (z_0, UNet rows run).

    `guide(step, t, x0)` may rewrite the predicted x̂0 of every branch before re-noising (the edit's blend).
    """
    with _denoising_loop(pipe, branches, latents):
        for i, t in enumerate(schedule.timesteps):
            alpha_t, alpha_prev = schedule.alpha_bar(t), schedule.alpha_bar(schedule.previous(i))
            eps = _predict_noise(pipe, branches, latents, t, alpha_t)
            if guide is None:
                latents = ddim_denoising_step(latents, eps, alpha_t, alpha_prev)
            else:  # each branch is re-noised with its own, unmodified ε (UAM sec. 3.3.2)
                latents = ddim_renoise(guide(i, t, predict_x0(latents, eps, alpha_t)), eps, alpha_prev)
            _report(callback, i + 1, len(schedule.timesteps))
    return latents, branches.rows * len(schedule.timesteps)


def _report(callback: ProgressCallback | None, step: int, total: int) -> None:
    """callback(step, total) after each step, as in `generate`; returning True stops the run."""
    if callback is not None and callback(step, total):
        raise GenerationInterrupted("editing stopped by the callback")


def encode_image(pipe: StableDiffusionPipeline, image: Image.Image) -> torch.Tensor:
    """z0 = scaling_factor · E(x).mean, (1, C, h, w) fp32: the posterior mean, so inversion is deterministic."""
    pixels = pipe.image_processor.preprocess(image).to(device=pipe._execution_device, dtype=pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean.float() * pipe.vae.config.scaling_factor


def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images from (n, C, h, w) latents through the pipe's VAE."""
    pixels = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """(n, L, D) text embeddings from the pipe's own `encode_prompt` ("" padded as its tokenizer pads it)."""
    # Keywords: SDXL's encode_prompt takes prompt_2 second, where SD's takes the device.
    return pipe.encode_prompt(prompt=prompts, device=pipe._execution_device, num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0]


def encode_pooled(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor | None:
    """(n, P) pooled text embeddings of a pipe with a second, projected text encoder (SDXL), as `encode_prompts`
    encodes the prompts; None for one text encoder (SD 1.x/2.x: `encode_prompt` gives no pooled output)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return None
    return pipe.encode_prompt(prompt=prompts, device=pipe._execution_device, num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[2]


def _image_size(pipe: StableDiffusionPipeline, height: int | None, width: int | None) -> tuple[int, int]:
    """(width, height) to work at: the model's native size unless given; multiples of the VAE factor."""
    factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * factor
    height, width = height or native, width or native
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value % factor:
            raise InputError(f"{name}={value!r} is not a multiple of {factor}: use e.g. {native} (the native size)")
    return width, height


def _check_model(model: Model, num_inference_steps: int) -> StableDiffusionPipeline:
    """The pipeline of `model` once it is known to suit UAM editing (SD 1.x/2.x or SDXL; ε-, v- or x0-prediction)."""
    pipe = model.pipe if isinstance(model, LoadedModel) else model
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type={prediction_type!r} is unknown: UAM editing reads the UNet's output as "
                         f"one of {PREDICTION_TYPES}; set the scheduler's prediction_type to the model's")
    check_steps(num_inference_steps, pipe.scheduler.config.num_train_timesteps, example=50)
    return pipe


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inversion:
    image: Image.Image  # the normalised input that was inverted
    image_latents: torch.Tensor  # z0 = scaling_factor · E(x).mean, (1, C, h, w) fp32
    uniform_latents: torch.Tensor  # z^u_T: start of the auxiliary branch (uniform attention, "")
    latents: torch.Tensor  # z_T: start of the source and target branches (normal attention, `prompt`)
    prompt: str  # the normal row's inversion prompt ("" = the MasaCtrl setup)
    schedule: DDIMSchedule
    unet_rows: int  # UNet row-evaluations this call ran: 2 x steps, or 0 when served from the cache


@dataclass(frozen=True)
class ImageResult:
    image: Image.Image
    unet_rows: int  # UNet row-evaluations this call ran


@dataclass(frozen=True)
class EditResult:
    image: Image.Image  # the edited image (target branch)
    reconstruction: Image.Image  # the auxiliary branch: the uniform-attention reconstruction of the input
    mask: Image.Image  # "L", image-sized: the edit region of the last blended step (mean over channels)
    inversion: Inversion
    unet_rows: int  # UNet row-evaluations this call ran, inversion included unless it was cached
    settings: GenerationSettings  # what made `image`: the target prompt, the edit's own keys in extra_params


# ---------------------------------------------------------------------------------------------
# Inversion cache: editing an image again with another target reuses it
# ---------------------------------------------------------------------------------------------
class InversionCache:
    """LRU of inversions keyed by the image's pixels, the model's identity and the inversion settings."""

    def __init__(self, max_entries: int = 8):  # at 512x512: ~1 MB each (the RGB image and three latents)
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Inversion] = OrderedDict()

    def get(self, key: tuple) -> Inversion | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: tuple, inversion: Inversion) -> None:
        self._entries[key] = inversion
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


INVERSION_CACHE = InversionCache()


def _model_key(pipe: StableDiffusionPipeline) -> tuple:
    """Which model, as loaded and wired now. Adapters attach through attention processors, forward
    hooks or peft layers (which rename parameters, so the fingerprint changes); all three are in the key,
    and so is every attached adapter's identity, scale, merged state and weights' version (an adapter
    trained or rescaled in place). Base weights changed in place by hand are not: clear the cache then."""
    unet = pipe.unet
    wiring = hashlib.sha256()
    for name, module in unet.named_modules():
        hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
        wiring.update(f"{name}:{[id(hook) for hook in hooks]};".encode())
    for name, processor in unet.attn_processors.items():
        wiring.update(f"{name}:{id(processor)};".encode())
    adapters = tuple((id(a), a.method, a.scale, a.merged, sum(p._version for p in a.parameters()))
                     for a in attached_adapters(unet))
    return (
        getattr(pipe, "name_or_path", None), unet_fingerprint(unet), wiring.hexdigest(), adapters,
        id(unet), id(pipe.vae), id(pipe.text_encoder), str(unet.dtype), str(pipe._execution_device),
    )


def _inversion_key(pipe: StableDiffusionPipeline, image: Image.Image, prompt: str, num_inference_steps: int) -> tuple:
    pixels = hashlib.sha256(image.tobytes()).hexdigest()
    scheduler = json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str)
    return (pixels, image.size, image.mode, _model_key(pipe), prompt, num_inference_steps, scheduler)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def invert(model: Model, image: ImageInput, prompt: str = "", num_inference_steps: int = 50, *,
           height: int | None = None, width: int | None = None, use_cache: bool = True,
           callback: ProgressCallback | None = None) -> Inversion:
    """DDIM-invert `image` in one 2-row batch: row 0 with uniform attention and "", row 1 with normal
    attention and `prompt` ("" for the MasaCtrl setup, the source prompt for P2P; the setups of UAM's reference code).

    The image is normalised by `load_image` to `width` x `height` (default: the model's native size).
    With `use_cache`, the same pixels, model and settings are inverted once (`INVERSION_CACHE`).
    callback(step, total) runs after each inversion step (not on a cache hit); True stops the run.
    """
    # 1. Check inputs and normalise the image
    pipe = _check_model(model, num_inference_steps)
    image = load_image(image, size=_image_size(pipe, height, width))

    # 2. Reuse a cached inversion
    key = _inversion_key(pipe, image, prompt, num_inference_steps) if use_cache else None
    cached = INVERSION_CACHE.get(key) if use_cache else None
    if cached is not None:
        return dataclasses.replace(cached, unet_rows=0)

    # 3. Encode the image and the two prompts
    z0 = encode_image(pipe, image)
    branches = _Branches(encode_prompts(pipe, ["", prompt]), names=(Row("", "uniform"), Row(prompt, "source")),
                         guided=(False, False))

    # 4. Invert both rows together, no CFG
    schedule = ddim_schedule(pipe.scheduler.config, num_inference_steps)
    latents, rows = _run_inversion(pipe, branches, torch.cat([z0, z0]), schedule, callback)

    inversion = Inversion(image, z0, latents[:1], latents[1:], prompt, schedule, rows)
    if use_cache:
        INVERSION_CACHE.put(key, inversion)
    return inversion


@torch.no_grad()
def reconstruct(model: Model, inversion: Inversion, *, callback: ProgressCallback | None = None) -> ImageResult:
    """Denoise z^u_T with uniform attention, "" and no CFG: UAM's reconstruction (UAM sec. 3.3.1)."""
    pipe = _check_model(model, len(inversion.schedule.timesteps))
    branches = _Branches(encode_prompts(pipe, [""]), names=(Row("", "uniform"),), guided=(False,))
    latents, rows = _run_denoising(pipe, branches, inversion.uniform_latents, inversion.schedule, callback=callback)
    return ImageResult(decode_latents(pipe, latents)[0], rows)


@torch.no_grad()
def edit(model: Model, image: ImageInput, source_prompt: str, target_prompt: str, *,
         num_inference_steps: int = 50,
         guidance_scale: float = 7.5,  # CFG of the source and target branches (none when <= 1)
         mask_start_t: int = 200,  # T_mask: blend only on 0 < t < T_mask (the last 9-10 of 50 steps)
         quantile: float = 0.25,  # q: the threshold's quantile level ramps from 0 to q (paper 0.5; 0.25 lets
         # background edits through at the same background PSNR: docs/benchmarks.md, issue #20)
         dilation: int = 1,  # radius of the mask's dilation (3x3 max-pool)
         threshold_mode: ThresholdMode = "reference",  # "reference": |Δ| > 2λ, dilate the edit region
         mask_channels: MaskChannels = "per_channel",  # one mask per latent channel, as the reference
         mask_floor: float = 0.8,  # |Δ| up to this never counts as an edit: guidance's faint tone shift over
         # the whole canvas stays the source's (0: the reference's rule; docs/benchmarks.md, issue #20)
         source_blend: bool = True,  # also blend the source branch (better numbers in UAM's ablation; docs/methods.md)
         user_mask: ImageInput | np.ndarray | None = None,  # edit only inside it; empty = no limit
         invert_with_source_prompt: bool = False,  # False: MasaCtrl setup (""), True: P2P setup
         adapters: Sequence[AdapterUse] = (),  # (adapter file or Adapter, scale) pairs, attached for this call
         height: int | None = None, width: int | None = None, use_cache: bool = True,
         callback: ProgressCallback | None = None) -> EditResult:
    """Edit a real image from `source_prompt` to `target_prompt` with UAM's adaptive mask guidance (UAM sec. 3.3.2).

    Three branches share one UNet batch per step: the auxiliary reconstruction (uniform attention, "",
    no CFG), the source and the target (CFG). On 0 < t < T_mask the target's x̂0 takes the auxiliary
    branch's x̂0 where the source and target agree (the keep mask), limited to `user_mask` if given.
    UNet rows: 2 per step for the inversion (unless cached) + 5 per step with CFG (3 without).
    Everything is deterministic (η = 0, posterior mean): there is no seed to pass.
    adapters are attached for the whole call as `generate` attaches them (pipelines/attach.py): the inversion and
    the three branches run with them, and a LoRA file's text-encoder part encodes every prompt; with adapters the
    inversion is not cached.
    callback(step, total) counts the inversion's steps (unless cached), then the edit's; True stops.
    """
    # 1. Check inputs, normalise the image and the user mask (before any work)
    pipe = _check_model(model, num_inference_steps)
    check_edit_inputs(source_prompt, target_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, mask_start_t=mask_start_t, quantile=quantile, dilation=dilation,
                      threshold_mode=threshold_mode, mask_channels=mask_channels, mask_floor=mask_floor)
    check_edit_adapters(adapters)
    image = load_image(image, size=_image_size(pipe, height, width))
    allowed = load_mask(user_mask, image.size)

    # 2-6 run with the adapters attached, as in `generate`: their text-encoder parts (LoRA files of other tools)
    # encode the prompts, their UNet parts denoise every branch.
    link_pipeline(pipe)
    with attached(pipe.unet, adapters):
        # 2. Invert (2 rows per step), or reuse this image's cached inversion. A file's adapter is a new object
        #    each call, which the cache key cannot tell from another file's: with adapters, invert afresh.
        steps = num_inference_steps
        inversion = invert(pipe, image, source_prompt if invert_with_source_prompt else "", steps,
                           height=image.height, width=image.width, use_cache=use_cache and not adapters,
                           callback=None if callback is None else lambda step, _: callback(step, 2 * steps))
        done = steps if inversion.unet_rows else 0  # progress steps already reported
        latent_size = inversion.latents.shape[-2:]
        if allowed is not None:  # a latent cell may change when any of its pixels may
            allowed = torch.from_numpy(allowed).float()[None, None].to(inversion.latents.device)
            allowed = F.adaptive_max_pool2d(allowed, latent_size)

        # 3. Encode the prompts: "" serves the auxiliary branch and the unconditional rows
        empty, source, target = encode_prompts(pipe, ["", source_prompt, target_prompt]).chunk(3)
        cfg = guidance_scale > 1
        branches = _Branches(torch.cat([empty, source, target]), guided=(False, cfg, cfg),
                             names=(Row("", "uniform"), Row(source_prompt, "source"), Row(target_prompt, "target")),
                             uncond=empty, guidance_scale=guidance_scale)

        # 4. Start latents [u, src, tgt] = [z^u_T, z_T, z_T]
        latents = torch.cat([inversion.uniform_latents, inversion.latents, inversion.latents])

        # 5. Denoise the three branches, blending x̂0 with the adaptive keep mask on 0 < t < T_mask
        levels = quantile_levels(quantile, steps)
        last_keep: torch.Tensor | None = None

        def guide(i: int, t: int, x0: torch.Tensor) -> torch.Tensor:
            nonlocal last_keep
            if not 0 < t < mask_start_t:
                return x0
            x0_aux, x0_source, x0_target = x0.chunk(3)
            keep = adaptive_keep_mask(x0_source, x0_target, float(levels[i]), threshold_mode=threshold_mode,
                                      dilation=dilation, mask_channels=mask_channels, floor=mask_floor)
            if allowed is not None:
                keep = restrict_edit(keep, allowed)
            last_keep = keep
            x0_source, x0_target = blend_branches(x0_aux, x0_source, x0_target, keep, source_blend)
            return torch.cat([x0_aux, x0_source, x0_target])

        progress = None if callback is None else lambda step, _: callback(done + step, done + steps)
        latents, rows = _run_denoising(pipe, branches, latents, inversion.schedule, guide, progress)
        if not torch.isfinite(latents).all():  # would decode to a black image
            raise NonFiniteError(non_finite_message("the edit's latents", None, adapters, pipe.unet.dtype))

        # 6. Decode the target and the auxiliary reconstruction; show the last blended step's edit region
        edited, reconstruction = decode_latents(pipe, latents[[2, 0]])
        edit_region = torch.ones(latent_size) if last_keep is None else (1 - last_keep)[0].mean(dim=0)
        mask = Image.fromarray((edit_region.cpu().numpy() * 255).round().astype(np.uint8), "L")
        mask = mask.resize(image.size, Image.Resampling.NEAREST)

    # 7. Record what made the edit: A1111's keys for the target prompt, plus the edit's own
    name, model_hash, family = model_identity(model)
    settings = GenerationSettings(
        prompt=target_prompt, negative_prompt="", steps=steps, sampler="DDIM", guidance_scale=float(guidance_scale),
        seed=None, width=image.width, height=image.height, model_name=name, model_hash=model_hash,
        model_family=family, scheduler_config=dict(pipe.scheduler.config),
        extra_params={"Edit": "UAM", "Source prompt": source_prompt, "Mask start": mask_start_t,
                      "Mask quantile": quantile, "Mask dilation": dilation, "Threshold mode": threshold_mode,
                      "Mask channels": mask_channels, "Mask floor": mask_floor, "Source blend": source_blend,
                      "User mask": allowed is not None, "Invert with source prompt": invert_with_source_prompt,
                      **adapter_params(adapters)},
    )
    return EditResult(edited, reconstruction, mask, inversion, inversion.unet_rows + rows, settings)


def save_edit(result: EditResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write out_dir/edited.png (with its settings, as `save_png`), reconstruction.png and mask.png, each
    through a temporary file and a rename; returns their paths by name. Files already there are replaced."""
    out_dir = Path(out_dir)
    return {"edited": save_png(result.image, result.settings, out_dir / "edited.png"),
            "reconstruction": write_png(result.reconstruction, out_dir / "reconstruction.png"),
            "mask": write_png(result.mask, out_dir / "mask.png")}


def check_edit_adapters(adapters: Sequence[AdapterUse]) -> None:
    """`check_adapters`, and no controller among them: a CSC-Tuner steers by a control image, which an edit does
    not take (InputError naming the adapter; before any work)."""
    check_adapters(adapters)
    for source, scale in adapters:
        method = source.method if isinstance(source, Adapter) else read_metadata(source).get("studio.method")
        if is_controller(method) and scale != 0:
            name = source.method if isinstance(source, Adapter) else Path(source).stem
            raise InputError(f"adapter {name!r} is a CSC-Tuner: it steers generation by a control image, which an "
                             "edit does not take; leave it out or set its scale to 0 (generate with a control "
                             "image uses it)")


def check_edit_inputs(source_prompt: str, target_prompt: str, *, num_inference_steps: int, guidance_scale: float,
                      mask_start_t: int, quantile: float, dilation: int, threshold_mode: str,
                      mask_channels: str = "per_channel", mask_floor: float = 0.8) -> None:
    """Refuse bad settings in milliseconds, before any model work (the CLI calls it before loading);
    each message: the argument, the value, the rule, the fix."""
    if not isinstance(source_prompt, str) or not isinstance(target_prompt, str):
        raise InputError("source_prompt and target_prompt must be strings (an empty string is allowed)")
    check_steps(num_inference_steps, example=50)
    check_guidance(guidance_scale)
    if not is_number(mask_start_t, 0):
        raise InputError(f"mask_start_t={mask_start_t!r} must be a finite number >= 0: use e.g. 200 "
                         "(0 turns the mask guidance off)")
    if not is_number(quantile, 0, maximum=1):
        raise InputError(f"quantile={quantile!r} must be in [0, 1]: use e.g. 0.5")
    if not isinstance(dilation, int) or dilation < 0:
        raise InputError(f"dilation={dilation!r} must be an integer radius >= 0: use e.g. 1 (a 3x3 max-pool)")
    if threshold_mode not in ("paper", "reference"):
        raise InputError(f"threshold_mode={threshold_mode!r} is unknown: use 'reference' or 'paper'")
    if not is_number(mask_floor, 0):
        raise InputError(f"mask_floor={mask_floor!r} must be a number >= 0: use e.g. 0.8 (0: no floor)")
    if mask_channels not in ("per_channel", "max"):
        raise InputError(f"mask_channels={mask_channels!r} is unknown: use 'per_channel' or 'max'")



# ---------------------------------------------------------------------------------------------
# Baselines (for the bench): plain DDIM inversion, no auxiliary branch, no mask
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_reconstruct(model: Model, image: ImageInput, prompt: str = "", guidance_scale: float = 1.0,
                     num_inference_steps: int = 50, *, height: int | None = None,
                     width: int | None = None) -> ImageResult:
    """DDIM inversion with `prompt` (no CFG), then reconstruction with `prompt` at `guidance_scale`:
    "" at 1.0 is UAM's sanity baseline (docs/methods.md, UAM), the source prompt at 7.5 the usual editing setup.
    UNet rows: 1 per step + 2 per step with CFG (1 without)."""
    return _ddim_invert_and_sample(model, image, prompt, prompt, guidance_scale, num_inference_steps, height, width)


@torch.no_grad()
def edit_without_uniform(model: Model, image: ImageInput, source_prompt: str, target_prompt: str, *,
                         num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                         width: int | None = None) -> ImageResult:
    """Plain DDIM editing: invert with the source prompt, denoise with the target prompt at the same
    guidance; no auxiliary branch, no mask. UNet rows: 1 per step + 2 per step with CFG (1 without)."""
    return _ddim_invert_and_sample(model, image, source_prompt, target_prompt, guidance_scale, num_inference_steps,
                                   height, width)


def _ddim_invert_and_sample(model: Model, image: ImageInput, inversion_prompt: str, prompt: str,
                            guidance_scale: float, num_inference_steps: int, height: int | None,
                            width: int | None) -> ImageResult:
    pipe = _check_model(model, num_inference_steps)
    check_guidance(guidance_scale)
    image = load_image(image, size=_image_size(pipe, height, width))
    empty, inversion_embeds, embeds = encode_prompts(pipe, ["", inversion_prompt, prompt]).chunk(3)
    schedule = ddim_schedule(pipe.scheduler.config, num_inference_steps)

    inverse = _Branches(inversion_embeds, names=(Row(inversion_prompt, "source"),), guided=(False,))
    latents, inversion_rows = _run_inversion(pipe, inverse, encode_image(pipe, image), schedule)
    forward = _Branches(embeds, names=(Row(prompt, "target"),), guided=(guidance_scale > 1,), uncond=empty,
                        guidance_scale=guidance_scale)
    latents, rows = _run_denoising(pipe, forward, latents, schedule)
    return ImageResult(decode_latents(pipe, latents)[0], inversion_rows + rows)
