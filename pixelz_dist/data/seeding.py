"""Per-batch seeding of the random numbers a dataset draws, so augmentations survive resume and ignore num_workers.

Each batch is produced whole by one process. Before it is produced, torch's, numpy's and Python's global RNGs are
seeded from (run seed, epoch, global position of the batch), so the same batch gets the same augmentation whatever
worker builds it, in whatever run. Seeding once per batch instead of per sample is a measured choice: seeding the
three RNGs costs about 5 us, saving and restoring them in the main process about 60 us (numpy's state copy dominates).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, get_worker_info

from ..random_state import preserved
from .sampler import BatchKey


def seed_global_rngs(seed: int) -> None:
    """Seed the three global RNGs a dataset may use. ``torch.manual_seed`` would also seed CUDA (80 us here)."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


def draws_no_random_numbers(dataset) -> bool:
    """Datasets known to be deterministic, for which seeding is wasted time."""
    return type(dataset) is TensorDataset


class SeededDataset(Dataset):
    """Wraps a map-style dataset; fetches whole batches from a :class:`BatchKey` under a per-batch seed.

    In the main process (``num_workers=0``) the global RNG states are saved and restored around the fetch, so the
    training process's own random stream (dropout, ...) is the same as with worker processes.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._inner_getitems = getattr(dataset, "__getitems__", None)
        self.last_indices: list | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def _fetch(self, indices):
        if self._inner_getitems is not None:
            return self._inner_getitems(indices)
        dataset = self.dataset
        return [dataset[i] for i in indices]

    def __getitems__(self, key: BatchKey):
        seed, indices = key
        self.last_indices = indices  # for the collate that follows in this process, to name samples in its errors
        if get_worker_info() is not None:
            seed_global_rngs(seed)
            return self._fetch(indices)
        with preserved():  # the trainer's own streams (dropout, ...) as if the batch came from a worker
            seed_global_rngs(seed)
            return self._fetch(indices)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_inner_getitems"] = None  # a bound method; rebuilt after unpickling in the worker
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._inner_getitems = getattr(self.dataset, "__getitems__", None)
