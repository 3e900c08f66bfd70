"""A DataLoader worker process that ended under training: torch's words for it, and the one clear error they become.

Workers end unexpectedly when the kernel's OOM killer picks one (SIGKILL, by far the most common), when native code
in them crashes (SIGSEGV, SIGABRT), when /dev/shm is full (SIGBUS), or when something in them calls ``exit``. torch
notices it at once: its SIGCHLD handler raises ``RuntimeError: DataLoader worker (pid N) is killed by signal:
Killed.`` in the main thread *wherever it happens to be* (inside the user's model, a callback, a snapshot write), or
the next fetch raises ``DataLoader worker (pid(s) N) exited unexpectedly``. Ending fast is right; the 40-75-line
traceback that ends in innocent code is not. :func:`worker_death` recognises those errors and builds a
:class:`~pixelz_dist.errors.WorkerDied` that says which worker ended, how, and what to do; the engine raises it in
their place (through ``BatchSource.worker_died``, so our dataset's loader, a user's DataLoader and the LR finder's
runs all get it). The snapshots written before are intact, and resuming from them is exact.
"""

from __future__ import annotations

import re
import signal
import time

from ..errors import WorkerDied

_TORCH_WORDS = re.compile(r"DataLoader worker \(pid(?:\(s\))? (\d+)")
_KILLED = re.compile(r"is killed by signal: ([^.]+)\.")
_EXITED = re.compile(r"exited unexpectedly with exit code (-?\d+)")

_RESUME = "then resume with --resume auto (load_snapshot_path='auto'): it continues exactly from the newest snapshot"
_WHY = {  # signal -> (what it usually means, what to do before resuming)
    signal.SIGKILL: ("often out of memory (the kernel's OOM killer; `dmesg` or the job's memory report says so)",
                     "use fewer workers (--workers / num_workers, now {workers}) or smaller batches, or give the job "
                     "more memory"),
    signal.SIGBUS: ("often /dev/shm is full (workers hand batches over in shared memory)",
                    "give /dev/shm more room (docker run --shm-size=8g) or use fewer workers (--workers / "
                    "num_workers, now {workers})"),
    signal.SIGSEGV: ("a crash in native code it ran (an image decoder, a C extension)",
                     "run with --workers 0 (num_workers=0) to see where, in the main process"),
}
_WHY[signal.SIGABRT] = _WHY[signal.SIGSEGV]


def worker_death(error: BaseException, workers=()) -> WorkerDied | None:
    """``error`` as a :class:`WorkerDied` when it (or an exception it was raised from) is torch's word that a
    DataLoader worker ended; None for any other error.

    Args:
        error: what the training loop raised.
        workers: the ``multiprocessing`` processes of the DataLoader iterator that was running (torch's
            ``iterator._workers``, in worker-id order); the dead one's exit status is read from them. Without them
            the pid and signal come from torch's message.
    """
    text = _torch_words(error)
    if text is None:
        # A worker killed while the main process was receiving its batch: the batch's shared-memory handle can no
        # longer be fetched from the dead worker, and multiprocessing says so first (ConnectionResetError, EOFError
        # from resource_sharer), before torch's own message. It is the worker's death only if one of them ended.
        if not workers or not _in_chain(error, (ConnectionError, EOFError)):
            return None
        dead = _ended(workers)
        if not dead:
            return None
        text, named = "", dead[0][1].pid
    else:
        named = int(_TORCH_WORDS.search(text).group(1))
        dead = [(i, w) for i, w in enumerate(workers) if w.exitcode not in (None, 0)]  # exitcode reaps: read it once
    dead.sort(key=lambda item: item[1].pid != named)  # the worker torch named first
    if dead:
        index, worker = dead[0]
        pid, code = worker.pid, worker.exitcode
        sig, exited = (-code, None) if code < 0 else (None, code)
    else:  # not one of the loop's workers (a loader iterated elsewhere): torch's message is all there is
        index, pid = None, named
        killed, exited_match = _KILLED.search(text), _EXITED.search(text)
        sig = _signal_named(killed.group(1)) if killed else None
        exited = int(exited_match.group(1)) if exited_match and sig is None else None
    message = _describe(index, pid, sig, exited, len(workers) or "?")
    if len(dead) > 1:
        message += f" ({len(dead) - 1} other worker(s) of the loader ended too)"
    return WorkerDied(message, worker=index, pid=pid, signal=sig, exit_code_of_worker=exited)


def _describe(index, pid, sig, exited, workers) -> str:
    who = f"DataLoader worker {index} (pid {pid})" if index is not None else f"a DataLoader worker (pid {pid})"
    if sig is not None:
        name = _signal_name(sig)
        why, todo = _WHY.get(sig, ("something outside the worker ended it (a user's kill, a scheduler)",
                                   "find what sent it"))
        return f"{who} was killed by signal {sig} ({name}): {why}. HINT: {todo.format(workers=workers)}; {_RESUME}."
    what = f"exited with code {exited}" if exited is not None else "exited unexpectedly"
    return (f"{who} {what}: something in the worker ended its process (sys.exit or os._exit in the dataset, or a "
            f"library it calls). HINT: run with --workers 0 (num_workers=0) to see where, in the main process; "
            f"{_RESUME}.")


def _torch_words(error: BaseException) -> str | None:
    """The texts of torch's worker-died errors in ``error``'s chain of causes (the fetch's "exited unexpectedly"
    is raised from the SIGCHLD handler's, which has the signal), joined; None when there is none."""
    seen, texts = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and not isinstance(error, WorkerDied):
            text = str(error)
            if _TORCH_WORDS.search(text):
                texts.append(text)
        error = error.__cause__ or error.__context__
    return " | ".join(texts) if texts else None


def _in_chain(error: BaseException, kinds: tuple) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return True
        error = error.__cause__ or error.__context__
    return False


def _ended(workers, wait_s: float = 1.0) -> list:
    """The workers that ended, as ``(index, process)``; waits up to ``wait_s`` for the kernel to report a worker that
    is dying (a SIGKILL is delivered at once, but its exit status may not be ready at the instant the pipe broke)."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(i, w) for i, w in enumerate(workers) if w.exitcode not in (None, 0)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.02)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _signal_named(description: str) -> int | None:
    """The signal whose ``strsignal`` text torch printed ("Killed" -> 9)."""
    for sig in signal.Signals:
        if signal.strsignal(sig) == description:
            return int(sig)
    return None
