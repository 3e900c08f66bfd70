"""One small exception hierarchy, so callers can catch everything the library raises on purpose.

Each class carries the exit code the command line leaves with when it is raised (``exit_code``), so the codes are
decided here, once: 2 for what the user can fix in the invocation or the input, and
:data:`WORKER_DIED_EXIT_CODE` for a DataLoader worker that the operating system ended.
"""

#: A DataLoader worker was killed by a signal (the kernel's OOM killer: SIGKILL) or exited with an error code. 71 is
#: EX_OSERR of sysexits.h ("an operating system error"), as 75 (preempted) is EX_TEMPFAIL: distinct from 1 (a bug,
#: with its traceback), 2 (a usage or input error), 75 (launch scripts requeue on it: a run that ran out of memory
#: would only run out again) and 130 (Ctrl-C).
WORKER_DIED_EXIT_CODE = 71


class PixelzError(Exception):
    """Base class of every error pixelz_dist raises deliberately.

    ``on_every_rank``: under torchrun, every rank raises this error alike (their decision was shared), so one rank's
    report says it all (see :func:`on_every_rank`).
    """

    exit_code = 2
    on_every_rank = False


def on_every_rank(error: PixelzError) -> PixelzError:
    """Mark ``error`` as raised alike by every rank of the job; returns it."""
    error.on_every_rank = True
    return error


class ConfigError(PixelzError, ValueError):
    """An argument or option has a value the library cannot use."""


class SnapshotError(PixelzError):
    """A snapshot cannot be written, found, trusted or applied."""


class DataError(PixelzError, ValueError):
    """A dataset, folder or file is not what training needs."""


class NondeterministicOp(PixelzError, RuntimeError):
    """Under ``deterministic=True``, the model ran an op that has no deterministic implementation on its device."""


class WorkerDied(PixelzError, RuntimeError):
    """A DataLoader worker process ended while training needed it: killed by a signal (SIGKILL: usually the kernel
    out of memory) or exited with an error code. Training stopped; the snapshots written before are intact.

    A ``RuntimeError`` too, as torch's own error for this was, so existing ``except RuntimeError`` clauses still
    catch it.

    Attributes:
        worker: the worker's index in its DataLoader (torch's ``worker_id``), or None when unknown.
        pid: the worker's process id.
        signal: the number of the signal that killed it, or None.
        exit_code_of_worker: its exit code when it exited by itself, or None.
    """

    exit_code = WORKER_DIED_EXIT_CODE

    def __init__(self, message: str, worker: int | None = None, pid: int | None = None, signal: int | None = None,
                 exit_code_of_worker: int | None = None):
        super().__init__(message)
        self.worker, self.pid, self.signal, self.exit_code_of_worker = worker, pid, signal, exit_code_of_worker
