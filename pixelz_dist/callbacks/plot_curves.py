"""Training curves as one PNG (the ``[plot]`` extra: matplotlib), and :class:`PlotCurves`, the callback that draws
them when training ends.

Panels, each against the iteration: the training loss (each display window's mean, and smoothed), with the
validation / evaluation loss when there is one; the learning rate of each param group (log scale); samples/s; the
share of time spent waiting for data; the other validation / evaluation metrics; other logged values
(``grad_norm``, ...). A dotted vertical line marks each iteration the run was resumed from.

Smoothing is TensorBoard's: a bias-corrected exponential moving average with weight 0.6 (its slider's default), so
the first point is unchanged and the curve does not start near zero. The metrics rows are already window means, so
the light smoothing is enough to show the trend without hiding a spike.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from ..distributed.env import read_env
from ..fileio import atomic_write
from .base import Callback
from .curves import CurveData, Series, curves_path, load_curves, resolve_prefix
from .smoothing import smooth

__all__ = ["DEFAULT_SMOOTHING", "INSTALL_HINT", "PlotCurves", "draw_curves", "plot_curves"]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "pixelz-dist[plot]"'
DEFAULT_SMOOTHING = 0.6


def _matplotlib():
    """The two matplotlib classes the figure needs (no pyplot: no global state, no GUI backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"the training curves need matplotlib, which is not installed. HINT: {INSTALL_HINT} (or "
                          "pip install matplotlib); the numbers are in the run's *_metrics.jsonl either way.") from e
    return Figure, FigureCanvasAgg


def smoothed(values: np.ndarray, weight: float) -> np.ndarray:
    """The bias-corrected EMA of the finite values (a NaN window stays NaN and does not poison the rest)."""
    out = np.full(len(values), np.nan)
    finite = np.isfinite(values)
    if weight > 0 and finite.any():
        out[finite] = smooth(values[finite], weight)
    elif finite.any():
        out[finite] = values[finite]
    return out


def plot_curves(prefix: str, out: str | None = None, smoothing: float = DEFAULT_SMOOTHING) -> str:
    """Read a run's metrics (and eval) file and write its curves to ``out`` (default ``{prefix}_curves.png``).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed.
        DataError: no metrics file at ``prefix``, or no row in it.
    """
    _matplotlib()  # before reading: the missing package is the first thing to fix
    prefix = resolve_prefix(prefix)
    data = load_curves(prefix)
    return draw_curves(data, out or curves_path(prefix), title=os.path.basename(prefix), smoothing=smoothing)


