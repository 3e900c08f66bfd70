"""Linear learning-rate warmup over the first iterations, on top of any scheduler (or of a constant rate).

Iteration ``k`` (0-based) of the first ``iters`` runs at ``lr_k * f(k)`` with ``f(k) = factor + (1 - factor) * k /
iters``: from ``factor`` times the rate up to the rate itself (torch's ``LinearLR(start_factor=factor,
total_iters=iters)``), counted in iterations even when the scheduler steps once per epoch. ``lr_k`` is what the
scheduler (or the optimizer) says; the scheduler never sees the factor: before it steps, the groups get its own
rates back, and the factor is put on the rates it leaves. So recursive schedulers (cosine, poly, plateau), closed
forms (one-cycle) and a changed ``lr`` on resume all compose with the warmup without a special case.

Why not ``SequentialLR([LinearLR, main])`` / ``ChainedScheduler``: the main scheduler would have to step per
iteration during the warmup (ours may step per epoch), ``SequentialLR`` restarts the second scheduler at its
milestone (a cosine would not begin where the warmup ends) and re-steps it at construction, and recursive schedulers
chained with another give rates that drift from their closed form.

Snapshots hold the scheduler's own rates while a warmup factor is on (part ``"warmup"``: ``{"base": [lr per
group]}``, None otherwise), and the optimizer's groups the warmed rates that were in use: a resume at any iteration
puts back the same rates bit for bit, and the factor itself is a pure function of the iteration.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def _set_lrs(optimizer, lrs) -> None:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # a tensor lr (capturable / fused optimizers) must stay the same tensor
        else:
            group["lr"] = lr


def _get_lrs(optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


class Warmup:
    """The warmup of ``optimizer``'s rates over ``iters`` iterations from ``factor`` times them (a snapshot part).

    ``iters=0``: no warmup (the part stays, so that a snapshot taken during a warmup resumed without one gets the
    scheduler's rates back instead of keeping a warmed rate for ever).
    """

    def __init__(self, optimizer, iters: int = 0, factor: float = 0.001):
        self.optimizer, self.iters, self.start_factor = optimizer, int(iters or 0), float(factor)
        self.base: list[float] | None = None  # the scheduler's rates while a factor is on the groups

    @property
    def active(self) -> bool:
        return self.base is not None

    def factor(self, iteration: int) -> float:
        """The multiplier of iteration ``iteration + 1`` (``iteration`` steps done)."""
        if iteration >= self.iters:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * iteration / self.iters

    def apply(self, iteration: int) -> None:
        """Give the groups the rates of the next iteration, ``iteration`` steps being done."""
        if self.base is None:
            if iteration >= self.iters:
                return
            self.base = _get_lrs(self.optimizer)
        if iteration >= self.iters:  # the warmup is over: the scheduler's own rates from now on
            _set_lrs(self.optimizer, self.base)
            self.base = None
            return
        f = self.factor(iteration)
        _set_lrs(self.optimizer, [lr * f for lr in self.base])

    def remove(self) -> None:
        """Put the scheduler's rates back on the groups (the factor goes until the next :meth:`apply`)."""
        if self.base is not None:
            _set_lrs(self.optimizer, self.base)
            self.base = None

    @contextlib.contextmanager
    def unwarmed(self, iteration: int):
        """Around a scheduler step: the scheduler sees and changes its own rates; the factor is put back after."""
        was_on = self.base is not None
        self.remove()
        try:
            yield
        finally:
            if was_on:
                self.apply(iteration)

    # -- snapshot part ---------------------------------------------------------------------------------------------
    def state_dict(self):
        return None if self.base is None else {"base": list(self.base)}

    def load_state_dict(self, state) -> None:
        self.base = None if not state else [float(x) for x in state["base"]]
        if self.base is not None and len(self.base) != len(self.optimizer.param_groups):
            self.base = None  # the optimizer part already refused other groups; nothing sensible to restore
        if self.base is not None and not self.iters:
            logger.warning("the snapshot was taken during a learning-rate warmup and this run has none "
                           "(warmup_iters): the scheduler's rates apply from now on")
