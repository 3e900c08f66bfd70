"""``train_model``: the public verb. Checks its arguments, then hands the run to
:class:`~pixelz_dist.engine.loop.Engine`."""

from __future__ import annotations

import inspect
import logging

import torch
from torch.utils.data import DataLoader

from ..callbacks.builtin import GradientClipping, NonFiniteGuard, StopOnLoss, TimeBudget
from ..checkpoint.best import KeepBest
from ..distributed.env import process_group, read_env
from ..distributed.log_relay import rank_logging
from ..errors import ConfigError, DataError
from ..log import ensure_handler
from .determinism import deterministic_mode
from .loop import Engine
from .settings import RunSettings, apply_legacy_names, check_settings, setting_names

logger = logging.getLogger(__name__)

#: The warning of a run without ``snapshot_prefix``; its record carries ``saves_nothing=True`` (the finder, whose
#: short runs save nothing on purpose, drops it).
SAVES_NOTHING = ("no snapshot_prefix (--snapshot-prefix): this run saves nothing, no snapshot, not even a final "
                 "one, so it cannot be resumed. HINT: pass --snapshot-prefix DIR/NAME (train_model(snapshot_prefix="
                 "'DIR/NAME'))")


def train_model(model, optimizer, scheduler, dataset, batch_size, shuffle=False, snapshot_prefix=None, num_iters=None,
                num_epochs=None, iter_size=1, display_iter=20, snapshot_interval=None, load_snapshot_path=None,
                restore_dataloader=True, display_gpu=False, schedule_on_iter=False, *, seed=0, num_workers=None,
                keep_last=None, callbacks=(), strict_load=True, drop_last=False, seed_data=None, log_prefix=None,
                keep_best=None, monitor="val_loss", monitor_mode=None,
                collate_fn=None, sync_bn=True, backend=None, dist_timeout=None, ddp_kwargs=None, clip_grad_norm=None,
                clip_grad_value=None, stop_loss_below=None, stop_patience=None, stop_min_delta=0.0, time_budget=None,
                on_nonfinite=None, amp=None, channels_last=False, compile=False, closure=None, prefetch=True,
                overwrite=False, allow_changed_data=False, deterministic=False, snapshot_async=True, ema=None,
                ema_buffers="average", warmup_iters=None, warmup_factor=0.001, **legacy_kwargs):
    """Train ``model`` (whose forward returns its loss) on ``dataset``; resumable to the bit.

    An *iteration* is one optimizer step made of ``iter_size`` micro-batches of ``batch_size`` samples (Caffe
    semantics); ``num_iters``, ``display_iter``, ``snapshot_interval`` (when training by iterations) and the number in
    snapshot names count iterations. Each micro-batch loss is divided by the number of micro-batches in its window:
    ``iter_size``, or fewer for the short last window of an epoch (10 batches with ``iter_size=4`` make windows of
    4, 4 and 2; the last two losses are halved, not quartered). Windows never span two epochs.

    Loop (see :mod:`pixelz_dist.engine.loop` for the full pseudocode)::

        for each window: for each micro-batch: (loss(model(*batch)) / window).backward()
                         optimizer.step(); optimizer.zero_grad(); scheduler / callbacks / log / snapshot

    Args:
        model: an ``nn.Module`` whose forward takes a batch (``model(*batch)`` for a tuple or list, ``model(**batch)``
            for a dict, ``model(batch)`` otherwise) and returns the loss: a scalar tensor, or a dict / object with a
            ``loss`` entry. A tensor with several elements is reduced by its mean. Batches are moved to the model's
            device.
        optimizer: any ``torch.optim.Optimizer`` (see :func:`make_param_groups` for per-parameter learning rates).
        scheduler: an LR scheduler or None; stepped once per epoch, or per iteration with ``schedule_on_iter``.
            ``ReduceLROnPlateau`` is stepped with the mean training loss of that epoch / iteration.
        dataset: a map-style dataset (``__len__`` and ``__getitem__``), or a ``DataLoader`` you built (then you own
            sampling: ``batch_size`` must be None or the loader's, and shuffle / num_workers / collate_fn /
            drop_last / seed_data stay at their defaults; see docs/how-to/own-dataloader.md for what resumes
            exactly). Under torchrun its processes may yield different numbers of batches: each epoch ends on all
            of them when the first runs out (one log line says how many each had left).
        batch_size: samples per micro-batch.
        shuffle: a new permutation each epoch, a pure function of (seed, epoch).
        snapshot_prefix: snapshots are written to ``{snapshot_prefix}_iter_{N}.pt``; metrics to
            ``{snapshot_prefix}_metrics.jsonl`` and the per-iteration sample-order record to
            ``{snapshot_prefix}_order.tsv``. A final snapshot is always written when set. None: nothing is saved
            (no snapshot, not even a final one: the run cannot be resumed), and a warning says so at the start.
        num_iters / num_epochs: exactly one, the length of training.
        iter_size: micro-batches per optimizer step (gradient accumulation).
        display_iter: iterations between log lines.
        snapshot_interval: in epochs (a float, 0.5 = twice per epoch) when training by epochs, in iterations when
            training by ``num_iters``.
        load_snapshot_path: a snapshot file, or ``"auto"`` for the newest valid snapshot of ``snapshot_prefix``
            (no snapshot there: start fresh; damaged ones are skipped with a warning for an older one; snapshots of
            which none loads, or one that cannot be read, stop the run with a SnapshotError, see ``overwrite``).
        restore_dataloader: resume at the exact sample the snapshot was taken at; False starts the next epoch from
            its beginning (the seed tool's behaviour). A DataLoader you built keeps its place per process: a snapshot
            of it taken mid-epoch resumes with as many processes as wrote it, or with False.
        display_gpu: add allocated / reserved / peak GPU memory to the log line.
        schedule_on_iter: step the scheduler every iteration instead of every epoch.
        seed: seeds the data order and the per-batch augmentation RNGs (not the model's weights: seed torch before
            building it; the command line's ``--seed`` does both).
        num_workers: DataLoader workers; None = ``min(max(cpus // gpus_per_node, 1), 6)`` with the CPUs this process
            may use.
        keep_last: keep only the K newest snapshots (an older one is removed only once its successor is durable, so
            ``"auto"`` always finds one; the final snapshot is the newest; ``keep_best``'s are kept besides). None
            (the default here; the command line's ``--keep-last`` is 3): every snapshot is kept.
        keep_best: keep the K best snapshots by ``monitor`` too (never removed by ``keep_last``), and
            ``{snapshot_prefix}_best.pt``, a hard link to (or copy of) the best so far, replaced atomically once the
            snapshot is durable. Each validation whose value would enter the top K asks for a snapshot of its
            iteration. Needs a :class:`~pixelz_dist.callbacks.Validation` in ``callbacks`` (``--val-data``).
        monitor: the validation value that ranks snapshots (``"val_loss"``, ``"val_miou"``, ...): one of the keys a
            ``Validation`` reports.
        monitor_mode: ``"min"`` or ``"max"``; None: ``"min"`` for a key containing ``loss``, else required.
        snapshot_async: write periodic snapshots in the background: the state is copied into host memory kept for
            it (pinned on CUDA; about the size of the model and optimizer state, on rank 0), and training goes on
            while it is written. The final, preemption and time-budget snapshots are always written before the run
            ends. False: every snapshot holds up training until it is durable.
        callbacks: :class:`~pixelz_dist.callbacks.Callback` objects (events, stop / snapshot requests, saved state).
        strict_load: refuse a snapshot whose model keys differ from the model's (shape mismatches are always refused).
        drop_last: drop a short last batch of each epoch.
        seed_data: seed the global RNGs per batch before the dataset runs (None: yes, unless the dataset is a plain
            ``TensorDataset``, which draws no random numbers).
        log_prefix: where metrics and order records go when it should not be ``snapshot_prefix``.
        collate_fn: passed to the DataLoader.
        sync_bn: under torchrun with GPUs, convert BatchNorm layers to SyncBatchNorm (converted back at the end).
        backend: process-group backend under torchrun (default: nccl with CUDA, else gloo).
        dist_timeout: seconds before a collective waiting on a hung peer fails (default 600, or
            ``PIXELZ_DIST_TIMEOUT``).
        ddp_kwargs: extra arguments for ``DistributedDataParallel`` (e.g. ``find_unused_parameters=True``).
        clip_grad_norm / clip_grad_value: clip the iteration's gradients (after accumulation, DDP's all-reduce and
            fp16 unscaling) by total norm / element value before the step; the pre-clip norm is logged as grad_norm.
        stop_loss_below: stop once the smoothed training loss is below this.
        stop_patience / stop_min_delta: stop after ``stop_patience`` iterations without the smoothed training loss
            improving by ``stop_min_delta``.
        time_budget: seconds; stop with a final snapshot before they are spent (counted from this call).
        on_nonfinite: None (no check, no sync), ``"raise"`` (error naming the iteration and the last good snapshot)
            or ``"skip"`` (drop the step, count it in the log) on a NaN / infinite loss.
        amp: None, ``"bf16"`` or ``"fp16"`` (autocast around forward; fp16 with a GradScaler saved in snapshots).
        channels_last: convert the model and 4-D float inputs to channels_last (faster convolutions on GPUs).
        compile: ``torch.compile`` what the loop calls (True, or a dict of torch.compile arguments); snapshots and the
            return value are still the plain module.
        closure: the optimizer needs ``step(closure)`` (None: detected for ``torch.optim.LBFGS``); needs iter_size=1.
        prefetch: on CUDA, copy the next batch to the GPU on a side stream during the current step.
        overwrite: a run that does not resume refuses a ``snapshot_prefix`` that holds another run's snapshots;
            True sets those aside (renamed ``NAME.old-<time>``, not deleted) and starts afresh; with
            ``load_snapshot_path="auto"`` it does the same when the prefix holds snapshots of which none loads.
        allow_changed_data: resume in the middle of an epoch although the dataset changed since the snapshot (files
            added, removed or renamed): the epoch goes on at the same position of the new list. Without it such a
            resume is refused (a changed dataset at an epoch boundary only logs a warning).
        deterministic: deterministic algorithms for the run (``torch.use_deterministic_algorithms``, cuDNN
            deterministic without benchmark, ``CUBLAS_WORKSPACE_CONFIG``), the process's previous settings restored
            after: what makes a GPU run and its resume bit-identical. An op without a deterministic implementation
            then raises ``NondeterministicOp`` naming it. Not needed on the CPU.
        ema: keep an exponential moving average of the weights with this decay (in (0, 1), e.g. 0.999), updated
            after every applied optimizer step (a skipped one leaves it), saved in snapshots under ``"ema"`` and
            resumed exactly. ``TrainState.ema_model`` during training; after it,
            ``pixelz_dist.engine.ema.ema_model(model)`` on the returned model. See :mod:`pixelz_dist.engine.ema`.
        ema_buffers: ``"average"``: floating-point buffers (BatchNorm statistics) are averaged like the weights;
            ``"copy"``: the EMA uses the live model's buffers.
        warmup_iters: the first N iterations run at a rate rising linearly from ``warmup_factor`` times the
            scheduler's (or the optimizer's) rate to the full rate, whatever the scheduler's unit; exact on resume.
        warmup_factor: the first warmup iteration's fraction of the rate, in (0, 1].

    Every step runs in train mode, whatever the model arrived in or a callback did between steps (a validation pass
    that calls ``model.eval()``): the loop calls ``model.train()`` when any module is found in eval mode, with one
    warning. To keep layers frozen (eval-mode BatchNorm of a pretrained backbone), override the model's ``train()``
    method so that it keeps them in eval mode.

    Returns:
        The trained model, each of its modules in the mode (train / eval) it arrived in.

    Raises:
        ConfigError: invalid arguments (all listed at once); an optimizer that holds none of the model's
            parameters; a snapshot prefix that cannot be written, is another live run's, or holds an old run's
            snapshots (see ``overwrite``). DataError: an empty dataset, or a sample that cannot be loaded.
        SnapshotError: a snapshot that cannot be loaded, does not fit, or cannot be written; ``"auto"`` over
            snapshots of which none loads; a resume mid-epoch onto a changed dataset (see ``allow_changed_data``).
        NondeterministicOp: with ``deterministic=True``, an op that has no deterministic implementation.
        Preempted: SIGTERM / SIGUSR1 / SIGUSR2 arrived; a snapshot was written (exit code 75 when uncaught).
        Interrupted: Ctrl-C arrived; a snapshot was written (a KeyboardInterrupt).

    Example:
        >>> model = train_model(model, optimizer, scheduler, dataset, batch_size=6, num_epochs=5, iter_size=2,
        ...                     snapshot_interval=0.5, snapshot_prefix="runs/exp6/snapshot",
        ...                     load_snapshot_path="auto")  # doctest: +SKIP
    """
    values = {name: value for name, value in locals().items() if name in setting_names()}
    given = apply_legacy_names("train_model", {k: values[k] for k in ("snapshot_prefix", "snapshot_interval")},
                               legacy_kwargs, list(inspect.signature(train_model).parameters)[:-1])
    values.update(given)
    if isinstance(dataset, DataLoader):
        values["batch_size"] = check_user_loader(dataset, batch_size, shuffle=shuffle, num_workers=num_workers,
                                                 collate_fn=collate_fn, drop_last=drop_last, seed_data=seed_data)
    elif not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigError(f"dataset must be a map-style dataset (with __len__ and __getitem__) or a DataLoader, got "
                          f"{type(dataset).__name__}. HINT: wrap an iterable dataset in a DataLoader.")
    elif len(dataset) == 0:
        raise DataError(f"the dataset ({type(dataset).__name__}) is empty: nothing to train on. HINT: check the "
                        "folders or the filter that built it.")
    values["closure"] = isinstance(optimizer, torch.optim.LBFGS) if closure is None else bool(closure)
    settings: RunSettings = check_settings(values)
    callbacks = list(callbacks or ())
    check_monitor(settings, callbacks)
    check_optimizer_holds(model, optimizer)
    ensure_handler()
    if settings.snapshot_prefix is None and read_env().is_main:
        logger.warning(SAVES_NOTHING, extra={"saves_nothing": True})
    with process_group(backend=backend, timeout_s=dist_timeout) as env, \
            rank_logging(env.rank, env.world_size) as flush_points, deterministic_mode(settings.deterministic):
        # the relay's flush points go last: they print what the callbacks before them logged (and shift no
        # callback's index, which names its state in snapshots)
        callbacks = builtin_callbacks(settings) + list(callbacks or ()) + flush_points
        return Engine(model, optimizer, scheduler, dataset, settings, callbacks).run()


