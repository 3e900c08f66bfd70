"""The K best snapshots by a validation value: kept from ``keep_last``'s pruning, the best one at ``{prefix}_best.pt``.

A value measured at iteration N names the weights of iteration N, so :class:`KeepBest` asks for a snapshot of that
very iteration (on every rank at once: a validation runs on all of them alike) whenever the value would enter the
top K. The value becomes a *best snapshot* only once that snapshot is durable (``on_snapshot``; with background
writes a few iterations later), and only then does ``{prefix}_best.pt`` point at it: a hard link made under a
temporary name and renamed over the old one (a copy where the file system has no hard links), so the name always
holds a complete snapshot. The list and the values still waiting for their snapshot are saved in snapshots (as the
tracker's callback state), so a resumed run keeps the same best snapshots.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time

from ..callbacks.base import Callback
from ..distributed.env import read_env
from .file_format import snapshot_path

logger = logging.getLogger(__name__)

__all__ = ["KeepBest", "best_path", "point_to"]


def best_path(prefix: str) -> str:
    return f"{prefix}_best.pt"


def point_to(target: str, name: str) -> None:
    """Make ``name`` the same file as ``target`` (a hard link, else a copy), atomically: ``name`` holds either its
    old content or the whole of ``target``, never part of it."""
    folder = os.path.dirname(os.path.abspath(name))
    tmp = os.path.join(folder, f".{os.path.basename(name)}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(target, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems): a full copy, flushed first
        shutil.copyfile(target, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, name)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class KeepBest(Callback):
    """Tracks the ``k`` best snapshots by ``monitor`` (a key a validation reports, e.g. ``"val_loss"``).

    Created by ``train_model(keep_best=K, monitor=..., monitor_mode=...)``. The checkpointer asks it which snapshots
    to spare (:meth:`protected_snapshots`); rank 0 maintains ``{prefix}_best.pt``. Ties keep the earlier snapshot;
    a NaN or infinite value is never a best one.

    Args:
        k: how many best snapshots to keep (>= 1).
        monitor: the validation value compared.
        mode: ``"min"`` (a loss) or ``"max"`` (an IoU, an accuracy).
    """

    def __init__(self, k: int, monitor: str = "val_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.k, self.monitor, self.mode = int(k), monitor, mode
        self.best: list[tuple[float, int]] = []  # (value, iteration) of durable snapshots, best first
        self.pending: dict[int, float] = {}  # iteration -> value measured there, its snapshot not durable yet
        self.prefix: str | None = None

    def _rank(self, entry: tuple[float, int]) -> tuple[float, int]:
        value, iteration = entry
        return (value if self.mode == "min" else -value, iteration)

    def would_enter(self, value: float, iteration: int) -> bool:
        return len(self.best) < self.k or self._rank((value, iteration)) < self._rank(self.best[-1])

    @property
    def best_value(self) -> float | None:
        return self.best[0][0] if self.best else None

    def protected_snapshots(self) -> set[str]:
        """The paths ``keep_last`` must not remove."""
        if self.prefix is None:
            return set()
        return {os.path.abspath(snapshot_path(self.prefix, it)) for _, it in self.best}

    # -- events -------------------------------------------------------------------------------------------------------
    def on_train_start(self, state):
        self.prefix = state.snapshot_prefix
        resumed = state.last_snapshot_iteration
        value = self.pending.pop(resumed, None)
        self.pending.clear()  # values whose snapshot never became durable: their weights are gone
        if value is not None:  # measured at the snapshot this run resumed from: durable, it was just read
            self._insert(value, resumed)
        if read_env().is_main and self.prefix:
            self._point_best(announce=False)

    def on_validation(self, state, values):
        if self.monitor not in values:
            return
        value, iteration = float(values[self.monitor]), state.iteration
        if not math.isfinite(value):
            logger.warning("%s is %s at iteration %d: not a candidate for the best snapshots", self.monitor, value,
                           iteration)
            return
        if self.would_enter(value, iteration):
            self.pending[iteration] = value
            state.request_snapshot(on_every_rank=True)  # every rank validated: this very iteration everywhere

    def on_snapshot(self, state, path):
        iteration = state.last_snapshot_iteration
        value = self.pending.pop(iteration, None)
        for older in [it for it in self.pending if it < iteration]:
            del self.pending[older]
        if value is None:
            return
        self._insert(value, iteration)
        if self.best[0][1] == iteration and read_env().is_main:
            self._point_best(announce=True)

    def _insert(self, value: float, iteration: int) -> None:
        entries = [e for e in self.best if e[1] != iteration] + [(value, iteration)]
        self.best = sorted(entries, key=self._rank)[:self.k]

    def _point_best(self, announce: bool) -> None:
        """Rank 0: ``{prefix}_best.pt`` is the best snapshot (or, with none yet, absent)."""
        name = best_path(self.prefix)
        if not self.best:
            if os.path.lexists(name):  # an abandoned branch's (newer snapshots set aside on resume) or old run's
                aside = f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(name, aside)
                logger.warning("%s named a snapshot this run does not continue; set aside as %s", name, aside)
            return
        value, iteration = self.best[0]
        target = snapshot_path(self.prefix, iteration)
        if not os.path.exists(target):
            logger.warning("the best snapshot so far (%s %.4g at iteration %d), %s, is gone: %s not updated",
                           self.monitor, value, iteration, target, name)
            return
        if os.path.exists(name) and os.path.samefile(name, target):
            return
        point_to(target, name)
        if announce:
            logger.info("new best %s %.4g at iteration %d: %s -> %s", self.monitor, value, iteration, name,
                        os.path.basename(target))

    # -- snapshots ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "mode": self.mode, "k": self.k,
                "best": [[value, iteration] for value, iteration in self.best],
                "pending": [[iteration, value] for iteration, value in sorted(self.pending.items())]}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("monitor"), state.get("mode")) != (self.monitor, self.mode):
            logger.warning("the snapshot's best snapshots were chosen by %s (%s); this run monitors %s (%s): the list "
                           "starts afresh (the older snapshots stay on disk)", state.get("monitor"),
                           state.get("mode"), self.monitor, self.mode)
            self.best, self.pending = [], {}
            return
        self.best = sorted(((float(v), int(it)) for v, it in state["best"]), key=self._rank)[:self.k]
        self.pending = {int(it): float(v) for it, v in state["pending"]}
