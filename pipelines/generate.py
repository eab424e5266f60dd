"""Text-to-image with a loaded model, and PNGs that remember how they were made.

    result = generate(model, "a red circle", seed=1, num_inference_steps=20)
    paths = save_images(result, "out")      # out/00000-1.png with A1111 `parameters` + `studio` JSON

Argument names follow diffusers' pipelines. The pipeline's own `__call__` does the work; this
module validates first, picks the sampler, seeds every image, encodes the prompts itself (so it
knows which UNet batch row is which: the per-call context every adapter reads, adapters/context.py),
reports progress through `callback_on_step_end`, and records each image's settings.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image, PngImagePlugin

from adapters import CallContext, Row, TextEncoding, call_context, detect_family
from adapters.checks import is_int, is_number
from adapters.foreign import link_pipeline

from .attach import (
    AdapterUse,
    adapter_params,
    attached,
    call_params,
    check_adapters,
    check_off_uncond,
    check_on_uncond_flag,
)
from .control import ControlSpec, check_controls, control_params, controlled
from .errors import GenerationInterrupted, InputError, NonFiniteError
from .images import write_png
from .loading import LoadedModel

# A1111's sampler names -> (scheduler class, overrides on top of the model's scheduler config).
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "DDIM": (DDIMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
# diffusers' rule: SD's VAE downsamples by 8 (the Shapes model's by 4, which 8 also satisfies).
SIZE_MULTIPLE = 8
MAX_SIZE = 2048  # pixels per side, A1111's limit; beyond it SD models produce repetition and run out of memory
MAX_IMAGES = 16  # images in one batch (they are denoised together, so memory grows with it)
MAX_SEED = 2**32 - 1  # A1111's seed range, so seeds copy between tools
# Denoising steps: SD schedulers are trained on 1000 timesteps and DDIM cannot take more than the model's
# scheduler has (num_train_timesteps); beyond ~150 images stop changing, and 10**6 steps would run for days.
MAX_STEPS = 1000
MAX_GUIDANCE = 30.0  # A1111's CFG slider ends at 30: far above it every pixel saturates (inf gives a black image)

ProgressCallback = Callable[[int, int], bool | None]


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that made one image; `infotext()` is A1111's `parameters` text for it."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    guidance_scale: float
    seed: int | None  # None when the caller passed its own generator
    width: int
    height: int
    model_name: str
    model_hash: str
    model_family: str
    scheduler_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # More "Key: value" pairs for the infotext (A1111's extra_generation_params), e.g. an edit's settings.
    extra_params: dict = field(default_factory=dict, hash=False)

    def infotext(self) -> str:
        params = {"Steps": self.steps, "Sampler": self.sampler, "CFG scale": self.guidance_scale, "Seed": self.seed,
                  "Size": f"{self.width}x{self.height}", "Model hash": self.model_hash, "Model": self.model_name,
                  **self.extra_params}
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items() if v not in (None, "")))
        return "\n".join(lines)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    settings: list[GenerationSettings]  # settings[i] made images[i]


def generate(
    model: LoadedModel | DiffusionPipeline,
    prompt: str,
    *,
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    scheduler: str = "DDIM",
    adapters: Sequence[AdapterUse] = (),
    adapters_on_uncond: bool = True,
    control: Sequence[ControlSpec] = (),
    callback: ProgressCallback | None = None,
) -> GenerationResult:
    """Generate `num_images_per_prompt` images for `prompt`.

    seed: image i uses seed + i, so any image re-generates alone from its own seed (to the last
    bit of rounding: batched and single convolutions round differently); None picks a random
    seed; pass either a seed or diffusers-style `generator`(s), not both. height/width: default
    the model's native size. scheduler: one of SCHEDULERS, built from the model's own scheduler
    config. adapters: (adapter file or Adapter, scale) pairs attached for this call only
    (pipelines/attach.py); adapters_on_uncond=False leaves classifier-free guidance's unconditional
    branch to the base model (A1111 Composable LoRA's "Use LoRA in uncond" off; docs/methods.md).
    control: CSC-Tuners with their control images and scales (pipelines/control.py), in effect
    for this call only; both CFG branches are controlled.
    callback(step, total) runs after each denoising step; returning True stops the run and raises
    GenerationInterrupted. Bad settings raise InputError before any work.
    """
    pipe = model.pipe if isinstance(model, LoadedModel) else model
    link_pipeline(pipe)  # LoRA files of other tools adapt its text encoders too (adapters/foreign.py)

    # 1. Check inputs (each message: the argument, the value, the rule, the fix).
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = native if height is None else height
    width = native if width is None else width
    check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                 num_images_per_prompt, scheduler, seed, generator)
    check_steps(num_inference_steps, pipe.scheduler.config.num_train_timesteps)
    check_adapters(adapters)
    check_on_uncond_flag(adapters_on_uncond)
    check_controls(control)
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        _warn_if_truncated(pipe.tokenizer, name, text)

    # 2. Seeds: one CPU generator per image, so noise is identical on any device.
    generator, seeds = image_generators(seed, generator, num_images_per_prompt)

    # 3. Sampler: built from the model's scheduler config, swapped in for this call only.
    scheduler_cls, overrides = SCHEDULERS[scheduler]
    original_scheduler = pipe.scheduler
    sampler = scheduler_cls.from_config(original_scheduler.config, **overrides)

    # 4. Denoise with the pipeline's own loop, with the adapters and under the controls (all undone after;
    #    adapters first, so that a CSC-Tuner among them is driven by its control), inside the call's context
    #    (the prompts encoded here, the control hints); the step hook reports progress and can interrupt.
    stopped = False
    diverged_at = None  # the first step whose latents hold NaN or inf: stop there rather than save a black image

    def on_step_end(pipe: DiffusionPipeline, i: int, t: torch.Tensor, kwargs: dict) -> dict:
        nonlocal stopped, diverged_at
        if not torch.isfinite(kwargs["latents"]).all():
            diverged_at = i + 1
            pipe._interrupt = True  # diffusers' documented stop flag, checked at the top of each step
        elif callback is not None and callback(i + 1, pipe.num_timesteps):
            stopped = True
            pipe._interrupt = True
        return {}

    pipe.scheduler = sampler
    try:
        with attached(pipe.unet, adapters), controlled(pipe.unet, control, (width, height)) as hints:
            embeds, context = encode_call(pipe, prompt, negative_prompt, num_images_per_prompt, guidance_scale,
                                          (width, height))
            context.hints = hints
            context.adapters_on_uncond = adapters_on_uncond
            check_off_uncond(pipe.unet, adapters_on_uncond)
            with call_context(pipe.unet, context):
                images = pipe(
                    **embeds, height=height, width=width, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
                    callback_on_step_end=on_step_end, output_type="np",  # checked for NaN before PIL hides it as 0
                ).images
            if diverged_at is not None or not np.isfinite(images).all():
                raise NonFiniteError(non_finite_message("the latents" if diverged_at else "the decoded images",
                                                        diverged_at, adapters, pipe.unet.dtype))
            images = pipe.image_processor.numpy_to_pil(images)
            reported = call_params(pipe.unet)  # what the adapters computed for this call (a membrane's gamma)
    finally:
        pipe.scheduler = original_scheduler
    if stopped:
        raise GenerationInterrupted("generation stopped by the callback")

    # 5. Record what made each image.
    name, model_hash, family = model_identity(model)
    extra_params = {**adapter_params(adapters, adapters_on_uncond), **control_params(control), **reported}
    settings = [
        GenerationSettings(prompt=prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
                           sampler=scheduler, guidance_scale=float(guidance_scale), seed=s, width=width,
                           height=height, model_name=name, model_hash=model_hash, model_family=family,
                           scheduler_config=dict(sampler.config), extra_params=extra_params)
        for s in seeds
    ]
    return GenerationResult(images=images, settings=settings)


def image_generators(seed: int | None, generator: torch.Generator | list[torch.Generator] | None,
                     n: int) -> tuple[torch.Generator | list[torch.Generator], list[int | None]]:
    """The generators of n images and their seeds: image i from seed + i on its own CPU generator (noise identical
    on any device; a random seed when None), or the caller's generator(s), whose seeds are unknown (None)."""
    if generator is not None:
        return generator, [None] * n
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    # Seeds wrap past MAX_SEED (as A1111's do), so every recorded seed is one the user can enter again.
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(n)]
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds


