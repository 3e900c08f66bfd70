"""What a snapshot holds, how it is written (atomically) and read (``weights_only``), and how a bad one is refused."""

from __future__ import annotations

import os
import pickle
import re
import tempfile

import torch

from .errors import SnapshotError
from .log import logger

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "progress", "data", "rng")
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


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill mid-write never leaves a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_snapshot(path: str) -> dict:
    """Load and check a snapshot. Never unpickles code: ``torch.load(weights_only=True)``.

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
    missing = [k for k in REQUIRED_KEYS if k not in snap]
    if missing:
        raise SnapshotError(f"snapshot {path!r} lacks key(s) {missing}; it was not written by pixelz_dist's "
                            f"train_model (keys found: {sorted(snap)}).")
    if snap["format_version"] > FORMAT_VERSION:
        raise SnapshotError(f"snapshot {path!r} has format version {snap['format_version']}, newer than this "
                            f"pixelz_dist understands ({FORMAT_VERSION}). HINT: upgrade pixelz_dist.")
    return snap


def find_latest_valid(prefix: str) -> tuple[str, dict] | None:
    """The newest snapshot of ``prefix`` that loads; unreadable ones are skipped with a warning."""
    for _, path in list_snapshots(prefix):
        try:
            return path, load_snapshot(path)
        except SnapshotError as e:
            logger.warning("skipping snapshot: %s", e)
    return None


def check_model_state(model: torch.nn.Module, state: dict, source: str, strict: bool = True) -> None:
    """Refuse a model state that does not fit, listing every mismatching key at once."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: snapshot {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    problems = []
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if strict and missing:
        problems.append(f"missing from the snapshot: {missing}")
    if strict and unexpected:
        problems.append(f"not in the model: {unexpected}")
    if problems:
        raise SnapshotError(f"snapshot {source!r} does not fit the model ({type(model).__name__}): "
                            + " | ".join(problems)
                            + ". HINT: build the same architecture as the run that wrote it"
                            + ("" if not strict else ", or pass strict_load=False to load matching keys only") + ".")


def prune_snapshots(prefix: str, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest snapshots of ``prefix``."""
    for _, path in list_snapshots(prefix)[keep_last:]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
