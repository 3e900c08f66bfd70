"""Progress on a terminal: one tqdm bar with the library's log lines written above it (training's
:class:`ProgressBar` callback and the learning-rate finder both use :class:`TerminalBar`).

Shown only on rank 0 and only when stderr is a terminal: in a log file (a SLURM output file, ``nohup``) the plain
log lines are the progress.
"""

from __future__ import annotations

import contextlib
import sys

from ..distributed.env import read_env
from ..log import logger
from .base import Callback

__all__ = ["ProgressBar", "TerminalBar", "want_progress_bar"]


def want_progress_bar(stream=None) -> bool:
    """True on rank 0 when ``stream`` (default stderr) is a terminal and tqdm is installed."""
    stream = sys.stderr if stream is None else stream
    if not read_env().is_main or not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class TerminalBar:
    """A tqdm bar; while it is open the ``pixelz_dist`` log lines are written above it, not through it."""

    def __init__(self, total, *, desc: str, unit: str = "it", initial: int = 0, leave: bool = True, file=None):
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=leave, dynamic_ncols=True,
                        file=file)
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(loggers=[logger]))

    def update(self, postfix: str | None = None, steps: int = 1) -> None:
        if postfix is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(steps)

    def describe(self, text: str) -> None:
        self.bar.set_description(text, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self._redirect.close()


class ProgressBar(Callback):
    """One bar over the run's iterations, its description the epoch; the loss is shown once per ``refresh_every``
    iterations (reading it synchronises with the device, so not every step)."""

    def __init__(self, refresh_every: int = 20, file=None):
        self.refresh_every = max(1, int(refresh_every))
        self.file = file
        self.bar: TerminalBar | None = None

    def on_train_start(self, state):
        self.bar = TerminalBar(state.total_iterations, initial=state.iteration, desc=f"epoch {state.epoch + 1}",
                               file=self.file)

    def on_epoch_start(self, state):
        if self.bar is not None:
            self.bar.describe(f"epoch {state.epoch + 1}")

    def on_iteration_end(self, state):
        if self.bar is None:
            return
        show = state.iteration % self.refresh_every == 0 and state.loss is not None
        self.bar.update(f"loss={float(state.loss):.4g}" if show else None)

    def on_train_end(self, state):
        if self.bar is not None and state.loss is not None:
            self.bar.bar.set_postfix_str(f"loss={float(state.loss):.4g}", refresh=False)  # the final loss stays
        self.close()

    def close(self) -> None:
        """Close the bar and restore the log handlers (also called when training raised)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