def builtin_callbacks(s) -> list:
    """What the keyword arguments ask for, in the order they must run before the step: the guard, then clipping."""
    cbs = []
    if s.on_nonfinite is not None:
        cbs.append(NonFiniteGuard(s.on_nonfinite))
    if s.clip_grad_norm is not None or s.clip_grad_value is not None:
        cbs.append(GradientClipping(max_norm=s.clip_grad_norm, max_value=s.clip_grad_value))
    if s.stop_loss_below is not None or s.stop_patience is not None:
        cbs.append(StopOnLoss(threshold=s.stop_loss_below, patience=s.stop_patience, min_delta=s.stop_min_delta))
    if s.time_budget is not None:
        cbs.append(TimeBudget(s.time_budget))
    if s.keep_best is not None:
        cbs.append(KeepBest(s.keep_best, s.monitor, s.monitor_mode))
    return cbs


def check_monitor(s, callbacks) -> None:
    """keep_best ranks snapshots by a value that a validation in ``callbacks`` must report."""
    if s.keep_best is None:
        return
    reported = [key for cb in callbacks for key in getattr(cb, "validation_keys", ())]
    if not reported:
        raise ConfigError(f"keep_best={s.keep_best} ranks snapshots by {s.monitor!r}, a validation value, but no "
                          "validation runs. HINT: pass callbacks=[Validation(val_dataset, ...)] (on the command line "
                          "--val-data DIR ...).")
    if s.monitor not in reported:
        raise ConfigError(f"monitor={s.monitor!r} is not a value the validation reports ({', '.join(reported)}). "
                          "HINT: pass one of those as monitor (--monitor), or add the metric to the Validation.")


