"""Preemption: a signal only sets a flag; the loop acts on it at the next optimizer-step boundary.

SLURM warns a job before it ends it (``#SBATCH --signal=B:USR1@120`` or SIGTERM); torchrun's agent forwards
SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers (SIGUSR1 too when started with ``--signals-to-handle``) and SIGKILLs them
about 30 s later. Doing real work inside a signal handler is unsafe (it may interrupt a collective or a file write), so
the handler records the signal; the engine combines the flag across ranks at the next step boundary, rank 0 writes a
snapshot, and every rank exits with :data:`PREEMPTION_EXIT_CODE` (launch scripts requeue on it). A scheduler signals
the whole process tree: DataLoader workers, which torch makes die on SIGTERM, ignore these signals instead
(:func:`ignore_preemption_signals`), so the trainer is not killed by a dead worker before it can snapshot; they still
exit when the trainer shuts them down or dies.
"""

from __future__ import annotations

import signal
import threading

PREEMPTION_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again" - the job should be requeued and resumed
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(SystemExit):
    """Raised by ``train_model`` after the preemption snapshot; uncaught, the process exits with code 75."""

    def __init__(self, signal_name: str, snapshot_path: str | None):
        super().__init__(PREEMPTION_EXIT_CODE)
        self.signal_name = signal_name
        self.snapshot_path = snapshot_path

    def __str__(self) -> str:
        return (f"preempted by {self.signal_name}; "
                + (f"snapshot {self.snapshot_path}" if self.snapshot_path else "no snapshot_prefix, nothing saved")
                + f"; exit code {PREEMPTION_EXIT_CODE}")


class PreemptionFlag:
    """Installs flag-setting handlers for the preemption signals while active; restores the previous ones after."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the trainer, not its workers, answers a preemption signal."""
    for name in PREEMPTION_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
