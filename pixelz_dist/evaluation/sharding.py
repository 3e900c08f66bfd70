"""Exact sharding of an evaluation set over the ranks, and the sums that bring the shards' results together.

torch's ``DistributedSampler`` pads the last shard with repeated samples so that every rank gets as many: right for
training (every rank must run the same number of steps), wrong for evaluation, where a repeated sample is counted
twice (7 samples on 2 ranks: 8 counted, one of them twice). Here every rank takes a contiguous slice of its own, the
slices differ by at most one sample, none is padded, and a rank whose slice is empty (more ranks than samples) still
joins every collective, so nobody waits for it.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from ..distributed.env import is_initialized


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """The indices rank ``rank`` of ``world_size`` evaluates: ``[n * r // W, n * (r + 1) // W)``.

    The ranges of all ranks cover ``range(num_samples)`` exactly once, in order; their lengths differ by at most one.
    Contiguous rather than strided, so each rank reads neighbouring files (what a folder on a network file system
    serves fastest).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} process(es)")
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def batch_indices(indices: range, batch_size: int) -> list[list[int]]:
    """``indices`` cut into batches of ``batch_size`` (the last one shorter, never dropped)."""
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]


def collective_device_now() -> torch.device:
    """Where the default group's collectives need their tensors: this process's GPU under nccl, else the CPU."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_tensor_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``tensor`` summed over the ranks (a copy of it without a process group); same device and dtype.
    Every rank must call it, in the same order, with a tensor of the same shape and dtype."""
    if not is_initialized():
        return tensor.clone()
    moved = tensor.to(collective_device_now(), copy=True)
    tdist.all_reduce(moved)
    return moved.to(tensor.device)
