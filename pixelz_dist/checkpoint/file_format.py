"""Snapshot files: their names, their layout, writing them atomically and reading them without running code.

A snapshot is a dict of named parts (see :class:`~pixelz_dist.checkpoint.checkpointer.Checkpointer`) plus
``format_version``, ``per_rank`` and ``meta``. Version 3 (this one)::

    model, optimizer, scheduler (None without one), grad_scaler (None without one),
    progress   {"iteration"}
    data       the batch source's state: {"kind", "epoch", "position", ...}; for a user's DataLoader, whose place
               in the data is each rank's own, a list of them, one per rank
    epoch_loss {"sum", "count"}      the training loss of the epoch so far, for ReduceLROnPlateau
    ema        (only with ema=DECAY) {"decay", "include_buffers", "num_updates", "state_dict"}: the moving average
               of the weights, its state_dict shaped like model's (see pixelz_dist.engine.ema)
    warmup     None, or during a learning-rate warmup {"base": [the scheduler's lr per group]}
    callbacks  {"<index>:<class>": state}
    rng        [per rank: {"torch", "numpy", "python"[, "cuda"]}]
    per_rank   the names of the parts stored as a list of states in rank order (["data", "rng"] or ["rng"])
    meta       {"pixelz_dist", "torch", "time", "optimizer", "hyperparameters", "final"}; ``final`` is True only on
               the snapshot that ends a completed run (absent in older snapshots: not final), see :func:`is_final`

Version 2 named no ``per_rank``: only ``rng`` was one state per rank, and ``data`` was rank 0's alone, also for a
user's DataLoader. Version 1 (pixelz_dist 0.1.0, the flat layout) kept the epoch and the position in ``progress``
and rank 0's RNG state in ``rng`` beside ``rng_per_rank``. :func:`load_snapshot` turns both into version 3 when it
reads them.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import time

import torch

from ..errors import SnapshotError
from ..fileio import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
REQUIRED_KEYS = {1: ("format_version", "model", "optimizer", "scheduler", "progress", "data", "rng"),
                 2: ("format_version", "model", "optimizer", "scheduler", "progress", "data", "rng"),
                 3: ("format_version", "model", "optimizer", "scheduler", "progress", "data", "rng", "per_rank")}
_ITER_RE = re.compile(r"_iter_(\d+)\.pt$")


def snapshot_path(prefix: str, iteration: int) -> str:
    return f"{prefix}_iter_{iteration}.pt"


def list_snapshots(prefix: str) -> list[tuple[int, str]]:
    """Snapshots written for ``prefix``, newest (highest iteration) first."""
    folder = os.path.dirname(os.path.abspath(prefix))
    base = os.path.basename(prefix)
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(base + "_iter_") and entry.is_file():
            m = _ITER_RE.search(name)
            if m and name == f"{base}_iter_{m.group(1)}.pt":
                found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found, reverse=True)


def save_snapshot(snapshot: dict, path: str) -> None:
    """Write atomically: a kill mid-write leaves the previous file (or none), never a torn one."""
    with atomic_write(path) as f:
        torch.save(snapshot, f)


def load_snapshot(path: str) -> dict:
    """Load, check and (for an older format) upgrade a snapshot. Never unpickles code: ``weights_only=True``.

    A read that fails for a reason that may pass (an I/O error, a stale NFS handle, memory) is tried again after
    :data:`READ_RETRY_DELAYS`; if it still fails, :class:`SnapshotUnreadable` says so: the file may be intact, and
    a caller must not take it for a damaged one.

    Raises:
        SnapshotUnreadable: the file could not be read (it may be fine).
        SnapshotError: the file is missing, truncated, holds pickled objects other than tensors and plain
            containers, lacks a key, or was written by a newer format.
    """
    if not os.path.isfile(path):
        raise SnapshotError(f"snapshot {path!r} does not exist. HINT: pass an existing file, or 'auto' with "
                            "snapshot_prefix set to resume from the newest snapshot of that prefix.")
    delays, tries = list(READ_RETRY_DELAYS), 1
    while True:
        try:
            snap = _read(path)
            break
        except SnapshotUnreadable as e:
            if not (e.transient and delays):
                raise SnapshotUnreadable(
                    f"{e}{f', {tries} tries' if tries > 1 else ''}. The file may be intact: the storage did not "
                    "deliver it, so it is not taken for a damaged snapshot (nor an older one for it), and nothing "
                    "was trained or changed. HINT: start again once the file can be read (check permissions, the "
                    "file system, free memory); --resume auto then continues from it.", transient=e.transient) from e
            delay = delays.pop(0)
            tries += 1
            logger.warning("%s; trying again in %g s", e, delay)
            time.sleep(delay)
    if not isinstance(snap, dict):
        raise SnapshotError(f"{path!r} holds a {type(snap).__name__}, not a pixelz_dist snapshot (a dict).")
    version = snap.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SnapshotError(f"snapshot {path!r} has format version {version}, newer than this pixelz_dist "
                            f"understands ({FORMAT_VERSION}). HINT: upgrade pixelz_dist.")
    missing = [k for k in REQUIRED_KEYS.get(version, REQUIRED_KEYS[FORMAT_VERSION]) if k not in snap]
    if missing:
        raise SnapshotError(f"snapshot {path!r} lacks key(s) {missing}; it was not written by pixelz_dist's "
                            f"train_model (keys found: {sorted(snap)}).")
    return _upgrade(snap)


def _upgrade(snap: dict) -> dict:
    """An older format's snapshot in this format's layout, one version at a time."""
    if snap["format_version"] == 1:
        snap = _upgrade_from_1(snap)
    if snap["format_version"] == 2:
        snap = _upgrade_from_2(snap)
    return snap


class SnapshotUnreadable(SnapshotError):
    """A snapshot could not be *read* (I/O error, stale file handle, permissions, no memory): the file itself may be
    intact. ``transient``: the cause may pass by itself, so the read is worth trying again."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


