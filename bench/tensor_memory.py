"""The peak bytes of the tensors a block of code allocates and holds at once, on any device.

This is what CUDA's `max_memory_allocated` minus the memory allocated before measures, without the caching
allocator's rounding. It is counted op by op through a dispatch mode, so a CPU figure is exact and the same on every
run, where the process's peak RSS moves by MiBs with where the allocator happens to place things. It does not see
what a kernel allocates and frees inside one op (e.g. a fused attention's workspace), nor tensors made outside
torch's dispatcher (`torch.from_numpy`).

    with TensorPeak() as memory:
        run()
    print(memory.peak)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class TensorPeak(TorchDispatchMode):
    """Counts each storage an op returns that no earlier op or input held, until it is freed; `peak` is the largest
    sum of such storages alive at one time, `live` the sum now."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        # Storages seen so far: those from before the block (met first as an input) count 0 bytes.
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in _tensors((args, kwargs)):
            self._see(tensor, allocated=False)
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            self._see(tensor, allocated=True)
        return out

    def _see(self, tensor: torch.Tensor, allocated: bool) -> None:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, meta and other storage-less tensors
            return
        if storage in self._seen:
            return
        size = storage.nbytes() if allocated else 0
        self._seen[storage] = size
        if size:
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
