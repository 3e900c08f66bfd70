"""The finder's curve and the suggestion read from it."""

from __future__ import annotations

import numpy as np

from ..callbacks.smoothing import smooth

__all__ = ["smooth_losses", "suggest_lr"]


def smooth_losses(values, beta: float) -> np.ndarray:
    """Exponential moving average with bias correction: ``avg_i / (1 - beta**(i+1))``; the first point is the first
    value and a constant input stays constant."""
    return smooth(values, beta)


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
