"""bench/tensor_memory.py's counter, which checks the composer's memory target (bench/fusion_quality.py)."""

import torch

from tests.adapter_helpers import bench_module

TensorPeak = bench_module("tensor_memory").TensorPeak
MIB = 2**20


def test_it_counts_what_the_block_allocates_while_alive_and_not_views_in_place_ops_or_older_tensors():
    older = torch.zeros(MIB // 4)  # 1 MiB from before the block
    with TensorPeak() as memory:
        a = torch.ones(MIB // 4)
        b = a * 2  # 2 MiB alive
        del a  # 1
        b.view(-1, 2).add_(1)  # a view, in place: nothing new
        c = older + 1  # 2 MiB again
        del b, c  # 0
    assert memory.peak == 2 * MIB and memory.live == 0


def test_it_sees_the_backward_and_what_it_saves():
    x = torch.ones(MIB // 4, requires_grad=True)
    with TensorPeak() as memory:
        y = x * x  # 1 MiB; saves x twice (no copy)
        y.sum().backward()  # x.grad: 1 MiB, kept
        del y
    assert memory.peak >= 2 * MIB and memory.live == MIB
