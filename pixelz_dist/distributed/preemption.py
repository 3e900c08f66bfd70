"""Preemption and Ctrl-C: a signal only sets a flag; the loop acts on it at the next optimizer-step boundary.

SLURM warns a job before it ends it (``#SBATCH --signal=B:USR1@120`` or SIGTERM); torchrun's agent forwards
SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers (SIGUSR1/SIGUSR2 too when started with ``--signals-to-handle``) and
SIGKILLs them about 30 s later. Doing real work inside a signal handler is unsafe (it may interrupt a collective or a
file write), so the handler records the signal; the engine combines the flag across ranks at a step boundary, rank 0
writes a snapshot, and every rank leaves: with :data:`PREEMPTION_EXIT_CODE` (launch scripts requeue on it) after
SIGTERM / SIGUSR1 / SIGUSR2, with :class:`Interrupted` (a ``KeyboardInterrupt``: exit code 130) after Ctrl-C. A second
Ctrl-C stops at once, as Ctrl-C always does.

A scheduler signals the whole process tree, and a terminal's Ctrl-C reaches the whole foreground group: DataLoader
workers, which torch makes die on SIGTERM and SIGINT, ignore these signals instead (:func:`ignore_preemption_signals`),
so the trainer is not killed by a dead worker before it can snapshot; the trainer shuts them down itself on every way
out (see :mod:`pixelz_dist.data.batch_source`).
"""

from __future__ import annotations

import signal
import threading

PREEMPTION_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again" - the job should be requeued and resumed
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a program stopped with Ctrl-C
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
WORKER_IGNORES = (*PREEMPTION_SIGNALS, "SIGINT")


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


class Interrupted(KeyboardInterrupt):
    """Raised by ``train_model`` after the snapshot that follows a Ctrl-C (SIGINT); uncaught, the process exits as
    from any Ctrl-C (code 130)."""

    def __init__(self, snapshot_path: str | None):
        super().__init__()
        self.snapshot_path = snapshot_path

    def __str__(self) -> str:
        return ("interrupted (Ctrl-C); " + (f"snapshot {self.snapshot_path}" if self.snapshot_path else
                                            "no snapshot_prefix, nothing saved")
                + "; resume with load_snapshot_path='auto' (--resume auto)")


class PreemptionFlag:
    """Installs flag-setting handlers for the preemption signals and SIGINT while active; restores the previous ones
    after. After a first SIGINT the next one raises ``KeyboardInterrupt`` at once (the previous handler's way)."""

    def __init__(self, signals=(*PREEMPTION_SIGNALS, "SIGINT")):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # pressed twice: stop now
                raise KeyboardInterrupt
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def interrupted(self) -> bool:
        """The signal is Ctrl-C (SIGINT), not a scheduler's preemption notice."""
        return self.received == signal.SIGINT

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
    """DataLoader ``worker_init_fn``: the trainer, not its workers, answers a preemption signal or a Ctrl-C."""
    for name in WORKER_IGNORES:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
