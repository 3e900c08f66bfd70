"""The bias-corrected exponential moving average: the stop criteria smooth the loss with it, the learning-rate
finder its curve."""

from __future__ import annotations

import numpy as np


class SmoothedValue:
    """``avg_i / (1 - beta**i)`` of the values so far: the correction removes the pull towards zero of an average
    started at zero, so the first value comes out unchanged and a constant input stays constant."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def update(self, value: float) -> float:
        """Add ``value``; returns the corrected average."""
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta ** self.count)

    def state_dict(self) -> dict:
        return {"avg": self.avg, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.avg, self.count = float(state["avg"]), int(state["count"])


def smooth(values, beta: float) -> np.ndarray:
    """The corrected average after each of ``values`` (float64)."""
    ema = SmoothedValue(beta)
    return np.array([ema.update(v) for v in np.asarray(values, dtype=np.float64)], dtype=np.float64)
