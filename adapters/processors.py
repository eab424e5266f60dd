"""One handle for swapping attention processors (uniform attention, regional composition, ...).

A swapped-in processor wraps the one that was there (`base_processor`) and passes through what it does
not change. Several swaps may stack on one layer; `ProcessorSwap.detach()` takes out exactly its own
processors whatever the order: when it is the outermost, the layer gets its base processor back; when a
later swap wraps it, that wrapper's `base_processor` is pointed past it. Once every swap is detached, each
layer holds the very processor object it had before, so outputs are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers.models.attention_processor import Attention
from torch import nn


class WrappingProcessor:
    """Base of swapped-in processors: holds the processor it wraps and, by default, passes every call on.

    A plain object, not an nn.Module: a processor without weights leaves the UNet's state dict unchanged."""

    def __init__(self, base_processor):
        self.base_processor = base_processor

    def __call__(self, attn: Attention, hidden_states, *args, **kwargs):
        return self.base_processor(attn, hidden_states, *args, **kwargs)


class ProcessorSwap:
    """Processors made by `make(path, previous_processor)` installed on `layers` (module path -> Attention)."""

    def __init__(self, layers: dict[str, Attention], make: Callable[[str, object], WrappingProcessor]):
        self._layers = dict(layers)
        self._installed = {name: make(name, layer.processor) for name, layer in self._layers.items()}
        for name, layer in self._layers.items():
            layer.set_processor(self._installed[name])

    @property
    def attached(self) -> bool:
        return bool(self._installed)

    @property
    def processors(self) -> dict[str, WrappingProcessor]:
        return dict(self._installed)

    def detach(self) -> None:
        """Take this swap's processors out of every layer, in any order relative to other swaps (a no-op when
        already detached). Refused, with nothing changed, when a layer's processor was replaced by one that
        does not wrap ours (e.g. `unet.set_attn_processor`)."""
        outer = {name: self._wrapper_of(name, layer) for name, layer in self._layers.items()}
        for name, layer in self._layers.items():
            mine = self._installed[name]
            if outer[name] is None:
                layer.set_processor(mine.base_processor)
            else:
                outer[name].base_processor = mine.base_processor
        self._installed, self._layers = {}, {}

    def _wrapper_of(self, name: str, layer: Attention) -> WrappingProcessor | None:
        """The processor wrapping ours on `layer` (None: ours is the layer's own)."""
        mine, wrapper = self._installed[name], None
        current = layer.processor
        while current is not mine:
            if not isinstance(current, WrappingProcessor):
                raise RuntimeError(f"the processor of {name} was replaced by a {type(current).__name__} that does not "
                                   "wrap the one installed here; restore it before detaching")
            wrapper, current = current, current.base_processor
        return wrapper

    def __enter__(self) -> ProcessorSwap:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()


def attention_layers(unet: nn.Module, which: str) -> dict[str, Attention]:
    """The UNet's attention modules by path: "cross" (`attn2`, SD 1.x/2.x: 16, SDXL: 70) or "self" (`attn1`)."""
    name = {"cross": "attn2", "self": "attn1"}[which]
    return {path: module for path, module in unet.named_modules()
            if isinstance(module, Attention) and path.rsplit(".", 1)[-1] == name
            and module.is_cross_attention == (which == "cross")}
