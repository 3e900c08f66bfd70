"""The learning-rate finder: ``find_lr``, built on :func:`~pixelz_dist.trainer.train_model` and two callbacks.

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
before the smoothed loss's minimum: see :func:`suggest_lr`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import __version__
from .dist import process_group
from .errors import ConfigError
from .hooks import Callback
from .log import ensure_handler, logger
from .rng import capture_rng_state, restore_rng_state
from .snapshot import load_snapshot
from .trainer import train_model

__all__ = ["LRFinderResult", "find_lr", "smooth_losses", "suggest_lr"]

METHODS = ("runs", "sweep")
_ENGINE_MODULES = {"engine", "checkpointing", "trainer", "dist"}  # whose INFO lines repeat for every inner run
_RESERVED = {"num_iters", "num_epochs", "display_iter", "callbacks", "snapshot_prefix", "snapshot_interval",
             "load_snapshot_path", "restore_dataloader", "scheduler", "schedule_on_iter", "log_prefix", "keep_last"}


# -- the result --------------------------------------------------------------------------------------------------
@dataclass
class LRFinderResult:
    """What ``find_lr`` measured; attached to the returned model as ``model.lr_finder_result``.

    Attributes:
        method: ``"runs"`` or ``"sweep"``.
        lrs: the rate of each run (runs) or of each iteration's step (sweep), for the first param group.
        losses: runs: ``(num_runs, iter_per_run)``, each run's per-iteration losses (NaN where not run); sweep:
            ``(num_iters,)``. A loss is the mean over ranks of the iteration's micro-batch losses, computed before
            that iteration's step.
        final_losses / mean_losses: per run, the last recorded loss and the mean of the run (sweep: the losses).
        smoothed: the curve the suggestion reads: per run, the mean of its last 20 % of losses (runs); the
            bias-corrected EMA of the losses (sweep). NaN for diverged or skipped points.
        curve_lrs: the x of ``smoothed``: ``lrs`` for runs; for the sweep the same EMA applied to log(lr), so the
            EMA's lag does not shift the curve towards larger rates.
        diverged: per point, True when it diverged (sweep: from the detection on).
        ran: per point, False for rates skipped after a divergence (sweep: iterations not run).
        suggestion: the suggested lr for the first param group, or None (then ``note`` says why).
        note: how the suggestion was chosen, or why there is none.
        settings: the arguments and environment of the call.
    """

    method: str
    lrs: np.ndarray
    losses: np.ndarray
    final_losses: np.ndarray
    mean_losses: np.ndarray
    smoothed: np.ndarray
    curve_lrs: np.ndarray
    diverged: np.ndarray
    ran: np.ndarray
    suggestion: float | None
    note: str
    settings: dict = field(default_factory=dict)

    ARRAYS = ("lrs", "losses", "final_losses", "mean_losses", "smoothed", "curve_lrs", "diverged", "ran")

    def summary(self) -> dict:
        """Everything as plain JSON types (NaN and inf become None)."""
        out = {"method": self.method, "suggestion": self.suggestion, "note": self.note}
        for name in self.ARRAYS:
            out[name] = _jsonable(getattr(self, name).tolist())
        out["settings"] = _jsonable(self.settings)
        return out

    def save(self, path: str) -> tuple[str, str]:
        """Write ``path`` (.npz, added when missing) and a JSON sidecar beside it, each atomically.

        The npz also holds the seed tool's keys ``lr_list`` and ``loss_list`` (mean loss per run), so scripts that
        read the old file keep working. Returns the two paths written.
        """
        npz = path if path.endswith(".npz") else path + ".npz"
        sidecar = npz[:-len(".npz")] + ".json"
        os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        arrays.update(suggestion=np.float64(np.nan if self.suggestion is None else self.suggestion),
                      method=np.str_(self.method), note=np.str_(self.note),
                      settings=np.str_(json.dumps(_jsonable(self.settings))),
                      lr_list=self.lrs, loss_list=self.mean_losses)
        with open(npz + ".tmp", "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **arrays)
        os.replace(npz + ".tmp", npz)
        with open(sidecar + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.summary(), f, indent=1)
        os.replace(sidecar + ".tmp", sidecar)
        return npz, sidecar

    @classmethod
    def load(cls, path: str) -> LRFinderResult:
        """Read a result written by :meth:`save` (no pickle involved)."""
        with np.load(path, allow_pickle=False) as z:
            suggestion = float(z["suggestion"])
            return cls(method=str(z["method"]), note=str(z["note"]), settings=json.loads(str(z["settings"])),
                       suggestion=None if math.isnan(suggestion) else suggestion,
                       **{name: z[name] for name in cls.ARRAYS})

    def plot(self, path: str) -> str:
        """Write a PNG of the loss against the learning rate (log x axis), the suggestion marked.

        Raises:
            ImportError: matplotlib is not installed (``pip install "pixelz-dist[plot]"``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError('LRFinderResult.plot needs matplotlib, which is not installed. HINT: pip install '
                              '"pixelz-dist[plot]" (or pip install matplotlib); the numbers are in the result '
                              'file and its .json sidecar either way.') from e
        fig = Figure(figsize=(7, 4.5), dpi=100)  # no pyplot: no global figure state, no backend switch
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ok = self.ran & ~self.diverged
        if self.method == "runs":
            ax.plot(self.lrs[ok], self.final_losses[ok], "o", color="0.6", ms=4, label="final loss of each run")
        else:
            ax.plot(self.lrs[self.ran], self.losses[self.ran], color="0.75", lw=0.8, label="loss per iteration")
        ax.plot(self.curve_lrs[ok], self.smoothed[ok], "-", color="C0", lw=2, label="smoothed loss")
        bad = self.ran & self.diverged
        if bad.any():
            y = np.where(np.isfinite(self.final_losses[bad]), self.final_losses[bad], np.nanmax(self.smoothed[ok])
                         if ok.any() else 1.0)
            ax.plot(self.lrs[bad], y, "x", color="C3", ms=8, label="diverged")
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="C2", ls="--", label=f"suggested lr {self.suggestion:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (first param group)")
        ax.set_ylabel("training loss")
        ax.set_title(f"learning-rate finder ({self.method})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# -- the curve and the suggestion -------------------------------------------------------------------------------
def smooth_losses(values, beta: float) -> np.ndarray:
    """Exponential moving average with bias correction: ``avg_i / (1 - beta**(i+1))``.

    The correction removes the pull towards zero of an average started at zero, so the first point is the first
    value and a constant input stays constant.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1.0 - beta) * v
        out[i] = avg / (1.0 - beta ** (i + 1)) if beta > 0 else v
    return out


def suggest_lr(lrs, curve, skip_start: int = 0) -> tuple[float | None, str]:
    """The rate of steepest descent of ``curve`` against log(lr), before the curve's minimum.

    Why this rule: the minimum itself is the edge of instability (training there is already slowing down or about
    to diverge), while the steepest fall is where a step of that size still makes the most progress; it is Smith's
    and fastai's "steep" choice. Points that are not finite are ignored; the slope is ``numpy.gradient`` over
    log10(lr) (central differences, so uneven spacing is fine); ties go to the smaller rate.

    Args:
        lrs: increasing learning rates.
        curve: the smoothed loss at each rate.
        skip_start: leading valid points the slope search ignores (a sweep's first EMA points average very few
            batches, so their slope is mostly noise).

    Returns:
        ``(lr, note)``; ``lr`` is None when no point lies on a descent (the note then says what to change).
    """
    lrs, curve = np.asarray(lrs, dtype=np.float64), np.asarray(curve, dtype=np.float64)
    valid = np.isfinite(curve) & np.isfinite(lrs) & (lrs > 0)
    x, y = np.log10(lrs[valid]), curve[valid]
    if len(y) < 3:
        return None, (f"only {len(y)} usable point(s) before the loss diverged: nothing to read a slope from. "
                      "HINT: lower min_lr, or use more runs / iterations.")
    lowest = int(np.argmin(y))
    if lowest == 0:
        return None, (f"the loss never went down: it was lowest at the smallest rate ({10 ** x[0]:.3g}). "
                      "HINT: lower min_lr, or check that the model can learn this data at all.")
    slope = np.gradient(y, x)
    # Strictly before the minimum: at the last point before a divergence the slope is one-sided and would credit
    # the minimum itself with the steepest drop.
    start = min(max(int(skip_start), 0), lowest - 1)
    j = start + int(np.argmin(slope[start:lowest]))
    if slope[j] >= 0:
        return None, ("no point before the minimum has a falling slope (the curve is too coarse or too noisy). "
                      "HINT: use more runs, or a longer sweep.")
    note = (f"steepest descent of the smoothed loss (slope {slope[j]:.3g} per decade) before its minimum "
            f"{y[lowest]:.4g} at lr {10 ** x[lowest]:.3g}")
    if lowest == len(y) - 1 and valid[-1]:
        note += "; the loss was still falling at the largest rate tried (consider a larger max_lr)"
    return float(10 ** x[j]), note


# -- restoring the starting point ---------------------------------------------------------------------------------
def _copy(obj):
    """Deep copy with tensors detached and moved to the CPU (a GPU model's copy costs no GPU memory)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _StartingPoint:
    """Everything a run changes, copied once: weights and buffers, optimizer state and lrs, gradients, train/eval
    flags and every global RNG. ``restore`` puts back bit-identical values."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.weights = _copy(model.state_dict())
        self.opt_state = _copy(optimizer.state_dict())
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        self.training = [m.training for m in model.modules()]
        self.rng = capture_rng_state()

    def restore(self, grads: bool = True) -> None:
        self.model.load_state_dict(self.weights)
        # load_state_dict keeps tensors that need no cast: give it a fresh copy, or the next run mutates ours.
        self.optimizer.load_state_dict(_copy(self.opt_state))
        for p, g in zip(self.model.parameters(), self.grads):
            p.grad = g.clone() if grads and g is not None else None
        for m, flag in zip(self.model.modules(), self.training):
            m.training = flag
        restore_rng_state(self.rng)


def _set_lrs(optimizer, lrs) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # a tensor lr (capturable / fused optimizers) must stay the same tensor
        else:
            group["lr"] = lr


def _group_scales(base_lrs: list[float], names: list[str], min_lr: float) -> list[float]:
    """Each group's lr as a multiple of the reference group's (the first with a non-zero lr); warns when that
    differs from the seed's rule (every group scaled by lr / min_lr), so a user of the old tool is not surprised."""
    ref = next((i for i, lr in enumerate(base_lrs) if lr > 0), None)
    if ref is None:
        raise ConfigError(f"every param group has lr 0 ({dict(zip(names, base_lrs))}): the finder scales the "
                          "groups' lrs, and zero stays zero. HINT: give at least one group a positive lr.")
    scales = [lr / base_lrs[ref] for lr in base_lrs]
    if ref != 0:
        logger.warning("lr finder: param group 0 (%s) has lr 0, so the rates reported are those of group %d (%s)",
                       names[0], ref, names[ref])
    distinct = len({round(s, 12) for s in scales}) > 1
    if distinct and not math.isclose(base_lrs[ref], min_lr, rel_tol=1e-6):
        ratios = ", ".join(f"{n}: x{s:.3g}" for n, s in zip(names, scales))
        logger.warning("lr finder: the param groups have different lrs and group %d's (%s, lr %.3g) is not min_lr "
                       "(%.3g). The rates tried are group %d's; the other groups keep their ratio to it (%s). The "
                       "old tool scaled every group by lr / min_lr instead, which equals this only when group %d's "
                       "lr is min_lr. HINT: put the group whose rate you want reported first.", ref, names[ref],
                       base_lrs[ref], min_lr, ref, ratios, ref)
    return scales


# -- the callback -----------------------------------------------------------------------------------------------
class _RateControl(Callback):
    """One inner run: sets the groups' lrs for the coming step, records the loss of each iteration, stops the run
    when ``judge(i, loss, losses_so_far)`` calls it diverged. ``lr_at(i)`` is the first group's rate at step i."""

    def __init__(self, scales, lr_at, judge, stop_on_divergence=True, report=None):
        self.scales, self.lr_at, self.judge = scales, lr_at, judge
        self.stop_on_divergence, self.report = stop_on_divergence, report
        self.losses: list[float] = []
        self.diverged_at: int | None = None
        self.start = 0

    def _apply(self, optimizer, i: int) -> None:
        lr = float(self.lr_at(i))
        _set_lrs(optimizer, [lr * s for s in self.scales])

    def on_train_start(self, state):
        self.start = state.iteration  # after any snapshot was loaded (and its lrs with it)
        self._apply(state.optimizer, 0)

    def on_after_backward(self, state):
        self._apply(state.optimizer, state.iteration - self.start)

    def on_iteration_end(self, state):
        loss = state.global_loss()  # a collective: every rank calls it here and so judges the same number
        i = len(self.losses)
        self.losses.append(loss)
        if self.diverged_at is None and self.judge(i, loss, self.losses):
            self.diverged_at = i
        if self.diverged_at is not None and self.stop_on_divergence:
            state.request_stop("lr finder: the loss diverged")
        if self.report is not None:
            self.report(i, loss)


class _QuietInnerRuns(logging.Filter):
    """Drops the INFO lines each inner ``train_model`` run logs (start, end, resume) and repeats of its warnings;
    the finder logs one line per run instead."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.module not in _ENGINE_MODULES:
            return True
        if record.levelno < logging.WARNING:
            return False
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
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit=unit, desc="lr finder", leave=False, dynamic_ncols=True)

    def step(self, message: str, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
            logger.debug(message)
        elif self.show:
            logger.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the public verb --------------------------------------------------------------------------------------------
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
        scales = _group_scales(base_lrs, names, min_lr)
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

        start = _StartingPoint(model, optimizer)
        quiet = _QuietInnerRuns()
        logger.addFilter(quiet)
        t0 = time.perf_counter()
        try:
            if method == "runs":
                result = _runs(run, start, scales, settings, env.is_main, progress_bar)
            else:
                result = _sweep(run, start, scales, settings, env.is_main, progress_bar)
        finally:
            logger.removeFilter(quiet)
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
            control = _RateControl(scales, lambda i, lr=lr: lr,
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
    ema = {"avg": 0.0, "best": math.inf}

    def judge(i, loss, seen):
        ema["avg"] = beta * ema["avg"] + (1.0 - beta) * loss
        smoothed[i] = ema["avg"] / (1.0 - beta ** (i + 1)) if beta > 0 else loss
        ema["best"] = min(ema["best"], smoothed[i]) if math.isfinite(smoothed[i]) else ema["best"]
        return not math.isfinite(smoothed[i]) or smoothed[i] > factor * ema["best"]

    def report(i, loss):
        message = f"lr finder sweep {i + 1}/{n}: lr {lrs[i]:.3g} | loss {loss:.4g} | smoothed {smoothed[i]:.4g}"
        if bar.bar is not None:
            bar.step(message, f"lr {lrs[i]:.2g} loss {smoothed[i]:.3g}")
        elif (i + 1) % every == 0 or i + 1 == n:
            bar.step(message)

    control = _RateControl(scales, lambda i: lrs[min(i, n - 1)], judge, s["stop_on_divergence"], report)
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

