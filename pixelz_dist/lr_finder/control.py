"""One inner run of the finder: the starting point every run is restored to, the groups' rates, and the callback that
sets the rate before each step and records the loss."""

from __future__ import annotations

import copy
import logging
import math

import torch

from ..callbacks.base import Callback
from ..errors import ConfigError
from ..random_state import capture

logger = logging.getLogger(__name__)


def detached_copy(obj):
    """Deep copy with tensors detached and moved to the CPU (a GPU model's copy costs no GPU memory)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detached_copy(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(detached_copy(v) for v in obj)
    return copy.deepcopy(obj)


class StartingPoint:
    """Everything a run changes, copied once: weights and buffers, optimizer state and lrs, gradients, train/eval
    flags and every global RNG. ``restore`` puts back bit-identical values."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.weights = detached_copy(model.state_dict())
        self.opt_state = detached_copy(optimizer.state_dict())
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        self.training = [m.training for m in model.modules()]
        self.rng = capture(cuda=True)

    def restore(self, grads: bool = True) -> None:
        self.model.load_state_dict(self.weights)
        # load_state_dict keeps tensors that need no cast: give it a fresh copy, or the next run mutates ours.
        self.optimizer.load_state_dict(detached_copy(self.opt_state))
        for p, g in zip(self.model.parameters(), self.grads):
            p.grad = g.clone() if grads and g is not None else None
        for m, flag in zip(self.model.modules(), self.training):
            m.training = flag
        self.rng.restore()


def set_lrs(optimizer, lrs) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # a tensor lr (capturable / fused optimizers) must stay the same tensor
        else:
            group["lr"] = lr


def group_scales(base_lrs: list[float], names: list[str], min_lr: float) -> list[float]:
    """Each group's lr as a multiple of the reference group's (the first with a non-zero lr); warns when that
    differs from the seed's rule (every group scaled by lr / min_lr), so a user of the old tool is not surprised."""
    ref = next((i for i, lr in enumerate(base_lrs) if lr > 0), None)
    if ref is None:
        raise ConfigError(f"every param group has lr 0 ({dict(zip(names, base_lrs))}): the finder scales the "
                          "groups' lrs, and zero stays zero. HINT: give at least one group a positive lr.")
    scales = [lr / base_lrs[ref] for lr in base_lrs]
    if ref != 0:
        logger.warning("lr finder: param group 0 (%s) has lr 0, so the rates reported are those of group %d (%s)",
                       names[0], ref, names[ref])
    distinct = len({round(s, 12) for s in scales}) > 1
    if distinct and not math.isclose(base_lrs[ref], min_lr, rel_tol=1e-6):
        ratios = ", ".join(f"{n}: x{s:.3g}" for n, s in zip(names, scales))
        logger.warning("lr finder: the param groups have different lrs and group %d's (%s, lr %.3g) is not min_lr "
                       "(%.3g). The rates tried are group %d's; the other groups keep their ratio to it (%s). The "
                       "old tool scaled every group by lr / min_lr instead, which equals this only when group %d's "
                       "lr is min_lr. HINT: put the group whose rate you want reported first.", ref, names[ref],
                       base_lrs[ref], min_lr, ref, ratios, ref)
    return scales


class RateControl(Callback):
    """One inner run: sets the groups' lrs for the coming step, records the loss of each iteration, stops the run
    when ``judge(i, loss, losses_so_far)`` calls it diverged. ``lr_at(i)`` is the first group's rate at step i."""

    def __init__(self, scales, lr_at, judge, stop_on_divergence=True, report=None):
        self.scales, self.lr_at, self.judge = scales, lr_at, judge
        self.stop_on_divergence, self.report = stop_on_divergence, report
        self.losses: list[float] = []
        self.diverged_at: int | None = None
        self.start = 0

    def _apply(self, optimizer, i: int) -> None:
        lr = float(self.lr_at(i))
        set_lrs(optimizer, [lr * s for s in self.scales])

    def on_train_start(self, state):
        self.start = state.iteration  # after any snapshot was loaded (and its lrs with it)
        self._apply(state.optimizer, 0)

    def on_after_backward(self, state):
        self._apply(state.optimizer, state.iteration - self.start)

    def on_iteration_end(self, state):
        loss = state.global_loss()  # a collective: every rank calls it here and so judges the same number
        i = len(self.losses)
        self.losses.append(loss)
        if self.diverged_at is None and self.judge(i, loss, self.losses):
            self.diverged_at = i
        if self.diverged_at is not None and self.stop_on_divergence:
            # judged on the global loss: every rank stops here together, no agreement needed
            state.request_stop("lr finder: the loss diverged", on_every_rank=True)
        if self.report is not None:
            self.report(i, loss)
