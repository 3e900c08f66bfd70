"""The training loop behind :func:`train_model`, in one screen.

Pseudocode of one run::

    resume model, optimizer, scheduler, counters, RNGs and data position from a snapshot (optional)
    while not done:
        sampler.set_epoch(epoch, start=samples_in_epoch)         # skip ahead by index: nothing is decoded
        for each window of iter_size micro-batches (shorter only at the epoch's end):
            for each micro-batch:  (loss(model(*batch)) / window).backward()
            callbacks.on_after_backward; optimizer.step(); optimizer.zero_grad()
            iteration += 1; scheduler.step() if schedule_on_iter; callbacks.on_iteration_end
            at the epoch's end: epoch += 1; scheduler.step() if per epoch; callbacks.on_epoch_end
            every display_iter: one log line + one metrics row (the only host sync)
            snapshot when due; stop at num_iters / num_epochs / a callback's request
    final snapshot; callbacks.on_train_end
"""

from __future__ import annotations

import math
import time

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader

from . import __version__
from .dist import default_num_workers, read_env
from .errors import DataError, PixelzError, SnapshotError
from .hooks import CallbackList, TrainState
from .log import AppendFile, WindowMeter, ensure_handler, format_duration, format_lrs, gpu_memory_fields, logger
from .model_io import call_model, extract_loss, move_to_device
from .progress import Progress
from .rng import capture_rng_state, restore_rng_state
from .sampler import ResumableBatchSampler
from .seeding import SeededDataset, draws_no_random_numbers
from .settings import RunSettings
from .snapshot import (
    FORMAT_VERSION,
    check_model_state,
    find_latest_valid,
    load_snapshot,
    prune_snapshots,
    save_atomic,
    snapshot_path,
)

ORDER_HEADER = "iteration\tepoch\tfrom\tto\tdigest"


