"""The resumable, shardable sample order.

The order of an epoch is a pure function of (seed, epoch) and the data position is a count of *global* samples
consumed, so a run can resume anywhere, on any number of ranks, without loading a single skipped sample.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _mix(h: int, v: int) -> int:
    """One splitmix64 round: fold ``v`` into the state ``h``."""
    h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
    h ^= h >> 31
    h = (h * 0x94D049BB133111EB) & _MASK64
    return h ^ (h >> 29)


_MIX_START = 0x9E3779B97F4A7C15


def mix_seed(*values: int) -> int:
    """Mix integers into one well-spread 63-bit seed (splitmix64 finaliser); cheap enough to run per batch."""
    h = _MIX_START
    for v in values:
        h = _mix(h, v)
    return h >> 1


def batches_in(samples: int, global_batch: int, drop_last: bool = False) -> int:
    """Batches per rank that ``samples`` global samples make: the one count of batches in the library."""
    return samples // global_batch if drop_last else math.ceil(samples / global_batch)


class BatchKey(NamedTuple):
    """What the loader hands a worker: the sample indices of one batch and the seed its augmentations draw from."""

    rng_seed: int
    indices: list


class ResumableBatchSampler:
    """Yields batches of one global (seed, epoch) order, sharded across ranks, starting at any global position.

    A global batch is ``batch_size * world_size`` consecutive samples of the epoch's order; rank ``r`` takes its
    ``r``-th slice. The position is therefore the same number of samples whatever the world size, which is what lets
    a run resume with another batch size or another number of processes.

    Args:
        num_samples: length of the dataset.
        batch_size: samples per batch on one rank.
        shuffle: draw a new permutation each epoch; otherwise the natural order.
        seed: the run's seed; the permutation of epoch ``e`` is seeded by ``mix_seed(seed, e)``.
        rank, world_size: this process's shard.
        drop_last: drop a short final global batch.
        with_seeds: yield :class:`BatchKey` (seed + indices) for :class:`~pixelz_dist.seeding.SeededDataset`, as
            train_model does; False yields plain index lists, for use as a ``DataLoader``'s ``batch_sampler``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, with_seeds: bool = True):
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.with_seeds = bool(with_seeds)
        self.global_batch = self.batch_size * self.world_size
        self.epoch = 0
        self.start = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of ``epoch`` (cached for the last epoch asked)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                self._order = torch.randperm(self.num_samples, generator=gen).numpy()
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch and the global sample position the next iteration starts from."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start position {start} is outside the epoch (0..{self.num_samples})")
        self.epoch = int(epoch)
        self.start = int(start)

    def batches_per_epoch(self) -> int:
        """Batches one rank sees in a whole epoch."""
        return self._batches_from(0)

    def _batches_from(self, start: int) -> int:
        return batches_in(self.num_samples - start, self.global_batch, self.drop_last)

    def __len__(self) -> int:
        return self._batches_from(self.start)

    def position_after(self, batches: int) -> int:
        """Global samples consumed in the epoch once ``batches`` batches from the start position are done."""
        return min(self.start + batches * self.global_batch, self.num_samples)

    def shard(self, chunk: list) -> tuple[int, list]:
        """This rank's part of one global batch, and its offset in it.

        A full global batch gives each rank ``batch_size`` consecutive samples. A short last one is split as evenly
        as possible; a rank left without a sample repeats the batch's first one (as DistributedSampler pads), since
        every rank must step together. Only a tail smaller than the world size does that.
        """
        if len(chunk) == self.global_batch or self.world_size == 1:
            lo = self.rank * self.batch_size
            return lo, chunk[lo:lo + self.batch_size]
        sizes = [len(chunk) // self.world_size + (r < len(chunk) % self.world_size) for r in range(self.world_size)]
        lo = sum(sizes[: self.rank])
        part = chunk[lo:lo + sizes[self.rank]]
        return lo, (part if len(part) else chunk[:1])

    BLOCK = 64  # batches turned into Python ints per numpy call; one loop then serves seeds or not, 1 or N ranks

    def __iter__(self):
        order = self.order(self.epoch)
        gb = self.global_batch
        h = _mix(_mix(_MIX_START, self.seed), self.epoch)  # mix_seed(seed, epoch, x) == _mix(h, x) >> 1, per epoch
        end = self.start + len(self) * gb
        span = self.BLOCK * gb
        for block_start in range(self.start, end, span):
            ids = order[block_start:min(block_start + span, end)].tolist()
            for p in range(block_start, min(block_start + span, end), gb):
                lo = p - block_start
                if self.world_size == 1:  # the whole global batch is this rank's: no shard() call per batch
                    offset, part = 0, ids[lo:lo + gb]
                else:
                    offset, part = self.shard(ids[lo:lo + gb])
                # seeded by the global position of this rank's first sample: ranks draw different augmentations
                yield BatchKey(_mix(h, p + offset) >> 1, part) if self.with_seeds else part

    def order_digest(self, begin: int, end: int) -> str:
        """A short hash of the global sample indices at positions ``[begin, end)`` of the current epoch."""
        return hashlib.blake2b(self.order(self.epoch)[begin:end].tobytes(), digest_size=8).hexdigest()
