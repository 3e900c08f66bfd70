"""The log line and the metrics row: what one display window measured, reduced over ranks once per window.

Losses stay on the device between lines (:class:`WindowMeter`); writing a line is the loop's only regular host
sync, one collective of a handful of numbers under torchrun.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..distributed.env import sum_over_ranks
from ..distributed.log_relay import flush_rank_logs
from .state import learning_rates

logger = logging.getLogger(__name__)


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


def describe_run(s, model_name: str, device, world_size: int, source, workers: int, per_epoch) -> str:
    """What the first log line says about the run: the model, where, the data, the length, the speed options."""
    world = f", {world_size} processes" if world_size > 1 else ""
    what = (f"{source.num_samples} samples, batch {s.batch_size}" if source.kind == "dataset" else
            f"your DataLoader ({source.epoch_size} batches per epoch, batch {source.batch_size})")
    extras = "".join(f", {name}" for name, on in (
        (f"amp {s.amp}", s.amp), ("channels_last", s.channels_last), ("torch.compile", s.compile),
        ("LBFGS-style closure", s.closure)) if on)
    length = (f"{s.num_iters} iterations" if s.num_iters is not None else
              f"{s.num_epochs} epochs ({per_epoch} iterations each)")
    return (f"{model_name} on {device}{world}: {what} x iter_size {s.iter_size}, {workers} DataLoader workers, "
            f"{length}{extras}")


class Reporter:
    """Writes one log line and one metrics row per display window.

    Args:
        metrics: the ``*_metrics.jsonl`` file (rank 0), or None.
        world_size: ranks to average over.
        comm_device: where the one collective's tensor lives.
        display_gpu: add this device's memory to the line (GPU only; a warning, once, otherwise).
        device: the training device.
    """

    def __init__(self, metrics, world_size: int, comm_device: torch.device, display_gpu: bool, device: torch.device):
        self.metrics, self.world_size, self.comm_device = metrics, world_size, comm_device
        self.display_gpu, self.device = display_gpu, device
        self.meter = WindowMeter()
        self.started = time.perf_counter()
        self.start_iteration = 0
        self._gpu_warned = False

    def start(self, iteration: int) -> None:
        self.started = time.perf_counter()
        self.start_iteration = iteration
        self.meter.reset(self.started)

    def report(self, iteration: int, total: int | None, epoch_fraction: float, optimizer) -> None:
        now = time.perf_counter()
        m = self.meter
        window = max(now - m.started, 1e-9)
        total_loss = m.total_loss()
        names = sorted(m.values)  # the same callbacks, hence the same names, on every rank
        means = [(s / count).cpu() for s, count in (m.values[n] for n in names)]
        loss_sum, count, data_wait, *values = sum_over_ranks(
            (total_loss if total_loss is not None else 0.0, m.loss_count, m.data_wait, *means), self.comm_device)
        loss = loss_sum / count if count else float("nan")
        data_wait /= self.world_size
        values = {n: v / self.world_size for n, v in zip(names, values)}
        lrs = learning_rates(optimizer)
        elapsed = now - self.started
        done_here = iteration - self.start_iteration
        eta = elapsed / done_here * (total - iteration) if done_here and total is not None else float("nan")
        row = {"iteration": iteration, "total": total, "epoch": round(epoch_fraction, 4), "loss": loss, "lr": lrs,
               "samples_per_s": m.samples / window, "data_wait": data_wait / window, "elapsed_s": elapsed,
               "eta_s": eta, **values}
        line = (f"iter {iteration}/{total if total is not None else '?'} | epoch {row['epoch']:.2f} | "
                f"loss {loss:.4g} | lr {format_lrs(lrs)} | "
                + "".join(f"{n} {v:.4g} | " for n, v in values.items())
                + f"{row['samples_per_s']:.1f} samples/s | data {row['data_wait']:.0%} | "
                f"elapsed {format_duration(elapsed)} | eta {format_duration(eta)}")
        if m.skipped:
            row["skipped_steps"] = m.skipped
            line += f" | skipped {m.skipped} non-finite"
        if self.display_gpu:
            mem = gpu_memory_fields(self.device, warn=not self._gpu_warned)
            self._gpu_warned = True
            row.update(mem)
            if mem:
                line += (f" | gpu {mem['gpu_allocated_mib']:.0f}/{mem['gpu_reserved_mib']:.0f} MiB "
                         f"(peak {mem['gpu_peak_mib']:.0f})")
        flush_rank_logs()  # every rank has passed the sum above: their warnings so far come before the line
        logger.info(line)
        if self.metrics is not None:
            self.metrics.add_json(row)
        m.reset(now)

    def report_point(self, iteration: int, epoch_fraction: float, values: dict, seconds: float | None = None) -> None:
        """One log line and one metrics row of values measured at ``iteration`` (a validation's), written at once.

        The values are already the same on every rank (reduced by whoever measured them): no collective here. The
        row carries ``iteration`` and ``epoch`` like the training rows, and only these values, so a reader tells the
        two kinds apart by their keys (``val_*``)."""
        row = {"iteration": iteration, "epoch": round(epoch_fraction, 4),
               **{k: float(v) for k, v in values.items()}}
        line = (f"validation at iter {iteration} | epoch {row['epoch']:.2f} | "
                + " | ".join(f"{k} {float(v):.4g}" for k, v in values.items()))
        if seconds is not None:
            line += f" | {seconds:.1f} s"
        flush_rank_logs()
        logger.info(line)
        if self.metrics is not None:
            self.metrics.add_json(row)


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
