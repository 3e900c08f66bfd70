"""The series that the training curves show, read from the files a run writes: ``{prefix}_metrics.jsonl`` (one row
per display window, rank 0) and, when the evaluation follower ran, ``{prefix}_eval.jsonl``.

A resumed run appends to the same metrics file, after a marker row ``{"resumed_at": N, "snapshot": PATH}``. The run
that was killed may have written rows past iteration N before it died; those rows belong to a timeline that no
longer exists (the resumed run trains iterations N+1... again), so the marker drops them and the curves stay
continuous: every iteration appears once, with the value of the run that owns it now. Files written before the
marker existed are handled by the step backwards itself: a row whose iteration is below one already read starts a
new timeline from there. Within a timeline, a value logged twice for the same iteration keeps the last one.

A kill can tear the last line of a file; a torn line is skipped (and a row the next run appended to the torn part of
the same line is still read).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

__all__ = ["CurveData", "Series", "continuous_rows", "curves_path", "load_curves", "read_jsonl", "resolve_prefix"]

logger = logging.getLogger(__name__)

METRICS_SUFFIX, EVAL_SUFFIX, CURVES_SUFFIX = "_metrics.jsonl", "_eval.jsonl", "_curves.png"
RESUME_KEY = "resumed_at"
# what a metrics row holds besides the values callbacks log (grad_norm, ...), which go to their own panel
TRAIN_KEYS = frozenset({"iteration", "total", "epoch", "loss", "lr", "samples_per_s", "data_wait", "elapsed_s",
                        "eta_s", "skipped_steps"})
EVAL_META_KEYS = frozenset({"iteration", "snapshot", "ema"})


@dataclass
class Series:
    """One curve: ``values[i]`` measured at ``iterations[i]`` (increasing, each once)."""

    iterations: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.iterations)


@dataclass
class CurveData:
    """Everything the curves show, each an iteration-indexed :class:`Series`.

    Attributes:
        loss: the training loss, mean of each display window.
        lrs: the learning rate of each param group (in the optimizer's group order).
        samples_per_s: training throughput, all ranks together.
        data_wait: the share of the window spent waiting for data (0..1).
        validation: the metrics file's ``val*`` values (``val_loss``, ``val_miou``, ...).
        evaluation: the eval file's values (``loss``, ``miou``, ...; ``"miou (ema)"`` for EMA weights).
        extra: other values callbacks logged (``grad_norm``, ...).
        resumed_at: the iterations the run was resumed from, in order.
        unreadable_lines: lines skipped because they are not JSON objects (torn by a kill, or foreign).
    """

    loss: Series
    lrs: list[Series]
    samples_per_s: Series
    data_wait: Series
    validation: dict[str, Series] = field(default_factory=dict)
    evaluation: dict[str, Series] = field(default_factory=dict)
    extra: dict[str, Series] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)
    unreadable_lines: int = 0


def resolve_prefix(prefix_or_file: str) -> str:
    """The run's prefix from a prefix or the path of its metrics file."""
    return prefix_or_file[:-len(METRICS_SUFFIX)] if prefix_or_file.endswith(METRICS_SUFFIX) else prefix_or_file


def curves_path(prefix: str) -> str:
    return resolve_prefix(prefix) + CURVES_SUFFIX


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """The JSON objects of a file, one per line, and the number of lines that are not one.

    A line torn by a kill, to which the next run appended a whole row (the torn part had no newline), yields that
    row: it starts at the last ``{"`` of the line (rows are flat objects).
    """
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = _parse(line)
            if row is None:
                start = line.rfind('{"')
                row = _parse(line[start:]) if start > 0 else None
                bad += 1
            if row is not None:
                rows.append(row)
    return rows, bad


def _parse(text: str) -> dict | None:
    try:
        row = json.loads(text)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _iteration(row: dict) -> int | None:
    it = row.get("iteration")
    return it if isinstance(it, int) and not isinstance(it, bool) else None


def continuous_rows(rows: list[dict]) -> tuple[list[dict], list[int]]:
    """The rows of the run's current timeline, in file order, and the iterations it was resumed from.

    A ``{"resumed_at": N}`` marker drops the rows of iterations after N written before it (by the killed run). A
    training row (the log line's: it has ``loss`` and ``lr``) whose iteration is below that of the training row before
    it (a file written before markers existed) drops the rows from its iteration on. Other rows (validation values
    of a snapshot, written when it is durable, a few iterations later) may come late. Rows without an integer
    ``iteration`` are left out.
    """
    kept: list[dict] = []
    resumed: list[int] = []
    top = -math.inf  # the last training row's iteration
    for row in rows:
        if RESUME_KEY in row:
            try:
                at = int(row[RESUME_KEY])
            except (TypeError, ValueError):
                continue
            kept = [r for r in kept if r["iteration"] <= at]
            resumed.append(at)
            top = min(top, at)
            continue
        it = _iteration(row)
        if it is None:
            continue
        if "loss" in row and "lr" in row:
            if it < top:
                kept = [r for r in kept if r["iteration"] < it]
            top = it
        kept.append(row)
    return kept, resumed


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class _Collector:
    """name -> {iteration: value}, the last value of an iteration winning; insertion order of names kept."""

    def __init__(self):
        self.points: dict[str, dict[int, float]] = {}

    def add(self, name: str, iteration: int, value) -> None:
        v = _number(value)
        if v is not None:
            self.points.setdefault(name, {})[iteration] = v

    def series(self, name: str) -> Series:
        points = self.points.get(name, {})
        its = np.array(sorted(points), dtype=np.int64)
        return Series(its, np.array([points[i] for i in its.tolist()], dtype=np.float64))

    def all(self, names=None) -> dict[str, Series]:
        return {n: self.series(n) for n in (self.points if names is None else names) if n in self.points}


def load_curves(prefix: str) -> CurveData:
    """Read ``{prefix}_metrics.jsonl`` (and ``{prefix}_eval.jsonl`` when it exists) into :class:`CurveData`.

    Raises:
        DataError: the metrics file does not exist, or holds no row with an iteration.
    """
    prefix = resolve_prefix(prefix)
    path = prefix + METRICS_SUFFIX
    if not os.path.isfile(path):
        raise DataError(f"no metrics file {path!r}. HINT: pass the prefix a run wrote its records with (its "
                        "--snapshot-prefix, or train_model's log_prefix), e.g. runs/a/snap for "
                        "runs/a/snap_metrics.jsonl.")
    rows, bad = read_jsonl(path)
    kept, resumed = continuous_rows(rows)
    if not kept:
        raise DataError(f"{path!r} holds no metrics row ({bad} unreadable lines). HINT: the run writes one row "
                        "every display_iter iterations (on rank 0); plot it once it has written some.")
    if bad:
        logger.warning("%s: %d line(s) that are not JSON rows skipped (a line torn by a kill)", path, bad)
    train, val, extra = _Collector(), _Collector(), _Collector()
    for row in kept:
        it = row["iteration"]
        lrs = row.get("lr")
        for i, lr in enumerate(lrs if isinstance(lrs, list) else ()):
            train.add(f"lr{i}", it, lr)
        for key, value in row.items():
            if key.startswith("val"):
                val.add(key, it, value)
            elif key in TRAIN_KEYS:
                train.add(key, it, value)
            elif not key.startswith("gpu_"):
                extra.add(key, it, value)
    groups = sum(1 for n in train.points if n.startswith("lr"))
    data = CurveData(loss=train.series("loss"), lrs=[train.series(f"lr{i}") for i in range(groups)],
                     samples_per_s=train.series("samples_per_s"), data_wait=train.series("data_wait"),
                     validation=val.all(), extra=extra.all(), resumed_at=resumed, unreadable_lines=bad)
    eval_path = prefix + EVAL_SUFFIX
    if os.path.isfile(eval_path):
        data.evaluation, bad_eval = _evaluation(eval_path)
        data.unreadable_lines += bad_eval
    return data


def _evaluation(path: str) -> tuple[dict[str, Series], int]:
    """The follower's rows: a snapshot evaluated again (or a resumed run's snapshot of the same name) keeps the
    last row; EMA weights are their own series."""
    rows, bad = read_jsonl(path)
    ev = _Collector()
    for row in rows:
        it = _iteration(row)
        if it is None:
            continue
        suffix = " (ema)" if row.get("ema") is True else ""
        for key, value in row.items():
            if key not in EVAL_META_KEYS:
                ev.add(key + suffix, it, value)
    return ev.all(), bad
