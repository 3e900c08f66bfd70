"""Warnings and errors of every rank in the job's output, each once, naming the ranks that logged it.

Under torchrun only rank 0 prints INFO lines (64 copies of each progress line help nobody; ``PIXELZ_LOG_ALL_RANKS=1``
shows every rank's, prefixed). Warnings and errors are different: the bad file rank 5 skipped, the setting every rank
found changed on resume, must reach the job's output, and 64 ranks must not print 64 copies. While ``train_model``
runs, :func:`rank_logging` puts a :class:`LogRelay` on the library's loggers: a WARNING or worse, on any rank, in the
main process or a DataLoader worker, becomes one entry in the job's c10d store; rank 0 prints what has arrived at
fixed points (training starts, each log line, the end, any error on the way out), identical messages
merged into one line that names the ranks: ``[ranks 1,3-5] skipping sample 7 ...``.

Why the store, and not each rank writing ``[rank N] ...`` to its own stderr:

- Merging needs one reader that sees every rank's lines. Per-rank stderr cannot merge 64 copies without the same
  exchange, and torchrun interleaves the ranks' streams as it likes.
- A log call comes at any moment on any rank, so it cannot be a collective. The store needs no matching: torchrun's
  agent hosts it at MASTER_ADDR:MASTER_PORT (without torchrun, rank 0's ``env://`` group does), an entry is three
  round trips, paid only when something is logged: nothing is added to the training step.
- Lines are not lost when a rank dies: the agent's store outlives its workers, and rank 0 prints them at its next
  flush, at the latest on its own way out (a dead peer makes its next collective fail). Only a rank 0 killed outright
  (SIGKILL, a crash in native code) loses them, and its own lines with them.
- DataLoader workers are forked: they inherit the relay but not a usable connection (a socket shared across fork is
  not usable), so each process opens its own the first time it logs (:func:`job_store`, keyed by pid).
- Rank 0 prints right after a collective (DDP's broadcast at the start, the log line's sum over ranks, a barrier at
  the end): whatever any rank logged before entering that collective is in the store by then, so the same message
  logged at the same place of the program on every rank meets its copies in one line. (Not at an epoch's end: a
  warning every rank logs there, after the last collective, would race rank 0's flush and come out twice.)
- The user's logging configuration is kept: rank 0 re-emits each merged line as a record of the logger that logged
  it (its level, the time of its first occurrence), through that logger's handlers and the root's.
- Keys live under ``pixelz_dist/logs/attempt_{TORCHELASTIC_RESTART_COUNT}/call_{n}``: a restarted job must not meet
  the previous attempt's lines (the agent keeps its store across restarts: see the notes on elastic restarts in
  :mod:`pixelz_dist.distributed.env`), nor one ``train_model`` call (find_lr makes many) the lines of another.

The price: rank 0's own warnings wait for the next of those points (at most ``display_iter`` iterations) instead of
appearing at once, because a line can name every rank that logged it only after the others had the chance to. When
no store can be reached (a group made with a ``file://`` or ``tcp://`` init method, no MASTER_ADDR), every rank
prints its own warnings at once, prefixed ``[rank N]``, as a fallback without merging.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as tdist

from ..log import filtering, tag_rank
from .preemption import Interrupted, Preempted

logger = logging.getLogger(__name__)

_ABSENT = b"\x00absent"  # compare_set(key, _ABSENT, _ABSENT) reads a key without blocking: this when it is missing
_MAX_MESSAGE = 4000  # characters of one message kept in the store (a traceback can be long)
CONNECT_TIMEOUT_S = 10.0  # the job's own store answers at once; a wrong MASTER_ADDR must not stall the start

_calls = [0]  # train_model calls with a relay in this process: every rank counts alike, so their key spaces agree
_active: list[LogRelay] = []  # the relay of the running train_model call (flush_rank_logs finds it)
_clients: dict = {}  # (pid, host, port) -> TCPStore client; a forked worker never uses (or closes) its parent's


class LogRelay(logging.Filter):
    """The filter on the library's loggers while ``train_model`` runs under torchrun (see the module docstring).

    Args:
        rank: this process's rank.
        namespace: the key prefix of this call in the job's store.
        all_ranks: PIXELZ_LOG_ALL_RANKS=1: every rank prints everything at once, prefixed, nothing merged.
        connect: returns a store client for ``namespace`` (called once per process: the main one and each worker
            that logs), or None when the job's store cannot be reached. Default: :func:`job_store`.
    """

    def __init__(self, rank: int, namespace: str, all_ranks: bool = False, connect=None):
        super().__init__()
        self.rank, self.namespace, self.all_ranks = rank, namespace, all_ranks
        self.pid = os.getpid()  # the rank's main process; any other pid is one of its DataLoader workers
        self._connect = connect or (lambda: job_store(namespace))
        self._stores: dict = {}  # pid -> store or None
        self._held: list[dict] = []  # rank 0's own lines, printed with the others' at the next flush
        self._next = 1  # rank 0: the first entry not read yet
        self._unread: list[int] = []  # rank 0: entries counted but not there yet (a write still on its way)
        self._lock = threading.Lock()

    # -- every process ---------------------------------------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "pixelz_ranks", None) is not None:  # a merged line on its way out, or already tagged
            return True
        if self.all_ranks:
            tag_rank(record, self.rank)
            return True
        if record.levelno < logging.WARNING:
            return self.rank == 0
        line = _line(record, self.rank)
        if self.rank == 0 and os.getpid() == self.pid and self.store() is not None:
            self._held.append(line)
            return False
        if self._send(line):
            return False
        if self.rank != 0:  # no store: printed here, at once, prefixed
            tag_rank(record, self.rank)
        return True

    def store(self):
        pid = os.getpid()
        if pid not in self._stores:
            self._stores[pid] = self._connect()
        return self._stores[pid]

    def _send(self, line: dict) -> bool:
        store = self.store()
        if store is None:
            return False
        try:
            with self._lock:
                seq = store.add("count", 1)
                store.set(f"line_{seq}", json.dumps(line))
                store.check([f"line_{seq}"])  # a round trip: the entry is in before this process passes a collective
            return True
        except Exception:  # noqa: BLE001 - a store that fails must not take training down: print the line here
            return False

    # -- rank 0 ----------------------------------------------------------------------------------------------------
    def flush(self, final: bool = False) -> None:
        """Rank 0's main process: print the lines that have arrived, identical messages merged. ``final``: the last
        flush of this call; entries still on their way get a moment to arrive."""
        if self.rank != 0 or os.getpid() != self.pid:
            return
        lines, self._held = self._held, []
        store = self.store()
        if store is not None:
            lines += self._take(store, final)
        for record in merge(lines):
            logging.getLogger(record.name).handle(record)

    def _take(self, store, final: bool) -> list[dict]:
        lines: list[dict] = []
        try:
            with self._lock:
                last = int(store.add("count", 0))
                wanted, self._unread = self._unread + list(range(self._next, last + 1)), []
                self._next = last + 1
                for _ in range(20 if final else 1):
                    missing = []
                    for seq in wanted:
                        value = store.compare_set(f"line_{seq}", _ABSENT, _ABSENT)
                        if value == _ABSENT:
                            missing.append(seq)
                        elif store.delete_key(f"line_{seq}"):  # read once, then gone: the store does not grow
                            lines.append(json.loads(value))
                    wanted = missing
                    if not wanted or not final:
                        break
                    time.sleep(0.05)  # a writer between its count and its entry (a dead writer's stays missing)
                self._unread = [] if final else wanted
        except Exception as e:  # noqa: BLE001 - the store went away (the job is ending): print what was read
            logger.debug("log relay: the store cannot be read (%s)", e)
        return lines


def merge(lines: list[dict]) -> list[logging.LogRecord]:
    """One record per distinct (level, logger, message), in order of first occurrence, naming its ranks."""
    groups: dict = {}
    for line in sorted(lines, key=lambda item: item["time"]):
        first, ranks = groups.setdefault((line["level"], line["name"], line["msg"]), (line, set()))
        ranks.add(line["rank"])
    records = []
    for (level, name, message), (first, ranks) in groups.items():
        label = rank_list(ranks)
        record = logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level),
                                        "msg": f"[{label}] {message}", "args": None, "pixelz_ranks": label})
        record.created, record.msecs = first["time"], (first["time"] % 1) * 1000
        records.append(record)
    return records


def rank_list(ranks) -> str:
    """``rank 3``; ``ranks 0,1``; ``ranks 1,3-5,9`` (runs of three or more as ranges)."""
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    parts, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[i - 1] + 1:
            run = ranks[start:i]
            parts += [f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(r) for r in run]
            start = i
    return "ranks " + ",".join(parts)


def _line(record: logging.LogRecord, rank: int) -> dict:
    message = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        message = f"{message}\n{record.exc_text}"
    return {"rank": rank, "level": record.levelno, "name": record.name, "msg": message[:_MAX_MESSAGE],
            "time": record.created}


def job_store(namespace: str):
    """A client of the job's store under ``namespace``, or None when there is none to reach.

    torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT (with ``env://``, rank 0's group does). Each process
    opens its own connection: a forked DataLoader worker cannot use the one it inherited.
    """
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    key = (os.getpid(), host, port)
    try:
        if key not in _clients:
            _clients[key] = tdist.TCPStore(host, int(port), is_master=False,
                                           timeout=timedelta(seconds=CONNECT_TIMEOUT_S))
        return tdist.PrefixStore(namespace, _clients[key])
    except Exception as e:  # noqa: BLE001 - no store: each rank prints its own lines
        logger.debug("log relay: no store at %s:%s (%s)", host, port, e)
        _clients[key] = None
        return None


class FlushPoints:
    """The relay's flush points that are callback events (used as a callback; the log line flushes through
    :func:`flush_rank_logs`). Each follows a collective: training starts after DDP's broadcast, and ends after the
    last exchange of stop requests and the final snapshot's broadcast."""

    def __init__(self, relay: LogRelay):
        self.relay = relay

    def on_train_start(self, state):
        self.relay.flush()

    def on_train_end(self, state):
        self.relay.flush()


