"""Several concepts in one image: their adapters merged into the weights, or composed by region (LoRA-Composer).

    result = compose(model, "a sks on the left and a zkz on the right",
                     adapters=[("sks.safetensors", None), ("zkz.safetensors", None)],
                     regions=[ComposeRegion((4, 16, 28, 48), "a sks"), ComposeRegion((36, 16, 60, 48), "a zkz")],
                     mode="composer", seed=0)
    save_images(result, "out")   # each PNG's settings name the mode, the adapters and the regions

- mode "merge": Σ w_k ΔW_k summed into the UNet for the call (adapters/fusion.py; default weight per method:
  0.6 for orthogonal LoRAs, as published), then an ordinary generation on the global prompt; restored after.
  UNet weights only: a LoRA file's text-encoder part is left out, with a warning.
- mode "composer": training-free, one UNet (adapters/composer.py). Adapter k acts only inside regions[k]'s box,
  on that region's prompt; regions beyond the adapters are plain regional prompts. The loop is written out
  below: latent re-initialisation at the first step, then per step a loss-guided update of the latent (a
  conditional pass with gradients, until the early stop) and the classifier-free guided step. On SDXL every
  UNet pass also gets its rows' added conditions (pooled text and size ids), which stay the global prompt's:
  a region prompt changes only the cross-attention keys and values inside its box.
  A LoRA file of another tool may adapt the text encoder(s) too (adapters/foreign.py). That part is regional
  like the rest of the concept: adapter k's text-encoder part encodes regions[k]'s prompt (and its negative
  prompt) only, never the global prompt or another region's; its UNet part acts only inside the box.

Boxes are (x0, y0, x1, y1) in pixels, as PIL crops. Bad input (overlapping boxes, a box outside the canvas or
smaller than one attention cell, more concepts than regions, an adapter for another base) raises InputError
before any model work.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline

from adapters import Adapter, CallContext, Region, call_context, read_metadata, unet_fingerprint
from adapters.composer import (
    CELL_RULES,
    Composer,
    ComposerLossWeights,
    composer_loss,
    map_size,
    reinitialise_latents,
)
from adapters.foreign import ForeignLoRA, link_pipeline
from adapters.fusion import merge_into

from .attach import AdapterUse, adapter_params, attached, check_adapters, check_on_uncond_flag, read_adapter
from .edit import classifier_free_guidance, decode_latents
from .errors import GenerationInterrupted, InputError, NonFiniteError
from .generate import (
    SCHEDULERS,
    GenerationResult,
    GenerationSettings,
    ProgressCallback,
    check_inputs,
    check_steps,
    encode_call,
    generate,
    image_generators,
    model_identity,
    non_finite_message,
)
from .loading import LoadedModel

Mode = Literal["merge", "composer"]
MODES = ("merge", "composer")


@dataclass(frozen=True)
class ComposeRegion:
    """A box of the image, in pixels (x0, y0, x1, y1), with the prompt of what goes there."""

    box: tuple[int, int, int, int]
    prompt: str
    negative_prompt: str = ""


@dataclass(frozen=True)
class ComposerSettings:
    """LoRA-Composer's knobs (arXiv 2403.11627, sec. 3.4-3.5; defaults from the reference code)."""

    loss_weights: ComposerLossWeights = ComposerLossWeights()
    step_size: float = 20.0  # φ_i = step_size · √s_i, s = linspace(1, 0.5, steps)
    refine_until: int = 25  # no latent update from this step on
    min_refine_steps: int = 5  # before this step the update never stops early
    reinitialise: bool = True  # sec. 3.5: move each concept's strongest latent patch into its box at step 0
    isolation: bool = True  # sec. 3.3: self-attention from a box does not see the other boxes
    # Beyond the paper, for UNet-only LoRAs, whose identity cross-attention alone does not carry (docs/methods.md,
    # LoRA-Composer): each concept's other deltas (self-attention, feed-forward, convolutions) act in its box too,
    every_delta: bool = False
    # and a box covers the cells it touches at each resolution rather than those wholly inside it.
    cells: Literal["inside", "touched"] = "inside"

    def __post_init__(self) -> None:
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size >= 0):
            raise InputError(f"ComposerSettings.step_size={self.step_size!r} must be a finite number >= 0 "
                             "(20 as published; 0: no latent update)")
        for name in ("refine_until", "min_refine_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise InputError(f"ComposerSettings.{name}={value!r} must be a whole number of steps >= 0")
        if self.cells not in CELL_RULES:
            raise InputError(f"ComposerSettings.cells={self.cells!r} is unknown: use 'inside' (the cells wholly in "
                             "a box, as published) or 'touched' (every cell a box touches)")

    def params(self) -> str:
        w = self.loss_weights
        return (f"concept {w.concept:g}, fill {w.fill:g}, region {w.region:g}, step {self.step_size:g}, "
                f"refine {self.refine_until}, early stop from {self.min_refine_steps}, "
                f"reinit {'on' if self.reinitialise else 'off'}, "
                f"isolation {'on' if self.isolation else 'off'}, cells {self.cells}"
                + (", every delta in its box" if self.every_delta else ""))


def compose(
    model: LoadedModel | DiffusionPipeline,
    prompt: str,
    *,
    adapters: Sequence[tuple[Adapter | str, float | None]],
    regions: Sequence[ComposeRegion] = (),
    mode: Mode = "composer",
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    scheduler: str = "DDIM",
    composer: ComposerSettings = ComposerSettings(),
    adapters_on_uncond: bool = True,
    callback: ProgressCallback | None = None,
) -> GenerationResult:
    """Images of `prompt` with every adapter's concept; see the module docstring. adapters: (file or Adapter,
    weight) pairs, weight None for the method's default (merge: the adapter's `default_merge_weight`;
    composer: 1). adapters_on_uncond=False keeps every concept off guidance's unconditional rows, as `generate`'s
    (merge: the summed deltas then act as branches on the conditional rows). The other arguments are `generate`'s."""
    pipe = model.pipe if isinstance(model, LoadedModel) else model

    # 1. Check everything before any model work.
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = native if height is None else height
    width = native if width is None else width
    check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                 num_images_per_prompt, scheduler, seed, generator)
    check_steps(num_inference_steps, pipe.scheduler.config.num_train_timesteps)
    size = map_size(pipe.unet, (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor))
    check_compose_inputs(adapters, regions, mode, (width, height), size)
    check_on_uncond_flag(adapters_on_uncond)
    link_pipeline(pipe)  # LoRA files of other tools find the text encoders too (adapters/foreign.py)
    loaded = [read_adapter(f"adapters[{i}]", source, pipe.unet) for i, (source, _) in enumerate(adapters)]
    for i, adapter in enumerate(loaded):
        check_composable(f"adapters[{i}]", adapter, pipe.unet)
    weights = [(1.0 if mode == "composer" else type(a).default_merge_weight) if w is None else float(w)
               for a, (_, w) in zip(loaded, adapters)]

    # 2. Generate.
    params = {"Compose": mode, **adapter_params([(s, w) for (s, _), w in zip(adapters, weights)], adapters_on_uncond)}
    if regions:
        params["Regions"] = json.dumps([[*r.box, r.prompt] for r in regions])
    if mode == "merge":
        for i, adapter in enumerate(loaded):
            if isinstance(adapter, ForeignLoRA) and adapter.adapts_text_encoders:
                warnings.warn(f"adapters[{i}]: merge mode sums UNet weights only, so the text-encoder part of "
                              f"{Path(adapter.config.file).name} is left out; mode='composer' applies it to its "
                              "region's prompt", UserWarning, stacklevel=2)
        sampling = dict(negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, seed=seed, generator=generator, height=height, width=width,
                        num_images_per_prompt=num_images_per_prompt, scheduler=scheduler, callback=callback)
        if adapters_on_uncond:
            with merge_into(pipe.unet, list(zip(loaded, weights))):
                result = generate(model, prompt, **sampling)
        else:  # fused weights cannot tell the rows apart: the same sum, as branches on the conditional rows
            result = generate(model, prompt, adapters=list(zip(loaded, weights)), adapters_on_uncond=False, **sampling)
        return GenerationResult(result.images, [replace(s, extra_params={**s.extra_params, **params})
                                                for s in result.settings])
    generator, seeds = image_generators(seed, generator, num_images_per_prompt)
    triggers = [_trigger_words(source) for source, _ in adapters]
    images, refined = _compose_by_region(pipe, prompt, negative_prompt, loaded, weights, triggers, regions, size,
                                         num_inference_steps, guidance_scale, generator, (width, height),
                                         num_images_per_prompt, scheduler, composer, adapters_on_uncond, callback)
    params["Composer"] = composer.params()
    name, model_hash, family = model_identity(model)
    settings = [GenerationSettings(prompt=prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
                                   sampler=scheduler, guidance_scale=float(guidance_scale), seed=s, width=width,
                                   height=height, model_name=name, model_hash=model_hash, model_family=family,
                                   extra_params={**params, "Refined steps": steps})
                for s, steps in zip(seeds, refined)]
    return GenerationResult(images, settings)


