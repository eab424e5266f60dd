"""Concept erasure with SPM membranes (Lyu et al., "One-dimensional Adapter to Rule Them All", CVPR 2024,
arXiv 2312.16145): the training loop's erasing objective, and `erase`, a thin layer over `train` with it.

    result = erase(model, ["triangle"], steps=3000, output_dir="runs/erase")
    generate(model, "a red triangle", adapters=[(result.adapter_path, 1.0)])   # gamma in the image's settings
    membrane_gammas(model, result.adapter_path, ["a red triangle", "a blue circle"])   # [1.0, 0.9...]

The objective (sec. "Latent Anchoring" and the reference code, Con6924/SPM train_spm.py), per step and row:

1. x_t: from pure noise, T_s ~ U{1..29} DDIM steps of a 30-step schedule with CFG 3 on the concept, with the
   membrane on, without gradient; the training timestep is t = (N - 1) - floor(T_s N / 30) (N = 1000: the
   reference's `timesteps[int(T_s * 1000 / 30)]` of a 1000-step schedule);
2. L_era = || e'(x_t, c) - [e(x_t, s) - eta (e(x_t, c) - e(x_t, s))] ||^2, e frozen (membrane off), e' with the
   membrane, s the surrogate ("" by default: plain ESD-style negative guidance);
3. L_anc = mean over K anchors of || e'(x_t, a_k) - e(x_t, a_k) ||^2, a_k random points of the text-embedding
   space (`latent_anchor`); L = L_era + lambda L_anc (means over elements, as the reference's MSELoss).

On SDXL every UNet call also takes the added conditions (`generate.added_conditions`, as the denoising objective
passes them): each row's pooled text and the size ids of the native, uncropped image. The concept, the surrogate
and "" have their real pooled text. An anchor's pooled text is drawn as its token embeddings are: `latent_anchor`
of the concept's pooled text, from the loop's generator, independently of the tokens. Anchoring is meant to keep
the model unchanged for arbitrary conditions, and on SDXL a condition is the pair (tokens, pooled text): anchors
paired with the concept's own pooled text would teach the membrane to leave that pooled text alone (against the
erasure), and with the pooled text of "" they would cover a single point of that space. The reference's SDXL
script is no guide here (no checkpoints were released; SDXL support is experimental there).

Departures from the reference, each for a reason: images at the model's native size (the reference draws 256-448
px on SD 1.4's 512: smaller sizes break small models whose latents must stay divisible by the UNet's
downsampling); every random number from the loop's seeded CPU generator (exact resume); several concepts in one
membrane take turns by step; AdamW with the loop's LR schedule instead of AdamW8bit with cosine restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline
from torch import nn

from adapters import SPM, Adapter, SPMConfig
from adapters.spm import check_texts

from .attach import read_adapter
from .errors import InputError
from .generate import added_conditions, text_encoding
from .loading import LoadedModel
from .train import (
    OBJECTIVES,
    Objective,
    ProgressCallback,
    TrainConfig,
    TrainConfigError,
    TrainResult,
    encode_texts,
    train,
)

SAMPLING_STEPS = 30  # the DDIM schedule x_t is sampled on (the reference's max_denoising_steps)
SAMPLING_GUIDANCE = 3.0  # CFG while sampling x_t
DEFAULT_STEPS = 3000  # the reference's iterations


def training_timestep(depth: int, num_train_timesteps: int) -> int:
    """The timestep of x_t after `depth` of SAMPLING_STEPS DDIM steps, as the reference maps it."""
    return num_train_timesteps - 1 - depth * num_train_timesteps // SAMPLING_STEPS


def latent_anchor(target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random point of the text-embedding space shaped like `target` (L, D), or of the pooled text's (P,): a
    uniform direction, kept with probability 1 - cos(direction, target) (favouring directions away from the
    concept), at U(0.8, 1.2) times the target's norm."""
    while True:
        direction = torch.randn(target.shape, generator=generator)
        direction = direction / direction.norm()
        if torch.rand((), generator=generator) < 1 - F.cosine_similarity(direction.flatten(), target.flatten(), 0):
            break
    return direction * (0.8 + 0.4 * torch.rand((), generator=generator)) * target.norm()