def model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Engine:
    """Owns one run: the loader, the counters, the meters and the files. Built and run by :func:`train_model`."""

    def __init__(self, model, optimizer, scheduler, dataset, settings: RunSettings, callbacks=()):
        self.s = s = settings
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.env = read_env()
        if self.env.is_distributed:
            raise PixelzError(f"WORLD_SIZE={self.env.world_size}: multi-process training is not available in this "
                              "version of pixelz_dist. HINT: run with one process (python, or torchrun "
                              "--nproc_per_node=1).")
        self.device = model_device(model)
        self.move = self.device.type != "cpu"
        self.num_samples = len(dataset)
        self.sampler = ResumableBatchSampler(self.num_samples, s.batch_size, shuffle=s.shuffle, seed=s.seed,
                                             rank=self.env.rank, world_size=self.env.world_size,
                                             drop_last=s.drop_last)
        if self.sampler.batches_per_epoch() == 0:
            raise DataError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                            f"{self.sampler.global_batch}, and drop_last=True leaves nothing to train on. "
                            "HINT: lower batch_size or set drop_last=False.")
        seed_data = (not draws_no_random_numbers(dataset)) if s.seed_data is None else s.seed_data
        workers = default_num_workers() if s.num_workers is None else s.num_workers
        self.num_workers = workers
        self.loader = DataLoader(SeededDataset(dataset, seed_data), batch_sampler=self.sampler, num_workers=workers,
                                 collate_fn=s.collate_fn, pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0,
                                 generator=torch.Generator())  # never draw from the global RNG: resume stays exact
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        self.progress = Progress()
        self.callbacks = CallbackList(callbacks)
        self.state = TrainState(self)
        self.snapshot_prefix = s.snapshot_prefix
        self.last_snapshot_path: str | None = None
        self.last_snapshot_iteration = -1
        log_prefix = s.log_prefix or s.snapshot_prefix
        self.metrics = AppendFile(f"{log_prefix}_metrics.jsonl") if log_prefix else None
        self.order = AppendFile(f"{log_prefix}_order.tsv", ORDER_HEADER) if log_prefix else None
        self._last_losses: list = []
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_loss_count = 0
        self.meter = WindowMeter()
        self._gpu_warned = False

    # -- counters -----------------------------------------------------------------------------------------------
    def epoch_fraction(self) -> float:
        return self.progress.epoch + self.progress.samples_in_epoch / self.num_samples

    def iterations_per_epoch(self, start: int = 0) -> int:
        left = self.num_samples - start
        gb = self.sampler.global_batch
        batches = left // gb if self.s.drop_last else math.ceil(left / gb)
        return math.ceil(batches / self.s.iter_size)

    @property
    def total_iters(self) -> int:
        if self.s.num_iters is not None:
            return self.s.num_iters
        p = self.progress
        if p.epoch >= self.s.num_epochs:
            return p.iteration
        return (p.iteration + self.iterations_per_epoch(p.samples_in_epoch)
                + (self.s.num_epochs - p.epoch - 1) * self.iterations_per_epoch())

    @property
    def last_loss(self):
        return torch.stack(self._last_losses).mean() if self._last_losses else None

    def done(self) -> bool:
        p = self.progress
        if self.state.stop_reason is not None:
            return True
        if self.s.num_iters is not None:
            return p.iteration >= self.s.num_iters
        return p.epoch >= self.s.num_epochs

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self):
        ensure_handler()
        self.resume()
        self._init_snapshot_schedule()
        logger.info("training %s on %s: %d samples, batch %d x iter_size %d, %d DataLoader workers, %s",
                    type(self.model).__name__, self.device, self.num_samples, self.s.batch_size, self.s.iter_size,
                    self.num_workers, f"{self.s.num_iters} iterations" if self.s.num_iters is not None
                    else f"{self.s.num_epochs} epochs ({self.iterations_per_epoch()} iterations each)")
        self.t_start = time.perf_counter()
        self.start_iteration = self.progress.iteration
        self.meter.reset(self.t_start)
        for hook in self.callbacks.on_train_start:
            hook(self.state)
        try:
            while not self.done():
                self.run_epoch()
        finally:
            self.loader = None  # the last reference: persistent workers shut down now, not at interpreter exit
        if self.meter.iterations:
            self.display()
        if self.snapshot_prefix and self.last_snapshot_iteration != self.progress.iteration:
            self.write_snapshot()
        self.flush_files()
        if self.state.stop_reason is not None:
            logger.info("stopped at iteration %d: %s", self.progress.iteration, self.state.stop_reason)
        for hook in self.callbacks.on_train_end:
            hook(self.state)
        return self.model

    def run_epoch(self) -> None:
        p, sampler = self.progress, self.sampler
        sampler.set_epoch(p.epoch, p.samples_in_epoch)
        for hook in self.callbacks.on_epoch_start:
            hook(self.state)
        remaining = len(sampler)
        batches = iter(self.loader) if remaining else None
        consumed = 0
        while consumed < remaining:
            window = min(self.s.iter_size, remaining - consumed)
            self.run_iteration(batches, window)
            consumed += window
            begin, p.samples_in_epoch = p.samples_in_epoch, sampler.position_after(consumed)
            p.iteration += 1
            self.meter.iterations += 1
            self.meter.samples += p.samples_in_epoch - begin
            if self.order is not None:
                self.order.add(f"{p.iteration}\t{p.epoch}\t{begin}\t{p.samples_in_epoch}\t"
                               f"{sampler.order_digest(begin, p.samples_in_epoch)}")
            if self.s.schedule_on_iter and self.scheduler is not None:
                self.scheduler.step(self.last_loss.item()) if self.plateau else self.scheduler.step()
            for hook in self.callbacks.on_iteration_end:
                hook(self.state)
            if consumed == remaining:
                self.end_epoch()
            self.after_iteration()
            if self.done():
                return
        if remaining == 0:  # resumed exactly at an epoch's end
            self.end_epoch()

    def run_iteration(self, batches, window: int) -> None:
        model, meter, device = self.model, self.meter, self.device
        clock = time.perf_counter
        losses = meter.losses
        first = len(losses)
        for _ in range(window):
            t0 = clock()
            batch = next(batches)
            meter.data_wait += clock() - t0
            if self.move:
                batch = move_to_device(batch, device)
            loss = extract_loss(call_model(model, batch))
            (loss / window if window > 1 else loss).backward()
            losses.append(loss.detach())
        self._last_losses = losses[first:]
        if self.plateau and not self.s.schedule_on_iter:
            for loss in self._last_losses:
                self._epoch_loss_sum += loss.double()
            self._epoch_loss_count += window
        for hook in self.callbacks.on_after_backward:
            hook(self.state)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end_epoch(self) -> None:
        p = self.progress
        p.epoch += 1
        p.samples_in_epoch = 0
        self.step_epoch_scheduler()
        for hook in self.callbacks.on_epoch_end:
            hook(self.state)

    def step_epoch_scheduler(self) -> None:
        if self.scheduler is None or self.s.schedule_on_iter:
            return
        if not self.plateau:
            self.scheduler.step()
        elif self._epoch_loss_count:
            self.scheduler.step((self._epoch_loss_sum / self._epoch_loss_count).item())
            self._epoch_loss_sum.zero_()
            self._epoch_loss_count = 0

    def after_iteration(self) -> None:
        if self.progress.iteration % self.s.display_iter == 0:
            self.display()
        if self.snapshot_prefix and (self.snapshot_due() or self.state.snapshot_requested):
            self.write_snapshot()

    # -- snapshots ------------------------------------------------------------------------------------------------
    def _init_snapshot_schedule(self) -> None:
        interval = self.s.snapshot_interval
        if interval is not None and self.s.num_epochs is not None:
            self._next_snapshot_at = (math.floor(self.epoch_fraction() / interval + 1e-9) + 1) * interval

    def snapshot_due(self) -> bool:
        interval = self.s.snapshot_interval
        if interval is None:
            return False
        if self.s.num_iters is not None:
            return self.progress.iteration % interval == 0
        frac = self.epoch_fraction()
        if frac + 1e-9 >= self._next_snapshot_at:
            self._next_snapshot_at = (math.floor(frac / interval + 1e-9) + 1) * interval
            return True
        return False

    def snapshot_state(self) -> dict:
        s = self.s
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "progress": self.progress.state_dict(),
            "data": {"seed": self.sampler.seed, "shuffle": s.shuffle, "batch_size": s.batch_size,
                     "iter_size": s.iter_size, "world_size": self.env.world_size, "num_samples": self.num_samples,
                     "drop_last": s.drop_last},
            "rng": capture_rng_state(),
            "callbacks": self.callbacks.state_dict(),
            "epoch_loss": {"sum": self._epoch_loss_sum.cpu(), "count": self._epoch_loss_count},
            "meta": {"pixelz_dist": __version__, "torch": str(torch.__version__), "time": time.time()},
        }

    def write_snapshot(self) -> str:
        path = snapshot_path(self.snapshot_prefix, self.progress.iteration)
        self.flush_files()  # the records up to this snapshot are durable before the snapshot exists
        save_atomic(self.snapshot_state(), path)
        if self.s.keep_last:
            prune_snapshots(self.snapshot_prefix, self.s.keep_last)
        self.last_snapshot_path, self.last_snapshot_iteration = path, self.progress.iteration
        self.state.snapshot_requested = False
        logger.info("snapshot written: %s", path)
        for hook in self.callbacks.on_snapshot:
            hook(self.state, path)
        return path

    def resume(self) -> None:
        spec = self.s.load_snapshot_path
        if spec is None:
            return
        if spec == "auto":
            found = find_latest_valid(self.snapshot_prefix)
            if found is None:
                logger.info("no snapshot found for prefix %r: starting from scratch", self.snapshot_prefix)
                return
            path, snap = found
        else:
            path, snap = str(spec), load_snapshot(str(spec))
        check_model_state(self.model, snap["model"], path, strict=self.s.strict_load)
        self.model.load_state_dict(snap["model"], strict=self.s.strict_load)
        try:
            self.optimizer.load_state_dict(snap["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise SnapshotError(f"the optimizer state in {path!r} does not fit this optimizer ({e}). HINT: build "
                                "the optimizer with the same parameter groups, in the same order, as the run that "
                                "wrote the snapshot.") from e
        if self.scheduler is not None and snap["scheduler"] is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        elif self.scheduler is not None or snap["scheduler"] is not None:
            logger.warning("snapshot %s %s but this run %s: the schedule %s", path,
                           "holds a scheduler state" if snap["scheduler"] is not None else "holds no scheduler state",
                           "has no scheduler" if self.scheduler is None else "has one",
                           "is dropped" if self.scheduler is None else "starts from its beginning")
        self.progress.load_state_dict(snap["progress"])
        if "epoch_loss" in snap:
            self._epoch_loss_sum = snap["epoch_loss"]["sum"].to(self.device)
            self._epoch_loss_count = int(snap["epoch_loss"]["count"])
        if self._resume_data_position(path, snap["data"]):
            self.step_epoch_scheduler()  # the rest of the snapshot's epoch is skipped: that epoch has ended
        absent = self.callbacks.load_state_dict(snap.get("callbacks", {}))
        if absent:
            logger.warning("snapshot %s holds no state for callback(s) %s; they start fresh", path, absent)
        restore_rng_state(snap["rng"])  # last: nothing above may draw from the restored streams
        self.last_snapshot_path, self.last_snapshot_iteration = path, self.progress.iteration
        if self.order is not None:
            self.order.add(f"# resumed from {path} at iteration {self.progress.iteration}")
        p = self.progress
        logger.info("resumed from %s: iteration %d, epoch %d, sample %d of %d", path, p.iteration, p.epoch,
                    p.samples_in_epoch, self.num_samples)

    def _resume_data_position(self, path: str, data: dict) -> bool:
        """Apply the saved position; True when the rest of the snapshot's epoch is skipped."""
        p, s = self.progress, self.s
        if data["seed"] != self.sampler.seed:
            logger.warning("snapshot %s was trained with seed %d, this call passes %d: the snapshot's seed is kept so "
                           "the data order continues", path, data["seed"], self.sampler.seed)
            self.sampler.seed = int(data["seed"])
        changed = [f"{k} {data[k]} -> {now}" for k, now in (("batch_size", s.batch_size), ("iter_size", s.iter_size),
                                                           ("world_size", self.env.world_size),
                                                           ("shuffle", s.shuffle))
                   if data.get(k) != now]
        if changed:
            logger.warning("resuming with %s: the data position is kept in samples (%d into epoch %d), so no "
                           "sample is skipped or repeated, but the run is no longer bit-identical to the "
                           "original", ", ".join(changed), p.samples_in_epoch, p.epoch)
        if data.get("num_samples") != self.num_samples:
            logger.warning("the dataset had %s samples when %s was written and has %d now", data.get("num_samples"),
                           path, self.num_samples)
            if p.samples_in_epoch >= self.num_samples:
                p.epoch, p.samples_in_epoch = p.epoch + 1, 0
                return True
        if not s.restore_dataloader and p.samples_in_epoch > 0:
            logger.info("restore_dataloader=False: skipping the rest of epoch %d (%d of %d samples were done); "
                        "training goes on at the start of epoch %d", p.epoch, p.samples_in_epoch, self.num_samples,
                        p.epoch + 1)
            p.epoch, p.samples_in_epoch = p.epoch + 1, 0
            return True
        return False

    # -- reporting --------------------------------------------------------------------------------------------------
    def display(self) -> None:
        now = time.perf_counter()
        m, p = self.meter, self.progress
        window = max(now - m.started, 1e-9)
        loss = m.mean_loss()
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        elapsed = now - self.t_start
        done_here = p.iteration - self.start_iteration
        total = self.total_iters
        eta = elapsed / done_here * (total - p.iteration) if done_here else float("nan")
        row = {"iteration": p.iteration, "total": total, "epoch": round(self.epoch_fraction(), 4), "loss": loss,
               "lr": lrs, "samples_per_s": m.samples / window, "data_wait": m.data_wait / window,
               "elapsed_s": elapsed, "eta_s": eta}
        line = (f"iter {p.iteration}/{total} | epoch {row['epoch']:.2f} | loss {loss:.4g} | lr {format_lrs(lrs)} | "
                f"{row['samples_per_s']:.1f} samples/s | data {row['data_wait']:.0%} | "
                f"elapsed {format_duration(elapsed)} | eta {format_duration(eta)}")
        if self.s.display_gpu:
            mem = gpu_memory_fields(self.device, warn=not self._gpu_warned)
            self._gpu_warned = True
            row.update(mem)
            if mem:
                line += (f" | gpu {mem['gpu_allocated_mib']:.0f}/{mem['gpu_reserved_mib']:.0f} MiB "
                         f"(peak {mem['gpu_peak_mib']:.0f})")
        logger.info(line)
        if self.metrics is not None:
            self.metrics.add_json(row)
        self.flush_files()
        m.reset(now)

    def flush_files(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()
        if self.order is not None:
            self.order.flush()