#: Seconds to wait before each new try of a read that failed for a reason that may pass.
READ_RETRY_DELAYS = (1.0, 5.0, 15.0)
#: errno values of a read failure that says nothing about the file's content (NFS and Lustre give most of them).
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ESTALE", "EAGAIN", "EBUSY", "ETIMEDOUT", "ENOMEM", "ENOLCK", "ENETDOWN", "ENETUNREACH", "ENETRESET",
    "ECONNABORTED", "ECONNRESET", "ECONNREFUSED", "EHOSTDOWN", "EHOSTUNREACH", "EREMOTEIO", "ENOBUFS", "ENFILE",
    "EMFILE") if hasattr(errno, name))
#: errno values of a read that no retry will fix, but that say nothing about the file's content either.
_REFUSED_ERRNOS = frozenset((errno.EACCES, errno.EPERM))
#: Words of torch's allocator when a tensor of the file does not fit in memory.
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Cannot allocate memory")


def _read(path: str):
    """Read every byte through a Python file object, then ``torch.load`` the file memory-mapped.

    The read pass makes an I/O error an ``OSError`` with its errno (torch's own reader turns it into a RuntimeError
    that looks like a damaged file) and leaves the file in the page cache. The mapping then costs no memory of this
    process's own: the tensors are the cached pages, shared by every rank of the node that loads the same file (a
    copy each only where one is written to), where a plain load would hold one private copy per rank; and a snapshot
    that is only looked at (``find_latest_valid`` on an older candidate) is never deserialised into memory.
    """
    try:
        with open(path, "rb") as f:
            _read_through(f)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
            raise SnapshotError(
                f"refusing to load {path!r}: it contains pickled objects that could run code, which a pixelz_dist "
                f"snapshot never does ({detail or 'not tensors and plain containers'}). HINT: if you made this "
                "file yourself and trust it, load it with torch.load(weights_only=False) and re-save its tensors."
            ) from e
        raise SnapshotError(f"snapshot {path!r} is corrupt ({e}). HINT: resume from an older snapshot.") from e
    except FileNotFoundError as e:
        raise SnapshotError(f"snapshot {path!r} disappeared while it was read (removed by another process?)") from e
    except OSError as e:
        if e.errno in _TRANSIENT_ERRNOS or e.errno in _REFUSED_ERRNOS:  # the storage failed, not the file
            raise SnapshotUnreadable(f"cannot read snapshot {path!r}: {e.strerror or e} (errno {e.errno})",
                                     transient=e.errno in _TRANSIENT_ERRNOS) from e
        # others come from the content: torch seeks to offsets a truncated file does not have (EINVAL)
        raise SnapshotError(f"snapshot {path!r} is unreadable ({e.strerror or e}). HINT: it may be truncated; "
                            "resume from an older snapshot.") from e
    except MemoryError as e:
        raise SnapshotUnreadable(f"cannot read snapshot {path!r}: out of memory") from e
    except Exception as e:  # truncated zip, empty file, wrong format: all mean 'not a usable snapshot'
        if isinstance(e, RuntimeError) and any(words in str(e) for words in _OUT_OF_MEMORY):
            raise SnapshotUnreadable(f"cannot read snapshot {path!r}: out of memory ({_first_line(e)})") from e
        raise SnapshotError(f"snapshot {path!r} is unreadable ({type(e).__name__}: {_first_line(e)}). "
                            "HINT: it may be truncated; resume from an older snapshot.") from e