def check_compose_inputs(adapters: Sequence[AdapterUse], regions: Sequence[ComposeRegion], mode: str,
                         image_size: tuple[int, int], cells: tuple[int, int]) -> None:
    """Refuse what cannot compose, naming the argument and the fix. image_size: (width, height) in pixels;
    cells: (h, w) of the attention grid the composer reads (a box must hold one cell)."""
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is unknown: use 'merge' (weights summed) or 'composer' (by region)")
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise InputError("adapters is empty: give the concepts to compose as (adapter file or Adapter, weight) pairs")
    check_adapters([(source, 1.0 if weight is None else weight) for source, weight in adapters])
    if mode == "composer" and len(adapters) > len(regions):
        raise InputError(f"{len(adapters)} concepts but {len(regions)} regions: the composer puts adapters[k] in "
                         "regions[k]; give each concept a region (a box and a prompt)")
    width, height = image_size
    cell_w, cell_h = width / cells[1], height / cells[0]
    for i, region in enumerate(regions):
        if not isinstance(region, ComposeRegion):
            raise InputError(f"regions[{i}] must be a ComposeRegion(box, prompt), got {type(region).__name__}")
        box = region.box
        if len(box) != 4 or not all(isinstance(v, int) for v in box):
            raise InputError(f"regions[{i}].box={box!r} must be four integers (x0, y0, x1, y1) in pixels")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InputError(f"regions[{i}].box={box!r} is not inside the {width}x{height} canvas: use "
                             f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
        if x1 - x0 < cell_w or y1 - y0 < cell_h:
            raise InputError(f"regions[{i}].box={box!r} is {x1 - x0}x{y1 - y0} px, smaller than one attention cell "
                             f"({cell_w:g}x{cell_h:g} px) where the composer places concepts: make it larger")
        if not region.prompt.strip():
            raise InputError(f"regions[{i}].prompt is empty: say what goes in the box, with the concept's trigger")
        for j in range(i):
            a0, b0, a1, b1 = regions[j].box
            if min(x1, a1) > max(x0, a0) and min(y1, b1) > max(y0, b0):
                raise InputError(f"regions[{j}] {regions[j].box} and regions[{i}] {box} overlap: the composer "
                                 "isolates concepts by box; make the boxes disjoint")


def check_composable(what: str, adapter: Adapter, unet: torch.nn.Module) -> None:
    """A concept to compose must change the weights (its deltas are what act) and belong to this base."""
    if not adapter.is_weight_delta:
        raise InputError(f"{what}: a {adapter.method} adapter is not a weight delta and cannot be merged or composed; "
                         "use LoRA, orthogonal LoRA or SaRA concepts")
    if adapter.base_fingerprint is not None and adapter.base_fingerprint != unet_fingerprint(unet):
        raise InputError(f"{what}: the {adapter.method} adapter was made for another base model (UNet fingerprint "
                         f"{adapter.base_fingerprint}, this one is {unet_fingerprint(unet)}); load its base model")


def concept_tokens(tokenizer, prompt: str, words: Sequence[str]) -> tuple[int, ...]:
    """Positions (with the start token at 0) of the tokens of `words` in `prompt`, found by matching token
    sequences (a word spelled by several tokens is found whole); without words found, every token of the prompt."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    found: list[int] = []
    for word in words:
        target = tokenizer(word, add_special_tokens=False).input_ids
        for start in range(1, len(ids) - len(target)):
            if target and ids[start:start + len(target)] == target:
                found.extend(range(start, start + len(target)))
    return tuple(sorted(set(found))) or tuple(range(1, len(ids) - 1))


def _trigger_words(source: Adapter | str) -> list[str]:
    if isinstance(source, Adapter):
        return []
    return json.loads(read_metadata(source).get("studio.trigger_words", "[]"))


def _compose_by_region(pipe, prompt: str, negative_prompt: str, adapters: list[Adapter], weights: list[float],
                       triggers: list[list[str]], regions: Sequence[ComposeRegion], size: tuple[int, int],
                       num_inference_steps: int, guidance_scale: float, generator, image_size: tuple[int, int],
                       n: int, scheduler_name: str, settings: ComposerSettings, adapters_on_uncond: bool,
                       callback: ProgressCallback | None) -> tuple[list, list[int]]:
    """LoRA-Composer's loop; returns the images and, per image, the number of steps whose latent was refined."""
    unet, device = pipe.unet, pipe._execution_device
    width, height = image_size
    # 1. Prompts: the global one as `generate` encodes it (rows: n unconditional, then n conditional; on SDXL with
    #    its pooled text and size ids), and each region's prompt on the same rows (its negative prompt on the
    #    unconditional ones). A region prompt only feeds cross-attention in its box: its pooled text is not used.
    embeds, context = encode_call(pipe, prompt, negative_prompt, n, guidance_scale, image_size)
    cfg = "negative_prompt_embeds" in embeds
    concept_regions = []
    for i, region in enumerate(regions):
        # A concept's tokens are steered into its box; a plain regional prompt (no adapter) is only isolated.
        adapter = adapters[i] if i < len(adapters) else None
        # The concept's text-encoder part (a LoRA file of another tool) is regional: it encodes this prompt only.
        text_part = [(adapter, weights[i])] if isinstance(adapter, ForeignLoRA) and adapter.adapts_text_encoders else []
        with attached(unet, text_part):
            rows = encode_call(pipe, region.prompt, region.negative_prompt, n, guidance_scale, image_size)[1]
        tokens = concept_tokens(pipe.tokenizer, region.prompt, triggers[i]) if adapter is not None else ()
        x0, y0, x1, y1 = region.box
        concept_regions.append(Region((x0 / width, y0 / height, x1 / width, y1 / height), region.prompt,
                                      rows.text_embeds, adapter, tokens))
    full = replace(context, regions=concept_regions, adapters_on_uncond=adapters_on_uncond)
    conditional = _rows_of(full, full.row_mask("cond"))  # the gradient and re-initialisation passes

    # 2. Sampler and initial noise, as `generate` draws them (the same seed gives the same starting noise).
    scheduler_cls, overrides = SCHEDULERS[scheduler_name]
    scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = pipe.prepare_latents(n, unet.config.in_channels, height, width, context.text_embeds.dtype, device,
                                   generator)
    step_sizes = settings.step_size * torch.linspace(1, 0.5, num_inference_steps).sqrt()

    def conditional_pass(z: torch.Tensor, t: torch.Tensor) -> None:
        _denoise(unet, conditional, scheduler.scale_model_input(z, t), t)

    # The early stop is per image, as in the reference (one image per call): an image's stop must not depend on
    # the others drawn with it.
    refined = torch.zeros(n, dtype=torch.long)
    previous_loss, refining = torch.full((n,), math.inf), torch.ones(n, dtype=torch.bool)
    with ExitStack() as restore:
        for adapter, weight in zip(adapters, weights):
            restore.callback(adapter.set_scale, adapter.scale)
            adapter.set_scale(weight)  # the scale its deltas are read at
            adapter.to(device)
        composer = restore.enter_context(Composer(unet, size, isolation=settings.isolation, cells=settings.cells,
                                                  every_delta=adapters if settings.every_delta else ()))
        # 3. Sec. 3.5: each concept's strongest patch of the initial noise goes into its box.
        if settings.reinitialise:
            with torch.no_grad(), composer.recording(len(concept_regions)) as maps:
                conditional_pass(latents, scheduler.timesteps[0])
            latents = reinitialise_latents(latents, maps, concept_regions, size, settings.cells)
        for i, t in enumerate(scheduler.timesteps):
            # 4. Sec. 3.4: z_t <- z_t - φ_i ∇L until step `refine_until`, or for good once the image's loss rises.
            if refining.any() and i < settings.refine_until:
                with torch.enable_grad(), composer.recording(len(concept_regions)) as maps:
                    z = latents.detach().requires_grad_(True)
                    conditional_pass(z, t)
                    loss = composer_loss(maps, concept_regions, size, settings.loss_weights, settings.cells)
                    grad = torch.autograd.grad(loss.sum(), z)[0] if loss.requires_grad else torch.zeros_like(z)
                loss = loss.detach().cpu().expand(n)
                if i >= settings.min_refine_steps:
                    refining &= loss <= previous_loss
                step = (step_sizes[i] * refining).to(latents.device, latents.dtype).view(-1, *(1,) * (latents.ndim - 1))
                latents = (latents - step * grad).detach()
                refined += refining
                previous_loss = torch.where(refining, loss, previous_loss)
            # 5. The guided denoising step, every concept in its box.
            with torch.no_grad():
                batch = torch.cat([latents] * 2) if cfg else latents
                eps = _denoise(unet, full, scheduler.scale_model_input(batch, t), t)
                if cfg:
                    eps = classifier_free_guidance(*eps.chunk(2), guidance_scale)
                latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
            if not torch.isfinite(latents).all():  # would decode to black images
                raise NonFiniteError(non_finite_message("the latents", i + 1, list(zip(adapters, weights)), unet.dtype))
            if callback is not None and callback(i + 1, num_inference_steps):
                raise GenerationInterrupted("composition stopped by the callback")
    with torch.no_grad():
        return decode_latents(pipe, latents), refined.tolist()


def _rows_of(ctx: CallContext, keep: torch.Tensor) -> CallContext:
    """`ctx` for the rows where `keep` (B,) is True: their prompts, text, added conditions and region prompts."""
    added = None if ctx.added_cond is None else {name: value[keep] for name, value in ctx.added_cond.items()}
    return CallContext(rows=[row for row, kept in zip(ctx.rows, keep.tolist()) if kept],
                       text_embeds=ctx.text_embeds[keep], image_size=ctx.image_size, added_cond=added,
                       regions=[replace(r, text_embeds=r.text_embeds[keep]) for r in ctx.regions])


def _denoise(unet, ctx: CallContext, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's output on `sample`, whose rows are `ctx`'s: each on its text and added conditions (SDXL's
    pooled text and size ids; none on SD 1.x/2.x), with the composer's processors reading `ctx`."""
    with call_context(unet, ctx):
        return unet(sample, t, encoder_hidden_states=ctx.text_embeds, added_cond_kwargs=ctx.added_cond).sample
