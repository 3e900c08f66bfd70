"""One run's snapshots: which parts go in, writing them (rank 0, atomically, in the background), choosing and
restoring one.

The checkpointer holds named parts, each an object with ``state_dict()`` / ``load_state_dict(state)`` (torchtitan's
``CheckpointManager(states={...})`` is the model): the loop hands it its counters, its data source, its scheduler
stepper and so on at construction, and never its private state afterwards. A part whose state differs per rank says
so with a true ``per_rank`` attribute (the random state; a user's DataLoader, whose place in the data is each rank's
own): its state is gathered from every rank and stored as a list in rank order, the snapshot's ``per_rank`` names
those parts, and on loading each rank gets its own back (at another world size, the entry of ``rank % saved ranks``:
a part whose state cannot move between ranks refuses that in its ``precheck``, from what its state records). Parts
are restored in the order given, so the random state, given last, is put back after everything that might draw from
it. A part may also define ``precheck(state, meta)``, which raises ``SnapshotError`` when the snapshot cannot fit:
every part is checked on every rank before any is loaded, and one rank's refusal is every rank's, so a refused
snapshot changes nothing anywhere.

Writing: rank 0 writes on a thread (:mod:`~pixelz_dist.checkpoint.background_write`), one snapshot at a time. A
periodic snapshot is copied into reused host memory first (:mod:`~pixelz_dist.checkpoint.staging`) and training goes
on; the ranks learn of its end through the loop's per-iteration agreement (:meth:`Checkpointer.status` /
:meth:`Checkpointer.agreed`), so they all announce it, or raise its error, at the same iteration. When they must wait
for it (the final snapshot, the next one due), :meth:`Checkpointer.wait_durable` polls rank 0 with short broadcasts:
no rank sits in a collective, with its timeout, for as long as the storage takes.

Before the first iteration, :meth:`Checkpointer.claim` makes the prefix this run's (see
:mod:`pixelz_dist.checkpoint.prefix`): a lock, a write check, no leftovers of killed writes, and no old run's snapshots
mixed with a fresh one's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as tdist

from .._version import __version__
from ..distributed.env import DistEnv, barrier, broadcast_from_main, gather_from_all, gather_to_main, is_initialized
from ..errors import ConfigError, SnapshotError, on_every_rank
from .background_write import BackgroundWrite
from .file_format import (
    FORMAT_VERSION,
    NoLoadableSnapshot,
    find_latest_valid,
    is_final,
    load_snapshot,
    prune_snapshots,
    save_snapshot,
    set_aside_newer,
    snapshot_path,
)
from .loadable import make_loadable
from .prefix import PrefixLock, check_fresh_start, remove_stale_temporaries
from .staging import HostStaging, Staged

logger = logging.getLogger(__name__)


class Checkpointer:
    """Snapshots of ``parts`` under ``prefix`` (``{prefix}_iter_{N}.pt``).

    Args:
        prefix: where snapshots go; None for a run that only loads (``load`` still works).
        parts: ``{name: Stateful}``, in restore order; ``"progress"`` is one, whose state holds ``"iteration"``. A
            part with a true ``per_rank`` attribute keeps one state per rank.
        env: this process's place in the job.
        keep_last: keep only this many snapshots of the prefix (the one just written always stays).
        meta: extra values for the snapshot's ``meta`` entry.
        group: a process group that carries CPU tensors (None: the default one), for :meth:`wait_durable`.
        on_durable: called with the path on every rank once a snapshot is durable (the ``on_snapshot`` hooks).
        protect: returns the paths ``keep_last`` must not remove (the best snapshots); asked on rank 0 when a
            snapshot is submitted.
    """

    def __init__(self, prefix: str | None, parts: dict, env: DistEnv, *, keep_last: int | None = None,
                 meta: dict | None = None, group=None, on_durable: Callable[[str], None] | None = None,
                 protect: Callable[[], set[str]] | None = None):
        self.prefix, self.parts, self.env = prefix, dict(parts), env
        self.per_rank = [name for name, part in self.parts.items() if getattr(part, "per_rank", False)]
        self.keep_last, self.meta = keep_last, dict(meta or {})
        self.group, self.on_durable = group, on_durable
        self.protect = protect
        self.last_path: str | None = None  # the newest durable snapshot (written, or resumed from)
        self.durable_iteration = -1
        self.last_iteration = -1  # the newest snapshot asked for (it may still be being written), or resumed from
        self.last_final = False  # whether that snapshot says it ends the run (meta["final"])
        self.last_seconds: float | None = None  # from the request of the last durable snapshot to its durability
        self._submitted = 0.0
        self._pending: tuple[int, str] | None = None  # the snapshot being written, on every rank
        self._writing: BackgroundWrite | None = None  # its writer, on rank 0
        self._staging = HostStaging()
        self._lock: PrefixLock | None = None

    # -- the prefix ------------------------------------------------------------------------------------------------
    def claim(self, fresh: bool, overwrite: bool = False) -> None:
        """Make the prefix this run's before anything is trained (rank 0 does it; every rank raises its error).

        Args:
            fresh: the run does not resume; the prefix must then hold no snapshots.
            overwrite: set an old run's snapshots aside instead of refusing.

        Raises:
            ConfigError: the folder cannot be written, another run holds the prefix, or an old run's snapshots are
                there (see :func:`~pixelz_dist.checkpoint.prefix.check_fresh_start`).
        """
        error = None
        if self.env.is_main and self.prefix:
            try:
                self._lock = PrefixLock(self.prefix)
                self._lock.acquire()
                remove_stale_temporaries(self.prefix)
                if fresh:
                    check_fresh_start(self.prefix, overwrite)
            except ConfigError as e:
                self.release()
                error = str(e)
        error = broadcast_from_main(error)
        if error is not None:
            raise ConfigError(error)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- writing ---------------------------------------------------------------------------------------------------
    def save(self, iteration: int, wait: bool = True, final: bool = False) -> str:
        """Write the snapshot of ``iteration``; every rank calls it (rank 0 writes).

        ``final``: the snapshot ends a completed run; its ``meta["final"]`` says so (every other snapshot's says
        False), so a reader beside the run (``python -m pixelz_dist.evaluate --follow``) knows that no other follows.

        ``wait=False`` (a periodic snapshot): rank 0 copies the state into reused host memory (see
        :mod:`~pixelz_dist.checkpoint.staging`) and writes it on a thread while training goes on; the ranks learn
        that it is durable, or that it failed, through :meth:`status` / :meth:`agreed` at a later iteration.
        ``wait=True`` (the final, preemption and time-budget snapshots): returns once the file is durable. Either
        way a snapshot still being written is waited for first (one write at a time, one set of host buffers), and
        no rank waits for a write inside a collective that has a timeout (see :meth:`wait_durable`).

        Raises:
            SnapshotError: the state cannot be loaded back (refused before anything is written), or (``wait=True``,
                or the write before this one) the file could not be written; on every rank.
        """
        started = time.perf_counter()
        self.wait_durable()
        path = snapshot_path(self.prefix, iteration)
        ranks = gather_to_main({name: self.parts[name].state_dict() for name in self.per_rank}, self.env)
        error = None
        if self.env.is_main:
            snapshot = {"format_version": FORMAT_VERSION, "per_rank": list(self.per_rank)}
            for name, part in self.parts.items():
                snapshot[name] = [own[name] for own in ranks] if name in self.per_rank else part.state_dict()
            snapshot["meta"] = {"pixelz_dist": __version__, "torch": str(torch.__version__), "time": time.time(),
                                **self.meta, "final": bool(final)}
            try:
                snapshot = make_loadable(snapshot)  # what is written must load back under weights_only
            except SnapshotError as e:
                error = f"cannot write snapshot {path}: {e}"
            else:
                try:  # a snapshot the process waits for is written from the live state (nothing changes it meanwhile)
                    staged = self._staging.stage(snapshot) if not wait else Staged(snapshot, [], [])
                    spared = frozenset(self.protect()) if self.protect is not None else frozenset()
                    self._writing = BackgroundWrite(iteration, path, lambda: self._write(staged, path, spared))
                except (RuntimeError, OSError, MemoryError) as e:  # no memory for the copy: every rank must hear it
                    error = (f"cannot write snapshot {path}: copying its state to host memory failed "
                             f"({type(e).__name__}: {e}). HINT: free host memory, or pass snapshot_async=False "
                             "(--no-async-snapshots) to write snapshots from the live state.")
        error = broadcast_from_main(error)  # only whether the write started: nobody waits for the file here
        if error is not None:
            raise on_every_rank(SnapshotError(error))
        self._pending, self._submitted = (iteration, path), started
        self.last_iteration, self.last_final = iteration, bool(final)
        if wait:
            self.wait_durable()
        return path

    @property
    def newest(self) -> tuple[str | None, int]:
        """The newest snapshot, durable or still being written (it will be durable before the process ends, unless
        its write fails), as ``(path, iteration)``; ``(None, -1)`` before any."""
        if self._pending is not None:
            return self._pending[1], self._pending[0]
        return self.last_path, self.durable_iteration

    def _write(self, staged: Staged, path: str, spared: frozenset = frozenset()) -> str | None:
        """Rank 0's write (on the writer's thread); the error message when it failed (the previous snapshots stay as
        they were, and ``keep_last`` removes older ones only once this one is durable)."""
        staged.wait()
        try:
            save_snapshot(staged.state, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
            cause = e
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            reason = (cause.strerror or str(cause)) if cause is not None else f"{type(e).__name__}: {e}"
            last = (f"the last good snapshot is {self.last_path} (iteration {self.durable_iteration})"
                    if self.last_path else "no snapshot was written or loaded before")
            return (f"cannot write snapshot {path} ({reason}); {last}. HINT: free space on that disk, or choose "
                    "another snapshot_prefix, then resume with load_snapshot_path='auto' (--resume auto).")
        if self.keep_last:
            prune_snapshots(self.prefix, self.keep_last, keep=path, spared=spared)
        logger.info("snapshot written: %s", path)
        return None

    def status(self) -> tuple[int, int]:
        """This rank's news of the snapshot being written, for the per-iteration agreement (every rank sends it; rank
        0 alone has news): ``(iteration + 1 of a write that is durable, iteration + 1 of one that failed)``, 0 for
        none. :meth:`agreed` takes the agreed (MAX) values."""
        writing = self._writing
        if writing is None or not writing.done:
            return 0, 0
        return (0, writing.iteration + 1) if writing.error is not None else (writing.iteration + 1, 0)

    def agreed(self, durable: int, failed: int) -> None:
        """Act, on every rank at the same iteration, on rank 0's news (see :meth:`status`): announce the pending
        snapshot as durable (``on_durable``), or raise the error of its write.

        Raises:
            SnapshotError: the pending snapshot could not be written (rank 0's message there; elsewhere one that
                says so), marked as raised by every rank.
        """
        if self._pending is None:
            return
        iteration = self._pending[0]
        if failed == iteration + 1:
            self._failed()
        elif durable == iteration + 1:
            self._durable()

    def wait_durable(self) -> None:
        """Wait, on every rank, until the pending snapshot (if any) is durable, and act as :meth:`agreed` would.

        Rank 0 waits for its writer in short slices and, after each, tells the others by a broadcast of two numbers
        on the CPU group: the other ranks are never inside a collective longer than a slice, whatever the storage's
        speed (a slow shared file system must not hit the collective timeout).
        """
        if self._pending is None:
            return
        if self.env.world_size > 1 and is_initialized():
            delay = 0.001
            while True:
                done = self._writing.join(delay) if self.env.is_main else False
                flags = torch.tensor([int(done), int(done and self._writing.error is not None)], dtype=torch.int32)
                tdist.broadcast(flags, src=0, group=self.group)
                done, failed = (bool(x) for x in flags.tolist())
                if done:
                    break
                delay = min(delay * 2, 0.1)
        else:
            failed = False
            if self._writing is not None:
                self._writing.join()
                failed = self._writing.error is not None
        self._failed() if failed else self._durable()

    def _durable(self) -> None:
        iteration, path = self._pending
        self.last_seconds = time.perf_counter() - self._submitted
        self._pending, self._writing = None, None
        self.last_path, self.durable_iteration = path, iteration
        if self.on_durable is not None:
            self.on_durable(path)
        if self.keep_last and self.protect is not None and self.env.is_main:
            # the hooks may have changed which snapshots are spared (a new best pushed one out of the K best):
            # keep_last applies to it now, not only at the next write
            prune_snapshots(self.prefix, self.keep_last, keep=path, spared=frozenset(self.protect()))

    def _failed(self):
        iteration, path = self._pending
        writing = self._writing
        self._pending, self._writing = None, None
        if writing is not None:
            raise on_every_rank(SnapshotError(writing.error))
        raise on_every_rank(SnapshotError(f"cannot write snapshot {path}: rank 0 could not write it (rank 0's error "
                                          "says why)"))

    def close(self) -> None:
        """Wait for a write still under way (this process only), then release the prefix. An error of that write
        that was not raised yet (the run is ending on another error) is logged."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.join()
            if writing.error is not None:
                logger.error("%s", writing.error)
            else:
                self.last_path, self.durable_iteration = writing.path, writing.iteration
        self._pending = None
        self.release()

    # -- reading ---------------------------------------------------------------------------------------------------
    def choose(self, spec: str | None, overwrite: bool = False) -> tuple[str | None, dict | None]:
        """The snapshot to resume from: ``spec`` itself, or for ``"auto"`` the newest valid one of the prefix
        (None: the prefix holds none, start fresh). Rank 0 decides and tells the others, so all load the same file;
        rank 0 also returns the content it already read, so the file is deserialised once.

        Args:
            overwrite: when the prefix holds snapshots and none of them loads, set them aside (renamed
                ``NAME.old-<time>``) and start fresh instead of refusing.

        Raises:
            SnapshotError: ``"auto"`` found snapshots but could load none (or could not read one: the storage, not
                the file, failed): starting from scratch would train over that run, so the run stops here.
        """
        if spec is None:
            return None, None
        path, content, error = None, None, None
        if self.env.is_main:
            try:
                path, content = self._choose_on_main(spec, overwrite)
            except SnapshotError as e:
                error = e
        path, message = broadcast_from_main((path, None if error is None else str(error)))
        if error is not None:
            raise on_every_rank(error)
        if message is not None:
            raise on_every_rank(SnapshotError(message))
        return path, content

    def _choose_on_main(self, spec: str, overwrite: bool) -> tuple[str | None, dict | None]:
        if spec != "auto":
            return str(spec), None
        try:
            found = find_latest_valid(self.prefix)
        except NoLoadableSnapshot:
            if not overwrite:
                raise
            check_fresh_start(self.prefix, overwrite=True)  # renamed NAME.old-<time>, with a warning naming them
            found = None
        if found is None:
            logger.info("no snapshot found for prefix %r: starting from scratch", self.prefix)
            return None, None
        return found

    def load(self, path: str, content: dict | None = None) -> dict:
        """Restore every part from the snapshot at ``path`` (``content``: already read); returns the snapshot.

        Every rank reads and checks for itself, then the ranks agree: when one fails, all raise (naming it), so no
        rank trains alone nor waits for a peer that has gone.

        Raises:
            SnapshotError: the file cannot be read, lacks a part, or a part does not fit (naming the part), on this
                rank or another.
        """
        error, snap, states = None, None, None
        try:  # every part checks its state before any is loaded, on every rank ...
            snap, states = self._read_and_check(path, content)
        except SnapshotError as e:
            error = e
        self._agree(error)  # ... and one rank's refusal is every rank's: a refused snapshot changes nothing anywhere
        try:
            for name, part in self.parts.items():
                part.load_state_dict(states[name])
        except SnapshotError as e:
            error = SnapshotError(f"cannot resume from {path!r}: {e}")
            error.__cause__ = e.__cause__
        self._agree(error)
        self.last_path = path
        self.last_iteration = self.durable_iteration = int(snap["progress"]["iteration"])
        self.last_final = is_final(snap)
        if self.env.is_main and self.prefix:
            moved = set_aside_newer(self.prefix, self.last_iteration)
            if moved:
                logger.warning("resumed from iteration %d while %d newer snapshot(s) of %r existed (a branch this "
                               "run abandons, or files that did not load): renamed to %s, so that 'auto' and "
                               "keep_last follow this run", self.last_iteration, len(moved), self.prefix,
                               ", ".join(moved))
        barrier()
        return snap

    def _read_and_check(self, path: str, content: dict | None) -> tuple[dict, dict]:
        """The snapshot and this rank's state of each part, every part's precheck passed."""
        snap = content if content is not None else load_snapshot(path)
        missing = [name for name in self.parts if name not in snap and name not in ABSENT_MEANS]
        if missing:
            raise SnapshotError(f"snapshot {path!r} has no {', '.join(map(repr, missing))} part(s) (it has "
                                f"{sorted(snap)}). HINT: resume from a snapshot written by train_model.")
        saved_per_rank = snap.get("per_rank", ("rng",))
        states = {}
        for name in self.parts:
            state = snap[name] if name in snap else ABSENT_MEANS[name]
            if name in saved_per_rank:  # at another world size a part's precheck refuses what cannot move
                state = state[self.env.rank % len(state)]
            states[name] = state
        try:
            for name, part in self.parts.items():
                precheck = getattr(part, "precheck", None)
                if precheck is not None:
                    precheck(states[name], snap.get("meta", {}))
        except SnapshotError as e:
            raise SnapshotError(f"cannot resume from {path!r}: {e}") from e.__cause__
        return snap, states

    def _agree(self, error: SnapshotError | None) -> None:
        """Every rank learns every rank's outcome (one collective, whatever happened), and when one failed, all raise
        the same error: the first failing rank's, prefixed ``on rank N:`` unless every rank failed alike."""
        outcomes = gather_from_all(None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
        if not failed:
            return
        rank, message = failed[0]
        if len(failed) < len(outcomes) or len(set(outcomes)) > 1:
            message = f"on rank {rank}: {message}"
        if error is not None and str(error) == message:
            raise on_every_rank(error)
        raise on_every_rank(SnapshotError(message)) from error


#: Parts that snapshots written before they existed lack, and the state that stands for "start fresh".
ABSENT_MEANS = {"callbacks": {}, "epoch_loss": None, "grad_scaler": None, "ema": None, "warmup": None}
