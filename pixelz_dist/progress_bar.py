"""A tqdm progress bar for training, as a :class:`~pixelz_dist.hooks.Callback`.

Shown only on rank 0 and only when stderr is a terminal: in a log file (a SLURM output file, ``nohup``) the plain
log lines are the progress. While the bar is up, the ``pixelz_dist`` log lines are written above it.
"""

from __future__ import annotations

import contextlib
import sys

from .dist import read_env
from .hooks import Callback
from .log import logger

__all__ = ["ProgressBar", "want_progress_bar"]


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


class ProgressBar(Callback):
    """One bar over the run's iterations, its description the epoch; the loss is shown once per ``refresh_every``
    iterations (reading it synchronises with the device, so not every step)."""

    def __init__(self, refresh_every: int = 20, file=None):
        self.refresh_every = max(1, int(refresh_every))
        self.file = file
        self.bar = None
        self._redirect = contextlib.ExitStack()

    def on_train_start(self, state):
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=state.total_iterations, initial=state.iteration, unit="it", dynamic_ncols=True,
                        file=self.file, desc=f"epoch {state.epoch + 1}")
        self._redirect.enter_context(logging_redirect_tqdm(loggers=[logger]))

    def on_epoch_start(self, state):
        if self.bar is not None:
            self.bar.set_description(f"epoch {state.epoch + 1}", refresh=False)

    def on_iteration_end(self, state):
        if self.bar is None:
            return
        self.bar.update(1)
        if state.iteration % self.refresh_every == 0 and state.loss is not None:
            self.bar.set_postfix(loss=f"{float(state.loss):.4g}", refresh=False)

    def on_train_end(self, state):
        if self.bar is not None and state.loss is not None:
            self.bar.set_postfix(loss=f"{float(state.loss):.4g}", refresh=False)  # the final loss stays on screen
        self.close()

    def close(self) -> None:
        """Close the bar and restore the log handlers (also called when training raised)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()
