"""Built-in callbacks: gradient clipping, stop criteria, a non-finite loss guard.

``train_model``'s keyword arguments (``clip_grad_norm=``, ``stop_loss_below=``, ``time_budget=``, ``on_nonfinite=``,
...) create these; they can also be passed in ``callbacks=`` directly. Each works only through the public
:class:`~pixelz_dist.engine.state.TrainState`, like a user's callback would.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import PixelzError
from .base import Callback
from .smoothing import SmoothedValue


class NonFiniteLossError(PixelzError, FloatingPointError):
    """The loss became NaN or infinite and ``on_nonfinite="raise"``."""


class NonFiniteGuard(Callback):
    """Checks the iteration's loss before the optimizer step (one host sync per iteration, and one collective
    under torchrun so that all ranks decide together).

    Args:
        mode: ``"raise"``: stop with :class:`NonFiniteLossError` naming the iteration and the last good snapshot;
            ``"skip"``: drop this step's gradients, leave the weights alone, count it (``skipped`` in the log line).
    """

    def __init__(self, mode: str = "raise"):
        if mode not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {mode!r}")
        self.mode = mode
        self.skipped = 0

    def on_after_backward(self, state):
        if state.loss_is_finite():
            return
        if self.mode == "skip":
            self.skipped += 1
            state.skip_step("non-finite loss")
            return
        it = state.iteration + 1
        snap, snap_iteration = state.newest_snapshot
        where = (f"the last good snapshot is {snap} (iteration {snap_iteration})" if snap else
                 "no snapshot was written or loaded before it")
        raise NonFiniteLossError(
            f"the loss is {state.loss.item()} at iteration {it} (epoch {state.epoch_fraction:.3f}); the weights were "
            f"not updated by it, and {where}. HINT: lower the learning rate, set clip_grad_norm=, check the data "
            "of this iteration, or pass on_nonfinite='skip' to skip such steps.")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])


class GradientClipping(Callback):
    """Clips the gradients of the whole iteration (all ``iter_size`` micro-batches, after DDP's all-reduce, after
    fp16 unscaling) right before the optimizer step. The pre-clip total norm goes into the log line as
    ``grad_norm`` (its mean over the display window).

    Args:
        max_norm: clip the total norm (``torch.nn.utils.clip_grad_norm_``) to this.
        max_value: clamp each gradient element to ``[-max_value, max_value]`` (applied first when both are given).
        norm_type: the norm's p (2.0; ``inf`` for the max norm).
    """

    def __init__(self, max_norm: float | None = None, max_value: float | None = None, norm_type: float = 2.0):
        if max_norm is None and max_value is None:
            raise ValueError("GradientClipping needs max_norm or max_value")
        self.max_norm, self.max_value, self.norm_type = max_norm, max_value, float(norm_type)

    def on_after_backward(self, state):
        if state.step_skipped:
            return
        state.unscale_gradients()
        params = [p for p in state.model.parameters() if p.grad is not None]
        if not params:
            return
        if self.max_value is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf, self.norm_type)  # measure only
            torch.nn.utils.clip_grad_value_(params, self.max_value)
        if self.max_norm is not None:
            clipped_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)
            if self.max_value is None:
                norm = clipped_norm
        state.log_value("grad_norm", norm)


class StopOnLoss(Callback):
    """Stops when the smoothed training loss is below ``threshold``, or has not improved by ``min_delta`` for
    ``patience`` iterations. Reads the loss every iteration (a host sync; a collective under torchrun), so every
    rank sees the same value and stops at the same iteration.

    Args:
        threshold: stop once the smoothed loss is below it.
        patience: stop after this many iterations without a new best (best - min_delta).
        min_delta: the improvement that counts.
        smoothing: the moving average's beta (0 = the raw loss of each iteration).
    """

    def __init__(self, threshold: float | None = None, patience: int | None = None, min_delta: float = 0.0,
                 smoothing: float = 0.9):
        if threshold is None and patience is None:
            raise ValueError("StopOnLoss needs threshold or patience")
        self.threshold, self.patience, self.min_delta = threshold, patience, min_delta
        self.smoother = SmoothedValue(smoothing)
        self.best = math.inf
        self.since_best = 0

    def on_iteration_end(self, state):
        value = state.global_loss()
        if not math.isfinite(value):
            return
        smooth = self.smoother.update(value)
        if self.threshold is not None and smooth < self.threshold:
            # every rank saw the same global loss and decides alike: no agreement needed, the stop is immediate
            state.request_stop(f"smoothed loss {smooth:.4g} is below stop_loss_below={self.threshold:g}",
                               on_every_rank=True)
            return
        if self.patience is None:
            return
        if smooth < self.best - self.min_delta:
            self.best, self.since_best = smooth, 0
        else:
            self.since_best += 1
            if self.since_best >= self.patience:
                state.request_stop(f"no improvement of the smoothed loss (best {self.best:.4g}) for "
                                   f"{self.patience} iterations", on_every_rank=True)

    def state_dict(self) -> dict:
        return {"smoother": self.smoother.state_dict(), "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.smoother.load_state_dict(state["smoother"])
        self.best, self.since_best = float(state["best"]), int(state["since_best"])


class TimeBudget(Callback):
    """Stops cleanly, with a final snapshot, before ``seconds`` of training are spent (e.g. a SLURM time limit).

    It stops when the time used, plus the longest iteration seen so far (for each iteration a stop request takes to
    act: one more under torchrun, where the ranks agree on it), plus the time the last snapshot took (or an estimate
    before the first), plus ``margin`` would pass the budget. The budget counts from the creation of the callback:
    for ``train_model(time_budget=...)``, from the call, set-up and resume included (a resumed run gets a fresh
    budget). ``clock``: seconds, monotonic (a test can pass its own).
    """

    def __init__(self, seconds: float, margin: float | None = None, clock=time.monotonic):
        if not seconds > 0:
            raise ValueError(f"time_budget must be a positive number of seconds, got {seconds!r}")
        self.seconds = float(seconds)
        self.margin = min(0.02 * self.seconds, 30.0) if margin is None else float(margin)
        self.clock = clock
        self.started = clock()
        self.last = self.started
        self.longest_iteration = 0.0

    def on_train_start(self, state):
        self.last = self.clock()

    def on_iteration_end(self, state):
        now = self.clock()
        self.longest_iteration = max(self.longest_iteration, now - self.last)
        self.last = now
        snapshot = state.last_snapshot_seconds
        if snapshot is None:  # nothing written yet: guess a few iterations' worth
            snapshot = 3 * self.longest_iteration
        used = now - self.started
        iterations_left = 1 + state.request_delay
        if used + iterations_left * self.longest_iteration + snapshot + self.margin >= self.seconds:
            state.request_stop(f"time budget: {used:.1f} s of {self.seconds:g} s used, the next iteration and the "
                               "snapshot would not fit")

    def on_snapshot(self, state, path):
        self.last = self.clock()  # the write is not an iteration
