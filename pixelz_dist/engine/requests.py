"""What callbacks, signals and guards ask of the loop (stop, snapshot, skip this step), and how ranks agree on it.

Under torchrun every rank must stop, snapshot and exit at the same iteration, but a request is made on one rank (a
signal reaches one process, a time budget runs out on one clock). The ranks agree on them without stopping the
host: each iteration starts an asynchronous MAX all-reduce of this rank's three flags (and rank 0's news of a snapshot
written in the background) on a CPU (gloo) group and acts
on the result of the previous iteration's, which has long arrived. A rank-local request therefore takes effect one
iteration later, at the same iteration on every rank; a request that every rank makes alike (a decision on the
global loss) can say so and act at once. No device tensor is involved: with nccl the exchange runs on a gloo group
of its own, so it never waits for the GPU (the old ``all_reduce`` + ``tolist()`` on the GPU blocked the host at
every step).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from ..distributed.preemption import PreemptionFlag


class Requests:
    """The loop's pending requests. One process: they act after the iteration they are made in.

    Args:
        preemption: the signal flag (set by SIGTERM / SIGUSR1 / SIGUSR2 handlers).
        distributed: several ranks must agree (under torchrun).
        group: the process group for the agreement (a CPU-capable one); None: the default group.
    """

    def __init__(self, preemption: PreemptionFlag, distributed: bool = False, group=None):
        self.preemption = preemption
        self.distributed = distributed
        self.group = group
        self.stop_reason: str | None = None
        self.stopping = False  # agreed: the loop ends after this iteration
        self.snapshot = False  # asked on this rank, not yet acted on (or sent)
        self.snapshot_now = False  # asked on every rank alike at this iteration: no agreement needed
        self.skip_reason: str | None = None  # drop this iteration's step
        self._in_flight = None  # (work, flags) of the exchange started last iteration
        # a snapshot being written in the background: rank 0's news of it (see Checkpointer.status), sent with the
        # flags, and the agreed news (Checkpointer.agreed), which every rank receives at the same iteration
        self.snapshot_news = (0, 0)
        self.agreed_snapshot_news = (0, 0)

    @property
    def delay(self) -> int:
        """Iterations between a rank-local request and the iteration it acts after."""
        return 1 if self.distributed else 0

    def request_stop(self, reason: str, on_every_rank: bool = False) -> None:
        self.stop_reason = reason
        if not self.distributed or on_every_rank:
            self.stopping = True

    def request_snapshot(self, on_every_rank: bool = False) -> None:
        if on_every_rank:
            self.snapshot_now = True
        else:
            self.snapshot = True

    def settle(self) -> tuple[bool, bool]:
        """Once per iteration, on every rank: ``(snapshot now, preempted now)``, and ``stopping`` updated."""
        preempted = self.preemption.received is not None
        now, self.snapshot_now = self.snapshot_now, False
        if not self.distributed:
            snapshot, self.snapshot = self.snapshot, False
            self.agreed_snapshot_news = self.snapshot_news
            return snapshot or now, preempted
        local = torch.tensor((self.stop_reason is not None, self.snapshot, preempted, *self.snapshot_news),
                             dtype=torch.int64)
        self.snapshot = False  # sent: it comes back agreed at the next iteration
        stop, snapshot, preempted = self.finish()
        work = tdist.all_reduce(local, op=tdist.ReduceOp.MAX, group=self.group, async_op=True)
        self._in_flight = (work, local)
        if stop:
            self.stopping = True
            if self.stop_reason is None:
                self.stop_reason = "requested on another rank"
        return snapshot or now, preempted

    def finish(self) -> tuple[bool, bool, bool]:
        """Wait for the exchange in flight (every rank calls this the same number of times); its agreed flags."""
        if self._in_flight is None:
            self.agreed_snapshot_news = (0, 0)
            return False, False, False
        work, flags = self._in_flight
        self._in_flight = None
        work.wait()
        stop, snapshot, preempted, *news = flags.tolist()  # a CPU tensor: no device sync
        self.agreed_snapshot_news = tuple(news)
        return bool(stop), bool(snapshot), bool(preempted)


def agreement_group():
    """A process group that can all-reduce CPU tensors: the default one under gloo, else a new gloo group (all ranks
    call this together). Returns ``(group, made_here)``."""
    if tdist.get_backend() == "gloo":
        return None, False
    return tdist.new_group(backend="gloo"), True
