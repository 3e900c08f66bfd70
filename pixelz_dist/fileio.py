"""Files a run writes: atomically replaced ones (snapshots, configurations, results) and appended records.

A reader (a resuming run, another rank, a person) must never see a half-written file, and a kill must never leave a
torn one in its place: :func:`atomic_write` writes a hidden temporary file in the same folder, flushes it to disk and
renames it over the target. Its mode follows the umask like any file the user creates.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _umask() -> int:
    try:  # Linux: read it, rather than set and restore it (a race with other threads creating files)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str, mode: str = "wb", *, encoding: str | None = None, durable: bool = True) -> Iterator:
    """``with atomic_write(path) as f: ...`` writes ``path`` all at once or not at all.

    The temporary file is ``.NAME.<random>.tmp`` beside ``path`` (hidden, so folder scans skip it); on any error it is
    removed and ``path`` keeps its old content. ``durable``: flush the file and the folder to the disk before
    returning, so a power loss cannot undo the write (what a snapshot needs; regenerable files can skip it).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a snapshot on shared storage is for the team too
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AppendFile:
    """A text file a run appends lines to; opened per flush, so nothing is held open across a kill."""

    def __init__(self, path: str, header: str | None = None):
        self.path = path
        self.header = header
        self.pending: list[str] = []
        self._folder_made = False
        self._checked_end = False

    def add(self, line: str) -> None:
        self.pending.append(line)

    def add_json(self, row: dict) -> None:
        self.pending.append(json.dumps(row, separators=(",", ":")))

    def flush(self) -> None:
        if not self.pending:
            return
        if not self._folder_made:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._folder_made = True
        new = not os.path.exists(self.path)
        torn = not new and not self._checked_end and _ends_torn(self.path)
        self._checked_end = True  # our own flushes end every line
        with open(self.path, "a", encoding="utf-8") as f:
            if new and self.header:
                f.write(self.header + "\n")
            # a run killed in the middle of a flush left a line without its end: ours must not be glued to it
            f.write(("\n" if torn else "") + "\n".join(self.pending) + "\n")
        self.pending.clear()


def _ends_torn(path: str) -> bool:
    """Whether the file's last line lacks its newline (an append cut short by a kill)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False