def flush_rank_logs() -> None:
    """Print the lines of every rank that have arrived (rank 0; a no-op elsewhere and without a relay). Called where
    every rank has just passed the same collective: the log line."""
    if _active:
        _active[-1].flush()


@contextmanager
def rank_logging(rank: int, world_size: int):
    """While active (one ``train_model`` call), the library's loggers go through a :class:`LogRelay`; yields the
    callbacks that flush it (an empty list for a single process, where nothing changes).

    On the way out rank 0 prints what is left: after a barrier when the call ends normally or every rank leaves
    together (a preemption, Ctrl-C), at once after an error (a peer may be gone).
    """
    if world_size <= 1:
        yield []
        return
    _calls[0] += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    relay = LogRelay(rank, f"pixelz_dist/logs/attempt_{attempt}/call_{_calls[0]}",
                     all_ranks=os.environ.get("PIXELZ_LOG_ALL_RANKS") == "1")
    if rank == 0 and not relay.all_ranks:
        relay.store()  # connect now: rank 0 must know whether to hold its own lines for merging
    together = True
    _active.append(relay)
    try:
        with filtering(relay):
            try:
                yield [FlushPoints(relay)]
            except BaseException as e:
                together = isinstance(e, (Preempted, Interrupted))
                raise
            finally:
                if together and tdist.is_available() and tdist.is_initialized():
                    try:  # every rank's last lines are in the store before rank 0 reads them
                        tdist.barrier()
                    except Exception:  # noqa: BLE001 - a peer gone at the very end: the group's own exit says so
                        pass
                relay.flush(final=True)
    finally:
        _active.remove(relay)
