"""A snapshot prefix belongs to one run: claimed with a lock, checked for writing before the first iteration, cleared
of temporary files that killed writes left, and never shared by a fresh run with an old one's snapshots.

The lock is ``{prefix}.lock``, held with ``fcntl.lockf`` for the whole run: the kernel releases it when the process
ends, however it ends (SIGKILL, a node lost), so a killed run cannot leave it stuck; the file itself says who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import socket
import time

from ..errors import ConfigError
from .file_format import list_snapshots

logger = logging.getLogger(__name__)

#: Files a run writes beside its snapshots (set aside with them by ``overwrite``); ``_eval.jsonl`` is written by
#: ``python -m pixelz_dist.evaluate`` beside the run, and names the old run's snapshots.
RECORDS = ("_metrics.jsonl", "_order.tsv", "_best.pt", "_eval.jsonl")


class PrefixLock:
    """The run's claim on ``prefix``: :meth:`acquire` or a ConfigError that says who holds it."""

    def __init__(self, prefix: str):
        self.path = f"{prefix}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises:
            ConfigError: the folder cannot be written, or another live run holds the prefix.
        """
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot write snapshots to {folder!r} ({e.strerror or e}): the snapshot prefix must be "
                              f"in a folder this process can create and write. HINT: choose another snapshot_prefix "
                              "(--snapshot-prefix), or fix the folder's permissions.") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without locks: say so, go on
                logger.warning("cannot lock %s (%s): two runs writing this prefix at once would not be noticed",
                               self.path, e.strerror or e)
            else:
                holder = _read(fd)
                os.close(fd)
                raise ConfigError(f"another run is writing snapshots to this prefix ({holder or 'holder unknown'}; "
                                  f"lock {self.path}). Two runs in one prefix replace each other's snapshots. HINT: "
                                  "give this run another snapshot_prefix, or wait for that one to end (a killed run "
                                  "releases the lock by itself).") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (removing it would race a new claimant)
            self._fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def remove_stale_temporaries(prefix: str) -> None:
    """Delete the temporary files of this prefix's snapshot writes that a kill interrupted (only its lock holder
    may: no write of this prefix is under way then)."""
    folder, base = os.path.split(os.path.abspath(prefix))
    stale = glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}_iter_*.pt.*.tmp"))
    if not stale:
        return
    size = 0
    for path in stale:
        try:
            size += os.path.getsize(path)
            os.unlink(path)
        except FileNotFoundError:
            pass
    logger.info("removed %d unfinished snapshot file(s) of %r left by killed writes (%.1f MB)", len(stale), prefix,
                size / 1e6)


def check_fresh_start(prefix: str, overwrite: bool) -> None:
    """A run that does not resume starts from an empty prefix: another run's snapshots there would be pruned, or
    taken by ``auto``, in place of this run's.

    Raises:
        ConfigError: the prefix holds snapshots and ``overwrite`` is False.
    """
    found = list_snapshots(prefix)
    records = [prefix + suffix for suffix in RECORDS if os.path.exists(prefix + suffix)]
    if found and not overwrite:
        newest_iteration, newest = found[0]
        raise ConfigError(
            f"snapshot prefix {prefix!r} already holds {len(found)} snapshot(s) of another run (newest: {newest}, "
            f"iteration {newest_iteration}), and this run does not resume. HINT: continue that run with "
            "load_snapshot_path='auto' (--resume auto); or start this one under another snapshot_prefix; or pass "
            "overwrite=True (--overwrite) to set the old run's files aside (renamed, not deleted) and start afresh.")
    if not found and not records:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in [p for _, p in found] + records:
        os.replace(path, f"{path}.old-{stamp}")
        moved.append(os.path.basename(path))
    logger.warning("%s: set aside %d file(s) of an earlier run as NAME.old-%s: %s",
                   "overwrite=True" if found else "a fresh run", len(moved), stamp, ", ".join(moved))