class ErasingObjective(Objective):
    """SPM's erasing loss plus latent anchoring (see the module's docstring); no images."""

    needs_data = False
    added_conditions = True  # the pooled text of each row (an anchor's drawn) and the native size's ids
    pooled_cpu: torch.Tensor | None = None  # the pooled text of the encoded texts, where the UNet takes it (begin)

    def __init__(self, pipe, config: TrainConfig, adapter_config: SPMConfig):
        super().__init__(pipe, config, adapter_config)
        try:  # before any work: texts the text encoder would truncate or cannot read
            check_texts(pipe.tokenizer, adapter_config.concepts)
            check_texts(pipe.tokenizer, [adapter_config.surrogate], "surrogate")
        except ValueError as e:
            raise TrainConfigError(str(e)) from e
        self.concepts, self.surrogate = adapter_config.concepts, adapter_config.surrogate
        self.num_anchors = adapter_config.num_anchors if adapter_config.anchor_weight > 0 else 0
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.concepts, self.surrogate]).encode()).hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "sampling_steps": SAMPLING_STEPS, "sampling_guidance": SAMPLING_GUIDANCE}

    def begin(self, adapter: Adapter) -> None:
        super().begin(adapter)
        # Rows: each concept, the surrogate, and "" (the unconditional branch while sampling x_t).
        text, pooled = encode_texts(self.pipe, [*self.concepts, self.surrogate, ""])
        dtype = self.pipe.unet.dtype
        self.text, self.pooled = text.to(dtype), pooled.to(dtype) if pooled is not None else None
        # The anchors are drawn on the CPU generator.
        self.text_cpu, self.pooled_cpu = text.cpu(), pooled.cpu() if pooled is not None else None
        self.sampler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.sampler.set_timesteps(SAMPLING_STEPS, device=self.device)

    def draw(self, step: int, count: int, generator: torch.Generator) -> dict[str, Any]:
        concept = step % len(self.concepts)  # several concepts take turns
        depth = int(torch.randint(1, SAMPLING_STEPS, (), generator=generator))
        unet = self.pipe.unet
        size = unet.config.sample_size
        noise = torch.randn((count, unet.config.in_channels, size, size), generator=generator)
        anchors = pooled_anchors = None
        if self.num_anchors:
            anchors = self._anchors(self.text_cpu[concept], count, generator)  # (count, K, L, D)
            if self.pooled_cpu is not None:  # drawn after the tokens: SD 1.x/2.x runs keep their random stream
                pooled_anchors = self._anchors(self.pooled_cpu[concept], count, generator)  # (count, K, P)
        return {"concept": concept, "depth": depth, "noise": noise, "anchors": anchors,
                "pooled_anchors": pooled_anchors}

    def _anchors(self, target: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, K, *target.shape): K latent anchors around `target` per row."""
        return torch.stack([torch.stack([latent_anchor(target, generator) for _ in range(self.num_anchors)])
                            for _ in range(count)])

    def loss(self, denoiser: nn.Module, batch: dict[str, Any], rows: slice) -> torch.Tensor:
        options, dtype = self.adapter_config, self.pipe.unet.dtype
        noise = batch["noise"][rows].to(self.device, dtype)
        n = noise.shape[0]
        # Conditions as (text, pooled text or None) per block of n rows.
        target, surrogate, empty = (self._rows(i, n) for i in (batch["concept"], -2, -1))
        anchors = []
        if batch["anchors"] is not None:  # (n, K, ...) -> K blocks of n rows, as x_t.repeat lays them out
            anchors = [tuple(None if a is None else a[rows].transpose(0, 1).flatten(0, 1).to(self.device, dtype)
                             for a in (batch["anchors"], batch["pooled_anchors"]))]
        blocks = anchors[0][0].shape[0] // n if anchors else 0
        with torch.no_grad():
            x_t = self._sample(denoiser, noise, target, empty, batch["depth"])
            t = torch.tensor(training_timestep(batch["depth"], self.num_train_timesteps), device=self.device)
            with _membrane_off(self.adapter):
                frozen = denoiser(x_t.repeat(2 + blocks, 1, 1, 1), t, *self._condition(target, surrogate, *anchors))
        pred = denoiser(x_t.repeat(1 + blocks, 1, 1, 1), t, *self._condition(target, *anchors)).float()
        frozen = frozen.float()
        eps_target, eps_surrogate, eps_anchors = frozen[:n], frozen[n:2 * n], frozen[2 * n:]
        loss = F.mse_loss(pred[:n], eps_surrogate - options.eta * (eps_target - eps_surrogate))
        if blocks:
            loss = loss + options.anchor_weight * F.mse_loss(pred[n:], eps_anchors)
        return loss

    def _rows(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row `index` of the encoded texts, n times: its text embeddings and pooled text (None without)."""
        return self.text[index].expand(n, -1, -1), None if self.pooled is None else self.pooled[index].expand(n, -1)

    def _condition(self, *blocks: tuple[torch.Tensor, torch.Tensor | None]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The UNet's text and added conditions (`generate.added_conditions` at the native size) for these blocks
        of rows, in order."""
        text = torch.cat([b[0] for b in blocks])
        pooled = None if self.pooled is None else torch.cat([b[1] for b in blocks])
        return text, added_conditions(self.pipe.unet, pooled, (self.resolution, self.resolution))

    def _sample(self, denoiser: nn.Module, noise: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor | None],
                empty: tuple[torch.Tensor, torch.Tensor | None], depth: int) -> torch.Tensor:
        """x_t after `depth` DDIM steps from `noise` with CFG on the concept, the membrane on."""
        x, condition = noise * self.sampler.init_noise_sigma, self._condition(empty, target)
        for t in self.sampler.timesteps[:depth]:
            uncond, cond = denoiser(self.sampler.scale_model_input(torch.cat([x, x]), t), t, *condition).chunk(2)
            x = self.sampler.step(uncond + SAMPLING_GUIDANCE * (cond - uncond), t, x).prev_sample
        return x


@contextmanager
def _membrane_off(adapter: Adapter) -> Iterator[None]:
    """Within the block the adapter adds nothing (scale 0: the frozen model, bit for bit); its scale is back after."""
    scale = adapter.scale
    adapter.set_scale(0.0)
    try:
        yield
    finally:
        adapter.set_scale(scale)


OBJECTIVES["erase"] = ErasingObjective


def erase_config(
    concepts: str | Sequence[str],
    *,
    surrogate: str = "",
    steps: int = DEFAULT_STEPS,
    eta: float = 1.0,
    anchor_weight: float = 1000.0,
    num_anchors: int = 4,
    transport: str = "additive",
    facilitate_factor: float = 1.0,
    similarity: str = "full",
    output_dir: str | os.PathLike = "runs/erase",
    name: str | None = None,
    resume: str | None = None,
    **settings: Any,
) -> TrainConfig:
    """The training run of a membrane erasing `concepts` (one name, or a list that takes turns by step), checked
    (TrainConfigError naming the setting): the membrane options (surrogate ... similarity) are SPMConfig's,
    `settings` more TrainConfig fields (learning_rate, seed, checkpoint_every, sample_prompts, ...). Gradients are
    not clipped unless `max_grad_norm` is given, as the reference trains; the default name is "erase-" and the
    concepts."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    options = {"concepts": concepts, "surrogate": surrogate, "eta": eta, "anchor_weight": anchor_weight,
               "num_anchors": num_anchors, "transport": transport, "facilitate_factor": facilitate_factor,
               "similarity": similarity}
    return TrainConfig(method=SPM.method, method_options=options, output_dir=Path(output_dir),
                       name=name or default_name(concepts), steps=steps, resume=resume,
                       **{"max_grad_norm": None, **settings})