def non_finite_message(where: str, step: int | None, adapters: Sequence[AdapterUse], dtype: torch.dtype) -> str:
    """What to tell the user when denoising produced NaN or inf (which would save an all-black image): the likely
    causes, most specific first."""
    causes = []
    if adapters:
        names = ", ".join(_adapter_name(source) for source, _ in adapters)
        causes.append(f"an adapter with NaN/inf weights or too large a scale ({names}): generate without it")
    if dtype in (torch.float16, torch.bfloat16):
        causes.append(f"{str(dtype).removeprefix('torch.')} overflow: load the model with dtype='float32' "
                      "(CLI: --dtype float32)")
    causes.append("NaN/inf in the model's weights: re-download or re-convert the model")
    at = f" at step {step}" if step is not None else ""
    return f"{where} became NaN/inf{at}, so the image would be black; likely causes: " + "; ".join(causes)


def _adapter_name(source: object) -> str:
    return getattr(source, "method", None) or Path(source).name


def encode_call(pipe: DiffusionPipeline, prompt: str, negative_prompt: str, num_images_per_prompt: int,
                guidance_scale: float, image_size: tuple[int, int] | None = None,
                ) -> tuple[dict[str, torch.Tensor], CallContext]:
    """The pipeline's embedding arguments for one prompt, encoded by its own `encode_prompt` (so the images are
    those of `pipe(prompt=...)` to the bit), and the call context of the UNet batch it will run: under
    classifier-free guidance the n unconditional rows, then the n conditional ones, as the pipeline stacks them.
    image_size: (width, height) of the call, recorded in the context with the UNet's added conditions for that size
    (SDXL's; None: the model's native size)."""
    cfg = guidance_scale > 1 and pipe.unet.config.get("time_cond_proj_dim") is None  # the pipeline's own rule
    # Without grad, as the pipeline's own __call__: the embeddings would otherwise hold the text encoder's
    # activations for backward for as long as they live (each row's, and on SDXL both encoders').
    with torch.no_grad():
        encoded = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
    # SD 1.x/2.x: (embeds, negative); SDXL: (embeds, negative, pooled, negative pooled).
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    embeds = {name: value for name, value in zip(names, encoded) if value is not None}
    n, n_uncond = num_images_per_prompt, num_images_per_prompt if cfg else 0
    rows = [Row(negative_prompt, "uncond")] * n_uncond + [Row(prompt, "cond")] * n
    texts = [embeds.get("negative_prompt_embeds")] * n_uncond + [embeds["prompt_embeds"]] * n
    ids = token_ids(pipe.tokenizer, [row.prompt for row in rows])
    if image_size is None:
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        image_size = (native, native)
    pooled = None
    if "pooled_prompt_embeds" in embeds:  # a second, projected text encoder (SDXL): rows stacked as the texts are
        pooled = torch.cat([embeds.get("negative_pooled_prompt_embeds")] * n_uncond
                           + [embeds["pooled_prompt_embeds"]] * n)
    return embeds, CallContext(rows=rows, text_embeds=torch.cat(texts), token_ids=ids, image_size=image_size,
                               text_encoding=text_encoding(pipe),
                               added_cond=added_conditions(pipe.unet, pooled, image_size))


