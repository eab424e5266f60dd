"""The one adapter abstraction every tuner implements (SC-Tuner, CSC-Tuner, SaRA, LoRA, SPM...).

An adapter is an `nn.Module` holding only its own weights. `attach(unet)` wires it into an
unmodified diffusers UNet through hooks, attention processors or peft layers, and keeps what
it replaced; `detach()` puts exactly those objects back, so the UNet's outputs are
bit-identical to before `attach`. Several adapters may be attached at once, each with its own
`scale`. Nothing outside `adapters/` branches on the method name except through `REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

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
    change it (see `_base_parameter_shapes`), so a LoRA can be loaded next to another one."""
    h = hashlib.sha256()
    for name, shape in sorted(_base_parameter_shapes(unet)):  # sorted: parametrize moves a weight last
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]


def _base_parameter_shapes(unet: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the UNet's own parameters as the bare model names them.

    peft wraps a target `to_q` as `to_q.base_layer` and adds `to_q.lora_A.<adapter>`; we see
    through the wrapper and skip the adapter weights. torch parametrize (SaRA) stores `conv_in.weight`
    as `conv_in.parametrizations.weight.original`. Hook-based adapters add no parameters."""
    adapter_prefixes = tuple(
        f"{name}.{attr}."
        for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer)
        for attr in module.adapter_layer_names
    )
    for name, p in unet.named_parameters():
        if not name.startswith(adapter_prefixes):
            yield _PARAMETRIZED.sub(r"\1", name.replace(".base_layer.", ".")), tuple(p.shape)


class Adapter(nn.Module):
    """Base class: subclasses set `method` and `config_class` and implement `from_unet`,
    `from_shapes`, `attach` and `detach`.

    Override `merge`/`unmerge` where the maths allows (a weight delta); the defaults refuse.
    `trainable_parameters()` are what the training loop optimises (default: all requires_grad).
    Attaching never changes any `requires_grad`: freeze the UNet (`unet.requires_grad_(False)`)
    *before* attaching, because adapters that live inside the UNet's modules (peft LoRA layers)
    would be frozen too by a later `unet.requires_grad_(False)`.

    `base_family`/`base_fingerprint` name the UNet the adapter was built for (`from_unet`) or
    trained on (read back from its file); adapters/io.py writes them and checks them on load.
    """

    method: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.scale = 1.0
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

    def _record_base(self, unet: nn.Module) -> None:
        self.base_family = detect_family(unet)
        self.base_fingerprint = unet_fingerprint(unet)

    # -- wiring -------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def _check_not_attached(self) -> None:
        if self.unet is not None:
            raise RuntimeError(f"{self.method} adapter is already attached; call detach() first")

    def _check_attached(self, action: str) -> nn.Module:
        if self.unet is None:
            raise RuntimeError(f"cannot {action} a {self.method} adapter that is not attached; call attach(unet) first")
        return self.unet

    # -- training / inference -------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @classmethod
    def default_learning_rate(cls, config: Any) -> float | None:
        """The method's learning rate when the user gives none (None: the training loop's default)."""
        return None

    def regularization_loss(self) -> torch.Tensor | None:
        """An extra loss term the training loop adds each step (e.g. SaRA's nuclear norm)."""
        return None

    def on_step_end(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Called by the training loop after each optimizer step (e.g. SaRA's re-selection)."""

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)

    def merge(self) -> None:
        raise NotImplementedError(f"{self.method} cannot be merged into the weights (it is not a weight delta)")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.method} cannot be merged into the weights (it is not a weight delta)")

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


REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a method loadable by name (the only place names map to classes)."""
    REGISTRY[cls.method] = cls
    return cls
