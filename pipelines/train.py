"""One training loop for every adapter method: a folder of images (or, for an SPM membrane, concept names) in, an
adapter file out.

    config = TrainConfig(data_dir="data/stars", method="sc_tuner", trigger="sks", steps=200)
    result = train(pipe, config)                  # result.adapter_path: runs/train/sks.safetensors

Methods differ in the adapter `adapters.REGISTRY` builds (which weights train), its `regularization_loss()`
(what adds to the loss) and its objective (`Adapter.objective`: an `Objective` of OBJECTIVES, what the loss is
and what it learns from: `DenoisingObjective` here, pipelines/erase.py's erasing objective); `train` reads top
to bottom:

  1. check the pipeline, the objective's inputs (the data) and the resume point (before any work)
  2. the objective's setup: prior preservation's class images from the base model, generated once and reused
  3. freeze the pipeline; build the adapter (with the checkpoint's weights) and attach it
  4. the objective caches what the frozen encoders compute (VAE posteriors, text embeddings, hints) once
  5. optimizer, LR schedule, accelerate; the checkpoint's state when resuming
  6. the loop: the objective's draw (noise, timestep...) and loss (+ regularization), step;
     samples, checkpoints and progress along the way
  7. the adapter file, with its trigger words and training settings

Exact resume: data order and noise are pure functions of (seed, step) plus one saved CPU
generator, and a checkpoint holds everything else (adapter, optimizer, LR schedule, grad
scaler, Python/NumPy/torch/CUDA RNG), so a resumed run reproduces an uninterrupted one.

Multi-GPU: the same code runs under `accelerate launch --multi_gpu`. Every process draws the
same global batch and trains on its own slice; only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from adapters import REGISTRY, Adapter, CallContext, Row, call_context, detect_family, save_adapter
from adapters.checks import is_int, is_number
from adapters.io import adapter_name_problem, default_library_root

from .annotators import training_hints
from .control import ControlSpec
from .datasets import EpochSampler, Example, images_in, load_images, load_masks, scan_folder
from .errors import InputError, StudioError
from .generate import MAX_GUIDANCE, MAX_STEPS, added_conditions, generate, save_png
from .images import check_out_dir
from .statefile import load_state, refuse_pickle, save_state

# AdamW as SCEdit trains (its released training configs; docs/methods.md): lr 1e-4, wd 1e-2, constant.
DEFAULT_LEARNING_RATE = 1e-4
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers' get_scheduler names
MIXED_PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MAX_TRAIN_STEPS = 100_000  # optimizer steps: adapters train in hundreds to a few thousand; 10**6 would take days
# Settings that fix the data order, the noise or the adapter's shape: a resume must keep them.
RESUME_KEYS = ("method", "method_options", "hint_dir", "caption_dropout", "prior_caption_dropout",
               "instance_prompt", "instance_prompt_share", "masked_loss", "batch_size",
               "gradient_accumulation_steps", "seed")


class TrainConfigError(StudioError):
    """A training setting that cannot work; the message names the field, the value and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint was written after the last good one."""

    def __init__(self, step: int, loss: float, learning_rate: float, checkpoint: Path | None):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        where = (f"resume from the last good checkpoint {checkpoint} (resume='latest')" if checkpoint
                 else "start again")
        super().__init__(
            f"training diverged: the loss is {loss} in step {step}. Lower learning_rate (now {learning_rate:g}; "
            f"try {learning_rate / 10:g}) and {where}"
        )


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a YAML (.yaml/.yml) or TOML (.toml) file, unchecked (see TrainConfig.from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise TrainConfigError(f"config file {path}: unknown format; use .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+; imported here so that YAML configs also work on 3.10

            values = tomllib.loads(text)
        else:
            values = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                               "save it as UTF-8") from e
    except (yaml.YAMLError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        reason = " ".join(str(e).split())
        raise TrainConfigError(f"config file {path} is not valid {path.suffix[1:].upper()} ({reason}); fix it, "
                               "one 'field: value' per line" + (" (TOML: field = value)" if path.suffix == ".toml"
                                                                 else "")) from e
    if not isinstance(values, dict):
        raise TrainConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


@dataclass
class TrainConfig:
    """Everything one training job needs besides the pipeline; `from_file` reads it from YAML or TOML."""

    # images + .txt/.caption sidecars, metadata.jsonl, or kohya "N_token class" folders; None for a method whose
    # objective needs no images (an SPM membrane learns from its concept names)
    data_dir: Path | None = None
    output_dir: Path = Path("runs/train")  # checkpoints/, samples/, class_images/ and <name>.safetensors
    method: str = "sc_tuner"  # a key of adapters.REGISTRY
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's config fields, e.g. {"rank": 8}
    # csc_tuner: ready hints mirroring data_dir (`studio annotate` writes them); None: the condition's
    # annotator draws them from the training images
    hint_dir: Path | None = None
    name: str | None = None  # adapter file stem; default: the trigger word, else the method
    trigger: str | None = None  # caption of images without one ("<trigger> <class_prompt>" with a class prompt)
    class_prompt: str | None = None  # the class the subject belongs to ("star"): prompts the class images
    class_dir: Path | None = None  # class images for prior preservation; default output_dir/class_images
    num_class_images: int = 0  # > 0 turns prior preservation on; missing class images are generated
    prior_loss_weight: float = 1.0  # weight of the class half's loss (DreamBooth's lambda)
    # Share of class images trained with the empty caption: keeps the adapter's unconditional branch on the base
    # model's images, so that classifier-free guidance amplifies what the trigger adds (docs/methods.md, "Prior
    # preservation of the unconditional branch").
    prior_caption_dropout: float = 0.0
    # Share of instance images trained on the instance prompt instead of their own caption: the trigger then draws
    # the subject without the context words it was photographed with (docs/methods.md, "A subject at CFG 7.5").
    # instance_prompt: DreamBooth's (diffusers' --instance_prompt), default "<trigger> <class>".
    instance_prompt: str | None = None
    instance_prompt_share: float = 0.0
    # Learn only the masked part of each instance image (kohya's --masked_loss): the error outside the mask is
    # zeroed, so what surrounds the subject (its background) is not learnt into the trigger. Masks: mask_dir's
    # image of the same name, else the image's transparency (pipelines/datasets.py). Class images keep the full loss.
    masked_loss: bool = False
    mask_dir: Path | None = None
    # Share of instance images trained with the empty caption (kohya's caption_dropout_rate). None: the method's
    # own default (0, and 0.5 for a controller as ControlNet drops: it then has to read the hint, not the text).
    caption_dropout: float | None = None
    steps: int = 200  # optimizer steps
    batch_size: int = 1  # images per process per micro-batch (a prior batch doubles the UNet batch)
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # None: the method's default (SaRA's), else DEFAULT_LEARNING_RATE
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"  # one of LR_SCHEDULERS
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no clipping
    mixed_precision: str | None = None  # None: the UNet's half dtype, else bf16/fp16 on a GPU, "no" on CPU
    gradient_checkpointing: bool = False  # less activation memory for ~30% more time
    seed: int = 0
    checkpoint_every: int = 100  # steps; 0: only when cancelled
    keep_last: int = 2  # checkpoints kept
    sample_every: int = 0  # steps; samples are made at step 0, every sample_every steps and at the end
    sample_prompts: list[str] = field(default_factory=list)  # none: no samples
    sample_seeds: list[int] = field(default_factory=lambda: [0])
    sample_steps: int = 20  # DDIM steps for samples and generated class images
    guidance_scale: float = 7.5  # CFG for samples and generated class images
    resume: str | None = None  # "latest" (a fresh start when there is no checkpoint) or a checkpoint folder
    # The adapter library, where a method may keep state shared between runs (orthogonal LoRA's basis slots).
    # None: adapters.io.default_library_root() ($STUDIO_ADAPTER_DIR, else ~/.cache/sd-studio/adapters).
    library_dir: Path | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser() if self.data_dir is not None else None
        self.output_dir = Path(self.output_dir).expanduser()
        self.class_dir = Path(self.class_dir).expanduser() if self.class_dir is not None else None
        self.hint_dir = Path(self.hint_dir).expanduser() if self.hint_dir is not None else None
        self.mask_dir = Path(self.mask_dir).expanduser() if self.mask_dir is not None else None
        self.library_dir = Path(self.library_dir).expanduser() if self.library_dir is not None else None
        self.method_options = dict(self.method_options or {})
        self.sample_prompts, self.sample_seeds = list(self.sample_prompts), list(self.sample_seeds)

        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise TrainConfigError(f"{name}={getattr(self, name)!r}: {rule}")

        check(self.method in REGISTRY, "method", f"is unknown; use one of {sorted(REGISTRY)}")
        method = REGISTRY[self.method]
        if objective_of(method).needs_data:
            check(self.data_dir is not None and self.data_dir.is_dir(), "data_dir",
                  "is not a folder; pass the folder that holds the training images")
        else:
            check(self.data_dir is None, "data_dir", f"is set, but {self.method} learns without images; unset it")
            check(self.num_class_images == 0, "num_class_images",
                  f"must be 0 for {self.method}: it learns without images, so there is no prior to preserve")
        self.adapter_config()  # the method's own dataclass validates its options
        controller = method.needs_hints
        controllers = " or ".join(name for name, cls in REGISTRY.items() if cls.needs_hints)
        check(self.hint_dir is None or controller, "hint_dir", f"is for {controllers} (a controller), not "
              f"{self.method}; unset it")
        check(self.hint_dir is None or self.hint_dir.is_dir(), "hint_dir",
              "is not a folder; write the hints with `studio annotate`, or unset it to annotate while training")
        check(not (controller and self.num_class_images), "num_class_images",
              f"must be 0 for {self.method}: a controller learns from (image, hint) pairs, and class images have no "
              "hints; set num_class_images=0")
        check(self.trigger is None or (isinstance(self.trigger, str) and bool(self.trigger.strip())), "trigger",
              "must be a non-empty word, or unset")
        problem = adapter_name_problem(self.adapter_name)
        check(problem is None, "name", f"the adapter file's name {self.adapter_name!r} {problem} (default: the "
              "trigger word); set a plain name")
        check(is_int(self.num_class_images, 0), "num_class_images", "must be an integer >= 0 (0: no prior loss)")
        check(self.num_class_images == 0 or bool(self.class_prompt), "class_prompt",
              f"is needed with num_class_images={self.num_class_images}: it prompts and captions the class images "
              "(e.g. 'star'); set it, or set num_class_images=0")
        check(self.class_dir is None or self.num_class_images > 0, "class_dir",
              "is set but num_class_images=0; set num_class_images to turn prior preservation on")
        check(is_number(self.prior_loss_weight, 0, inclusive=False), "prior_loss_weight", "must be a number > 0")
        check(is_number(self.prior_caption_dropout, 0, maximum=1), "prior_caption_dropout",
              "must be a number in [0, 1] (0: class images always keep their caption)")
        check(self.prior_caption_dropout == 0 or self.num_class_images > 0, "prior_caption_dropout",
              "drops the captions of class images, but num_class_images=0; set num_class_images to turn prior "
              "preservation on, or set prior_caption_dropout=0")
        check(self.instance_prompt is None or (isinstance(self.instance_prompt, str)
                                                 and bool(self.instance_prompt.strip())), "instance_prompt",
              "must be a non-empty prompt with the trigger word (e.g. 'a sks'), or unset for '<trigger> <class>'")
        check(is_number(self.instance_prompt_share, 0, maximum=1), "instance_prompt_share",
              "must be a number in [0, 1] (0: instance images always keep their own caption)")
        check(self.instance_prompt_share == 0 or self.instance_prompt_text is not None, "instance_prompt_share",
              "trains on the instance prompt, but there is none; set instance_prompt or trigger")
        check(isinstance(self.masked_loss, bool), "masked_loss", "must be true or false")
        check(not self.masked_loss or objective_of(method).needs_data, "masked_loss",
              f"masks the loss on training images, but {self.method} learns without images; turn it off")
        check(self.mask_dir is None or self.masked_loss, "mask_dir",
              "is set but masked_loss is off; turn masked_loss on, or unset mask_dir")
        check(self.mask_dir is None or self.mask_dir.is_dir(), "mask_dir",
              "is not a folder; pass the folder of masks (one per image, same name), or unset it to use the "
              "images' transparency")
        if self.caption_dropout is None:
            self.caption_dropout = method.caption_dropout
        check(is_number(self.caption_dropout, 0, maximum=1), "caption_dropout",
              "must be a number in [0, 1] (0: always the caption; 0.5 as ControlNet trains)")
        check(is_int(self.steps, 1) and self.steps <= MAX_TRAIN_STEPS, "steps",
              f"must be an integer >= 1 and at most {MAX_TRAIN_STEPS:,} (adapters train in hundreds to a few thousand)")
        check(is_int(self.batch_size, 1), "batch_size", "must be an integer >= 1")
        check(is_int(self.gradient_accumulation_steps, 1), "gradient_accumulation_steps", "must be an integer >= 1")
        if self.learning_rate is None:
            self.learning_rate = (REGISTRY[self.method].default_learning_rate(self.adapter_config())
                                  or DEFAULT_LEARNING_RATE)
        check(is_number(self.learning_rate, 0, inclusive=False), "learning_rate", "must be a finite number > 0")
        check(is_number(self.weight_decay, 0), "weight_decay", "must be a finite number >= 0")
        check(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"must be one of {LR_SCHEDULERS}")
        check(is_int(self.warmup_steps, 0) and self.warmup_steps < self.steps, "warmup_steps",
              f"must be an integer in [0, steps={self.steps})")
        check(self.warmup_steps == 0 or self.lr_scheduler != "constant", "lr_scheduler",
              f"'constant' has no warm-up but warmup_steps={self.warmup_steps}; use 'constant_with_warmup'")
        check(self.max_grad_norm is None or is_number(self.max_grad_norm, 0, inclusive=False), "max_grad_norm",
              "must be a number > 0, or None for no clipping")
        check(self.mixed_precision is None or self.mixed_precision in MIXED_PRECISIONS, "mixed_precision",
              f"must be one of {MIXED_PRECISIONS}, or None to choose from the hardware")
        check(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "must be true or false")
        check(is_int(self.seed, 0), "seed", "must be an integer >= 0")
        check(is_int(self.checkpoint_every, 0), "checkpoint_every", "must be an integer >= 0 (0: only on cancel)")
        check(is_int(self.keep_last, 1), "keep_last", "must be an integer >= 1")
        check(is_int(self.sample_every, 0), "sample_every", "must be an integer >= 0")
        check(all(isinstance(p, str) and p.strip() for p in self.sample_prompts), "sample_prompts",
              "must be a list of non-empty prompts")
        check(self.sample_every == 0 or bool(self.sample_prompts), "sample_every",
              "is set but sample_prompts is empty; add prompts or set sample_every=0")
        check(bool(self.sample_seeds) and all(is_int(s, 0) for s in self.sample_seeds), "sample_seeds",
              "must be a non-empty list of integers >= 0")
        check(is_int(self.sample_steps, 1) and self.sample_steps <= MAX_STEPS, "sample_steps",
              f"must be an integer >= 1 and at most {MAX_STEPS} (DDIM steps of the samples)")
        check(is_number(self.guidance_scale, 0, maximum=MAX_GUIDANCE), "guidance_scale",
              f"must be a finite number from 0 to {MAX_GUIDANCE:g}")
        try:
            check_out_dir(self.output_dir, "output_dir")
        except InputError as e:
            raise TrainConfigError(str(e)) from e
        check(self.resume is None or self.resume == "latest" or (Path(self.resume) / "state.safetensors").is_file()
              or (Path(self.resume) / "state.pt").is_file(), "resume",  # .pt: refused by name when read
              "must be 'latest' or a checkpoint folder (output_dir/checkpoints/step-XXXXXX)")
        resume_from = _resume_point(self) if self.resume is not None else None
        if resume_from is not None:  # before the CLI loads a model; train() checks again when it starts
            _refuse_pickled_checkpoint(resume_from)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Read YAML (.yaml/.yml) or TOML (.toml) whose keys are this class's fields; `overrides`
        (e.g. the command line's flags) win over the file."""
        return cls.from_dict({**read_config_file(path), **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Like `TrainConfig(**values)`, with unknown or missing keys refused by name."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TrainConfigError(f"{source}: unknown setting(s) {unknown}; the settings are {known}")
        method = REGISTRY.get(values.get("method", cls.method))
        if "data_dir" not in values and (method is None or objective_of(method).needs_data):
            raise TrainConfigError(f"{source}: data_dir is required (the folder of training images)")
        return cls(**values)

    @property
    def adapter_name(self) -> str:
        return self.name or self.trigger or self.method

    @property
    def fallback_caption(self) -> str | None:
        """The caption of an image without one: DreamBooth's "<trigger> <class>" ("sks star")."""
        if self.trigger and self.class_prompt:
            return f"{self.trigger} {self.class_prompt}"
        return self.trigger

    @property
    def instance_prompt_text(self) -> str | None:
        """The prompt `instance_prompt_share` trains on: `instance_prompt`, else the fallback caption."""
        return self.instance_prompt or self.fallback_caption

    @property
    def class_images_dir(self) -> Path:
        return self.class_dir if self.class_dir is not None else self.output_dir / "class_images"

    def adapter_config(self) -> Any:
        """The method's config dataclass built from `method_options` (it validates them)."""
        config_class = REGISTRY[self.method].config_class
        try:
            return config_class(**self.method_options)
        except (TypeError, ValueError) as e:
            names = [f.name for f in dataclasses.fields(config_class)]
            raise TrainConfigError(f"method_options={self.method_options!r}: {e} ({self.method} takes {names})") from e

    def training_metadata(self) -> dict[str, Any]:
        """The settings recorded in the adapter file (local paths and run control left out)."""
        skip = {"data_dir", "output_dir", "class_dir", "hint_dir", "mask_dir", "resume", "checkpoint_every",
                "keep_last", "library_dir"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class TrainProgress:
    """What the progress callback sees: after each step, and at step 0 with the first samples."""

    step: int  # optimizer steps done
    total_steps: int
    loss: float | None = None  # this step's loss (mean over the global batch); None at step 0
    learning_rate: float | None = None
    samples: list[Path] = field(default_factory=list)  # images written at this step
    checkpoint: Path | None = None  # checkpoint written at this step


@dataclass
class TrainResult:
    adapter_path: Path | None  # None when cancelled: resume to finish (the checkpoint holds an adapter file too)
    step: int  # optimizer steps done
    cancelled: bool
    losses: list[float]  # one per step taken in this call (a resumed run starts at the resume point)
    checkpoint: Path | None  # the last checkpoint written


ProgressCallback = Callable[[TrainProgress], None]


@dataclass
class _Encoded:
    """A training set after the frozen encoders, kept on the device for the whole run."""

    latent_mean: torch.Tensor  # (N, C, h, w) VAE posterior mean, already shifted and scaled
    latent_std: torch.Tensor  # (N, C, h, w) posterior std, scaled: a fresh latent is drawn each step
    text: torch.Tensor  # (U, L, D) embeddings of the U distinct captions, the empty one last
    captions: list[str]  # the U distinct captions, "" last
    caption_index: torch.Tensor  # (N,) row of `text` for each image
    hints: torch.Tensor | None = None  # (N, 3, H, W) uint8: a controller's hint for each image
    pooled: torch.Tensor | None = None  # (U, P) pooled text of each caption (SDXL's second encoder), else None
    prompt_row: int | None = None  # row of `text` holding the instance prompt, if one was encoded
    loss_mask: torch.Tensor | None = None  # (N, 1, h, w) each image's loss mask at the latents' size (masked_loss)


class _Denoiser(nn.Module):
    """The frozen UNet with the adapter as one module. The adapter's weights act through hooks in the
    UNet's forward, so this is the forward DDP must run (to all-reduce the adapter's gradients) and
    autocast must cover; the UNet's frozen weights get no gradient and DDP leaves them alone."""

    def __init__(self, unet: nn.Module, adapter: Adapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                added_cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        # added_cond: the UNet's added conditions per row (SDXL's pooled text and size ids), None for SD 1.x/2.x.
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added_cond).sample


class Objective:
    """What a training run minimises, chosen by the method (`Adapter.objective`, a key of OBJECTIVES); `train`
    owns everything else (accelerate, optimizer, LR schedule, checkpoints and exact resume, NaN stop, samples,
    progress, the adapter file). The loop calls, in order:

    - `__init__(pipe, config, adapter_config)`: check and read the objective's inputs, before any work;
    - `setup(accelerator)`: work on the base model before the adapter exists (prior preservation's class images);
    - `fingerprint()`: what a resumed run must find unchanged besides the settings (the training images);
    - `begin(adapter)`: the pipeline is frozen and the adapter attached: cache what the frozen encoders compute;
    - per step `draw(step, count, generator)`: every random number of the step, for the global batch of `count`
      rows, from the loop's seeded CPU generator only (so that a resumed run draws the same), then per micro-batch
      `loss(denoiser, batch, rows)`: the loss of this process's rows `rows` of that batch.
    """

    needs_data: ClassVar[bool] = True  # trains on config.data_dir's images
    # Passes the UNet's added conditions (SDXL's pooled text and size ids) with each call: False refuses such UNets.
    added_conditions: ClassVar[bool] = False
    sample_hints: torch.Tensor | None = None  # a controller's hints, cycled over the sample prompts

    def __init__(self, pipe, config: TrainConfig, adapter_config: Any):
        self.pipe, self.config, self.adapter_config = pipe, config, adapter_config
        self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the model's native size
        self.device = pipe.device

    def setup(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device

    def fingerprint(self) -> str:
        raise NotImplementedError

    def begin(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def info(self) -> dict[str, Any]:
        """What the adapter file's training metadata records besides the settings."""
        return {"resolution": self.resolution}

    def draw(self, step: int, count: int, generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, denoiser: nn.Module, batch: dict[str, Any], rows: slice) -> torch.Tensor:
        raise NotImplementedError


class DenoisingObjective(Objective):
    """Learn a folder of images: the noise-prediction MSE on its cached latents and captions, plus DreamBooth's
    prior preservation on class images of the base model (a second batch weighted by prior_loss_weight)."""

    added_conditions = True  # each caption's pooled text is cached with it; the size ids are the resolution's

    def __init__(self, pipe, config: TrainConfig, adapter_config: Any):
        super().__init__(pipe, config, adapter_config)
        self.examples = scan_folder(config.data_dir, fallback_caption=config.fallback_caption)
        self.pixels: torch.Tensor | None = load_images(self.examples, self.resolution)
        self.masks = load_masks(self.examples, self.resolution, config.mask_dir) if config.masked_loss else None
        method = REGISTRY[config.method]
        self.condition = method.hint_condition(adapter_config) if method.needs_hints else None
        if self.condition is not None:
            self.sample_hints = training_hints(self.pixels, [e.image for e in self.examples], self.condition,
                                               image_dir=config.data_dir, hint_dir=config.hint_dir)
        self.class_examples: list[Example] = []
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.instance_sampler = EpochSampler([e.repeats for e in self.examples], config.seed, stream=0)

    def setup(self, accelerator: Accelerator) -> None:
        super().setup(accelerator)
        config = self.config
        if not config.num_class_images:
            return
        # Class images from the base model: no adapter is attached yet.
        if accelerator.is_main_process:
            generate_class_images(self.pipe, config.class_images_dir, config.class_prompt, config.num_class_images,
                                  num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale)
        accelerator.wait_for_everyone()
        found = scan_folder(config.class_images_dir, fallback_caption=config.class_prompt)
        self.class_examples = found[:config.num_class_images]

    def fingerprint(self) -> str:
        return _data_fingerprint(self.examples, self.class_examples)

    def begin(self, adapter: Adapter) -> None:
        super().begin(adapter)
        self.instance = _encode(self.pipe, self.pixels, [e.caption for e in self.examples],
                                instance_prompt=self.config.instance_prompt_text
                                if self.config.instance_prompt_share else None)
        if self.sample_hints is not None:
            self.instance.hints = self.sample_hints.to(self.device)
        if self.masks is not None:  # area: a latent cell's weight is the share of its pixels the mask keeps
            size = self.instance.latent_mean.shape[-2:]
            self.instance.loss_mask = F.interpolate(self.masks, size=size, mode="area").to(self.device)
        self.prior = None
        if self.class_examples:
            self.prior = _encode(self.pipe, load_images(self.class_examples, self.resolution),
                                 [e.caption for e in self.class_examples])
        self.prior_sampler = EpochSampler([e.repeats for e in self.class_examples], self.config.seed, stream=1)
        self.pixels = self.masks = None  # encoded: the images and masks are no longer needed

    def info(self) -> dict[str, Any]:
        return {**super().info(), "num_images": len(self.examples), "num_class_images": len(self.class_examples)}

    def draw(self, step: int, count: int, generator: torch.Generator) -> dict[str, Any]:
        draws = [_draw(self.instance, self.instance_sampler, step, count, generator, self.noise_scheduler,
                       self.config.caption_dropout, self.config.instance_prompt_share)]
        if self.prior is not None:
            draws.append(_draw(self.prior, self.prior_sampler, step, count, generator, self.noise_scheduler,
                               self.config.prior_caption_dropout))
        return {"draws": draws}

    def loss(self, denoiser: nn.Module, batch: dict[str, Any], rows: slice) -> torch.Tensor:
        draws, batch_size = batch["draws"], self.config.batch_size
        # Instance rows first, then the class rows.
        latents, text, noise, timesteps = (
            torch.cat([d[k][rows] for d in draws]).to(self.device) for k in ("latents", "text", "noise", "timesteps")
        )
        # The call's context: each row's caption, and a controller's hint per image (no prior batch then).
        size = (self.resolution, self.resolution)
        pooled = torch.cat([d["pooled"][rows] for d in draws]).to(self.device) if "pooled" in draws[0] else None
        context = CallContext(rows=[Row(prompt, "train") for d in draws for prompt in d["prompts"][rows]],
                              text_embeds=text, image_size=size,
                              added_cond=added_conditions(self.pipe.unet, pooled, size))
        if self.instance.hints is not None:
            context.hints = {self.condition: draws[0]["hints"][rows].float() / 255}
        with call_context(self.pipe.unet, context):
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            pred = denoiser(noisy_latents, timesteps, text, context.added_cond)
        target = _target(self.noise_scheduler, latents, noise, timesteps)
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        per_image = error.mean(dim=(1, 2, 3))
        instance = per_image[:batch_size]
        if self.instance.loss_mask is not None:  # kohya's: the error outside the mask zeroed, the mean kept whole
            mask = draws[0]["loss_mask"][rows].to(self.device)  # (n, 1, h, w): the same for every channel
            instance = (error[:batch_size] * mask).mean(dim=(1, 2, 3))
        loss = instance.mean()
        if self.prior is not None:
            loss = loss + self.config.prior_loss_weight * per_image[batch_size:].mean()
        return loss


# Adapter.objective -> its Objective; pipelines/erase.py adds "erase" (SPM membranes) when pipelines is imported.
OBJECTIVES: dict[str, type[Objective]] = {"denoise": DenoisingObjective}


def objective_of(method: type[Adapter]) -> type[Objective]:
    """The objective a method trains with."""
    if method.objective not in OBJECTIVES:
        raise TrainConfigError(f"method {method.method!r} trains with the objective {method.objective!r}, unknown "
                               f"to this training loop (known: {sorted(OBJECTIVES)})")
    return OBJECTIVES[method.objective]


def image_methods() -> list[str]:
    """The methods that learn from a folder of images (not an SPM membrane, which learns from concept names)."""
    return [name for name, method in sorted(REGISTRY.items()) if objective_of(method).needs_data]


def train(
    pipe, config: TrainConfig, *, progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `config.method` with `pipe` (a StableDiffusionPipeline) frozen, on `config.data_dir` or, for a method
    whose objective needs no images (an SPM membrane), on what its options name.

    The pipeline is moved to accelerate's device and its modules are frozen; the adapter is
    detached again at the end, so `pipe` generates as before. `progress` gets a TrainProgress
    after each step; `should_stop()` is asked before each step and True (in any process) ends the
    run with a checkpoint. A NaN/inf loss raises TrainingDiverged before the weights change."""
    # 1. Check the pipeline, the objective's inputs (the data) and the resume point before any work.
    method = REGISTRY[config.method]
    _check_pipeline(pipe, objective_of(method))
    mixed_precision = _mixed_precision(config, pipe.unet.dtype)
    adapter_config = _adapter_config_for(pipe, config)
    objective = objective_of(method)(pipe, config, adapter_config)
    resume_from = _resume_point(config)
    if resume_from is not None:
        _refuse_pickled_checkpoint(resume_from)

    # find_unused_parameters: an adapter may leave some of its weights out of a step's graph (SaRA's emptied
    # deltas after re-selection); DDP must not wait for gradients that never come.
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(config.seed)  # Python, NumPy, torch, CUDA: the adapter's initial weights depend on the seed alone
    # accelerate picks the device (cuda:N per process under `accelerate launch`); the frozen models work there.
    pipe.to(accelerator.device)

    # 2. The objective's work on the base model (prior preservation's class images).
    objective.setup(accelerator)

    # 3. A checkpoint must come from the same settings and data (checked before anything is built).
    #    Freeze the pipeline, build the adapter (with the checkpoint's weights), attach it. Freeze first:
    #    peft LoRA layers live inside the UNet, and a later unet.requires_grad_(False) would freeze them too.
    run_key = {**{k: getattr(config, k) for k in RESUME_KEYS}, "num_processes": accelerator.num_processes,
               "data": objective.fingerprint()}
    state = _read_checkpoint(resume_from, run_key) if resume_from is not None else None
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
    adapter_config = _config_for_run(method, adapter_config, config, run_key["data"], accelerator)
    adapter = method.from_unet(pipe.unet, adapter_config)  # fp32 master weights
    if state is not None:
        adapter.load_tensors(load_file(resume_from / "adapter.safetensors"))
    adapter.attach(pipe.unet)
    checkpointing_was_on = pipe.unet.is_gradient_checkpointing
    if config.gradient_checkpointing:
        # diffusers checkpoints with use_reentrant=False by default. SC-Tuner needs that: its weights sit on
        # the skips inside the up-blocks, whose tensor inputs (frozen decoder features) need no grad, and
        # reentrant checkpointing then returns outputs without grad: the tuners would silently get none
        # (docs/methods.md, SC-Tuner; tests/test_train.py checks equal gradients with and without checkpointing).
        pipe.unet.enable_gradient_checkpointing()
    try:
        # 4. Cache what the frozen encoders compute, once.
        objective.begin(adapter)

        # 5. Optimizer over the adapter's (loaded) weights, LR schedule and accelerate; the checkpoint's state.
        params = adapter.trainable_parameters()
        if not params:
            raise TrainConfigError(f"method={config.method!r}: the adapter has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                     num_training_steps=config.steps)
        denoiser, optimizer = accelerator.prepare(_Denoiser(pipe.unet, adapter), optimizer)
        # Every random draw of the loop comes from this CPU generator: the same numbers on any device and
        # in every process (each then takes its own slice), saved in checkpoints.
        generator = torch.Generator().manual_seed(config.seed)
        per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        training_info = {**config.training_metadata(), "mixed_precision": mixed_precision, **objective.info()}
        trigger_words = [config.trigger] if config.trigger else []
        start = 0
        if state is not None:
            start = _restore(state, resume_from, config, optimizer, lr_scheduler, accelerator, generator)
        adapter.train()

        def checkpoint(step: int) -> Path:
            return _save_checkpoint(config, step, adapter, optimizer, lr_scheduler, accelerator, generator, run_key,
                                    trigger_words, training_info)

        def samples(step: int) -> list[Path]:
            """Previews at step 0, every sample_every steps and at the end (by the main process)."""
            due = step in (0, config.steps) or (config.sample_every > 0 and step % config.sample_every == 0)
            if not (config.sample_prompts and due and accelerator.is_main_process):
                return []
            return _write_samples(pipe, adapter, config, step, objective.sample_hints)

        # 6. The loop.
        if start == 0 and (first := samples(0)) and progress is not None:
            progress(TrainProgress(0, config.steps, samples=first))
        losses: list[float] = []
        last_checkpoint = resume_from
        cancelled = False
        for step in range(start, config.steps):
            if should_stop is not None and _in_any_process(accelerator, should_stop()):
                cancelled = True
                if last_checkpoint != _checkpoint_dir(config, step):  # not just written by the previous step
                    last_checkpoint = checkpoint(step)
                break
            # All randomness of this step, drawn for the global batch at once (every micro-batch of every
            # process): accumulation and multi-GPU then train on exactly what one big batch would.
            batch = objective.draw(step, per_step, generator)
            step_loss = 0.0
            for micro in range(config.gradient_accumulation_steps):
                # Rows of this micro-batch on this process.
                first_row = (micro * accelerator.num_processes + accelerator.process_index) * config.batch_size
                rows = slice(first_row, first_row + config.batch_size)
                with accelerator.accumulate(denoiser):
                    loss = objective.loss(denoiser, batch, rows)
                    regularization = adapter.regularization_loss()
                    if regularization is not None:
                        loss = loss + regularization
                    # The mean over processes: NaN anywhere stops every process, before any weight changes.
                    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(step + 1, loss_value, config.learning_rate, last_checkpoint)
                    accelerator.backward(loss)  # divides by gradient_accumulation_steps
                step_loss += loss_value / config.gradient_accumulation_steps
            # The last micro-batch synchronised the gradients (accelerator.sync_gradients): one optimizer step.
            if config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            adapter.on_step_end(step, config.steps, optimizer)
            if [id(p) for p in adapter.trainable_parameters()] != [id(p) for p in params]:
                # SaRA's re-selection swaps in smaller Parameters (and puts them in the optimizer itself):
                # clip those from now on, and wrap them anew so DDP all-reduces their gradients.
                params = adapter.trainable_parameters()
                denoiser = accelerator.prepare(_Denoiser(pipe.unet, adapter))
            losses.append(step_loss)

            done = step + 1
            written = samples(done)  # before the checkpoint, whose RNG state then follows them
            saved = None
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                saved = last_checkpoint = checkpoint(done)
            if progress is not None:
                progress(TrainProgress(done, config.steps, step_loss, lr_scheduler.get_last_lr()[0], written, saved))
        else:  # no break: every step is done (also when resuming a finished run)
            step = config.steps

        # 7. The adapter file.
        adapter_path = None
        if not cancelled:
            adapter_path = config.output_dir / f"{config.adapter_name}.safetensors"
            if accelerator.is_main_process:
                save_adapter(adapter, adapter_path, trigger_words=trigger_words,
                             training={**training_info, "step": step})
        return TrainResult(adapter_path, step, cancelled, losses, last_checkpoint)
    finally:
        adapter.detach()
        if config.gradient_checkpointing and not checkpointing_was_on:
            pipe.unet.disable_gradient_checkpointing()


def _in_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True in every process when `flag` is True in one, so that all stop at the same step."""
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def training_refusal(pipe, objective: str = "denoise") -> str | None:
    """Why `pipe` cannot be trained on with `objective` (a key of OBJECTIVES), in the words `train` would refuse it
    with, or None when it can (the UI says it in place of a tab that would fail)."""
    try:
        _check_pipeline(pipe, OBJECTIVES[objective])
    except TrainConfigError as e:
        return str(e)
    return None


def _check_pipeline(pipe, objective: type[Objective]) -> None:
    unet = pipe.unet
    if unet.config.get("addition_embed_type") is not None and not objective.added_conditions:
        raise TrainConfigError(f"this model's UNet takes added conditions ({unet.config.addition_embed_type!r}: "
                               f"{detect_family(unet)}'s pooled text and size ids), which the {objective.__name__} "
                               "does not pass yet; use an SD 1.x/2.x model")
    if unet.config.in_channels != pipe.vae.config.latent_channels:
        raise TrainConfigError(f"the UNet takes {unet.config.in_channels} input channels (an inpainting or other "
                               "special model); train on a text-to-image model with "
                               f"{pipe.vae.config.latent_channels}")
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise TrainConfigError(f"the scheduler's prediction_type {kind!r} is not one of {PREDICTION_TYPES}")


def _mixed_precision(config: TrainConfig, unet_dtype: torch.dtype) -> str:
    """The config's choice, else the UNet's own half dtype, else bf16 (fp16 on older GPUs) on CUDA, else none."""
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(unet_dtype)
    if config.mixed_precision is not None:
        if half is not None and config.mixed_precision == "no":
            raise TrainConfigError(f"mixed_precision='no', but the pipeline's UNet is {unet_dtype}; set it to "
                                   f"'{half}' or load the model in float32")
        return config.mixed_precision
    if half is not None:
        return half
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _data_fingerprint(examples: list[Example], class_examples: list[Example]) -> str:
    """A hash of the images' names, captions and repeats: the data order depends on all of them."""
    rows = [(e.image.name, e.caption, e.repeats) for e in (*examples, *class_examples)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def generate_class_images(pipe, class_dir: Path, class_prompt: str, num_images: int, *, num_inference_steps: int,
                          guidance_scale: float) -> list[Path]:
    """Top `class_dir` up to `num_images` images of `class_prompt` drawn by `pipe` (the base model:
    call it before attaching an adapter), for DreamBooth-style prior preservation.

    Image `class-<seed>.png` comes from seed <seed>, taking the smallest seeds whose files are
    missing, so the set is the same whenever it is (re)built; existing images, generated or
    supplied, count toward `num_images` and are never regenerated. Each PNG is written atomically
    with its generation settings. Returns the new files."""
    class_dir.mkdir(parents=True, exist_ok=True)
    missing = max(num_images - len(images_in(class_dir)), 0)
    free_seeds = (seed for seed in itertools.count() if not (class_dir / f"class-{seed:05d}.png").exists())
    written = []
    for seed in itertools.islice(free_seeds, missing):
        result = generate(pipe, class_prompt, seed=seed, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale)
        written.append(save_png(result.images[0], result.settings[0], class_dir / f"class-{seed:05d}.png"))
    return written


@torch.no_grad()
def _encode(pipe, pixels: torch.Tensor, captions: list[str], chunk: int = 16,
            instance_prompt: str | None = None) -> _Encoded:
    """VAE posteriors of uint8 `pixels` (N, 3, H, W) and text embeddings of the distinct `captions` (and of
    `instance_prompt`, for TrainConfig.instance_prompt_share)."""
    vae, device = pipe.vae, pipe.device
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    means, stds = [], []
    for batch in pixels.split(chunk):
        posterior = vae.encode(batch.to(device, vae.dtype) / 127.5 - 1.0).latent_dist
        means.append((posterior.mean.float() - shift) * scale)
        stds.append(posterior.std.float() * scale)
    distinct = list(dict.fromkeys([*captions, *([instance_prompt] if instance_prompt else []), ""]))  # "": dropout
    text, pooled = encode_texts(pipe, distinct, chunk)
    caption_index = torch.tensor([distinct.index(c) for c in captions], device=device)
    prompt_row = distinct.index(instance_prompt) if instance_prompt else None
    return _Encoded(torch.cat(means), torch.cat(stds), text, distinct, caption_index, pooled=pooled,
                    prompt_row=prompt_row)


@torch.no_grad()
def encode_texts(pipe, texts: list[str], chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 text embeddings (N, L, D) of `texts` as the pipeline conditions on them, and their pooled text (N, P)
    where the UNet also takes it (SDXL's second encoder), else None."""
    # Keywords: SDXL's encode_prompt takes prompt_2 second, where SD's takes the device. SDXL also gives the pooled
    # text of its second encoder (outputs 3 and 4); SD 1.x/2.x give two outputs.
    encoded = [pipe.encode_prompt(prompt=texts[i:i + chunk], device=pipe.device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False) for i in range(0, len(texts), chunk)]
    text = torch.cat([out[0].float() for out in encoded])
    pooled = torch.cat([out[2].float() for out in encoded]) if len(encoded[0]) > 2 else None
    return text, pooled


def _draw(data: _Encoded, sampler: EpochSampler, step: int, count: int, generator: torch.Generator,
          noise_scheduler: DDPMScheduler, caption_dropout: float = 0.0,
          prompt_share: float = 0.0) -> dict[str, torch.Tensor]:
    """Step `step`'s `count` examples: a latent sampled from each posterior, its text (the instance prompt's with
    probability `prompt_share`, then the empty caption's with probability `caption_dropout`), noise and timestep."""
    index = sampler.take(step * count, count).to(data.latent_mean.device)
    shape = (count, *data.latent_mean.shape[1:])
    eps = torch.randn(shape, generator=generator).to(data.latent_mean.device)
    rows = data.caption_index[index]
    draw = {
        "latents": data.latent_mean[index] + data.latent_std[index] * eps,
        "noise": torch.randn(shape, generator=generator),
        "timesteps": torch.randint(0, noise_scheduler.config.num_train_timesteps, (count,), generator=generator),
    }
    if prompt_share > 0:  # drawn only then, so that runs without it keep their random stream
        swapped = (torch.rand(count, generator=generator) < prompt_share).to(index.device)
        rows = torch.where(swapped, data.prompt_row, rows)
    if caption_dropout > 0:  # drawn only then, so that runs without dropout keep their random stream
        dropped = (torch.rand(count, generator=generator) < caption_dropout).to(index.device)
        rows = torch.where(dropped, len(data.text) - 1, rows)  # the empty caption is the last row
    draw["text"] = data.text[rows]
    if data.pooled is not None:
        draw["pooled"] = data.pooled[rows]
    draw["prompts"] = [data.captions[i] for i in rows.tolist()]
    if data.hints is not None:
        draw["hints"] = data.hints[index]
    if data.loss_mask is not None:
        draw["loss_mask"] = data.loss_mask[index]
    return draw


def _adapter_config_for(pipe, config: TrainConfig) -> Any:
    """The method's config, with what only the pipeline knows filled in: the fields whose metadata names a
    pipeline attribute (`from_model`, e.g. a controller's vae_scale_factor: 8 on SD, 4 on the embedded Shapes
    model), which a given value must match."""
    adapter_config = config.adapter_config()
    filled = {}
    for f in dataclasses.fields(adapter_config):
        attribute = f.metadata.get("from_model")
        if attribute is None:
            continue
        given, value = config.method_options.get(f.name), getattr(pipe, attribute)
        if given is not None and given != value:
            raise TrainConfigError(f"method_options {f.name}={given!r}, but this model's {attribute} is {value}; "
                                   "leave it unset (it is read from the model)")
        filled[f.name] = value
    return dataclasses.replace(adapter_config, **filled)


def _config_for_run(method: type[Adapter], adapter_config: Any, config: TrainConfig, data: str,
                    accelerator: Accelerator) -> Any:
    """The method's `config_for_run` (e.g. an orthogonal LoRA's slot claim), asked by the main process and shared
    with the others. The owner names this run: the same host, adapter file and data when it resumes, another
    data fingerprint for another concept."""
    if accelerator.is_main_process:
        owner = f"{socket.gethostname()}:{config.output_dir.resolve()}/{config.adapter_name}:{data}"
        library = config.library_dir if config.library_dir is not None else default_library_root()
        adapter_config = method.config_for_run(adapter_config, owner=owner, library=library)
    return broadcast_object_list([adapter_config])[0]


def _target(noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
            timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, by the scheduler's prediction_type (v for SD 2.x-768)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents  # "sample"


def _write_samples(pipe, adapter: Adapter, config: TrainConfig, step: int, hints: torch.Tensor | None) -> list[Path]:
    """One image per (prompt, seed) with the adapter attached, through the studio's `generate`
    (DDIM, fixed seeds), into output_dir/samples/step-XXXXXX/<prompt index>-seed<seed>.png.
    A controller's prompt i is controlled by the hint of training image i (cycling)."""
    folder = config.output_dir / "samples" / f"step-{step:06d}"
    paths = []
    adapter.eval()  # no dropout in previews
    try:
        for i, prompt in enumerate(config.sample_prompts):
            control = []
            if hints is not None:
                hint = Image.fromarray(hints[i % len(hints)].permute(1, 2, 0).cpu().numpy())
                control = [ControlSpec(type(adapter).hint_condition(adapter.config), hint, annotate=False)]
            for seed in config.sample_seeds:
                result = generate(pipe, prompt, seed=seed, num_inference_steps=config.sample_steps,
                                  guidance_scale=config.guidance_scale, control=control)
                paths.append(save_png(result.images[0], result.settings[0], folder / f"{i:02d}-seed{seed}.png"))
    finally:
        adapter.train()
    return paths


# -- checkpoints ------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The finished checkpoints of a run, oldest first (half-written ones are hidden `.tmp` folders)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _checkpoint_dir(config: TrainConfig, step: int) -> Path:
    return config.output_dir / "checkpoints" / f"step-{step:06d}"


def _resume_point(config: TrainConfig) -> Path | None:
    existing = list_checkpoints(config.output_dir)
    if config.resume is None:
        if existing:
            raise TrainConfigError(
                f"resume=None, but output_dir {config.output_dir} already holds checkpoints (latest "
                f"{existing[-1].name}); pass resume='latest' to continue that run, or choose another output_dir"
            )
        return None
    if config.resume == "latest":
        return existing[-1] if existing else None  # nothing yet: a fresh start, so re-running a job resumes it
    return Path(config.resume)


def _refuse_pickled_checkpoint(folder: Path) -> None:
    """Refuse, unopened, a checkpoint whose state.pt / rng-N.pt are pickles (the format before safetensors)."""
    for old in [folder / "state.pt", *sorted(folder.glob("rng-*.pt"))]:
        if old.is_file() and not old.with_suffix(".safetensors").is_file():
            refuse_pickle(old, f"start a new run with another output_dir (--out), or delete {folder.parent} "
                               "and train again without resume")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(config: TrainConfig, step: int, adapter: Adapter, optimizer, lr_scheduler,
                     accelerator: Accelerator, generator: torch.Generator, run_key: dict[str, Any],
                     trigger_words: list[str], training_info: dict[str, Any]) -> Path:
    """Everything an exact resume needs, in output_dir/checkpoints/step-XXXXXX/: the adapter (a normal
    adapter file), optimizer, LR schedule, grad scaler, loop generator, step, and each process's RNG.
    Written into a hidden temporary folder renamed when complete, so the newest checkpoint is always whole."""
    final = _checkpoint_dir(config, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(_rng_state(accelerator.device), tmp / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        save_adapter(adapter, tmp / "adapter.safetensors", trigger_words=trigger_words,
                     training={**training_info, "step": step})
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_state({"step": step, "run": run_key, "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler,
                    "generator": generator.get_state()}, tmp / "state.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a run resumed from an earlier checkpoint reaches this step again
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(config.output_dir)[:-config.keep_last]:
            shutil.rmtree(old)
    return final


def _read_checkpoint(folder: Path, run_key: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state, refused if made with other data or settings than `run_key` records.

    State files are safetensors with a JSON header (pipelines/statefile.py): reading one runs no code."""
    state = load_state(folder / "state.safetensors")
    fields = TrainConfig.__dataclass_fields__
    for key, value in run_key.items():
        # A setting added after the checkpoint was written is not in it: the run used the setting's default.
        recorded = state["run"].get(key, fields[key].default if key in fields else None)
        if recorded != value:
            what = "the training images or captions" if key == "data" else key
            raise TrainConfigError(
                f"checkpoint {folder} was made with other {what} ({recorded!r}, now {value!r}); "
                "resume with the same settings and data, or start a new output_dir"
            )
    return state


def _restore(state: dict[str, Any], folder: Path, config: TrainConfig, optimizer, lr_scheduler,
             accelerator: Accelerator, generator: torch.Generator) -> int:
    """Put a checkpoint's training state (all but the adapter's weights) back; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    # A resume may lower the learning rate (the fix for a diverged run): keep the schedule's position, take
    # the config's base rate, and let the scheduler recompute the current rate (bit for bit the saved one
    # when the rate is unchanged).
    lr_scheduler.base_lrs = [config.learning_rate] * len(lr_scheduler.base_lrs)
    lr_scheduler.last_epoch -= 1
    lr_scheduler.step()
    if accelerator.scaler is not None and state["grad_scaler"] is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    generator.set_state(state["generator"])
    _set_rng_state(load_state(folder / f"rng-{accelerator.process_index}.safetensors"), accelerator.device)
    return state["step"]
