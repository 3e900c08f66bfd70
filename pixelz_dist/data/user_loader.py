"""Training from a ``DataLoader`` the user built: the user owns sampling, we keep the position honest.

Resuming in the middle of an epoch means producing exactly the batches the interrupted run had not consumed yet. We
can do that when we can put the sampling back to where the epoch began and skip the consumed batches *by index*
(nothing is loaded for them):

- a loader with its own ``state_dict`` / ``load_state_dict`` (torchdata's ``StatefulDataLoader``): its state is saved
  with every snapshot and loaded back (no read-ahead to the GPU then, so its state counts only consumed batches);
- a sampler or batch sampler with ``state_dict`` / ``load_state_dict``: its state at the start of the epoch is saved;
- torch's own samplers (sequential, random, subset-random, weighted, distributed, ``BatchSampler`` over them) and
  :class:`~pixelz_dist.sampler.ResumableBatchSampler`: their order is a function of ``set_epoch`` and of torch
  generators, whose states at the start of the epoch are saved (the loader's ``generator``, the sampler's, and the
  global one when either is missing, since the DataLoader then draws its seeds from it).

Anything else cannot be put back, and resuming it mid-epoch is refused with the ways out, never silently wrong.

Under torchrun each rank's loader reads its own shard, so that state is each rank's own (``per_rank``: the
checkpointer keeps one per rank and hands each rank its own back), and a mid-epoch snapshot resumes only with as many
processes as wrote it. Unlike our own dataset path, whose position counts global samples and reshards exactly, a
user's loader has no global position to divide among another number of processes. The ranks' loaders may also differ
in length (``equal_lengths`` is False): the loop has them agree when an epoch ends (see
:mod:`pixelz_dist.engine.uneven`) and tells the source how long the epoch is then (``limit_epoch``).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ..errors import ConfigError, DataError, SnapshotError
from ..random_state import capture, preserved
from .batch_source import BatchSource, start_iterator, stop_workers
from .sampler import ResumableBatchSampler

logger = logging.getLogger(__name__)

REPLAYABLE_SAMPLERS = (SequentialSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler,
                       DistributedSampler, ResumableBatchSampler)


def _stateful(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _samplers(loader: DataLoader) -> list:
    """The batch sampler (if any) and the sampler under it, outermost first."""
    found = []
    bs = loader.batch_sampler
    if bs is not None:
        found.append(bs)
        inner = getattr(bs, "sampler", None)
        if inner is not None and inner is not bs:
            found.append(inner)
    elif loader.sampler is not None:
        found.append(loader.sampler)
    return found


def is_distributed_loader(loader: DataLoader, world_size: int) -> bool:
    return any(isinstance(s, DistributedSampler) and s.num_replicas == world_size
               or isinstance(s, ResumableBatchSampler) and s.world_size == world_size for s in _samplers(loader))


class _SkipFirst:
    """A (batch) sampler without its first ``skip`` entries, skipped by index (nothing is loaded for them).

    Like torch's own samplers, iterating it draws nothing until the first entry is asked for, so a random sampler
    draws its seed after the DataLoader drew its base seed, as in the interrupted run; :meth:`prime` makes that
    happen now (the single-process loader asks only when the first batch is needed, after the RNG is put back).
    """

    def __init__(self, inner, skip: int):
        self.inner, self.skip = inner, skip
        self.current = None

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)

    def __iter__(self):
        self.current = _Skipping(self.inner, self.skip)
        return self.current


class _Skipping:
    def __init__(self, inner, skip: int):
        self.inner, self.skip, self.it = inner, skip, None

    def prime(self) -> None:
        if self.it is None:
            self.it = iter(self.inner)
            for _ in range(self.skip):
                next(self.it, None)

    def __iter__(self):
        return self

    def __next__(self):
        self.prime()
        return next(self.it)


class UserLoaderSource(BatchSource):
    """A batch source over the user's ``DataLoader``; the position is the number of batches consumed in the epoch."""

    kind = "user_loader"
    unit = "batches"
    per_rank = True  # each rank's loader (or sampler) is at its own place in its own shard
    equal_lengths = False  # a rank's IterableDataset or batch sampler may yield more batches than another's

    def __init__(self, loader: DataLoader, env, restore_position: bool = True, iter_size: int = 1):
        super().__init__(restore_position=restore_position, iter_size=iter_size)
        self.loader = loader
        self.iterable = isinstance(loader.dataset, IterableDataset)
        if env.is_distributed and not self.iterable and not is_distributed_loader(loader, env.world_size):
            raise ConfigError(
                f"under torchrun (WORLD_SIZE={env.world_size}) the DataLoader you passed has a "
                f"{type(loader.sampler).__name__}, so every rank would train on the same samples. HINT: build it with "
                "sampler=torch.utils.data.DistributedSampler(dataset, shuffle=True) (train_model calls its set_epoch "
                "each epoch), or pass the dataset itself and let train_model shard it.")
        if env.is_distributed and self.iterable:
            logger.warning("the DataLoader's dataset is an IterableDataset: each rank must read its own shard "
                           "(split by torch.distributed.get_rank() inside the dataset)")
        try:
            self.length: int | None = len(loader)
        except TypeError:
            self.length = None
        try:
            self.dataset_length: int | None = len(loader.dataset)
        except TypeError:
            self.dataset_length = None
        self.stateful_loader = _stateful(loader)
        self.read_ahead = not self.stateful_loader
        self.batch_size = loader.batch_size or 1
        self.world_size = env.world_size
        self.global_batch = self.batch_size * self.world_size
        self._epoch_start: dict | None = None  # how sampling stood when the current epoch began
        self._agreed: tuple[int | None] | None = None  # (the current epoch's batches on every rank,) once agreed
        self._pending: dict | None = None  # state from a snapshot, used by the next begin_epoch
        self._iterator = None  # the iterator this epoch made (of the loader, or of its twin on a resume)

    # -- what the engine asks ----------------------------------------------------------------------------------------
    @property
    def epoch_size(self) -> int | None:
        """Batches in the current epoch: the ranks' agreed number once the loop set it (the same on every rank, so
        that a snapshot interval in epochs is due on all of them alike), else this loader's length."""
        return self._agreed[0] if self._agreed is not None else self.length

    def limit_epoch(self, remaining: int | None) -> None:
        """The ranks agreed that the current epoch ends after ``remaining`` more batches (None: when the first rank
        runs out, which none can tell ahead)."""
        self._agreed = (None if remaining is None else self.position + remaining,)

    def end_epoch(self) -> None:
        super().end_epoch()
        self._agreed = None

    def advance(self, batches: int) -> tuple[int, int]:
        begin = self.position
        self.position = begin + batches
        return begin, self.position

    def samples_between(self, begin: int, end: int) -> int:
        return (end - begin) * self.global_batch

    def digest(self, begin: int, end: int) -> str:
        return "-"  # the user's sampler decides which samples: only their positions are recorded

    def batches_from(self, position: int) -> int | None:
        return None if self.length is None else max(self.length - position, 0)

    @property
    def samples_in_epoch(self) -> int:
        """Global samples: batches x batch_size x world size (at most the dataset's length, when it has one)."""
        samples = self.position * self.global_batch
        return samples if self.dataset_length is None else min(samples, self.dataset_length)

    @property
    def batches_in_epoch(self) -> int:
        return self.position

    def begin_epoch(self):
        """Iterator over the epoch's batches after the first ``position``, and how many are left (None: unknown)."""
        epoch, position = self.epoch, self.position
        for obj in (*_samplers(self.loader), self.loader.dataset):
            if callable(getattr(obj, "set_epoch", None)) and not isinstance(obj, ResumableBatchSampler):
                obj.set_epoch(epoch)
            elif isinstance(obj, ResumableBatchSampler):
                obj.set_epoch(epoch, 0)
        pending, self._pending = self._pending, None
        if position == 0:
            self._epoch_start = self._capture()
            self._iterator = start_iterator(self.loader)
        elif pending is None:
            raise SnapshotError("internal: a mid-epoch position without the loader's saved state")
        elif self.stateful_loader:
            self.loader.load_state_dict(pending["loader"])
            self._epoch_start = pending.get("epoch_start")
            # the interrupted run drew the epoch's seeds before the snapshot: drawing again would shift dropout
            with preserved(numpy=False, python=False):
                self._iterator = start_iterator(self.loader)
        else:
            self._epoch_start = pending["epoch_start"]
            self._iterator = self._replay(pending["epoch_start"], position)
        remaining = self.batches_from(position)
        if self.iterable and remaining is not None:  # an IterableDataset's __len__ is a claim nothing enforces
            return _held_to_length(self._iterator, position, remaining, self), remaining
        return self._iterator, remaining

    def close(self, failed: bool = False) -> None:
        """The loader is the user's (and a stateful one is still asked for its state by the final snapshot): its
        persistent iterator is left to it after a normal end; any other iterator made here, and every one after a
        failure, has its workers shut down now."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and (failed or iterator is not getattr(self.loader, "_iterator", None)):
            stop_workers(iterator)

    # -- snapshots ------------------------------------------------------------------------------------------------
    def _sampling_state(self) -> dict:
        state = {"length": self.length, "batch_size": self.batch_size, "world_size": self.world_size,
                 "epoch_size": self.epoch_size, "epoch_start": self._epoch_start}
        if self.stateful_loader:
            state["loader"] = self.loader.state_dict()
        return state

    def restorable(self) -> str | None:
        """None when a mid-epoch position can be restored; else why not."""
        if self.stateful_loader:
            return None
        if self.iterable:
            return f"its dataset is an IterableDataset ({type(self.loader.dataset).__name__}) without state"
        for s in _samplers(self.loader):
            if _stateful(s) or isinstance(s, REPLAYABLE_SAMPLERS):
                continue
            if isinstance(s, BatchSampler) and type(s) is BatchSampler:
                continue
            return f"its {type(s).__name__} has no state_dict()/load_state_dict() and is not one of torch's samplers"
        return None

    def _check_sampling(self, state: dict, position: int) -> None:
        """Refuse a mid-epoch state that cannot be put back here (at an epoch's start nothing is needed)."""
        if position == 0:
            return
        saved = int(state.get("world_size", 1))
        if saved != self.world_size:
            raise SnapshotError(
                f"it was taken {position} batches into epoch {state['epoch']} by {saved} process(es), and this run "
                f"has {self.world_size}: each process's DataLoader was at its own place in its own shard, which "
                f"cannot be divided among {self.world_size} process(es). HINT: resume with {saved} process(es) "
                f"(torchrun --nproc_per_node ... with WORLD_SIZE={saved}), or with restore_dataloader=False to start "
                f"at the beginning of epoch {int(state['epoch']) + 1}; passing the dataset itself instead of a "
                "DataLoader lets train_model reshard it at any world size.")
        why = self.restorable()
        if why is not None:
            raise SnapshotError(
                f"it was taken {position} batches into an epoch, but the DataLoader you passed cannot be put back "
                f"there: {why}. HINT: give the sampler state_dict()/load_state_dict(), use torchdata's "
                "StatefulDataLoader, pass the dataset itself instead of a DataLoader, or resume with "
                "restore_dataloader=False (training continues at the start of the next epoch).")
        key = "loader" if self.stateful_loader else "epoch_start"
        if state.get(key) is None:
            what = "DataLoader state" if self.stateful_loader else "epoch-start sampler state"
            raise SnapshotError(
                f"it holds no {what} of this process (key 'data.{key}'): it was written with another kind of "
                "DataLoader, or, under torchrun, by a pixelz_dist that kept rank 0's alone (snapshot format 2). "
                "HINT: resume with restore_dataloader=False (training continues at the start of the next epoch).")

    def _restore_sampling(self, state: dict) -> None:
        """Prepare the next ``begin_epoch`` to continue at the position (``_check_sampling`` passed)."""
        if self.position == 0:
            return
        if state.get("length") != self.length:
            logger.warning("the DataLoader had %s batches per epoch when the snapshot was written and has %s now",
                           state.get("length"), self.length)
        if self.world_size > 1 and "epoch_size" in state:  # the ranks' agreed epoch until the loop agrees again:
            self._agreed = (state["epoch_size"],)  # a snapshot interval in epochs stays due on every rank alike
        self._pending = state

    # -- replaying the start of an epoch --------------------------------------------------------------------------
    def _generators(self) -> dict:
        gens = {"loader": getattr(self.loader, "generator", None)}
        for i, s in enumerate(_samplers(self.loader)):
            gens[f"sampler{i}"] = getattr(s, "generator", None)
        return {k: g for k, g in gens.items() if isinstance(g, torch.Generator)}

    def _capture(self) -> dict:
        """Everything that decides the epoch's batches, taken just before ``iter(loader)``."""
        state = {"samplers": {str(i): s.state_dict() for i, s in enumerate(_samplers(self.loader)) if _stateful(s)},
                 "generators": {k: g.get_state() for k, g in self._generators().items()},
                 "global_rng": capture(numpy=False, python=False).torch}
        return state

    def _replay(self, start: dict, skip: int):
        """Put sampling back to the epoch's start, then iterate a twin of the loader that skips ``skip`` batches."""
        for i, s in enumerate(_samplers(self.loader)):
            if str(i) in start["samplers"]:
                s.load_state_dict(start["samplers"][str(i)])
        gens = self._generators()
        for k, st in start["generators"].items():
            if k in gens:
                gens[k].set_state(st)
        with preserved(numpy=False, python=False):  # the trainer's own stream is left where the snapshot put it
            torch.default_generator.set_state(start["global_rng"])
            twin, skipper = _twin(self.loader, skip)
            it = start_iterator(twin)  # draws the loader's base seed here, as the epoch's iter(loader) did
            skipper.current.prime()  # and then the sampler's, as its first batch did
        return it


def _held_to_length(iterator, start: int, expected: int, source: UserLoaderSource):
    """``iterator`` (from batch ``start`` of the epoch on), raising a ``DataError`` that says why when it ends before
    the ``expected`` batches its length promised (the loop would otherwise stop with a bare ``StopIteration``, and
    under torchrun leave the other ranks waiting in a collective)."""
    got = 0
    for batch in iterator:
        got += 1
        yield batch
    if got < expected:
        raise DataError(
            f"the DataLoader ended after {start + got} batches of epoch {source.epoch}, but its length "
            f"says {source.length}: its IterableDataset ({type(source.loader.dataset).__name__}) has a __len__ of "
            f"{source.dataset_length} that this process's iteration does not yield. HINT: make __len__ return the "
            "number of samples this process yields (its own shard, not the whole dataset), or remove __len__ (the "
            "processes then agree on each epoch's end as they go).")


def _twin(loader: DataLoader, skip: int) -> tuple[DataLoader, _SkipFirst]:
    """The same loader (same dataset, workers, collate, generator) whose sampling skips its first ``skip`` batches."""
    if loader.batch_sampler is not None:
        skipper = _SkipFirst(loader.batch_sampler, skip)
        sampling = {"batch_sampler": skipper}
    else:
        skipper = _SkipFirst(loader.sampler, skip)
        sampling = {"sampler": skipper, "batch_size": None}
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    if hasattr(loader, "in_order"):
        extra["in_order"] = loader.in_order
    return DataLoader(loader.dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      pin_memory_device=loader.pin_memory_device, **sampling, **extra), skipper
