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

import contextlib
import math
import time

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader

from .amp import MixedPrecision
from .batch_source import DatasetSource
from .checkpointing import Checkpointing
from .device_feed import DeviceFeed
from .dist import (
    convert_sync_batchnorm,
    default_num_workers,
    has_batchnorm,
    plan_devices,
    read_env,
    revert_sync_batchnorm,
)
from .errors import PixelzError
from .hooks import CallbackList, TrainState
from .log import (
    AppendFile,
    WindowMeter,
    ensure_handler,
    format_duration,
    format_lrs,
    gpu_memory_fields,
    logger,
)
from .model_io import call_model, extract_loss
from .preemption import Preempted, PreemptionFlag
from .progress import Progress
from .settings import RunSettings
from .user_loader import UserLoaderSource

ORDER_HEADER = "iteration\tepoch\tfrom\tto\tdigest"
NO_CONTEXT = contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Engine(Checkpointing):
    """Owns one run: the loader, the counters, the meters and the files. Built and run by :func:`train_model`."""

    def __init__(self, model, optimizer, scheduler, dataset, settings: RunSettings, callbacks=()):
        self.s = s = settings
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.env = env = read_env()
        self.distributed = env.is_distributed
        if self.distributed and not (tdist.is_available() and tdist.is_initialized()):
            raise PixelzError(f"WORLD_SIZE={env.world_size} but no process group exists. HINT: call train_model "
                              "directly (it creates the group), or wrap your code in pixelz_dist.dist.process_group().")
        self.plan = plan_devices(env, model_device(model), s.sync_bn, has_batchnorm(model), backend=s.backend)
        self.device = self.plan.device
        if self.distributed:
            model.to(self.device)
        self.comm_device = self.device if self.distributed and tdist.get_backend() == "nccl" else torch.device("cpu")
        self.sync_bn_originals = convert_sync_batchnorm(model) if self.plan.sync_bn else {}
        if s.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ddp = None
        self.forward_model = model
        self.callbacks = CallbackList(callbacks)
        if isinstance(dataset, DataLoader):
            self.source = UserLoaderSource(dataset, env)
            self.num_workers = dataset.num_workers
        else:
            workers = default_num_workers(self.plan.local_processes) if s.num_workers is None else s.num_workers
            # a dataset (or a callback) that changes the data between epochs needs workers that see the change
            persistent = not callable(getattr(dataset, "set_epoch", None)) and not self.callbacks.changes_dataset
            self.source = DatasetSource(dataset, s, env, self.plan.pin_memory, workers, persistent)
            self.num_workers = workers
        self.dataset = dataset
        self.sampler = getattr(self.source, "sampler", None)
        self.num_samples = self.source.epoch_size
        self.feed = DeviceFeed(self.device, s.channels_last, ahead=s.prefetch and self.source.read_ahead)
        self.precision = MixedPrecision(s.amp, self.device)
        self.closure = s.closure
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        self.progress = Progress()
        self.state = TrainState(self)
        self.preemption = PreemptionFlag()
        self.snapshot_prefix = s.snapshot_prefix
        self.last_snapshot_path: str | None = None
        self.last_snapshot_iteration = -1
        self.last_snapshot_seconds: float | None = None
        self._skip_reason: str | None = None
        self.bare_micro_batches = False  # no DDP, no autocast: the micro-batch loop runs without context managers
        self._unscaled = False
        log_prefix = (s.log_prefix or s.snapshot_prefix) if env.is_main else None
        self.metrics = AppendFile(f"{log_prefix}_metrics.jsonl") if log_prefix else None
        self.order = AppendFile(f"{log_prefix}_order.tsv", ORDER_HEADER) if log_prefix else None
        self._last_losses: list = []
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._epoch_loss_count = 0
        self.meter = WindowMeter()
        self._gpu_warned = False

    # -- counters -----------------------------------------------------------------------------------------------
    def epoch_fraction(self) -> float:
        size = self.num_samples
        return self.progress.epoch + (self.progress.samples_in_epoch / size if size else 0.0)

    def iterations_per_epoch(self, start: int = 0) -> int | None:
        batches = self.source.batches_left(start)
        return None if batches is None else math.ceil(batches / self.s.iter_size)

    @property
    def total_iters(self) -> int | None:
        if self.s.num_iters is not None:
            return self.s.num_iters
        p = self.progress
        if p.epoch >= self.s.num_epochs:
            return p.iteration
        now, whole = self.iterations_per_epoch(p.samples_in_epoch), self.iterations_per_epoch()
        if now is None or whole is None:
            return None  # a DataLoader without a length
        return p.iteration + now + (self.s.num_epochs - p.epoch - 1) * whole

    @property
    def last_loss(self):
        """Mean loss of the last iteration, detached (the loop keeps the raw losses: a detach each costs time)."""
        return torch.stack([x.detach() for x in self._last_losses]).mean() if self._last_losses else None

    def reduce_sum(self, *values) -> list[float]:
        """Sum float values (or 0-dim tensors) over ranks in one collective; plain floats back."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.comm_device) for v in values])
        if self.distributed:
            tdist.all_reduce(t)
        return t.tolist()

    def global_last_loss(self) -> float:
        loss = self.last_loss
        if loss is None:
            return float("nan")
        if not self.distributed:
            return loss.item()
        return self.reduce_sum(loss.detach().double())[0] / self.env.world_size

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
        try:
            self.resume()  # into the plain module, before DDP wraps it
            if self.distributed:
                self.ddp = DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    **(self.s.ddp_kwargs or {}))
                self.forward_model = self.ddp
            if self.s.compile:
                options = self.s.compile if isinstance(self.s.compile, dict) else {}
                self.forward_model = torch.compile(self.forward_model, **options)
            self.bare_micro_batches = self.ddp is None and self.precision.amp is None
            return self.train()
        finally:
            self.ddp, self.forward_model = None, self.model
            if self.sync_bn_originals:
                revert_sync_batchnorm(self.model, self.sync_bn_originals)

    def train(self):
        self.init_snapshot_schedule()
        world = f", {self.env.world_size} processes" if self.distributed else ""
        what = (f"{self.num_samples} samples, batch {self.s.batch_size}" if self.source.kind == "dataset" else
                f"your DataLoader ({self.num_samples} batches per epoch, batch {self.source.batch_size})")
        extras = "".join(f", {name}" for name, on in (
            (f"amp {self.s.amp}", self.s.amp), ("channels_last", self.s.channels_last),
            ("torch.compile", self.s.compile), ("LBFGS-style closure", self.closure)) if on)
        logger.info("training %s on %s%s: %s x iter_size %d, %d DataLoader workers, %s%s",
                    type(self.model).__name__, self.device, world, what, self.s.iter_size, self.num_workers,
                    f"{self.s.num_iters} iterations" if self.s.num_iters is not None else
                    f"{self.s.num_epochs} epochs ({self.iterations_per_epoch()} iterations each)", extras)
        self.t_start = time.perf_counter()
        self.start_iteration = self.progress.iteration
        self.meter.reset(self.t_start)
        self.optimizer.zero_grad(set_to_none=True)  # gradients left by the caller must not leak into step 1
        for hook in self.callbacks.on_train_start:
            hook(self.state)
        with self.preemption:  # DataLoader workers start inside: they inherit the flag-setting handlers
            try:
                while not self.done():
                    self.run_epoch()
            finally:
                self.source.close()
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
        p, source, meter, state = self.progress, self.source, self.meter, self.state
        for hook in self.callbacks.on_epoch_start:
            hook(state)
        loader_iter, remaining = source.begin_epoch(p.epoch, p.samples_in_epoch)
        batches = self.feed.feed(loader_iter) if loader_iter is not None else None
        consumed = 0
        # loop invariants, looked up once per epoch rather than once per step (the budget is ~20 us per step)
        iter_size, order, on_iteration_end = self.s.iter_size, self.order, self.callbacks.on_iteration_end
        step_scheduler = self.s.schedule_on_iter and self.scheduler is not None
        run_iteration = self.run_closure_iteration if self.closure else self.run_iteration
        position_after, samples_between = source.position_after, source.samples_between
        display_iter, preemption = self.s.display_iter, self.preemption
        # after_iteration has work every step only under torchrun (flags agreed on) or with snapshots (one due?)
        check_every_step = self.distributed or bool(self.snapshot_prefix)
        last_iteration = self.s.num_iters if self.s.num_iters is not None else math.inf  # by epochs: the loop ends
        while remaining is None or consumed < remaining:
            if remaining is None:  # a DataLoader without a length: look ahead to know the window
                window_batches = [b for _, b in zip(range(iter_size), batches)]
                window = len(window_batches)
                if window == 0:
                    break
                run_iteration(iter(window_batches), window)
            else:
                window = min(iter_size, remaining - consumed)
                run_iteration(batches, window)
            consumed += window
            begin = p.samples_in_epoch
            end = p.samples_in_epoch = position_after(consumed)
            p.iteration += 1
            meter.iterations += 1
            meter.samples += samples_between(begin, end)
            if order is not None:
                order.add(f"{p.iteration}\t{p.epoch}\t{begin}\t{end}\t{source.digest(begin, end)}")
            if step_scheduler:
                self.scheduler.step(self.global_last_loss()) if self.plateau else self.scheduler.step()
            for hook in on_iteration_end:
                hook(state)
            if consumed == remaining:
                self.end_epoch()
            if (check_every_step or p.iteration % display_iter == 0 or state.snapshot_requested
                    or preemption.received is not None):
                self.after_iteration()
            if state.stop_reason is not None or p.iteration >= last_iteration:
                return
        if remaining is None or remaining == 0:  # the loader ran dry, or we resumed exactly at an epoch's end
            self.end_epoch()

    def run_iteration(self, batches, window: int) -> None:
        """One optimizer step. Under DDP every micro-batch but the last runs forward *and* backward in no_sync():
        one gradient all-reduce per step (wrapping only backward still syncs, a common bug)."""
        model = self.forward_model
        clock = time.perf_counter
        losses = []
        waited = 0.0
        if self.bare_micro_batches:  # the common case, without the two context managers DDP and autocast need
            for _ in range(window):
                t0 = clock()
                batch = next(batches)
                waited += clock() - t0
                loss = extract_loss(call_model(model, batch))
                (loss / window if window > 1 else loss).backward()
                losses.append(loss)  # detached when read (last_loss); the meter copies it without its graph
        else:
            ddp, autocast, scaler = self.ddp, self.precision.context(), self.precision.scaler
            for m in range(window):
                t0 = clock()
                batch = next(batches)
                waited += clock() - t0
                with ddp.no_sync() if ddp is not None and m < window - 1 else NO_CONTEXT:
                    with autocast or NO_CONTEXT:
                        loss = extract_loss(call_model(model, batch))
                    scaled = loss / window if window > 1 else loss
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                losses.append(loss)
        self.meter.data_wait += waited
        self._last_losses = losses
        for hook in self.callbacks.on_after_backward:
            hook(self.state)
        self.optimizer_step()

    def optimizer_step(self) -> None:
        if self._skip_reason is not None:
            self._skip_reason = None
            self.meter.skipped += 1  # its loss stays out of the window's mean
            if self.precision.scaler is not None and self._unscaled:
                self.precision.scaler.update()  # unscale_ was called: the scaler must be told the step is over
        else:
            self.meter.add_losses(self._last_losses)
            if self.plateau and not self.s.schedule_on_iter:
                for loss in self._last_losses:
                    self._epoch_loss_sum += loss.detach()
                self._epoch_loss_count += len(self._last_losses)
            if self.precision.scaler is not None:
                self.precision.scaler.step(self.optimizer)
                self.precision.scaler.update()
            else:
                self.optimizer.step()
        self._unscaled = False
        self.optimizer.zero_grad(set_to_none=True)

    def run_closure_iteration(self, batches, window: int) -> None:
        """One step of an optimizer that re-evaluates the loss itself (LBFGS): ``optimizer.step(closure)``, the
        closure running forward and backward on the same batch. No accumulation (iter_size is 1)."""
        t0 = time.perf_counter()
        batch = next(batches)
        self.meter.data_wait += time.perf_counter() - t0
        first: list = []

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.context() or NO_CONTEXT:
                loss = extract_loss(call_model(self.forward_model, batch))
            loss.backward()
            if not first:
                first.append(loss.detach())
                self._last_losses = first
            for hook in self.callbacks.on_after_backward:
                hook(self.state)
            if self._skip_reason is not None:  # no gradient: the optimizer sees a flat point and stops
                self.optimizer.zero_grad(set_to_none=True)
            return loss

        self.optimizer.step(closure)
        if self._skip_reason is not None:
            self.optimizer_step()  # only counts the skip and clears it: the gradient was zero
            return
        self.meter.add_losses(first)
        if self.plateau and not self.s.schedule_on_iter:
            self._epoch_loss_sum += first[0]
            self._epoch_loss_count += 1
        self.optimizer.zero_grad(set_to_none=True)

    # -- levers for callbacks (through TrainState) ------------------------------------------------------------------
    def unscale_gradients(self) -> None:
        scaler = self.precision.scaler
        if scaler is not None and not self._unscaled and not self.closure:
            scaler.unscale_(self.optimizer)
            self._unscaled = True

    def skip_step(self, reason: str) -> None:
        self._skip_reason = reason

    def loss_is_finite(self) -> bool:
        """Whether the current iteration's loss is finite on every rank (a host sync; a collective under DDP)."""
        ok = torch.isfinite(torch.stack([x.detach() for x in self._last_losses])).all()
        if not self.distributed:
            return bool(ok)
        t = ok.to(self.comm_device, torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t)

    def log_value(self, name: str, value) -> None:
        self.meter.add_value(name, value if isinstance(value, torch.Tensor) else torch.tensor(float(value)))

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
            return
        total, count = self.reduce_sum(self._epoch_loss_sum, self._epoch_loss_count)
        if count:
            self.scheduler.step(total / count)
            self._epoch_loss_sum.zero_()
            self._epoch_loss_count = 0

    def agree_on_requests(self) -> tuple[bool, bool, bool]:
        """Stop, snapshot and preemption requests, combined over ranks so that all ranks act on them together."""
        st = self.state
        if not self.distributed:
            return st.stop_reason is not None, st.snapshot_requested, self.preemption.received is not None
        flags = (st.stop_reason is not None, st.snapshot_requested, self.preemption.received is not None)
        t = torch.tensor(flags, dtype=torch.int32, device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        stop, snap, preempt = (bool(x) for x in t.tolist())
        if stop and st.stop_reason is None:
            st.stop_reason = "requested on another rank"
        st.snapshot_requested = snap
        return stop, snap, preempt

    def after_iteration(self) -> None:
        if self.distributed:
            _, snapshot_requested, preempted = self.agree_on_requests()
        else:  # the same flags, without a collective
            snapshot_requested, preempted = self.state.snapshot_requested, self.preemption.received is not None
        if self.progress.iteration % self.s.display_iter == 0:
            self.display()
        if preempted:
            self.preempt()
        if self.snapshot_prefix and (self.snapshot_due() or snapshot_requested):
            self.write_snapshot()

    def preempt(self):
        """Snapshot (rank 0 writes, all wait), then leave with the preemption exit code on every rank."""
        name = self.preemption.signal_name or "a signal received on another rank"
        logger.warning("preemption: %s received; snapshot at iteration %d, then exit", name, self.progress.iteration)
        path = None
        if self.snapshot_prefix:
            path = self.write_snapshot()
        self.flush_files()
        raise Preempted(name, path)

    # -- reporting --------------------------------------------------------------------------------------------------
    def display(self) -> None:
        now = time.perf_counter()
        m, p = self.meter, self.progress
        window = max(now - m.started, 1e-9)
        total = m.total_loss()
        local = total if total is not None else 0.0
        names = sorted(m.values)  # the same callbacks, hence the same names, on every rank
        means = [(total / count).cpu() for total, count in (m.values[n] for n in names)]
        loss_sum, count, data_wait, *values = self.reduce_sum(local, m.loss_count, m.data_wait, *means)  # one sync
        loss = loss_sum / count if count else float("nan")
        data_wait /= self.env.world_size
        values = {n: v / self.env.world_size for n, v in zip(names, values)}
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        elapsed = now - self.t_start
        done_here = p.iteration - self.start_iteration
        total = self.total_iters
        eta = elapsed / done_here * (total - p.iteration) if done_here and total is not None else float("nan")
        row = {"iteration": p.iteration, "total": total, "epoch": round(self.epoch_fraction(), 4), "loss": loss,
               "lr": lrs, "samples_per_s": m.samples / window, "data_wait": data_wait / window,
               "elapsed_s": elapsed, "eta_s": eta, **values}
        line = (f"iter {p.iteration}/{total if total is not None else '?'} | epoch {row['epoch']:.2f} | "
                f"loss {loss:.4g} | lr {format_lrs(lrs)} | "
                + "".join(f"{n} {v:.4g} | " for n, v in values.items())
                + f"{row['samples_per_s']:.1f} samples/s | data {row['data_wait']:.0%} | "
                f"elapsed {format_duration(elapsed)} | eta {format_duration(eta)}")
        if m.skipped:
            row["skipped_steps"] = m.skipped
            line += f" | skipped {m.skipped} non-finite"
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