def added_conditions(unet: torch.nn.Module, pooled: torch.Tensor | None,
                     image_size: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """The UNet's `added_cond_kwargs` for rows with the pooled text embeddings `pooled` (B, P) at `image_size`
    (width, height), or None for a UNet that takes none (SD 1.x/2.x).

    SDXL's "text_time" conditioning: the pooled text and six size ids per row, (original height, width, crop top,
    left, target height, width), which StableDiffusionXLPipeline builds by default as the uncropped image size."""
    if unet.config.get("addition_embed_type") != "text_time":
        return None
    if pooled is None:
        raise ValueError("this UNet is conditioned on pooled text embeddings (addition_embed_type='text_time'), but "
                         "the pipeline's text encoding gave none: load it with its second, projected text encoder")
    width, height = image_size
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], -1)}


def token_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(N, L) token ids of `texts` padded and truncated to the tokenizer's length, as the text encoder reads them."""
    return tokenizer(list(texts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def text_encoding(pipe: DiffusionPipeline) -> TextEncoding:
    """The pipeline's own encoding of other texts, for the call context (a membrane's concepts): `encode_prompt`'s
    conditional embeddings, the same tensors a prompt gets, and their token ids."""
    tokenizer, device = pipe.tokenizer, pipe._execution_device

    def encode(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = pipe.encode_prompt(prompt=list(texts), device=device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
        return embeds, token_ids(tokenizer, texts)

    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return TextEncoding(encode, frozenset(i for i in special if i is not None))


def check_inputs(prompt: str, negative_prompt: str = "", height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 scheduler: str = "DDIM", seed: int | None = None, generator: object = None) -> None:
    """Refuse bad settings in milliseconds, before any model work (the CLI calls it before loading).

    height/width None mean the model's native size, checked when it is known."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise InputError("prompt and negative_prompt must be strings (an empty string is allowed)")
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if not isinstance(value, int) or not SIZE_MULTIPLE <= value <= MAX_SIZE:
            raise InputError(f"{name}={value!r} is out of range: use a multiple of {SIZE_MULTIPLE} "
                             f"from {SIZE_MULTIPLE} to {MAX_SIZE}")
        if value % SIZE_MULTIPLE:
            below = value - value % SIZE_MULTIPLE
            options = [str(v) for v in (below, below + SIZE_MULTIPLE) if SIZE_MULTIPLE <= v <= MAX_SIZE]
            raise InputError(f"{name}={value} is not a multiple of {SIZE_MULTIPLE}: use {' or '.join(options)}")
    check_steps(num_inference_steps)
    check_guidance(guidance_scale)
    if not isinstance(num_images_per_prompt, int) or not 1 <= num_images_per_prompt <= MAX_IMAGES:
        raise InputError(f"num_images_per_prompt={num_images_per_prompt!r} must be from 1 to {MAX_IMAGES}: "
                         "run again for more images")
    if scheduler not in SCHEDULERS:
        raise InputError(f"scheduler={scheduler!r} is unknown: use one of {', '.join(SCHEDULERS)}")
    if seed is not None and generator is not None:
        raise InputError("pass either seed or generator, not both")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InputError(f"seed={seed!r} must be an integer from 0 to {MAX_SEED}: leave it empty for a random seed")


def check_steps(num_inference_steps: int, num_train_timesteps: int | None = None, *,
                name: str = "num_inference_steps", example: int = 25) -> None:
    """Refuse a step count that is not an integer from 1 to MAX_STEPS, nor more than the model's scheduler was
    trained on (`num_train_timesteps`, when the model is known): the one steps check of every pipeline."""
    limit = MAX_STEPS if num_train_timesteps is None else min(MAX_STEPS, int(num_train_timesteps))
    if not is_int(num_inference_steps, 1) or num_inference_steps > limit:
        why = "" if limit == MAX_STEPS else f" (the model's scheduler was trained on {num_train_timesteps} timesteps)"
        raise InputError(f"{name}={num_inference_steps!r} must be a positive integer, at most {limit}{why}: "
                         f"use e.g. {example}")


def check_guidance(guidance_scale: float, *, name: str = "guidance_scale") -> None:
    """Refuse a guidance scale that is not a finite number from 0 to MAX_GUIDANCE (inf or 1e30 give black images)."""
    if not is_number(guidance_scale, 0, maximum=MAX_GUIDANCE):
        raise InputError(f"{name}={guidance_scale!r} must be a finite number from 0 to {MAX_GUIDANCE:g}: "
                         "use e.g. 7.5 (0 or 1 turns guidance off)")


def _warn_if_truncated(tokenizer, name: str, text: str) -> None:
    """CLIP sees at most model_max_length tokens (start and end included); say how many are dropped."""
    n_tokens = len(tokenizer.tokenize(text)) + 2  # + start and end tokens
    limit = tokenizer.model_max_length
    if n_tokens > limit:
        warnings.warn(f"{name} is {n_tokens} tokens, the text encoder reads {limit}: the last "
                      f"{n_tokens - limit} tokens are dropped; shorten it", UserWarning, stacklevel=3)


def model_identity(model: LoadedModel | DiffusionPipeline) -> tuple[str, str, str]:
    """(name, hash, family) of a model, as the images' settings record it."""
    if isinstance(model, LoadedModel):
        return model.name, model.hash, model.family
    return Path(model.name_or_path or "").name, "", detect_family(model.unet)


# --- PNG metadata ------------------------------------------------------------------------


def _quote(value: str) -> str:
    """A1111 quotes values holding a separator (comma, colon, newline) as JSON strings."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


# A1111's "Key: value" pairs; a value is a JSON string or runs up to the next comma.
_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read A1111 `parameters` text back: {"Prompt", "Negative prompt", "Steps", "Seed", ...} as strings."""
    *head, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameters line: all of it is prompt
        head, last = [*head, last], ""
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        out[key] = json.loads(value) if value.startswith('"') else value.strip()
    return out


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("sd-studio", "diffusers", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # running from a checkout without `pip install -e`
            versions[package] = "unknown"
    return versions


def save_png(image: Image.Image, settings: GenerationSettings, path: str | os.PathLike) -> Path:
    """Write `image` with an A1111 `parameters` chunk and a `studio` JSON chunk of the exact settings."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", settings.infotext())
    info.add_text("studio", json.dumps({**asdict(settings), "versions": _versions()}))
    return write_png(image, path, info)



def save_images(result: GenerationResult, out_dir: str | os.PathLike) -> list[Path]:
    """Save every image as out_dir/NNNNN-SEED.png (A1111's naming), numbering on from files already there."""
    out_dir = Path(out_dir)
    numbers = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := re.match(r"(\d+)[-.]", p.name))]
    start = max(numbers, default=-1) + 1
    paths = []
    for i, (image, settings) in enumerate(zip(result.images, result.settings)):
        suffix = "" if settings.seed is None else f"-{settings.seed}"
        paths.append(save_png(image, settings, out_dir / f"{start + i:05d}{suffix}.png"))
    return paths
