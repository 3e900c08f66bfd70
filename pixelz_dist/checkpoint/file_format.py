"""Snapshot files: their names, their layout, writing them atomically and reading them without running code.

A snapshot is a dict of named parts (see :class:`~pixelz_dist.checkpoint.checkpointer.Checkpointer`) plus
``format_version``, ``per_rank`` and ``meta``. Version 3 (this one)::

    model, optimizer, scheduler (None without one), grad_scaler (None without one),
    progress   {"iteration"}
    data       the batch source's state: {"kind", "epoch", "position", ...}; for a user's DataLoader, whose place
               in the data is each rank's own, a list of them, one per rank
    epoch_loss {"sum", "count"}      the training loss of the epoch so far, for ReduceLROnPlateau
    callbacks  {"<index>:<class>": state}
    rng        [per rank: {"torch", "numpy", "python"[, "cuda"]}]
    per_rank   the names of the parts stored as a list of states in rank order (["data", "rng"] or ["rng"])
    meta       {"pixelz_dist", "torch", "time", "optimizer"}

Version 2 named no ``per_rank``: only ``rng`` was one state per rank, and ``data`` was rank 0's alone, also for a
user's DataLoader. Version 1 (pixelz_dist 0.1.0, the flat layout) kept the epoch and the position in ``progress``
and rank 0's RNG state in ``rng`` beside ``rng_per_rank``. :func:`load_snapshot` turns both into version 3 when it
reads them.
"""

from __future__ import annotations

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

    Raises:
        SnapshotError: the file is missing, truncated, holds pickled objects other than tensors and plain
            containers, lacks a key, or was written by a newer format.
    """
    if not os.path.isfile(path):
        raise SnapshotError(f"snapshot {path!r} does not exist. HINT: pass an existing file, or 'auto' with "
                            "snapshot_prefix set to resume from the newest snapshot of that prefix.")
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
            raise SnapshotError(
                f"refusing to load {path!r}: it contains pickled objects that could run code, which a pixelz_dist "
                f"snapshot never does ({detail or 'not tensors and plain containers'}). HINT: if you made this "
                "file yourself and trust it, load it with torch.load(weights_only=False) and re-save its tensors."
            ) from e
        raise SnapshotError(f"snapshot {path!r} is corrupt ({e}). HINT: resume from an older snapshot.") from e
    except Exception as e:  # truncated zip, empty file, wrong format: all mean 'not a usable snapshot'
        raise SnapshotError(f"snapshot {path!r} is unreadable ({type(e).__name__}: {e}). "
                            "HINT: it may be truncated; resume from an older snapshot.") from e
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


def find_latest_valid(prefix: str) -> tuple[str, dict] | None:
    """The newest snapshot of ``prefix`` that loads, with its content; unreadable ones are skipped with a warning."""
    for _, path in list_snapshots(prefix):
        try:
            return path, load_snapshot(path)
        except SnapshotError as e:
            logger.warning("skipping snapshot: %s", e)
    return None


def prune_snapshots(prefix: str, keep_last: int, keep: str) -> None:
    """Delete all but the ``keep_last`` newest snapshots of ``prefix``; ``keep`` (the one just written) never goes."""
    others = [path for _, path in list_snapshots(prefix) if os.path.abspath(path) != os.path.abspath(keep)]
    for path in others[max(keep_last - 1, 0):]:
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
