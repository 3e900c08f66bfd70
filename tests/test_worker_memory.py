"""DataLoader workers' memory: the pages they share with their parent must stay shared, whatever they read.

Measured as each worker's unique memory (USS, ``psutil``'s ``memory_full_info().uss``): RSS counts shared pages in
full and hides copy-on-write. The bounds are generous (the effects measured are several times larger) and the tests
assert no timing.
"""

import gc
import json
import os
import sys

import numpy as np
import psutil
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pixelz_dist import MultiImgsDataset, train_model

pytestmark = pytest.mark.slow


def _path_length(path):
    """A loader that opens nothing: the workers' reads of the table are all that is measured."""
    return len(path)


def test_a_dataloader_workers_memory_does_not_grow_with_the_samples_it_reads(tmp_path):
    """A worker reads all 3 x 60 000 paths; its unique memory (USS: RSS counts shared pages in full) must not grow
    with the table (about 4 MiB here, the worker's own work). With lists of str (41 MB of them) it grew by 25-28 MiB:
    every read dirtied the pages of the strings it read."""
    n, long = 60_000, "a_long_file_name_so_that_each_entry_weighs_what_real_ones_do"
    dirs = []
    for k in range(3):
        d = tmp_path / f"folder{k}"
        d.mkdir()
        (d / "source.png").touch()
        for i in range(n):  # hard links: a directory entry each, no inode, no data
            os.link(d / "source.png", d / f"{long}_{i:06d}.png")
        dirs.append(str(d))
    ds = MultiImgsDataset(dirs, loader=_path_length)
    as_lists = [list(column) for column in ds.files] + [list(ds.stems)]
    old_form = sum(sys.getsizeof(s) for column in as_lists for s in column) + sum(map(sys.getsizeof, as_lists))
    del as_lists
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    batches = [order[:1]] + [order[i : i + 512] for i in range(1, len(order), 512)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=1, persistent_workers=True)
    others = {child.pid for child in psutil.Process().children()}  # an earlier test's process may still be ending
    gc.freeze()  # as train_model forks its workers: a collection in the worker would copy far more than the table
    try:
        it = iter(loader)
    finally:
        gc.unfreeze()
    next(it)
    (worker,) = [child for child in psutil.Process().children() if child.pid not in others]
    before = worker.memory_full_info().uss
    assert sum(len(batch[0]) for batch in it) == len(ds) - 1
    growth = worker.memory_full_info().uss - before
    del it, loader
    bound = 10 << 20
    assert old_form > 3 * bound  # the lists of str this table replaces weigh over three times the bound
    assert growth < bound, f"the worker's USS grew by {growth / 2**20:.1f} MiB reading {len(ds)} samples"


class MemoryProbe(Dataset):
    """Records, in the worker that reads it, its USS at the first sample and after a full garbage collection at the
    last (a worker's own collections come when its allocations say so: this one is forced, to be sure it happens)."""

    def __init__(self, n, out):
        self.n, self.out = n, out

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.n - 1:
            gc.collect()
        if i in (0, self.n - 1):
            with open(self.out, "a") as f:
                f.write(json.dumps([os.getpid(), psutil.Process().memory_full_info().uss]) + "\n")
        return torch.ones(1)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (self.w * x).square().mean()


def test_a_garbage_collection_in_a_worker_of_train_model_copies_nothing_of_its_parent(tmp_path):
    """A collection in a forked worker writes to the header of every object it inherited: ffa8613's workers each copied
    about 80 MiB of their parent's pages (torch, the model, everything imported) at their first full collection."""
    out = tmp_path / "uss.jsonl"
    model = Scale()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, MemoryProbe(8, str(out)), batch_size=1,
                num_iters=8, num_workers=1)
    (pid, first), (same_pid, last) = [json.loads(line) for line in out.read_text().splitlines()]
    assert pid == same_pid != os.getpid()
    assert last - first < 20 << 20, f"the worker's USS grew by {(last - first) / 2**20:.1f} MiB"