def draw_curves(data: CurveData, path: str, title: str = "", smoothing: float = DEFAULT_SMOOTHING) -> str:
    """Draw ``data`` to the PNG ``path``, written atomically (a reader never sees half a file); returns ``path``."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}. HINT: 0 draws the raw values only; "
                         f"TensorBoard's default is {DEFAULT_SMOOTHING}.")
    Figure, FigureCanvasAgg = _matplotlib()
    panels = [_loss_panel, _lr_panel, _speed_panel, _wait_panel]
    metrics = {**{k: s for k, s in data.validation.items() if k != "val_loss"},
               **{f"eval {k}": s for k, s in data.evaluation.items() if not k.startswith("loss")}}
    if metrics:
        panels.append(lambda ax, d, w: _named_panel(ax, metrics, "validation / evaluation metrics", "o-"))
    if data.extra:
        panels.append(lambda ax, d, w: _named_panel(ax, d.extra, "other logged values", "-"))
    rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(12, 3.2 * rows), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        panel(ax, data, smoothing)
        for at in data.resumed_at:
            ax.axvline(at, color="0.5", ls=":", lw=1)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    last = int(data.loss.iterations[-1]) if len(data.loss) else None
    resumed = f", resumed at {', '.join(map(str, data.resumed_at))}" if data.resumed_at else ""
    fig.suptitle(f"{title} (iteration {last}{resumed})" if last is not None else title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.06 if rows > 2 else 0.1, top=0.92 if rows > 2 else 0.88,
                        hspace=0.45, wspace=0.18)
    with atomic_write(path, durable=False) as f:  # regenerable: no fsync
        fig.savefig(f, format="png")
    return path


def _loss_panel(ax, data: CurveData, weight: float) -> None:
    loss = data.loss
    if weight > 0:
        ax.plot(loss.iterations, loss.values, color="C0", alpha=0.3, lw=1, label="loss")
        ax.plot(loss.iterations, smoothed(loss.values, weight), color="C0", lw=2, label=f"smoothed ({weight:g})")
    else:
        ax.plot(loss.iterations, loss.values, color="C0", lw=1.5, label="loss")
    if "val_loss" in data.validation:
        s = data.validation["val_loss"]
        ax.plot(s.iterations, s.values, "o-", color="C1", ms=4, label="val_loss")
    for i, (name, s) in enumerate((k, v) for k, v in data.evaluation.items() if k.startswith("loss")):
        ax.plot(s.iterations, s.values, "s--", color=f"C{2 + i}", ms=4, label=f"eval {name}")
    if data.resumed_at:
        ax.plot([], [], color="0.5", ls=":", label="resumed")
    _positive_log(ax, [loss.values])
    ax.set_title("loss")
    ax.legend(loc="best", fontsize="small")


def _lr_panel(ax, data: CurveData, weight: float) -> None:
    for i, s in enumerate(data.lrs):
        ax.plot(s.iterations, s.values, lw=1.5, label=f"group {i}")
    _positive_log(ax, [s.values for s in data.lrs])
    ax.set_title("learning rate" + (" per param group" if len(data.lrs) > 1 else ""))
    if len(data.lrs) > 1:
        ax.legend(loc="best", fontsize="small")


def _speed_panel(ax, data: CurveData, weight: float) -> None:
    ax.plot(data.samples_per_s.iterations, data.samples_per_s.values, color="C2", lw=1.5)
    ax.set_ylim(bottom=0)
    ax.set_title("samples/s (all processes)")


def _wait_panel(ax, data: CurveData, weight: float) -> None:
    ax.plot(data.data_wait.iterations, 100 * data.data_wait.values, color="C3", lw=1.5)
    ax.set_ylim(0, 100)
    ax.set_title("waiting for data (% of the time)")


def _named_panel(ax, series: dict[str, Series], title: str, style: str) -> None:
    for name, s in series.items():
        ax.plot(s.iterations, s.values, style, ms=4, lw=1.5, label=name)
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")


def _positive_log(ax, arrays) -> None:
    """A log scale when every value is positive and they span more than a factor of 10."""
    values = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if len(values) and values.min() > 0 and values.max() / values.min() > 10:
        ax.set_yscale("log")


class PlotCurves(Callback):
    """Writes the run's curves (``{prefix}_curves.png``) when training ends, on rank 0.

    Training never fails because of it: without matplotlib it logs one debug line; any other error is a warning.
    The command line adds it (``--no-curves`` turns it off); in Python, pass ``callbacks=[PlotCurves()]``.

    Args:
        prefix: whose metrics to draw; default: the run's own (``log_prefix``, else ``snapshot_prefix``).
        out: the PNG written; default ``{prefix}_curves.png``.
        smoothing: the loss curve's EMA weight, in [0, 1) (0: raw values only).
    """

    def __init__(self, prefix: str | None = None, out: str | None = None, smoothing: float = DEFAULT_SMOOTHING):
        self.prefix, self.out, self.smoothing = prefix, out, smoothing
        self.path: str | None = None  # what the last on_train_end wrote

    def on_train_end(self, state):
        if not read_env().is_main:
            return
        prefix = self.prefix or state.log_prefix
        if prefix is None:
            logger.debug("no curves: the run writes no metrics file (no snapshot_prefix nor log_prefix)")
            return
        try:
            self.path = plot_curves(prefix, self.out, self.smoothing)
        except ImportError as e:
            logger.debug("no curves: %s", e)
        except Exception as e:  # a plot is a by-product: the trained model and its snapshot matter more
            logger.warning("the training curves could not be written (%s: %s); the numbers are in %s_metrics.jsonl",
                           type(e).__name__, e, prefix)
        else:
            logger.info("training curves written to %s", self.path)
