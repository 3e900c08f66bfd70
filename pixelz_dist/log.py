"""The library's logger, the per-window meters behind the progress line, and the files a run appends to."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager

import torch

logger = logging.getLogger("pixelz_dist")


def ensure_handler() -> None:
    """Show INFO progress lines when the application configured no logging at all (a script, a notebook)."""
    if logger.handlers or logging.getLogger().handlers:
        if logger.level == logging.NOTSET and logging.getLogger().level > logging.INFO:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class RankFilter(logging.Filter):
    """Rank 0's records only, unless every rank was asked to log (then each record names its rank)."""

    def __init__(self, rank: int, all_ranks: bool = False):
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        if self.all_ranks:
            record.msg = f"[rank {self.rank}] {record.msg}"
            return True
        return self.rank == 0


@contextmanager
def rank_logging(rank: int, world_size: int):
    """While active, only rank 0 logs (all ranks, each line prefixed, with PIXELZ_LOG_ALL_RANKS=1)."""
    if world_size <= 1:
        yield
        return
    rank_filter = RankFilter(rank, os.environ.get("PIXELZ_LOG_ALL_RANKS") == "1")
    logger.addFilter(rank_filter)
    try:
        yield
    finally:
        logger.removeFilter(rank_filter)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_lrs(lrs: list[float]) -> str:
    shown = ",".join(f"{lr:.3g}" for lr in lrs[:4])
    return shown + (f",...({len(lrs)} groups)" if len(lrs) > 4 else "")


class AppendFile:
    """A text file a run appends lines to; opened per flush, so nothing is held open across a kill."""

    def __init__(self, path: str, header: str | None = None):
        self.path = path
        self.header = header
        self.pending: list[str] = []
        self._folder_made = False

    def add(self, line: str) -> None:
        self.pending.append(line)

    def add_json(self, row: dict) -> None:
        self.pending.append(json.dumps(row, separators=(",", ":")))

    def flush(self) -> None:
        if not self.pending:
            return
        if not self._folder_made:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._folder_made = True
        new = not os.path.exists(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            if new and self.header:
                f.write(self.header + "\n")
            f.write("\n".join(self.pending) + "\n")
        self.pending.clear()


class WindowMeter:
    """Collects one display window. Losses stay on the device (one host sync per window, when the line is written):
    each is copied into a slot of a preallocated buffer (float32, or the losses' dtype if wider), which is summed in
    float64 into a running total when full.

    Why this shape: no loss tensor outlives its step (keeping each step's loss until the line costs ~3 % of a 1 ms
    step on CPU: hundreds of small live allocations fragment the heap the step's large buffers come from), and a
    same-dtype copy into a slot is one small op, where ``detach()`` plus a share of ``torch.stack`` are two."""

    SLOTS = 64

    def __init__(self):
        self._buffer = None  # SLOTS long, on the losses' device; kept across windows
        self._slots: list = []  # its 0-dim views, made once
        self._no_grad = None
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.loss_sum = None  # float64 tensor: the folded part of the window's loss sum
        self.loss_count = 0
        self._filled = 0
        self.data_wait = 0.0
        self.samples = 0
        self.iterations = 0
        self.skipped = 0
        self.values: dict = {}  # name -> [sum tensor, count]: values logged by callbacks (e.g. grad_norm)
        self.started = now

    def add_losses(self, losses: list) -> None:
        """Record the loss tensors of one step (they may still carry their autograd graph; none is kept)."""
        if not losses:
            return
        if self._buffer is None:
            dtype = torch.promote_types(losses[0].dtype, torch.float32)
            self._buffer = torch.zeros(self.SLOTS, dtype=dtype, device=losses[0].device)
            self._slots = list(self._buffer.unbind())
            self._no_grad = torch.no_grad()
        slots, k = self._slots, self._filled
        with self._no_grad:
            for loss in losses:
                if k == self.SLOTS:
                    self._fold(k)
                    k = 0
                slots[k].copy_(loss)
                k += 1
        self._filled = k
        self.loss_count += len(losses)

    def _fold(self, filled: int) -> None:
        part = self._buffer[:filled].sum(dtype=torch.float64)
        if self.loss_sum is None:
            self.loss_sum = part
        else:
            self.loss_sum.add_(part)
        self._filled = 0

    def total_loss(self):
        """The window's loss sum as a float64 tensor on the device (None before any loss)."""
        if self._filled:
            self._fold(self._filled)
        return self.loss_sum

    def add_value(self, name: str, value) -> None:
        entry = self.values.get(name)
        if entry is None:
            self.values[name] = [value.detach().double(), 1]
        else:
            entry[0].add_(value.detach())
            entry[1] += 1


def gpu_memory_fields(device, warn: bool = True) -> dict:
    """Allocated / reserved / peak memory of ``device`` in MiB; empty (and a warning) when it is not a GPU."""
    if getattr(device, "type", str(device)) != "cuda":
        if warn:
            logger.warning("display_gpu=True but the model is on %s: no GPU memory to show", device)
        return {}
    mib = 1024 * 1024
    return {"gpu_allocated_mib": torch.cuda.memory_allocated(device) / mib,
            "gpu_reserved_mib": torch.cuda.memory_reserved(device) / mib,
            "gpu_peak_mib": torch.cuda.max_memory_allocated(device) / mib}
