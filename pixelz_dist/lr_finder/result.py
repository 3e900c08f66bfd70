"""What the learning-rate finder measured: arrays, the suggestion, the settings; saved as .npz + .json, plotted."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..fileio import atomic_write

__all__ = ["LRFinderResult"]


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
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        arrays.update(suggestion=np.float64(np.nan if self.suggestion is None else self.suggestion),
                      method=np.str_(self.method), note=np.str_(self.note),
                      settings=np.str_(json.dumps(_jsonable(self.settings))),
                      lr_list=self.lrs, loss_list=self.mean_losses)
        with atomic_write(npz) as f:  # a file object: np.savez would append .npz to a temporary name
            np.savez(f, **arrays)
        with atomic_write(sidecar, "w", encoding="utf-8") as f:
            json.dump(self.summary(), f, indent=1)
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