_READ_CHUNK = 16 << 20


def _read_through(f) -> None:
    buffer = bytearray(_READ_CHUNK)
    while f.readinto(buffer):
        pass


def _first_line(e: BaseException) -> str:
    """The first sentence of an error (torch's zip reader adds a paragraph of advice after it)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


def _upgrade_from_1(snap: dict) -> dict:
    """Format 1 -> 2: the data position moves from ``progress`` to ``data``; ``rng`` becomes the per-rank list."""
    snap = dict(snap)
    progress = snap["progress"]
    snap["progress"] = {"iteration": int(progress["iteration"])}
    snap["data"] = {**snap["data"], "epoch": int(progress["epoch"]), "position": int(progress["samples_in_epoch"])}
    snap["rng"] = snap.pop("rng_per_rank", None) or [snap["rng"]]
    snap["format_version"] = 2
    return snap


#: The keys of a user DataLoader's state that are each rank's own (the rest is the same on every rank).
_USER_LOADER_RANK_KEYS = ("loader", "epoch_start")


def _upgrade_from_2(snap: dict) -> dict:
    """Format 2 -> 3: the snapshot names its per-rank parts. A user DataLoader's ``data``, of which format 2 kept rank
    0's alone, becomes one state per rank (``rng`` tells how many ranks wrote it): rank 0's as it was, the others'
    without the keys only rank 0's value of was kept, so that a mid-epoch resume refuses them rather than giving
    every rank rank 0's place in the data."""
    snap = dict(snap)
    snap["per_rank"] = ["rng"]
    data = snap["data"]
    if data.get("kind") == "user_loader":
        others = {k: v for k, v in data.items() if k not in _USER_LOADER_RANK_KEYS}
        snap["data"] = [data] + [others] * (len(snap["rng"]) - 1)
        snap["per_rank"] = ["data", "rng"]
    snap["format_version"] = 3
    return snap


def is_final(snapshot: dict) -> bool:
    """Whether ``snapshot`` ends a completed run (``meta["final"]``; a snapshot written before the key existed is
    not final)."""
    meta = snapshot.get("meta")
    return bool(meta.get("final", False)) if isinstance(meta, dict) else False


