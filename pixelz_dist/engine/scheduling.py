"""When the learning-rate scheduler steps, and with what: once per epoch or per iteration; ``ReduceLROnPlateau`` is
given the mean training loss over that epoch (or iteration) and every rank."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..distributed.env import sum_over_ranks


class SchedulerStepper:
    """Steps ``scheduler`` (None: nothing to do) and keeps the epoch's loss sum that a plateau scheduler needs.

    The loss sum is a snapshot part (``epoch_loss``): a run resumed mid-epoch feeds the scheduler the mean of the
    whole epoch, as the uninterrupted run does.
    """

    def __init__(self, scheduler, per_iteration: bool, device: torch.device, comm_device: torch.device):
        self.scheduler = scheduler
        self.per_iteration = per_iteration and scheduler is not None
        self.per_epoch = not per_iteration and scheduler is not None
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        #: the loop adds every step's losses (only a per-epoch plateau scheduler needs them)
        self.collects_losses = self.plateau and self.per_epoch
        self.device, self.comm_device = device, comm_device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = 0

    def add_losses(self, losses: list) -> None:
        for loss in losses:
            self.loss_sum += loss.detach()
        self.loss_count += len(losses)

    def after_iteration(self, global_loss) -> None:
        """``global_loss``: a callable giving the iteration's mean loss over ranks (called only for a plateau)."""
        if self.per_iteration:
            self.scheduler.step(global_loss()) if self.plateau else self.scheduler.step()

    def after_epoch(self) -> None:
        if not self.per_epoch:
            return
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
