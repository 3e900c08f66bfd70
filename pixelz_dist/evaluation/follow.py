"""Evaluating a training run's snapshots from beside it: each snapshot once, one row each in ``{prefix}_eval.jsonl``.

Training on a large server should not carry the inference load of validation; this evaluates the run's snapshots
elsewhere (another machine on the same file system, or later), as they appear::

    python -m pixelz_dist.evaluate --config runs/a/snap_config.toml --data val/rgb val/mask --follow

Only reads the run's files, so that it can never disturb the run: it takes no lock (the prefix's lock is the run's),
changes, renames and prunes nothing, and reads a snapshot only under its final name (a snapshot is renamed into
place once complete, so a temporary file being written is never read). ``keep_last`` may prune a snapshot between
the listing and the read: it is skipped with one line. Its own file, ``{prefix}_eval.jsonl``, is appended one row at a
time, each flushed to the disk, and is its memory: run again, it evaluates only the snapshots without a row, and a
last line torn by a kill is cut off (and that snapshot evaluated again).

The run's end is the snapshot that says so (``meta["final"]``, see :func:`~pixelz_dist.checkpoint.file_format
.is_final`): ``--follow`` exits once the newest snapshot of the prefix is final and evaluated. A run resumed past its
final snapshot (more iterations) writes newer ones, so only the newest counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from ..checkpoint.file_format import (
    SnapshotUnreadable,
    is_final,
    list_snapshots,
    load_snapshot,
    read_meta,
)
from ..checkpoint.parts import check_model_state
from ..engine.ema import ema_state_dict
from ..errors import SnapshotError

logger = logging.getLogger(__name__)

#: The evaluation rows' file beside the run's snapshots: ``{prefix}{EVAL_SUFFIX}``.
EVAL_SUFFIX = "_eval.jsonl"


def eval_file(prefix: str) -> str:
    return f"{prefix}{EVAL_SUFFIX}"


class EvalRecord:
    """``{prefix}_eval.jsonl``: one JSON row per evaluated snapshot, appended and flushed to the disk row by row.

    Never held open (a kill leaves nothing half-open, another machine sees each row once it is written); a last line
    without its newline, or that is not JSON, is what a kill mid-write leaves: :meth:`read` ignores it and the first
    :meth:`append` cuts it off, so the file stays one row per line.
    """

    def __init__(self, path: str):
        self.path = path
        self._checked = False

    def read(self) -> list[dict]:
        """The complete rows, in file order (none when the file does not exist)."""
        rows, _ = self._read()
        return rows

    def _read(self) -> tuple[list[dict], int]:
        """The complete rows and the byte length they take (where a torn last line starts)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], 0
        rows, end = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except ValueError:  # a torn line followed by a newline written later: not ours, but say so
                logger.warning("%s: ignoring a line that is not a JSON row: %.80r", self.path, line)
                end += len(line)
                continue
            if isinstance(row, dict):
                rows.append(row)
            end += len(line)
        return rows, end

    def append(self, row: dict) -> None:
        """Add ``row`` as one line, durable before returning (a follower killed after this never evaluates that
        snapshot again)."""
        if not self._checked:
            _, end = self._read()
            if os.path.exists(self.path) and os.path.getsize(self.path) > end:
                logger.warning("%s: cutting off a torn last line (a follower killed while writing it)", self.path)
                os.truncate(self.path, end)
            self._checked = True
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def snapshot_weights(snapshot: dict, path: str, use_ema: bool) -> dict:
    """The model state to evaluate: the trained weights, or with ``use_ema`` the EMA weights (``snapshot["ema"]
    ["state_dict"]``, the plain model's keys).

    Raises:
        SnapshotError: ``use_ema`` and the snapshot holds no EMA weights.
    """
    if not use_ema:
        return snapshot["model"]
    state = ema_state_dict(snapshot)
    if state is None:
        raise SnapshotError(f"snapshot {path!r} holds no EMA weights (its run trained without EMA). HINT: evaluate "
                            "without --use-ema, or train with --ema DECAY (train_model(ema=DECAY)).")
    return state


class ModelEvaluation:
    """Evaluates one snapshot's weights: loads them into ``model`` (checked first: a snapshot of another model is an
    error listing every mismatching key) and runs :func:`~pixelz_dist.evaluation.evaluate.evaluate_model`.

    Args:
        model: the model the run trained (built from the same options), on its device.
        dataset: the evaluation data.
        use_ema: evaluate the snapshots' EMA weights.
        **evaluate_kwargs: for ``evaluate_model`` (``batch_size``, ``metrics``, ``num_workers``, ``device``, ...).
    """

    def __init__(self, model, dataset, use_ema: bool = False, **evaluate_kwargs):
        self.model, self.dataset, self.use_ema = model, dataset, use_ema
        self.kwargs = evaluate_kwargs

    def __call__(self, snapshot: dict, path: str) -> dict[str, float]:
        from .evaluate import evaluate_model

        state = snapshot_weights(snapshot, path, self.use_ema)
        try:
            check_model_state(self.model, state)
        except SnapshotError as e:
            raise SnapshotError(f"cannot evaluate {path!r}: {e}") from None
        self.model.load_state_dict(state)
        return evaluate_model(self.model, self.dataset, **self.kwargs)


