"""Where the engine's batches come from when it is given a dataset: our resumable sampler and a DataLoader over it.

The engine talks to a *batch source* (this one, or :class:`~pixelz_dist.user_loader.UserLoaderSource` for a
DataLoader the user built) through a handful of methods, so the loop does not care who owns the sampling. A source's
*position* is an integer that snapshots store: global samples consumed in the epoch here, batches for a user loader.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from .errors import DataError
from .preemption import ignore_preemption_signals
from .sampler import ResumableBatchSampler
from .seeding import SeededDataset, draws_no_random_numbers


class DatasetSource:
    """Owns sampling for a map-style dataset: order a pure function of (seed, epoch), skip by index, per-batch seeds."""

    kind = "dataset"
    read_ahead = True  # fetching one batch beyond the window changes nothing that a snapshot records

    def __init__(self, dataset, settings, env, pin_memory: bool, num_workers: int, persistent_workers: bool):
        s = settings
        self.num_samples = len(dataset)
        seed_data = (not draws_no_random_numbers(dataset)) if s.seed_data is None else s.seed_data
        self.sampler = ResumableBatchSampler(self.num_samples, s.batch_size, shuffle=s.shuffle, seed=s.seed,
                                             rank=env.rank, world_size=env.world_size, drop_last=s.drop_last,
                                             with_seeds=seed_data)
        if self.sampler.batches_per_epoch() == 0:
            raise DataError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                            f"{self.sampler.global_batch}, and drop_last=True leaves nothing to train on. "
                            "HINT: lower batch_size or set drop_last=False.")
        self.num_workers = num_workers
        self.dataset = dataset
        self.drop_last = s.drop_last
        self.loader = DataLoader(SeededDataset(dataset) if seed_data else dataset, batch_sampler=self.sampler,
                                 num_workers=num_workers, collate_fn=s.collate_fn, pin_memory=pin_memory,
                                 persistent_workers=persistent_workers and num_workers > 0,
                                 worker_init_fn=ignore_preemption_signals,
                                 generator=torch.Generator())  # never draw from the global RNG: resume stays exact

    @property
    def epoch_size(self) -> int:
        """Positions in one epoch (samples)."""
        return self.num_samples

    @property
    def global_batch(self) -> int:
        return self.sampler.global_batch

    def begin_epoch(self, epoch: int, position: int):
        """``(iterator or None, batches left for this rank)`` for ``epoch`` from ``position``."""
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)  # before iter(): new workers get the dataset as it is now
        self.sampler.set_epoch(epoch, position)
        remaining = len(self.sampler)
        return (iter(self.loader) if remaining else None), remaining

    def position_after(self, consumed: int) -> int:
        return self.sampler.position_after(consumed)

    def samples_between(self, begin: int, end: int) -> int:
        return end - begin

    def digest(self, begin: int, end: int) -> str:
        return self.sampler.order_digest(begin, end)

    def batches_left(self, start: int) -> int:
        left = self.num_samples - start
        gb = self.sampler.global_batch
        return left // gb if self.drop_last else math.ceil(left / gb)

    def close(self) -> None:
        self.loader = None  # the last reference: persistent workers shut down now, not at interpreter exit
