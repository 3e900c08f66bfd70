"""Ranks whose data differ in length end each epoch together, when the first of them runs out.

Under DDP every optimizer step is a collective. A rank that runs out of batches while another goes on leaves that
other one in a gradient all-reduce that can never complete: gloo aborts (``EnforceNotMet``) or the peer's exit reads
as a lost node. Our own dataset path and a ``DistributedSampler`` pad every rank to the same length, but a user's
``IterableDataset`` (one shard per rank) or batch sampler need not. So the ranks of a user's DataLoader agree:

- once per epoch, on how many batches each has left, when every rank's loader has a length: the epoch then has the
  fewest, on every rank (one small collective per epoch, nothing per step);
- per window of ``iter_size`` batches, when some rank's loader has none (it cannot tell how many it has left without
  reading its whole shard): each rank reads its window ahead, as the loop does anyway without a length, and the
  window is the shortest any rank read. A window shorter than ``iter_size`` means a rank ran out: it is the epoch's
  last, on every rank. That costs one blocking all-gather of one integer per step (about 1 ms on a shared 2-core
  CPU machine: benchmarks/README.md, ``uneven_agreement.py``); a ``__len__`` on the dataset avoids it.

The exchange runs on the requests' CPU group (gloo), so it never waits for a GPU. When an epoch ended early on some
rank, one log line says how many batches each rank had left ("at least" where a rank read only a window ahead).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as tdist

logger = logging.getLogger(__name__)


class UnevenEpochs:
    """The agreement on the end of each epoch between ranks whose loaders may differ in length.

    Args:
        world_size: the number of ranks.
        group: a process group that all-gathers CPU tensors (None: the default group, under gloo).
    """

    def __init__(self, world_size: int, group=None):
        self.world_size, self.group = world_size, group
        self._left: list[tuple[int, bool]] | None = None  # per rank: (batches left unused, exact), when uneven
        self._told = False

    def _gather(self, value: int) -> list[int]:
        mine = torch.tensor([value], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        tdist.all_gather(every, mine, group=self.group)
        return [int(t) for t in every]

    def remaining(self, remaining: int | None) -> int | None:
        """Once per epoch, on every rank: the batches the epoch has left on every rank (the fewest any rank has), or
        None when some rank's loader has no length (then :meth:`window` agrees as the epoch goes)."""
        counts = self._gather(-1 if remaining is None else remaining)
        if min(counts) < 0:
            return None
        agreed = min(counts)
        self._left = [(c - agreed, True) for c in counts] if max(counts) > agreed else None
        return agreed

    def window(self, read: int, asked: int) -> int:
        """Per window, on every rank, when lengths are unknown: how many of the ``read`` batches (of ``asked``) to
        train on, the fewest any rank read."""
        counts = self._gather(read)
        agreed = min(counts)
        if max(counts) > agreed:  # a rank that read a whole window may have more beyond it
            self._left = [(c - agreed, c < asked) for c in counts]
        return agreed

    def epoch_ended(self, epoch: int, batches: int) -> None:
        """At every epoch's end: one log line when the epoch ended early on some rank."""
        left, self._left = self._left, None
        if left is None:
            return
        level = logging.INFO if self._told else logging.WARNING
        self._told = True
        logger.log(level, "the ranks' data differ in length: epoch %d ended on every rank after %d batches, when "
                   "the first rank ran out; batches left unused: %s. HINT: give every rank as many samples (a "
                   "DistributedSampler pads the shards to equal length) to train on all of them", epoch, batches,
                   describe_left(left))


def describe_left(left: list[tuple[int, bool]]) -> str:
    """``"rank 0: 3; rank 1: 0"``; ranks with the same count are named together (``"ranks 0, 2-63: at least 1"``)."""
    groups: dict[str, list[int]] = {}
    for rank, (count, exact) in enumerate(left):
        groups.setdefault(str(count) if exact else f"at least {count}", []).append(rank)
    return "; ".join(f"{_ranks(ranks)}: {what}" for what, ranks in groups.items())


def _ranks(ranks: list[int]) -> str:
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return ("rank " if len(ranks) == 1 else "ranks ") + text
