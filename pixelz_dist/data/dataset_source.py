"""Batches from a map-style dataset: our resumable sampler, a DataLoader over it, per-batch seeds.

The position is a count of *global* samples consumed in the epoch, the same number whatever the world size or batch
size, which is what lets a run resume with another number of processes without repeating or skipping a sample.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.utils.data import DataLoader

from ..distributed.env import gather_from_all
from ..distributed.preemption import ignore_preemption_signals
from ..errors import DataError, SnapshotError, on_every_rank
from .batch_source import BatchSource, start_iterator, stop_workers
from .collate import NamedCollate
from .sample_list import SampleList
from .sampler import ResumableBatchSampler, batches_in
from .seeding import SeededDataset, draws_no_random_numbers

logger = logging.getLogger(__name__)


class DatasetSource(BatchSource):
    """Owns sampling for a map-style dataset: order a pure function of (seed, epoch), skip by index, per-batch seeds.

    Args:
        dataset: the map-style dataset.
        settings: the run's settings (batch size, shuffle, seed, drop_last, seed_data, collate_fn, iter_size,
            restore_dataloader).
        env: this process's place in the job (its shard).
        pin_memory, num_workers, persistent_workers: for the DataLoader.
    """

    kind = "dataset"
    unit = "samples"

    def __init__(self, dataset, settings, env, pin_memory: bool, num_workers: int, persistent_workers: bool):
        s = settings
        super().__init__(restore_position=s.restore_dataloader, iter_size=s.iter_size)
        self.num_samples = len(dataset)
        seed_data = (not draws_no_random_numbers(dataset)) if s.seed_data is None else s.seed_data
        self.sampler = ResumableBatchSampler(self.num_samples, s.batch_size, shuffle=s.shuffle, seed=s.seed,
                                             rank=env.rank, world_size=env.world_size, drop_last=s.drop_last,
                                             with_seeds=seed_data)
        if self.sampler.batches_per_epoch() == 0:
            raise DataError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                            f"{self.sampler.global_batch}, and drop_last=True leaves nothing to train on. "
                            "HINT: lower batch_size or set drop_last=False.")
        self.dataset = dataset
        self.batch_size, self.world_size, self.drop_last = s.batch_size, env.world_size, s.drop_last
        self.sample_list = SampleList.of(dataset)
        self.allow_changed_data = s.allow_changed_data
        self._data_change: str | None = None  # how the dataset differs from the snapshot's being loaded
        check_same_list_on_every_rank(self.sample_list)
        self._iterator = None  # the epoch's DataLoader iterator: its workers are shut down in close()
        fetched = SeededDataset(dataset) if seed_data else dataset
        self.loader = DataLoader(fetched, batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=NamedCollate(s.collate_fn, fetched), pin_memory=pin_memory,
                                 persistent_workers=persistent_workers and num_workers > 0,
                                 worker_init_fn=ignore_preemption_signals,
                                 generator=torch.Generator())  # never draw from the global RNG: resume stays exact

    @property
    def epoch_size(self) -> int:
        return self.num_samples

    def begin_epoch(self):
        """``(iterator or None, batches left for this rank)`` for the current epoch from the current position."""
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(self.epoch)  # before iter(): new workers get the dataset as it is now
        self.sampler.set_epoch(self.epoch, self.position)
        remaining = len(self.sampler)
        self._iterator = start_iterator(self.loader) if remaining else None
        return self._iterator, remaining

    def advance(self, batches: int) -> tuple[int, int]:
        """``batches`` more batches are done on every rank; returns the positions before and after."""
        begin = self.position
        self.position = min(begin + batches * self.sampler.global_batch, self.num_samples)
        return begin, self.position

    def samples_between(self, begin: int, end: int) -> int:
        return end - begin

    def digest(self, begin: int, end: int) -> str:
        return self.sampler.order_digest(begin, end)

    def batches_from(self, position: int) -> int:
        """This rank's batches from ``position`` to the end of an epoch."""
        return batches_in(self.num_samples - position, self.sampler.global_batch, self.drop_last)

    @property
    def samples_in_epoch(self) -> int:
        return self.position

    @property
    def batches_in_epoch(self) -> int:
        return math.ceil(self.position / self.sampler.global_batch)

    def close(self, failed: bool = False) -> None:
        """The loader is ours: its workers go now, whatever the way out (not at interpreter exit)."""
        iterator, self._iterator, self.loader = self._iterator, None, None
        stop_workers(iterator)

    # -- snapshots ----------------------------------------------------------------------------------------------------
    def _sampling_state(self) -> dict:
        return {"seed": self.sampler.seed, "shuffle": self.sampler.shuffle, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_samples": self.num_samples, "drop_last": self.drop_last,
                "samples": self.sample_list.state_dict()}

    def precheck(self, state: dict, meta: dict | None = None) -> None:
        """Besides the checks of every source, refuse to resume in the middle of an epoch of a dataset that changed
        since the snapshot (the same position would point into another list), unless ``allow_changed_data``."""
        super().precheck(state, meta)
        change = self.sample_list.difference(state.get("samples"))
        if change is None and state.get("num_samples", self.num_samples) != self.num_samples:  # older snapshots
            change = f"{state['num_samples']} samples when the snapshot was written, {self.num_samples} now"
        self._data_change = change
        position, epoch = int(state["position"]), int(state["epoch"])
        if change is None or position == 0 or not self.restore_position or self.allow_changed_data:
            return
        raise SnapshotError(
            f"the dataset changed since the snapshot, which was taken {position} samples into epoch {epoch}: "
            f"{change}. The position would now point into another list: the rest of that epoch would train some "
            "samples twice and never show others. HINT: put the data back as it was; or continue anyway with "
            "allow_changed_data=True (--allow-changed-data): the epoch goes on at the same position of the new "
            "list, and the next epochs use the whole new list; or resume with restore_dataloader=False to start "
            "the next epoch on the new list.")

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        change, self._data_change = self._data_change, None
        if change is None:
            return
        if int(state["position"]) == 0 or not self.restore_position:
            logger.warning("the dataset changed since the snapshot (%s): epoch %d starts on the new list", change,
                           self.epoch)
        elif int(state["position"]) >= self.num_samples:  # _restore_sampling ended that epoch
            logger.warning("the dataset changed since the snapshot (%s); allow_changed_data: the snapshot was taken "
                           "%d samples into epoch %d, past the end of the new list, so that epoch is over; epoch %d "
                           "starts on the new list", change, int(state["position"]), int(state["epoch"]), self.epoch)
        else:
            logger.warning("the dataset changed since the snapshot (%s); allow_changed_data: epoch %d goes on at "
                           "position %d of the new list (some of its samples are seen twice in this epoch, others "
                           "not at all); the next epochs use the new list", change, self.epoch, self.position)

    def _restore_sampling(self, state: dict) -> None:
        if state["seed"] != self.sampler.seed:
            logger.warning("the snapshot was trained with seed %d, this call passes %d: the snapshot's seed is kept "
                           "so the data order continues", state["seed"], self.sampler.seed)
            self.sampler.seed = int(state["seed"])
        now = {"batch_size": self.batch_size, "iter_size": self.iter_size, "world_size": self.world_size,
               "shuffle": self.sampler.shuffle}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if state.get(k) != v]
        if changed:
            logger.warning("resuming with %s: the data position is kept in samples (%d into epoch %d), so no "
                           "sample is skipped or repeated, but the run is no longer bit-identical to the "
                           "original", ", ".join(changed), self.position, self.epoch)
        if self.position >= self.num_samples:  # a shorter dataset (allow_changed_data): that epoch is over
            self.skip_rest_of_epoch()


def check_same_list_on_every_rank(sample_list: SampleList) -> None:
    """Every rank must shard the same list (a folder read while it was being copied, a stale NFS view: the ranks
    would train on different data without a word).

    Raises:
        DataError: the ranks' lists differ; says which rank saw how many samples.
    """
    seen = gather_from_all((sample_list.count, sample_list.digest))
    if len(set(seen)) <= 1:
        return
    listed = ", ".join(f"rank {rank}: {count} samples (names {digest or 'unknown'})"
                       for rank, (count, digest) in enumerate(seen))
    raise on_every_rank(DataError(
        f"the ranks see different datasets ({listed}): each would shard another list. HINT: make the data identical "
        "on every node (wait for a copy or sync to finish, or read it from one shared folder), then start again."))
