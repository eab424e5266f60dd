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
from typing import Any, ClassVar

import torch
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


def unet_fingerprint(unet: nn.Module) -> str:
    """A short hash of the UNet's architecture (every parameter name and shape).

    Two checkpoints of the same architecture share it; an adapter trained on SD 1.5 refuses a
    UNet with another fingerprint because its shapes would not line up."""
    h = hashlib.sha256()
    for name, p in unet.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


class Adapter(nn.Module):
    """Base class: subclasses set `method` and `config_class`, and implement `attach`/`detach`.

    Override `merge`/`unmerge` where the maths allows (a weight delta); the defaults refuse.
    `trainable_parameters()` are what the training loop optimises (default: all requires_grad).
    """

    method: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.scale = 1.0
        self.unet: nn.Module | None = None
        self.merged = False

    # -- wiring -------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def _check_not_attached(self) -> None:
        if self.unet is not None:
            raise RuntimeError(f"{self.method} adapter is already attached; call detach() first")

    # -- training / inference -------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

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


REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a method loadable by name (the only place names map to classes)."""
    REGISTRY[cls.method] = cls
    return cls