class SnapshotFollower:
    """Evaluates the snapshots of ``prefix`` that have no row in ``{prefix}_eval.jsonl`` yet, oldest first.

    Args:
        prefix: the training run's snapshot prefix.
        evaluate: ``evaluate(snapshot, path) -> {"loss": ..., <metric>: ...}`` (a :class:`ModelEvaluation`).
        use_ema: recorded in each row (``"ema"``); a snapshot counts as evaluated for the weights it was evaluated
            with, so one file can hold both the trained and the EMA weights' rows.
        poll_seconds: :meth:`follow`: seconds between looks at the folder.
        timeout: :meth:`follow`: give up after this many seconds without a new snapshot (None: never).
    """

    def __init__(self, prefix: str, evaluate: Callable[[dict, str], dict], *, use_ema: bool = False,
                 poll_seconds: float = 5.0, timeout: float | None = None):
        self.prefix, self.evaluate, self.use_ema = prefix, evaluate, use_ema
        self.poll_seconds, self.timeout = poll_seconds, timeout
        self.record = EvalRecord(eval_file(prefix))
        self.done = {row["snapshot"] for row in self.record.read()
                     if "snapshot" in row and bool(row.get("ema", False)) == use_ema}
        self._skipped: set[str] = set()  # damaged files, each reported once
        self._final: dict[str, tuple[tuple, bool]] = {}  # name -> (the file's identity, whether it is final)

    def pending(self) -> list[tuple[int, str]]:
        """The snapshots without a row, oldest first, as ``(iteration, path)``."""
        return [(it, path) for it, path in reversed(list_snapshots(self.prefix))
                if os.path.basename(path) not in self.done and os.path.basename(path) not in self._skipped]

    def run_once(self) -> int:
        """Evaluate every pending snapshot (a row each); returns how many rows were added.

        Raises:
            SnapshotError: a snapshot that cannot be evaluated (not the model's, no EMA weights with ``use_ema``).
            SnapshotUnreadable: the storage failed to deliver a snapshot, after retries.
        """
        added = 0
        for iteration, path in self.pending():
            name = os.path.basename(path)
            identity = _identity(path)
            try:
                snapshot = load_snapshot(path)
            except SnapshotUnreadable:
                raise
            except SnapshotError as e:
                if not os.path.exists(path):
                    logger.warning("skipping %s: removed before it could be read (keep_last pruned it)", name)
                else:
                    logger.warning("skipping %s: %s", name, e)
                self._skipped.add(name)
                continue
            started = time.perf_counter()
            values = self.evaluate(snapshot, path)
            row = {"iteration": int(snapshot["progress"]["iteration"]), "snapshot": name, **values,
                   "ema": self.use_ema}
            self.record.append(row)
            self.done.add(name)
            if identity is not None:
                self._final[name] = (identity, is_final(snapshot))
            added += 1
            logger.info("evaluated %s (iteration %d%s, %.1f s): %s", name, iteration,
                        ", final" if is_final(snapshot) else "", time.perf_counter() - started,
                        ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float))))
        return added

    def final_evaluated(self) -> str | None:
        """The newest snapshot's name when it is the run's final one and evaluated, else None."""
        found = list_snapshots(self.prefix)
        if not found:
            return None
        _, path = found[0]
        name = os.path.basename(path)
        if name not in self.done:
            return None
        identity = _identity(path)
        if identity is None:
            return None
        known = self._final.get(name)
        if known is None or known[0] != identity:  # not read by this process, or rewritten since (as the final one)
            try:
                final = is_final({"meta": read_meta(path)})
            except SnapshotError:
                return None  # pruned or replaced meanwhile: look again at the next poll
            known = self._final[name] = (identity, final)
        return name if known[1] else None

    def follow(self, sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
        """Evaluate the snapshots as they appear until the run's final one is evaluated; returns the rows added.

        Raises:
            SnapshotError: ``timeout`` seconds passed without a new snapshot, before the final one; or one that
                cannot be evaluated (see :meth:`run_once`).
        """
        added, last_news, listed = 0, clock(), None
        while True:
            names = tuple(os.path.basename(p) for _, p in list_snapshots(self.prefix))
            if names != listed:
                listed, last_news = names, clock()
            try:
                added += self.run_once()
            except SnapshotUnreadable as e:  # the storage may recover: the next poll tries that snapshot again
                logger.warning("%s; trying again in %g s", e, self.poll_seconds)
            final = self.final_evaluated()
            if final is not None:
                logger.info("the run's final snapshot %s is evaluated (%d row(s) added): done", final, added)
                return added
            waited = clock() - last_news
            if self.timeout is not None and waited >= self.timeout:
                newest = f"the newest is {listed[0]}" if listed else "there is none yet"
                raise SnapshotError(
                    f"no new snapshot of {self.prefix!r} for {waited:.0f} s (--timeout {self.timeout:g}) and the "
                    f"run's final one has not appeared ({newest}). HINT: check that the training run is alive and "
                    "writes to this prefix; run again (rows already written are kept) or raise --timeout.")
            sleep(self.poll_seconds)


def _identity(path: str) -> tuple | None:
    """What changes when a file is replaced (a snapshot rewritten as the final one); None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
