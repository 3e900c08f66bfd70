"""The training loop behind :func:`~pixelz_dist.engine.train_model.train_model`, composed from parts.

Pseudocode of one run::

    place the model (device, SyncBN); resume every part from a snapshot (optional); wrap it (DDP, compile)
    while not done:
        source.begin_epoch()                                   # from its position: skipped batches are not loaded
        (a user's loader under torchrun: the ranks agree on the epoch's end, the first rank out of data ends it)
        for each window of iter_size micro-batches (shorter only at the epoch's end):
            for each micro-batch:  (loss(model(*batch)) / window).backward()    # no_sync() but for the last
            callbacks.on_after_backward; optimizer.step(); ema.update(model) if applied; optimizer.zero_grad()
            iteration += 1; source.advance(window); scheduler per iteration; warmup factor; callbacks.on_iteration_end
            at the epoch's end: source.end_epoch(); scheduler per epoch; callbacks.on_epoch_end
            requests settled (under torchrun: agreed over ranks, one iteration late, without blocking), with
                rank 0's news of a snapshot being written: on_snapshot once durable, or its error raised
            every display_iter: one log line + one metrics row (the only regular host sync)
            snapshot when due or requested (copied to host memory, written in the background);
            stop at num_iters / num_epochs / an agreed request
    final snapshot, written before returning; callbacks.on_train_end

Who owns what: the data position is the batch source's (``data/``), placement and wrapping
:class:`~pixelz_dist.distributed.model_wrapping.PreparedModel`'s, snapshots the
:class:`~pixelz_dist.checkpoint.checkpointer.Checkpointer`'s (over the parts listed in :meth:`Engine._parts`),
requests :class:`~pixelz_dist.engine.requests.Requests`', the log line the
:class:`~pixelz_dist.engine.report.Reporter`'s. The loop only moves batches and counts iterations.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader

from ..callbacks.base import CallbackList
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.hyperparameters import apply_changes, requested
from ..checkpoint.order_record import open_order_record
from ..checkpoint.parts import ModelState, OptimizerState, SchedulerState
from ..checkpoint.rng import RNGState
from ..checkpoint.schedule import SnapshotSchedule
from ..data.dataset_source import DatasetSource
from ..data.device_feed import DeviceFeed
from ..data.user_loader import UserLoaderSource
from ..distributed.env import collective_device, default_num_workers, is_initialized, read_env, sum_over_ranks
from ..distributed.model_wrapping import prepare_model
from ..distributed.preemption import Interrupted, Preempted, PreemptionFlag
from ..errors import DataError, PixelzError
from ..fileio import AppendFile
from .ema import EMA
from .ema import register as register_ema
from .ema import resume as resume_ema
from .model_call import call_model, extract_loss
from .precision import MixedPrecision
from .report import Reporter, describe_run
from .requests import Requests, agreement_group
from .scheduling import SchedulerStepper
from .settings import RunSettings
from .state import Progress, TrainState
from .train_mode import TRAINING, TrainMode
from .uneven import UnevenEpochs
from .warmup import Warmup

logger = logging.getLogger(__name__)

NO_CONTEXT = contextlib.nullcontext()


class Engine:
    """Owns one run: builds its parts from the settings, resumes them, runs the loop. Built by ``train_model``."""

    def __init__(self, model, optimizer, scheduler, dataset, settings: RunSettings, callbacks=()):
        self.s = s = settings
        self.model, self.optimizer, self.scheduler, self.dataset = model, optimizer, scheduler, dataset
        self.env = env = read_env()
        self.distributed = env.is_distributed
        self.train_mode = TrainMode(model)  # records the modes the model arrived in, before any wrapping
        # the average copies the user's module as it arrived: before SyncBatchNorm conversion (its classes stay the
        # user's) and before any wrapping; it is then put where the model trains
        self.ema = EMA(model, s.ema, s.ema_buffers, strict=s.strict_load) if s.ema is not None else None
        if self.distributed and not is_initialized():
            raise PixelzError(f"WORLD_SIZE={env.world_size} but no process group exists. HINT: call train_model "
                              "directly (it creates the group), or wrap your code in "
                              "pixelz_dist.distributed.env.process_group().")
        self.prepared = prepare_model(model, env, sync_bn=s.sync_bn, channels_last=s.channels_last,
                                      compile=s.compile, ddp_kwargs=s.ddp_kwargs, backend=s.backend)
        self.device = device = self.prepared.device
        if self.ema is not None:  # placed as prepare_model placed the model (it moves it only under torchrun)
            self.ema.to(device if self.distributed else None, s.channels_last)
        self.comm_device = collective_device(device)
        self.callbacks = CallbackList(callbacks)
        if isinstance(dataset, DataLoader):
            self.source = UserLoaderSource(dataset, env, restore_position=s.restore_dataloader, iter_size=s.iter_size)
            self.num_workers = dataset.num_workers
        else:
            plan = self.prepared.plan
            workers = default_num_workers(plan.local_processes) if s.num_workers is None else s.num_workers
            # a dataset (or a callback) that changes the data between epochs needs workers that see the change
            persistent = not callable(getattr(dataset, "set_epoch", None)) and not self.callbacks.changes_dataset
            self.source = DatasetSource(dataset, s, env, plan.pin_memory, workers, persistent)
            self.num_workers = workers
        self.feed = DeviceFeed(device, s.channels_last, ahead=s.prefetch and self.source.read_ahead)
        self.precision = MixedPrecision(s.amp, device)
        self.progress = Progress()
        self.warmup = Warmup(optimizer, s.warmup_iters or 0, s.warmup_factor)
        self.stepper = SchedulerStepper(scheduler, s.schedule_on_iter, device, self.comm_device, self.warmup,
                                        self.progress)
        self.preemption = PreemptionFlag()
        self._group, self._group_made_here = agreement_group() if self.distributed else (None, False)
        self.requests = Requests(self.preemption, self.distributed, self._group)
        # ranks whose loaders may differ in length agree on each epoch's end (our own sources are equal by design)
        self.uneven = (UnevenEpochs(env.world_size, self._group)
                       if self.distributed and not self.source.equal_lengths else None)
        self.state = TrainState(self)
        self.schedule = SnapshotSchedule(s.snapshot_interval, by_epochs=s.num_epochs is not None)
        self.log_prefix = s.log_prefix or s.snapshot_prefix  # where the records go (rank 0 writes them)
        log_prefix = self.log_prefix if env.is_main else None
        self.order = open_order_record(log_prefix) if log_prefix else None
        self.reporter = Reporter(AppendFile(f"{log_prefix}_metrics.jsonl") if log_prefix else None, env.world_size,
                                 self.comm_device, s.display_gpu, device)
        self._requested = requested(optimizer.param_groups)  # the call's hyper-parameters, before any resume
        self.checkpointer = Checkpointer(s.snapshot_prefix, self._parts(), env, keep_last=s.keep_last,
                                         meta={"optimizer": type(optimizer).__name__,
                                               "hyperparameters": self._requested},
                                         group=self._group, on_durable=self.snapshot_durable,
                                         protect=self.protected_snapshots if self._protectors() else None)
        self._last_losses: list = []
        self.bare_micro_batches = False  # no DDP, no autocast: the micro-batch loop runs without context managers

    def _parts(self) -> dict:
        """What a snapshot holds, in restore order: the random state last, after everything that might draw."""
        parts = {"model": ModelState(self.model, strict=self.s.strict_load)}
        if self.ema is not None:  # after the model: a snapshot without an EMA restarts it from the loaded weights
            parts["ema"] = self.ema
        return {**parts,
                "optimizer": OptimizerState(self.optimizer),
                "scheduler": SchedulerState(self.scheduler),
                "warmup": self.warmup,
                "progress": self.progress,
                "epoch_loss": self.stepper,
                "grad_scaler": self.precision,
                "data": self.source,
                "callbacks": self.callbacks,
                "rng": RNGState()}

    # -- counters -----------------------------------------------------------------------------------------------
    def iterations_per_epoch(self, start: int = 0) -> int | None:
        batches = self.source.batches_from(start)
        return None if batches is None else math.ceil(batches / self.s.iter_size)

    @property
    def total_iterations(self) -> int | None:
        if self.s.num_iters is not None:
            return self.s.num_iters
        iteration, source = self.progress.iteration, self.source
        if source.epoch >= self.s.num_epochs:
            return iteration
        now, whole = self.iterations_per_epoch(source.position), self.iterations_per_epoch()
        if now is None or whole is None:
            return None  # a DataLoader without a length
        return iteration + now + (self.s.num_epochs - source.epoch - 1) * whole

    @property
    def last_loss(self):
        """Mean loss of the last iteration, detached (the loop keeps the raw losses: a detach each costs time)."""
        return torch.stack([x.detach() for x in self._last_losses]).mean() if self._last_losses else None

    def global_last_loss(self) -> float:
        loss = self.last_loss
        if loss is None:
            return float("nan")
        if not self.distributed:
            return loss.item()
        return sum_over_ranks((loss.detach().double(),), self.comm_device)[0] / self.env.world_size

    def loss_is_finite(self) -> bool:
        """Whether the current iteration's loss is finite on every rank (a host sync; a collective under DDP)."""
        ok = torch.isfinite(torch.stack([x.detach() for x in self._last_losses])).all()
        if not self.distributed:
            return bool(ok)
        t = ok.to(self.comm_device, torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t)

    def done(self) -> bool:
        if self.requests.stopping:
            return True
        if self.s.num_iters is not None:
            return self.progress.iteration >= self.s.num_iters
        return self.source.epoch >= self.s.num_epochs

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self):
        try:
            self.checkpointer.claim(fresh=self.s.load_snapshot_path is None, overwrite=self.s.overwrite)
            self.resume()  # into the plain module, before DDP wraps it
            self.forward_model = self.prepared.wrap()
            self.train_mode.watch(self.forward_model)
            self.bare_micro_batches = self.prepared.ddp is None and self.precision.amp is None
            return self.train()
        finally:
            self.checkpointer.close()  # a snapshot still being written is finished first
            self.warmup.remove()  # a run stopped during its warmup leaves the optimizer with the scheduler's rates
            self.prepared.undo()
            self.train_mode.restore()
            # The last reference to the DDP wrapper: it (and its reducer, which holds the process group) must be freed
            # now, before the group is destroyed, not by the garbage collector at interpreter exit, where gloo's
            # teardown can abort the process ("terminate called without an active exception").
            self.forward_model = self.model
            if self._group_made_here:
                tdist.destroy_process_group(self._group)

    def resume(self) -> None:
        path, content = self.checkpointer.choose(self.s.load_snapshot_path, overwrite=self.s.overwrite)
        if path is None:
            return
        snap = self.checkpointer.load(path, content)
        resume_ema(self.ema, self.model, snap)
        self.stepper.remove_warmup()  # the call's hyper-parameters apply to the scheduler's rates, not warmed ones
        changes = apply_changes(self.optimizer, self.scheduler, self._requested,
                                snap.get("meta", {}).get("hyperparameters"))
        if changes:
            logger.warning("resuming with %s from this call (the run that wrote the snapshot had the former); the "
                           "optimizer's state and the schedule's position come from the snapshot", ", ".join(changes))
        if self.source.skipped_rest_of_epoch:  # the snapshot's epoch has ended: its scheduler step is due
            with warnings.catch_warnings():  # torch warns that no optimizer.step() ran yet in this process: expected
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.stepper.after_epoch()
        if self.order is not None:
            self.order.add(f"# resumed from {path} at iteration {self.progress.iteration}")
        if self.reporter.metrics is not None:  # the killed run's rows after it are no longer this run's (curves.py)
            self.reporter.metrics.add_json({"resumed_at": self.progress.iteration, "snapshot": path})
        source = self.source
        logger.info("resumed from %s: iteration %d, epoch %d, position %d of %s %s", path, self.progress.iteration,
                    source.epoch, source.position, source.epoch_size, source.unit)

    def train(self):
        s, source = self.s, self.source
        self.stepper.start()  # the warmup's rate for the next iteration (also after a resume)
        self.schedule.start(source.epoch_fraction())
        logger.info("training %s", describe_run(s, type(self.model).__name__, self.device, self.env.world_size,
                                                source, self.num_workers, self.iterations_per_epoch()))
        self.reporter.start(self.progress.iteration)
        self.optimizer.zero_grad(set_to_none=True)  # gradients left by the caller must not leak into step 1
        for hook in self.callbacks.on_train_start:
            hook(self.state)
        self.train_mode.ensure("train_model received the model with" if not self.progress.iteration
                               else f"resuming at iteration {self.progress.iteration + 1}, the model had")
        with self.preemption:  # DataLoader workers start inside (and ignore these signals: see the module)
            try:
                while not self.done():
                    self.run_epoch()
            except BaseException as error:
                died = source.worker_died(error)  # before close(): it reads the dead worker's exit status
                source.close(failed=True)  # no worker may outlive the error: a process with live workers never exits
                if died is not None:  # one line that names the worker, not torch's traceback through the model
                    raise died from None
                raise
            source.close()
        self.requests.finish()  # the last exchange in flight (under torchrun): every rank waits for it alike
        if self.reporter.meter.iterations:
            self.display()
        checkpointer = self.checkpointer
        if s.snapshot_prefix and (checkpointer.last_iteration != self.progress.iteration
                                  or not checkpointer.last_final):
            # the run's end is marked in its last snapshot (meta["final"]), which readers beside the run wait for;
            # one of this iteration written without the mark (a loader without a length ends its epoch only when it
            # runs dry; a preemption snapshot at the last iteration, resumed) is written again, atomically, with it
            self.write_snapshot(wait=True, final=True)
        elif s.snapshot_prefix:
            checkpointer.wait_durable()  # the last iteration's snapshot: durable before train_model returns
        self.flush_files()
        if self.requests.stopping:
            logger.info("stopped at iteration %d: %s", self.progress.iteration, self.requests.stop_reason)
        for hook in self.callbacks.on_train_end:
            hook(self.state)
        if self.ema is not None:
            register_ema(self.model, self.ema)  # ema_model(model) finds it; the return value stays the model
        return self.model

    def run_epoch(self) -> None:
        p, source, meter, requests = self.progress, self.source, self.reporter.meter, self.requests
        for hook in self.callbacks.on_epoch_start:
            hook(self.state)
        loader_iter, remaining = source.begin_epoch()
        uneven = self.uneven
        if uneven is not None:
            remaining = uneven.remaining(remaining)
            source.limit_epoch(remaining)
        batches = self.feed.feed(loader_iter) if loader_iter is not None else None
        consumed, started_at = 0, source.position
        # loop invariants, looked up once per epoch rather than once per step (the budget is ~20 us per step)
        iter_size, order, on_iteration_end = self.s.iter_size, self.order, self.callbacks.on_iteration_end
        state, stepper, step_per_iteration = self.state, self.stepper, self.stepper.per_iteration
        run_iteration = self.run_closure_iteration if self.s.closure else self.run_iteration
        advance, samples_between = source.advance, source.samples_between
        display_iter, preemption = self.s.display_iter, self.preemption
        modules, train_mode = self.train_mode.modules, self.train_mode
        # after_iteration has work every step only under torchrun (requests agreed on) or with snapshots (one due?)
        check_every_step = self.distributed or bool(self.s.snapshot_prefix)
        last_iteration = self.s.num_iters if self.s.num_iters is not None else math.inf  # by epochs: the loop ends
        while remaining is None or consumed < remaining:
            if not all(map(TRAINING, modules)):  # ~5 us for a ResNet-50; model.train() would cost 850 us
                train_mode.ensure(f"before iteration {p.iteration + 1}, the model had")
            if remaining is None:  # a DataLoader without a length: look ahead to know the window
                window_batches = [b for _, b in zip(range(iter_size), batches)]
                window = len(window_batches)
                if uneven is not None:  # the shortest any rank read: a rank out of data ends the epoch for all
                    window = uneven.window(window, iter_size)
                if window == 0:
                    break
                run_iteration(iter(window_batches), window)
                ended = window < iter_size  # a short window: the (first) loader ran dry
            else:
                window = min(iter_size, remaining - consumed)
                run_iteration(batches, window)
                ended = consumed + window == remaining
            consumed += window
            begin, end = advance(window)
            p.iteration += 1
            meter.iterations += 1
            meter.samples += samples_between(begin, end)
            if order is not None:
                order.add(f"{p.iteration}\t{source.epoch}\t{begin}\t{end}\t{source.digest(begin, end)}")
            if step_per_iteration:
                stepper.after_iteration(self.global_last_loss)
            for hook in on_iteration_end:
                hook(state)
            if ended:
                self.end_epoch()
            if (check_every_step or p.iteration % display_iter == 0 or requests.snapshot
                    or preemption.received is not None):
                self.after_iteration()
            if ended or requests.stopping or p.iteration >= last_iteration:
                return
        if remaining is None or remaining == 0:  # the loader ran dry, or we resumed exactly at an epoch's end
            if consumed == started_at == 0:  # else every epoch would end at once, and num_iters never be reached
                raise DataError(f"the DataLoader yielded no batch in epoch {source.epoch}"
                                f"{' on at least one process' if self.uneven is not None else ''}: there is "
                                "nothing to train on. HINT: check the dataset (under torchrun: that every "
                                "process's shard holds samples).")
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
            ddp, autocast, scaler = self.prepared.ddp, self.precision.context(), self.precision.scaler
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
        self.reporter.meter.data_wait += waited
        self._last_losses = losses
        for hook in self.callbacks.on_after_backward:
            hook(self.state)
        self.optimizer_step()

    def optimizer_step(self) -> None:
        if self.requests.skip_reason is not None:
            self.requests.skip_reason = None
            self.reporter.meter.skipped += 1  # its loss stays out of the window's mean
            self.precision.skip_step()
        else:
            self.reporter.meter.add_losses(self._last_losses)
            if self.stepper.collects_losses:
                self.stepper.add_losses(self._last_losses)
            if self.ema is None:
                self.precision.step(self.optimizer)
            elif self.precision.step(self.optimizer, report_skip=True):  # fp16 may drop the step: then no update
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)

    def run_closure_iteration(self, batches, window: int) -> None:
        """One step of an optimizer that re-evaluates the loss itself (LBFGS): ``optimizer.step(closure)``, the
        closure running forward and backward on the same batch. No accumulation (iter_size is 1)."""
        t0 = time.perf_counter()
        batch = next(batches)
        self.reporter.meter.data_wait += time.perf_counter() - t0
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
            if self.requests.skip_reason is not None:  # no gradient: the optimizer sees a flat point and stops
                self.optimizer.zero_grad(set_to_none=True)
            return loss

        self.optimizer.step(closure)
        if self.requests.skip_reason is not None:
            self.optimizer_step()  # only counts the skip and clears it: the gradient was zero
            return
        self.reporter.meter.add_losses(first)
        if self.stepper.collects_losses:
            self.stepper.add_losses(first)
        if self.ema is not None:
            self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)

    def end_epoch(self) -> None:
        if self.uneven is not None:
            self.uneven.epoch_ended(self.source.epoch, self.source.position)
        self.source.end_epoch()
        self.stepper.after_epoch()
        for hook in self.callbacks.on_epoch_end:
            hook(self.state)

    def after_iteration(self) -> None:
        checkpointer = self.checkpointer
        if self.s.snapshot_prefix:
            self.requests.snapshot_news = checkpointer.status()
        snapshot_requested, preempted = self.requests.settle()
        if self.s.snapshot_prefix:
            checkpointer.agreed(*self.requests.agreed_snapshot_news)  # a background write's end, on every rank
        iteration = self.progress.iteration
        if iteration % self.s.display_iter == 0:
            self.display()
        if preempted:
            self.preempt()
        if self.s.snapshot_prefix and (self.schedule.due(iteration, self.source.epoch_fraction())
                                       or snapshot_requested):
            # done() is already what ends the loop after this iteration (the epoch's end and the agreed requests are
            # in): a snapshot due now is then the final one, and is not written twice
            self.write_snapshot(wait=not self.s.snapshot_async, final=self.done())

    def write_snapshot(self, wait: bool, final: bool = False) -> str:
        """Snapshot this iteration; ``wait``: return once it is durable, else write it in the background (its
        ``on_snapshot`` hooks run at the iteration every rank learns that it is durable). ``final``: it ends the
        completed run (``meta["final"]``)."""
        if self.env.is_main:
            self.flush_files()  # the records up to this snapshot are durable before the snapshot exists
        return self.checkpointer.save(self.progress.iteration, wait=wait, final=final)

    def snapshot_durable(self, path: str) -> None:
        for hook in self.callbacks.on_snapshot:
            hook(self.state, path)

    def _protectors(self) -> list:
        return [cb for cb in self.callbacks.callbacks if callable(getattr(cb, "protected_snapshots", None))]

    def protected_snapshots(self) -> set[str]:
        """Snapshots that ``keep_last`` must spare: those the callbacks name (the best ones, see keep_best)."""
        return {path for cb in self._protectors() for path in cb.protected_snapshots()}

    def preempt(self):
        """Snapshot (rank 0 writes, all wait), then leave on every rank: with the preemption exit code, or as a
        KeyboardInterrupt after a Ctrl-C."""
        self.requests.finish()  # every rank has one exchange in flight (under torchrun): settle it alike
        interrupted = self.preemption.interrupted
        name = self.preemption.signal_name or "a signal received on another rank"
        if interrupted:
            logger.warning("interrupted (Ctrl-C): snapshot at iteration %d, then exit (press Ctrl-C again to stop "
                           "at once)", self.progress.iteration)
        else:
            logger.warning("preemption: %s received; snapshot at iteration %d, then exit", name,
                           self.progress.iteration)
        path = self.write_snapshot(wait=True) if self.s.snapshot_prefix else None
        self.flush_files()
        raise Interrupted(path) if interrupted else Preempted(name, path)

    # -- reporting --------------------------------------------------------------------------------------------------
    def display(self) -> None:
        self.reporter.report(self.progress.iteration, self.total_iterations, self.source.epoch_fraction(),
                             self.optimizer)
        self.flush_files()

    def report_validation(self, values: dict, seconds: float | None = None) -> None:
        """A validation's values at this iteration: log line and metrics row now, then the on_validation hooks."""
        self.reporter.report_point(self.progress.iteration, self.source.epoch_fraction(), values, seconds)
        self.flush_files()
        for hook in self.callbacks.on_validation:
            hook(self.state, values)

    def flush_files(self) -> None:
        if self.reporter.metrics is not None:
            self.reporter.metrics.flush()
        if self.order is not None:
            self.order.flush()