def check_optimizer_holds(model, optimizer) -> None:
    """The optimizer must step the model's own parameters (a re-created or copied model has new ones)."""
    own = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in own for p in held)
    if held and foreign == len(held):
        raise ConfigError(f"the optimizer holds none of the model's parameters ({len(held)} parameter(s) in its "
                          f"groups, {len(own)} in {type(model).__name__}): training would change nothing. HINT: "
                          "build the optimizer from this model (model.parameters() or make_param_groups(model, ...)) "
                          "after creating it; a copied or re-created model has new parameter objects.")
    if foreign:
        logger.warning("%d of the optimizer's %d parameters are not %s's: they will not be trained", foreign,
                       len(held), type(model).__name__)


def check_user_loader(loader: DataLoader, batch_size, **defaults_only) -> int:
    """A DataLoader decides its own sampling: the arguments that would do it here must be left alone."""
    expected = {"shuffle": False, "num_workers": None, "collate_fn": None, "drop_last": False, "seed_data": None}
    clashing = [f"{k}={v!r}" for k, v in defaults_only.items() if v != expected[k]]
    size = loader.batch_size
    if batch_size is not None and batch_size != size:
        clashing.append(f"batch_size={batch_size!r} (the DataLoader's is {size!r})")
    if clashing:
        raise ConfigError(f"dataset is a DataLoader, which already decides its sampling, batching and workers, but "
                          f"train_model also got {', '.join(clashing)}. HINT: set these on the DataLoader and pass "
                          "batch_size=None.")
    return size or 1
