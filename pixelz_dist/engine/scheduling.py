"""When the learning-rate scheduler steps, and with what: once per epoch or per iteration; ``ReduceLROnPlateau`` is
given the mean training loss over that epoch (or iteration) and every rank. A linear warmup
(:mod:`~pixelz_dist.engine.warmup`) goes on top, counted in iterations whatever the scheduler's unit."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..distributed.env import sum_over_ranks
from .warmup import Warmup


class SchedulerStepper:
    """Steps ``scheduler`` (None: nothing to do) and keeps the epoch's loss sum that a plateau scheduler needs.

    The loss sum is a snapshot part (``epoch_loss``): a run resumed mid-epoch feeds the scheduler the mean of the
    whole epoch, as the uninterrupted run does. ``warmup`` (a :class:`~pixelz_dist.engine.warmup.Warmup`, its own
    part) scales the rates of the first iterations; ``progress`` counts them.
    """

    def __init__(self, scheduler, per_iteration: bool, device: torch.device, comm_device: torch.device,
                 warmup: Warmup | None = None, progress=None):
        self.scheduler = scheduler
        self.warmup, self.progress = warmup, progress
        self.steps_per_iteration = per_iteration and scheduler is not None
        self.warming = warmup is not None and warmup.iters > 0
        #: whether the loop must call after_iteration (a per-iteration scheduler, or a warmup to advance)
        self.per_iteration = self.steps_per_iteration or self.warming
        self.per_epoch = not per_iteration and scheduler is not None
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        #: the loop adds every step's losses (only a per-epoch plateau scheduler needs them)
        self.collects_losses = self.plateau and self.per_epoch
        self.device, self.comm_device = device, comm_device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = 0

    def start(self) -> None:
        """Before the first iteration of this call (fresh or resumed): the warmup's rate for the next iteration."""
        if self.warmup is not None:
            self.warmup.apply(self.progress.iteration)

    def remove_warmup(self) -> None:
        """The scheduler's own rates on the groups (on resume, before the call's hyper-parameters are applied)."""
        if self.warmup is not None:
            self.warmup.remove()

    def _unwarmed(self):
        return self.warmup.unwarmed(self.progress.iteration)

    def add_losses(self, losses: list) -> None:
        for loss in losses:
            self.loss_sum += loss.detach()
        self.loss_count += len(losses)

    def after_iteration(self, global_loss) -> None:
        """``global_loss``: a callable giving the iteration's mean loss over ranks (called only for a plateau)."""
        if self.steps_per_iteration:
            if self.warmup is not None and self.warmup.active:
                with self._unwarmed():
                    self._step_per_iteration(global_loss)
            else:
                self._step_per_iteration(global_loss)
        if self.warming:
            self.warmup.apply(self.progress.iteration)
            if not self.warmup.active and self.progress.iteration >= self.warmup.iters:
                self.warming = False  # over: nothing to do per iteration any more
                self.per_iteration = self.steps_per_iteration

    def _step_per_iteration(self, global_loss) -> None:
        self.scheduler.step(global_loss()) if self.plateau else self.scheduler.step()

    def after_epoch(self) -> None:
        if not self.per_epoch:
            return
        if self.warmup is not None and self.warmup.active:
            with self._unwarmed():
                self._step_per_epoch()
        else:
            self._step_per_epoch()

    def _step_per_epoch(self) -> None:
        if not self.plateau:
            self.scheduler.step()
            return
        total, count = sum_over_ranks((self.loss_sum, self.loss_count), self.comm_device)
        if count:
            self.scheduler.step(total / count)
            self.loss_sum.zero_()
            self.loss_count = 0

    def state_dict(self) -> dict:
        return {"sum": self.loss_sum.cpu(), "count": self.loss_count}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        self.loss_sum = state["sum"].to(self.device, torch.float64)
        self.loss_count = int(state["count"])
