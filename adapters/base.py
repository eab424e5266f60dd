"""The one adapter abstraction every tuner implements (SC-Tuner, CSC-Tuner, SaRA, LoRA, SPM...).

An adapter is an `nn.Module` holding only its own weights. `attach(unet)` wires it into an
unmodified diffusers UNet through hooks, attention processors or peft layers, and keeps what
it replaced; `detach()` puts exactly those objects back, so the UNet's outputs are
bit-identical to before `attach`. Several adapters may be attached at once, each with its own
`scale` (or a scale per UNet batch row); the UNet's registry (adapters/context.py) lists them, and
each reads the pipeline's per-call context in `prepare`.

A method describes itself: its config dataclass's fields carry `metadata` (help, choices, range; see
`option`) from which the Train tab and the CLI build their options, and class attributes give its
training defaults. Nothing outside `adapters/` branches on the method name except through `REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .context import CallContext, attachments, current_context

FORMAT_VERSION = "1"


def detect_family(unet: nn.Module) -> str:
    """SD1 / SD2 / SDXL from the UNet config alone (the text-conditioning layout decides it).

    SDXL conditions on pooled text + size ids ("text_time"); SD 2.x uses OpenCLIP-H (1024-wide
    context); everything else with one CLIP-style text encoder is SD 1.x-style."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "SDXL"
    if config.cross_attention_dim == 1024:
        return "SD2"
    return "SD1"


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights live (adapters are built and attached there; `meta` included)."""
    return next(module.parameters()).device


_PARAMETRIZED = re.compile(r"parametrizations\.(\w+)\.original$")


def unet_fingerprint(unet: nn.Module) -> str:
    """A short hash of the UNet's architecture (every parameter name and shape).

    Two checkpoints of the same architecture share it; an adapter trained on SD 1.5 refuses a
    UNet with another fingerprint because its shapes would not line up. Attached adapters do not
    change it (see `base_parameters`), so a LoRA can be loaded next to another one."""
    h = hashlib.sha256()
    # peft wraps a target `to_q` as `to_q.base_layer` and adds `to_q.lora_A.<adapter>`; torch parametrize (SaRA)
    # stores `conv_in.weight` as `conv_in.parametrizations.weight.original`: base_parameters sees through both.
    shapes = [(name, tuple(p.shape)) for name, p in base_parameters(unet)]
    for name, shape in sorted(shapes):  # sorted: parametrize moves a weight last
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]


def _adapter_prefixes(unet: nn.Module) -> tuple[str, ...]:
    """Name prefixes of adapter weights living inside the UNet's modules (peft's `lora_A.<adapter>` ...)."""
    return tuple(
        f"{name}.{attr}."
        for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer)
        for attr in module.adapter_layer_names
    )


def option(default: Any, help: str, *, choices: tuple = (), minimum: float | None = None,
           maximum: float | None = None, ui: bool = False, from_model: str | None = None,
           labels_for_model: Callable[[nn.Module], list[tuple[str, Any]]] | None = None) -> Any:
    """A config dataclass field that describes itself to the Train tab and the CLI.

    choices: the usual values, or (label, value) pairs (the config's own checks decide what is allowed);
    minimum/maximum: an inclusive range; ui: shown in the Train tab (else only the CLI's --option and config
    files); from_model: filled from the pipeline's attribute of that name (e.g. "vae_scale_factor") by the
    training loop; labels_for_model(unet): (label, value) choices labelled for the loaded model."""
    metadata = {"help": help, "choices": tuple(choices), "minimum": minimum, "maximum": maximum, "ui": ui,
                "from_model": from_model, "labels_for_model": labels_for_model}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choice_values(choices: tuple) -> list:
    """The values of an option's choices, which may be plain values or (label, value) pairs."""
    return [c[1] if isinstance(c, tuple) else c for c in choices]


@dataclass(frozen=True)
class Recommendation:
    """A method's best measured settings on a kind of concept (docs/benchmarks.md); `reason` says what they
    reach, including when no method meets the customization targets."""

    options: dict[str, Any]
    reason: str
    learning_rate: float | None = None  # None: the method's default
    steps: int | None = None  # None: the training loop's default
    instance_prompt_share: float = 0.0  # TrainConfig's: the share of steps on the trigger alone


class Adapter(nn.Module):
    """Base class: subclasses set `method`, `config_class` (fields made with `option`) and `label`, and
    implement `from_unet`, `from_shapes`, `_attach` and `_detach`.

    Weight-delta methods (LoRA, SaRA, orthogonal LoRA) set `is_weight_delta` and implement `delta_weights`;
    `merge`/`unmerge` and LoRA export build on it. `trainable_parameters()` are what the training loop
    optimises; `frozen_parameters()` are the adapter's own weights that never train (e.g. orthogonal LoRA's
    fixed down-projection). Attaching never changes any `requires_grad`: freeze the UNet
    (`unet.requires_grad_(False)`) *before* attaching, because adapters that live inside the UNet's modules
    (peft LoRA layers) would be frozen too by a later `unet.requires_grad_(False)`.

    `base_family`/`base_fingerprint` name the UNet the adapter was built for (`from_unet`) or
    trained on (read back from its file); adapters/io.py writes them and checks them on load.
    """

    method: ClassVar[str]
    config_class: ClassVar[type]
    label: ClassVar[str]  # the name users read ("SC-Tuner")
    summary: ClassVar[str] = ""  # one line for the Train tab: what it is good for, what it cannot do
    is_weight_delta: ClassVar[bool] = False
    default_merge_weight: ClassVar[float] = 1.0  # a weight delta's weight in adapters/fusion.py's merges
    needs_hints: ClassVar[bool] = False  # trained and run with control images (ctx.hints)
    per_row: ClassVar[bool] = True  # takes a scale per UNet batch row (set_row_scales); False: one per call
    caption_dropout: ClassVar[float] = 0.0  # the training loop's default share of empty captions
    # What the training loop minimises (a key of pipelines.train.OBJECTIVES): "denoise" learns from a folder of
    # images, "erase" (SPM membranes) from concept names alone.
    objective: ClassVar[str] = "denoise"
    # concept kind ("subject", "style", "control") -> the best measured settings on it, and what they reach
    recommended_for: ClassVar[dict[str, Recommendation]] = {}

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.scale = 1.0
        self.row_scales: torch.Tensor | None = None
        self._off_uncond = False  # row_scales hold the call's zeros on the unconditional rows
        self.unet: nn.Module | None = None
        self.merged = False
        self.base_family: str | None = None
        self.base_fingerprint: str | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # `self.unet` is a reference, not a submodule: nn.Module would otherwise register the
        # UNet as a child, and the adapter's parameters(), state_dict() and .to() would take it in.
        if name == "unet":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_unet(cls, unet: nn.Module, config: Any = None) -> Adapter:
        """A fresh, unattached adapter sized for `unet` (default config when None), built on
        the UNet's device (so a `meta` UNet counts parameters without allocating them)."""
        raise NotImplementedError

    @classmethod
    def from_shapes(cls, config: Any, shapes: dict[str, tuple[int, ...]]) -> Adapter:
        """An adapter whose `tensors()` have exactly these names and shapes (a saved file's),
        ready for `load_tensors`; no UNet needed."""
        raise NotImplementedError

    def record_base(self, unet: nn.Module) -> None:
        """Remember the family and fingerprint of the UNet this adapter is built for (`from_unet` calls it)."""
        self.base_family = detect_family(unet)
        self.base_fingerprint = unet_fingerprint(unet)

    # -- wiring -------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        """Wire into `unet` (refused when already attached) and join its registry; inside a pipeline call the
        adapter is prepared for that call's context at once."""
        if self.unet is not None:
            raise RuntimeError(f"{self.method} adapter is already attached; call detach() first")
        self._attach(unet)
        self.unet = unet
        attachments(unet).adapters.append(self)
        context = current_context(unet)
        if context is not None:
            self.prepare(context)

    def detach(self) -> None:
        """Put back exactly what `attach` replaced and leave the registry (a no-op when not attached)."""
        if self.unet is None:
            return
        unet = self.unet
        self._detach()
        attachments(unet).adapters.remove(self)
        self.prepare(None)
        self.unet = None

    def _attach(self, unet: nn.Module) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        raise NotImplementedError

    def _check_attached(self, action: str) -> nn.Module:
        if self.unet is None:
            raise RuntimeError(f"cannot {action} a {self.method} adapter that is not attached; call attach(unet) first")
        return self.unet

    def prepare_call(self, context: CallContext | None) -> None:
        """What `call_context` runs on entry and exit: the method's `prepare`, then the call's choice of rows (0 on
        the unconditional rows when `context.adapters_on_uncond` is False), on top of the method's own row scales."""
        if self._off_uncond:  # the previous call's zeros go first, so that `prepare` starts from a plain scale
            self._off_uncond = False
            self.set_row_scales(None)
        self.prepare(context)
        off = context.adapter_row_scales() if context is not None else None
        if off is not None:
            if not self.acts_per_row:
                raise ValueError(f"a {'merged ' if self.merged else ''}{self.label} adapter acts on every row of the "
                                 "UNet batch alike, so it cannot stay off the unconditional rows; keep adapters on "
                                 "the unconditional branch" + (" or unmerge it" if self.merged else ""))
            self.set_row_scales(off if self.row_scales is None else self.row_scales * off)
            self._off_uncond = True

    @property
    def acts_per_row(self) -> bool:
        """Whether a scale per UNet batch row takes effect now: not for a method with one scale per call, nor
        while merged into the weights every row shares."""
        return self.per_row and not self.merged

    def prepare(self, context: CallContext | None) -> None:
        """Read the pipeline's per-call context before its denoising loop (None: the call ended). The default
        reads nothing; a membrane would set its per-row strength here with `set_row_scales`."""

    # -- training / inference -------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The adapter's own weights that never train (none by default)."""
        return []

    @classmethod
    def default_learning_rate(cls, config: Any) -> float | None:
        """The method's learning rate when the user gives none (None: the training loop's default)."""
        return None

    @classmethod
    def config_for_run(cls, config: Any, *, owner: str, library: Path) -> Any:
        """The config a training run builds its adapter from, given the run's `owner` (stable across resumes of
        one run, different for another concept) and the adapter `library` folder, where a method may keep state
        shared between runs (orthogonal LoRA claims its basis slot there). Default: `config` unchanged."""
        return config

    @classmethod
    def hint_condition(cls, config: Any) -> str | None:
        """What the control images show, for a method that `needs_hints` (None otherwise)."""
        return None

    def regularization_loss(self) -> torch.Tensor | None:
        """An extra loss term the training loop adds each step (e.g. SaRA's nuclear norm)."""
        return None

    def on_step_end(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Called by the training loop after each optimizer step (e.g. SaRA's re-selection)."""

    def infotext_params(self) -> dict[str, str]:
        """After a pipeline call, entries this adapter adds to the images' settings (A1111's extra generation
        parameters), e.g. the permeability a membrane computed for the prompt; none by default."""
        return {}

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)

    def set_row_scales(self, row_scales: torch.Tensor | None) -> None:
        """A factor per UNet batch row on top of `scale` (B,), or None for the same scale on every row."""
        if row_scales is not None and row_scales.ndim != 1:
            raise ValueError(f"row_scales must be one factor per UNet batch row (B,), got shape "
                             f"{tuple(row_scales.shape)}")
        self.row_scales = row_scales

    def scale_for(self, x: torch.Tensor) -> float | torch.Tensor:
        """The scale of the rows of `x` (B, ...): `scale`, or `scale` x the row factors shaped (B, 1, ...)."""
        if self.row_scales is None:
            return self.scale
        if self.row_scales.numel() != x.shape[0]:
            raise ValueError(f"{self.method}: {self.row_scales.numel()} row scales for a batch of {x.shape[0]} rows")
        return self.scale * self.row_scales.to(x.device, x.dtype).view(-1, *(1,) * (x.ndim - 1))

    # -- weight deltas: merge, unmerge, export, fusion ----------------------------------------
    def delta_weights(self, scale: float | None = None) -> dict[str, torch.Tensor]:
        """UNet parameter name (as the bare UNet names it) -> the dense change this adapter makes to it at
        `scale` (None: its own), for a weight-delta method; others refuse."""
        raise NotImplementedError(f"{self.method} is not a weight delta: it has no delta_weights()")

    def delta_weight(self, name: str, scale: float | None = None) -> torch.Tensor | None:
        """`delta_weights()[name]` alone (None where this adapter changes nothing), for a caller that takes one
        module at a time without holding every dense delta (the composer's regional deltas); methods override it
        to compute just that one."""
        return self.delta_weights(scale).get(name)

    def merge(self) -> None:
        """W += delta for every delta of `delta_weights()` (checked finite first: on a non-finite delta nothing
        changes); the adapter's own forward path is then bypassed, so the UNet computes the same thing."""
        unet = self._check_attached("merge")
        if not self.is_weight_delta:
            raise NotImplementedError(f"{self.method} cannot be merged into the weights (it is not a weight delta)")
        if self.merged:
            raise RuntimeError(f"this {self.method} adapter is already merged")
        deltas = self.delta_weights()
        bad = [name for name, delta in deltas.items() if not torch.isfinite(delta).all()]
        if bad:
            raise ValueError(f"the delta is not finite in {len(bad)} weights (e.g. {bad[0]}); nothing was merged")
        weights = dict(base_parameters(unet))
        for name, delta in deltas.items():
            weights[name].data += delta.to(weights[name].dtype)
        self._bypass(True)
        self.merged = True

    def unmerge(self) -> None:
        """W -= delta (equal to before the merge up to rounding), and the adapter's forward path is back."""
        unet = self._check_attached("unmerge")
        if not self.merged:
            raise RuntimeError(f"this {self.method} adapter is not merged")
        weights = dict(base_parameters(unet))
        self._bypass(False)
        for name, delta in self.delta_weights().items():
            weights[name].data -= delta.to(weights[name].dtype)
        self.merged = False

    def _bypass(self, on: bool) -> None:
        """Stop (on) or resume adding this adapter's delta in the forward pass: the weights hold it when merged."""
        raise NotImplementedError(f"{self.method} does not implement merging")

    # -- serialisation (see adapters/io.py) ------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors saved in the adapter file (default: the module's state dict)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors, strict=True)

    def header_metadata(self) -> dict[str, str]:
        """Method-specific header entries besides our `studio.*` ones (LoRA: diffusers'
        `lora_adapter_metadata`, so diffusers can load the file too)."""
        return {}

    def read_header(self, header: dict[str, str]) -> None:
        """Take back what `header_metadata` wrote, after `load_tensors` (adapters/io.py's `load_adapter`);
        the default reads nothing."""


def base_parameters(unet: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name as the bare UNet names it, the Parameter that holds it) for every UNet weight, seen through peft
    wrappers (`to_q.base_layer.weight` is `to_q.weight`) and torch parametrizations (SaRA)."""
    adapter_prefixes = _adapter_prefixes(unet)
    for name, p in unet.named_parameters():
        if not name.startswith(adapter_prefixes):
            yield _PARAMETRIZED.sub(r"\1", name.replace(".base_layer.", ".")), p


REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a method loadable by name (the only place names map to classes)."""
    REGISTRY[cls.method] = cls
    return cls