def read_meta(path: str) -> dict:
    """The ``meta`` entry of the snapshot at ``path``, without reading its tensors (memory-mapped: only the few kB
    of the pickle are read), for a reader that only asks what a snapshot is.

    Raises:
        SnapshotError: the file is missing, unreadable or not a snapshot.
    """
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as e:
        raise SnapshotError(f"snapshot {path!r} disappeared while it was read (removed by another process?)") from e
    except Exception as e:  # truncated, not a zip, pickled code: not a snapshot this reader can use
        raise SnapshotError(f"snapshot {path!r} is unreadable ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(snap, dict):
        raise SnapshotError(f"{path!r} holds a {type(snap).__name__}, not a pixelz_dist snapshot (a dict).")
    meta = snap.get("meta")
    return dict(meta) if isinstance(meta, dict) else {}


def find_latest_valid(prefix: str) -> tuple[str, dict] | None:
    """The newest snapshot of ``prefix`` that loads, with its content; None when the prefix holds no snapshot.

    A newer snapshot that is damaged (truncated, not a snapshot) is skipped with a warning, for an older one.

    Raises:
        SnapshotUnreadable: a snapshot could not be read even after retries (the storage failed, not the file):
            resuming from an older one would silently give up the newer, so nothing is chosen.
        NoLoadableSnapshot: the prefix holds snapshots and none of them loads; the message lists each and why.
    """
    failures = []
    for _, path in list_snapshots(prefix):
        try:
            found = path, load_snapshot(path)
        except SnapshotUnreadable:
            raise
        except SnapshotError as e:
            if os.path.exists(path):  # one pruned under our feet is simply gone
                failures.append((path, e))
            continue
        for skipped, e in failures:
            logger.warning("skipping snapshot %s: %s", skipped, _reason(e, skipped))
        return found
    if failures:
        raise NoLoadableSnapshot(prefix, failures)
    return None


class NoLoadableSnapshot(SnapshotError):
    """The prefix holds snapshots, none of which loads: starting from scratch would train over a run."""

    def __init__(self, prefix: str, failures: list[tuple[str, SnapshotError]]):
        self.prefix, self.paths = prefix, [path for path, _ in failures]
        listed = "; ".join(f"{os.path.basename(path)}: {_reason(e, path)}" for path, e in failures)
        super().__init__(
            f"snapshot prefix {prefix!r} holds {len(failures)} snapshot(s) and none of them can be loaded ({listed}). "
            "Nothing was trained and no file was changed: starting from scratch would train over that run. HINT: "
            "resume from a good copy of a snapshot (load_snapshot_path=FILE, --resume FILE); or, if that run is "
            "lost, start afresh with overwrite=True (--overwrite), which renames these files NAME.old-<time> "
            "instead of deleting them.")


def _reason(error: SnapshotError, path: str) -> str:
    """The part of a load error that is about the file, without its path and hint (they are said once)."""
    text = str(error).replace(f"snapshot {path!r} ", "").replace(f"{path!r} ", "")
    text = text[3:] if text.startswith("is ") else text
    return text.split(" HINT:")[0].rstrip(". ")


def prune_snapshots(prefix: str, keep_last: int, keep: str, spared=frozenset()) -> None:
    """Delete all but the ``keep_last`` newest snapshots of ``prefix``; ``keep`` (the one just written) never goes,
    nor do the absolute paths in ``spared`` (the best snapshots)."""
    others = [path for _, path in list_snapshots(prefix) if os.path.abspath(path) != os.path.abspath(keep)]
    for path in others[max(keep_last - 1, 0):]:
        if os.path.abspath(path) in spared:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def set_aside_newer(prefix: str, iteration: int) -> list[str]:
    """Rename the snapshots of ``prefix`` newer than ``iteration`` to ``NAME.abandoned-<time>`` (kept, but no longer
    snapshots of the prefix: ``auto`` and pruning ignore them); returns the new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for it, path in list_snapshots(prefix):
        if it > iteration:
            target = f"{path}.abandoned-{stamp}"
            os.replace(path, target)
            moved.append(target)
    return moved
