"""When a periodic snapshot is due: every N iterations, or every fraction of an epoch.

A pure function of the counters, so every rank reaches the same answer without talking to the others.
"""

from __future__ import annotations

import math


class SnapshotSchedule:
    """``interval`` counts iterations (``by_epochs=False``) or epochs, fractions allowed (0.5 = twice per epoch)."""

    def __init__(self, interval: float | None, by_epochs: bool):
        self.interval, self.by_epochs = interval, by_epochs
        self._next_at = math.inf

    def start(self, epoch_fraction: float) -> None:
        """Where training starts (after a resume): the next due point lies after it."""
        if self.interval is not None and self.by_epochs:
            self._next_at = self._after(epoch_fraction)

    def _after(self, epoch_fraction: float) -> float:
        return (math.floor(epoch_fraction / self.interval + 1e-9) + 1) * self.interval

    def due(self, iteration: int, epoch_fraction: float) -> bool:
        if self.interval is None:
            return False
        if not self.by_epochs:
            return iteration % self.interval == 0
        if epoch_fraction + 1e-9 >= self._next_at:
            self._next_at = self._after(epoch_fraction)
            return True
        return False