def erase(
    model: LoadedModel | DiffusionPipeline,
    concepts: str | Sequence[str],
    *,
    surrogate: str = "",
    steps: int = DEFAULT_STEPS,
    eta: float = 1.0,
    anchor_weight: float = 1000.0,
    output_dir: str | os.PathLike = "runs/erase",
    name: str | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: str | None = None,
    **options: Any,
) -> TrainResult:
    """Train a membrane that erases `concepts` from `model` into output_dir/<name>.safetensors: `train` with
    `erase_config`'s run (`options`: its other arguments). progress/should_stop/resume as in `train`; bad input
    (an empty concept, one the tokenizer cannot read whole, a bad option) raises before any work."""
    config = erase_config(concepts, surrogate=surrogate, steps=steps, eta=eta, anchor_weight=anchor_weight,
                          output_dir=output_dir, name=name, resume=resume, **options)
    pipe = model.pipe if isinstance(model, LoadedModel) else model
    return train(pipe, config, progress=progress, should_stop=should_stop)


def default_name(concepts: Sequence[str]) -> str:
    """A membrane's default file stem: "erase-" and its concepts in plain characters ("erase-van-gogh")."""
    words = re.sub(r"[^\w]+", "-", "-".join(str(c) for c in concepts)).strip("-").lower()
    return f"erase-{words or 'concept'}"


def membrane_gammas(model: LoadedModel | DiffusionPipeline, membrane: SPM | str | os.PathLike,
                    prompts: Sequence[str]) -> list[float]:
    """The permeability gamma a membrane (object or file, refused when made for another architecture) opens for
    each prompt with this model's text encoder, whatever its transport: the diagnostic for prompts it should
    leave alone, and what the Erase tab shows."""
    pipe = model.pipe if isinstance(model, LoadedModel) else model
    adapter = read_adapter("membrane", membrane, pipe.unet)
    if not isinstance(adapter, SPM):
        raise InputError(f"membrane: {adapter.label} is not an SPM membrane; pick a membrane file")
    encoding = text_encoding(pipe)
    with torch.no_grad():
        embeds, ids = encoding.encode(list(prompts))
    return adapter.gammas(embeds, ids, encoding).tolist()
