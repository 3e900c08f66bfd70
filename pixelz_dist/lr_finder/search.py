"""The learning-rate finder: ``find_lr``, built on :func:`~pixelz_dist.engine.train_model.train_model` and a
callback.

Nothing here iterates over data. Every measurement is an ordinary ``train_model`` run, so accumulation
(``iter_size``), param groups, the data order and position, snapshots and DDP behave exactly as in training; a
callback sets the learning rates before each ``optimizer.step`` and records the loss averaged over ranks.

Two methods::

    runs  (the seed's):  for lr in geomspace(min_lr, max_lr, num_runs):
                             restore model, optimizer, RNGs (and the snapshot, with its data position)
                             train_model(num_iters=iter_per_run) at that fixed lr; record every loss
                             stop when a run diverges (the larger rates are skipped)
    sweep (Smith's):     restore once; train_model(num_iters) with lr rising exponentially every step;
                         record every loss; stop when the smoothed loss diverges

The suggestion is the rate where the smoothed loss falls fastest (steepest negative slope against log(lr)) at or
before the smoothed loss's minimum: see :func:`~pixelz_dist.lr_finder.curve.suggest_lr`.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
import time

import numpy as np
import torch

from .._version import __version__
from ..callbacks.progress_bar import TerminalBar
from ..callbacks.smoothing import SmoothedValue
from ..checkpoint.file_format import load_snapshot
from ..distributed.env import process_group
from ..engine.train_model import train_model
from ..errors import ConfigError
from ..log import ensure_handler, filtering
from .control import RateControl, StartingPoint, group_scales
from .curve import smooth_losses, suggest_lr
from .result import LRFinderResult

__all__ = ["find_lr"]

logger = logging.getLogger(__name__)

METHODS = ("runs", "sweep")
#: the modules whose INFO lines repeat for every inner run (start, resume, end)
_INNER_RUN_MODULES = ("pixelz_dist.engine", "pixelz_dist.checkpoint", "pixelz_dist.distributed",
                      "pixelz_dist.data")
_RESERVED = {"num_iters", "num_epochs", "display_iter", "callbacks", "snapshot_prefix", "snapshot_interval",
             "load_snapshot_path", "restore_dataloader", "scheduler", "schedule_on_iter", "log_prefix", "keep_last"}


class _QuietInnerRuns(logging.Filter):
    """Drops the INFO lines each inner ``train_model`` run logs (start, end, resume) and repeats of its warnings;
    the finder logs one line per run instead."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "saves_nothing", False):
            return False  # the finder's runs write no snapshot on purpose: no "this run saves nothing" warning
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _Progress:
    """A tqdm bar on a terminal when tqdm is installed; otherwise (and in log files) one log line per step."""

    def __init__(self, total: int, unit: str, show: bool, bar: bool | None):
        self.show, self.bar = show, None
        if show and (bar or (bar is None and sys.stderr.isatty())):
            try:
                self.bar = TerminalBar(total, unit=unit, desc="lr finder", leave=False)
            except ImportError:  # no tqdm: log lines
                self.bar = None

    def step(self, message: str, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.update(postfix)
            logger.debug(message)
        elif self.show:
            logger.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def find_lr(model, optimizer, dataset, batch_size, shuffle=False, iter_size=1, load_snapshot_path=None,
            restore_dataloader=True, min_lr=1e-10, max_lr=1, iter_per_run=50, num_runs=30, result_file="results.npz",
            *, method="runs", num_iters=100, divergence_factor=4.0, stop_on_divergence=True, smoothing=None,
            seed=0, num_workers=None, callbacks=(), progress_bar=None, train_kwargs=None):
    """Find a good learning rate by training briefly at many rates; return ``model``, unchanged, with the result.

    ``method="runs"`` (the seed tool's): ``num_runs`` rates spaced exponentially from ``min_lr`` to ``max_lr``
    inclusive; each run starts from the same model, optimizer, RNG state and data position (those of the snapshot
    ``load_snapshot_path`` when given) and trains ``iter_per_run`` iterations at its fixed rate.
    ``method="sweep"`` (Smith's range test): one run of ``num_iters`` iterations whose rate rises exponentially from
    ``min_lr`` to ``max_lr``; about ``num_runs`` times cheaper than ``runs`` with ``num_iters = iter_per_run``.

    Param groups keep their ratios: the rates are those of the first group with a non-zero lr, and every other
    group's lr is scaled with it (so the optimizer's lr need no longer equal ``min_lr``; a warning says when this
    differs from the old tool's rule). Divergence: a loss that is NaN / inf, or above ``divergence_factor`` times
    the run's first loss (the same for every rate: it is measured before the first step), ends that run; a run whose
    final loss (the mean of its last 20 % of iterations) exceeds ``divergence_factor`` times the lowest final loss so
    far also counts as diverged. With ``stop_on_divergence`` the larger rates are then skipped (sweep: the
    sweep stops once the smoothed loss exceeds ``divergence_factor`` times its lowest value).

    Under torchrun every rank trains its shard and calls this function; losses are averaged over ranks before they
    are recorded, and only rank 0 logs per-run lines and writes files.

    Args:
        model, optimizer, dataset, batch_size, shuffle, iter_size, load_snapshot_path, restore_dataloader: as for
            :func:`train_model` (a snapshot file path; ``"auto"`` needs a prefix, which the finder does not take).
        min_lr, max_lr: the range of rates, ``0 < min_lr < max_lr``.
        iter_per_run, num_runs: the ``runs`` method's grid (``iter_per_run >= 2``: the first loss of every run is
            measured before its first step, so it is the same for all rates).
        result_file: ``.npz`` written by rank 0 (plus a ``.json`` sidecar); None writes nothing.
        method: ``"runs"`` or ``"sweep"``.
        num_iters: the sweep's length.
        divergence_factor: see above (> 1).
        stop_on_divergence: skip the larger rates after a divergence.
        smoothing: the sweep's EMA factor beta in [0, 1); None chooses ``1 - 10 / num_iters`` clipped to
            [0.5, 0.98], about a tenth of the sweep.
        seed, num_workers, callbacks: passed to every ``train_model`` run (callbacks see every run; their state is
            not reset between runs).
        progress_bar: True / False to force a tqdm bar on or off; None: on a terminal, when tqdm is installed.
        train_kwargs: further ``train_model`` keywords (``drop_last``, ``collate_fn``, ``sync_bn``, ...).

    Returns:
        ``model`` itself, with its parameters, buffers, gradients, train/eval mode, the optimizer's state and lrs and
        the global RNGs exactly as before the call (like the seed's ``model = find_lr(...)``), and the
        :class:`LRFinderResult` attached as ``model.lr_finder_result``.

    Raises:
        ConfigError: invalid arguments (all listed at once). Errors of ``train_model`` pass through; the model and
            optimizer are restored first.

    Example:
        >>> optimizer = torch.optim.SGD(make_param_groups(model, custom_lr), lr=1e-6)  # doctest: +SKIP
        >>> model = find_lr(model, optimizer, train_dataset, batch_size=6, num_runs=15, min_lr=1e-6, max_lr=1e-1,
        ...                 iter_size=3)  # doctest: +SKIP
        >>> model.lr_finder_result.suggestion  # doctest: +SKIP
        0.0031622776601683794
    """
    train_kwargs = dict(train_kwargs or {})
    _check_args(method, min_lr, max_lr, iter_per_run, num_runs, num_iters, divergence_factor, smoothing,
                load_snapshot_path, train_kwargs)
    beta = None
    if method == "sweep":
        beta = smoothing if smoothing is not None else min(0.98, max(0.5, 1.0 - 10.0 / num_iters))
    names = [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]
    with process_group() as env:
        ensure_handler()
        start_iteration, base_lrs = 0, [float(g["lr"]) for g in optimizer.param_groups]
        if load_snapshot_path is not None:
            snap = load_snapshot(str(load_snapshot_path))  # once, for the start iteration and the lrs it will load
            start_iteration = int(snap["progress"]["iteration"])
            base_lrs = [float(g["lr"]) for g in snap["optimizer"]["param_groups"]]
            del snap
        scales = group_scales(base_lrs, names, min_lr)
        settings = dict(method=method, batch_size=batch_size, shuffle=shuffle, iter_size=iter_size,
                        load_snapshot_path=None if load_snapshot_path is None else str(load_snapshot_path),
                        restore_dataloader=restore_dataloader, min_lr=min_lr, max_lr=max_lr,
                        iter_per_run=iter_per_run, num_runs=num_runs, num_iters=num_iters,
                        divergence_factor=divergence_factor, stop_on_divergence=stop_on_divergence, smoothing=beta,
                        seed=seed, world_size=env.world_size, group_names=names, group_base_lrs=base_lrs,
                        group_scales=scales, model=type(model).__name__, optimizer=type(optimizer).__name__,
                        pixelz_dist=__version__, torch=str(torch.__version__))

        def run(control, iterations):
            train_model(model, optimizer, None, dataset, batch_size, shuffle=shuffle,
                        num_iters=start_iteration + iterations, iter_size=iter_size, display_iter=iterations,
                        load_snapshot_path=load_snapshot_path, restore_dataloader=restore_dataloader, seed=seed,
                        num_workers=num_workers, callbacks=[control, *callbacks], **train_kwargs)

        start = StartingPoint(model, optimizer)
        t0 = time.perf_counter()
        try:
            with filtering(_QuietInnerRuns(), *_INNER_RUN_MODULES):
                search = _runs if method == "runs" else _sweep
                result = search(run, start, scales, settings, env.is_main, progress_bar)
        finally:
            start.restore()
        result.settings["elapsed_s"] = round(time.perf_counter() - t0, 3)
        if env.is_main:
            if result_file:
                paths = result.save(str(result_file))
                logger.info("lr finder: results in %s and %s", *paths)
            if result.suggestion is not None:
                logger.info("lr finder: suggested lr %.3g (%s)", result.suggestion, result.note)
            else:
                logger.warning("lr finder: no suggestion: %s", result.note)
    model.lr_finder_result = result
    return model


def _check_args(method, min_lr, max_lr, iter_per_run, num_runs, num_iters, factor, smoothing, snapshot, extra):
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    problems = []
    if method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {method!r}")
    if not (is_num(min_lr) and is_num(max_lr) and 0 < min_lr < max_lr):
        problems.append(f"need 0 < min_lr < max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
    if method == "runs":
        if not is_int(num_runs) or num_runs < 2:
            problems.append(f"num_runs must be an integer >= 2 (the rates span min_lr to max_lr), got {num_runs!r}")
        if not is_int(iter_per_run) or iter_per_run < 2:
            problems.append(f"iter_per_run must be an integer >= 2, got {iter_per_run!r}: the first loss of a run is "
                            "measured before its first step, so it is the same at every rate")
    if method == "sweep" and (not is_int(num_iters) or num_iters < 3):
        problems.append(f"num_iters must be an integer >= 3 for the sweep, got {num_iters!r}")
    if not is_num(factor) or factor <= 1:
        problems.append(f"divergence_factor must be a number > 1, got {factor!r}")
    if smoothing is not None and not (is_num(smoothing) and 0 <= smoothing < 1):
        problems.append(f"smoothing must be in [0, 1) or None, got {smoothing!r}")
    if snapshot == "auto":
        problems.append("load_snapshot_path='auto' needs a snapshot prefix, which find_lr does not take; pass the "
                        "snapshot's file path (e.g. runs/a/snap_iter_1000.pt)")
    taken = sorted(set(extra) & _RESERVED)
    if taken:
        problems.append(f"train_kwargs may not set {taken}: the finder sets them for each run")
    if problems:
        raise ConfigError("invalid find_lr arguments:\n  - " + "\n  - ".join(problems))


def _runs(run, start, scales, settings, is_main, progress_bar) -> LRFinderResult:
    s = settings
    n, per_run, factor = s["num_runs"], s["iter_per_run"], s["divergence_factor"]
    lrs = np.geomspace(s["min_lr"], s["max_lr"], n)
    losses = np.full((n, per_run), np.nan)
    curve, final, means = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    diverged, ran = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    tail = max(1, math.ceil(per_run / 5))
    best = math.inf  # the lowest final loss so far
    bar = _Progress(n, "run", is_main, progress_bar)
    try:
        for k, lr in enumerate(lrs):
            start.restore(grads=False)  # leftover gradients of the caller would leak into every first step
            t0 = time.perf_counter()
            # every run's first loss is measured before its first step, so it is the same for all rates
            control = RateControl(scales, lambda i, lr=lr: lr,
                                   lambda i, loss, seen: not math.isfinite(loss) or loss > factor * seen[0])
            run(control, per_run)
            got = np.asarray(control.losses, dtype=np.float64)
            losses[k, :len(got)] = got
            ran[k], final[k], means[k] = True, got[-1], got.mean()
            reason = "" if control.diverged_at is None else f" (diverged at iteration {control.diverged_at + 1})"
            if control.diverged_at is None:
                curve[k] = got[max(1, len(got) - tail):].mean()
                if curve[k] > factor * best:
                    diverged[k], curve[k] = True, np.nan
                    reason = f" (diverged: final loss above {factor:g} x the best so far, {best:.4g})"
                else:
                    best = min(best, curve[k])
            else:
                diverged[k] = True
            bar.step(f"lr finder run {k + 1}/{n}: lr {lr:.3g} | final loss {got[-1]:.4g} | mean "
                     f"{means[k]:.4g} | {len(got)} iterations | {time.perf_counter() - t0:.1f} s{reason}",
                     f"lr {lr:.2g} loss {got[-1]:.3g}")
            if diverged[k] and s["stop_on_divergence"]:
                break
    finally:
        bar.close()
    skipped = int(n - ran.sum())
    if skipped and is_main:
        logger.info("lr finder: run %d diverged; skipped the %d larger rate(s)", int(ran.sum()), skipped)
    suggestion, note = suggest_lr(lrs, curve)
    return LRFinderResult("runs", lrs, losses, final, means, curve, lrs.copy(), diverged, ran, suggestion, note,
                          settings)


def _sweep(run, start, scales, settings, is_main, progress_bar) -> LRFinderResult:
    s = settings
    n, factor, beta = s["num_iters"], s["divergence_factor"], s["smoothing"]
    lrs = np.geomspace(s["min_lr"], s["max_lr"], n)
    smoothed = np.full(n, np.nan)
    every = max(1, n // 10)
    bar = _Progress(n, "it", is_main, progress_bar)
    ema, best = SmoothedValue(beta), [math.inf]

    def judge(i, loss, seen):
        smoothed[i] = ema.update(loss)
        if math.isfinite(smoothed[i]):
            best[0] = min(best[0], smoothed[i])
        return not math.isfinite(smoothed[i]) or smoothed[i] > factor * best[0]

    def report(i, loss):
        message = f"lr finder sweep {i + 1}/{n}: lr {lrs[i]:.3g} | loss {loss:.4g} | smoothed {smoothed[i]:.4g}"
        if bar.bar is not None:
            bar.step(message, f"lr {lrs[i]:.2g} loss {smoothed[i]:.3g}")
        elif (i + 1) % every == 0 or i + 1 == n:
            bar.step(message)

    control = RateControl(scales, lambda i: lrs[min(i, n - 1)], judge, s["stop_on_divergence"], report)
    start.restore(grads=False)
    try:
        run(control, n)
    finally:
        bar.close()
    losses = np.full(n, np.nan)
    got = np.asarray(control.losses, dtype=np.float64)
    losses[:len(got)] = got
    ran = np.arange(n) < len(got)
    diverged = np.zeros(n, dtype=bool)
    if control.diverged_at is not None:
        diverged[control.diverged_at:len(got)] = True
        if is_main:
            logger.info("lr finder: the smoothed loss diverged at iteration %d (lr %.3g)%s", control.diverged_at + 1,
                        lrs[control.diverged_at], "; sweep stopped" if s["stop_on_divergence"] else "")
    curve = np.where(ran & ~diverged, smoothed, np.nan)
    # The EMA of log(lr) with the same weights is the rate each smoothed point stands for: without it the curve
    # lags behind the rates by about 1 / (1 - beta) iterations, and the suggestion would be too large.
    curve_lrs = 10 ** smooth_losses(np.log10(lrs), beta)
    suggestion, note = suggest_lr(curve_lrs, curve, skip_start=n // 10)
    return LRFinderResult("sweep", lrs, losses, losses.copy(), losses.copy(), curve, curve_lrs, diverged, ran,
                          suggestion, note, settings)

