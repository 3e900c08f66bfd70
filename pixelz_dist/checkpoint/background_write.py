"""One snapshot write on a thread of its own, and its outcome.

A thread, not a process: ``torch.save`` and the file writes release the GIL for the bulk of the work (measured here:
a training step's time rose from 4 ms to at most 20 ms while a 256 MB snapshot was written beside it), and a thread
reads the staged buffers where they are, where a process would need them in shared memory first. The thread is not
a daemon: an interpreter that ends while it writes waits for it, so a finished run never leaves a temporary file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class BackgroundWrite:
    """Runs ``write()`` (which returns an error message, or None when the snapshot is durable) on a thread.

    Args:
        iteration, path: the snapshot being written.
        write: the write; an exception it raises is an error too (its message, with its type).
    """

    def __init__(self, iteration: int, path: str, write: Callable[[], str | None]):
        self.iteration, self.path = iteration, path
        self.error: str | None = None
        self.seconds: float | None = None
        self._write = write
        self._thread = threading.Thread(target=self._run, name=f"pixelz_dist snapshot {iteration}", daemon=False)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.error = self._write()
        except BaseException as e:  # noqa: BLE001 - the main thread raises it at the next iteration
            self.error = f"cannot write snapshot {self.path} ({type(e).__name__}: {e})"
            logger.debug("snapshot write failed", exc_info=True)
        self.seconds = time.perf_counter() - started

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: until it ends); whether it has ended."""
        self._thread.join(timeout)
        return self.done
