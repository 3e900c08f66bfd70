"""The engine's side of snapshots: what goes in, when one is due, and how a run picks up from one.

Kept apart from the loop (``engine.py``) so that each fits on a screen; :class:`Checkpointing` is mixed into
:class:`~pixelz_dist.engine.Engine` and works on its attributes.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.distributed as tdist

from . import __version__
from .dist import barrier, gather_to_main
from .errors import SnapshotError
from .log import logger
from .rng import capture_rng_state, restore_rng_state
from .snapshot import (
    FORMAT_VERSION,
    check_model_state,
    find_latest_valid,
    load_snapshot,
    prune_snapshots,
    save_atomic,
    snapshot_path,
)


class Checkpointing:
    """Snapshot timing, writing (rank 0, atomically) and resuming, for :class:`~pixelz_dist.engine.Engine`."""

    def init_snapshot_schedule(self) -> None:
        interval = self.s.snapshot_interval
        if interval is not None and self.s.num_epochs is not None:
            self._next_snapshot_at = (math.floor(self.epoch_fraction() / interval + 1e-9) + 1) * interval

    def snapshot_due(self) -> bool:
        """Pure function of the counters, so every rank reaches the same answer without talking."""
        interval = self.s.snapshot_interval
        if interval is None:
            return False
        if self.s.num_iters is not None:
            return self.progress.iteration % interval == 0
        frac = self.epoch_fraction()
        if frac + 1e-9 >= self._next_snapshot_at:
            self._next_snapshot_at = (math.floor(frac / interval + 1e-9) + 1) * interval
            return True
        return False

    def snapshot_state(self, rng_per_rank: list) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "progress": self.progress.state_dict(),
            "data": self.data_state(),
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "callbacks": self.callbacks.state_dict(),
            "epoch_loss": {"sum": self._epoch_loss_sum.cpu(), "count": self._epoch_loss_count},
            "grad_scaler": self.precision.state_dict(),
            "meta": {"pixelz_dist": __version__, "torch": str(torch.__version__), "time": time.time()},
        }

    def data_state(self) -> dict:
        s = self.s
        if self.sampler is None:  # the user's DataLoader
            return {**self.source.state_dict(), "iter_size": s.iter_size}
        return {"kind": "dataset", "seed": self.sampler.seed, "shuffle": s.shuffle, "batch_size": s.batch_size,
                "iter_size": s.iter_size, "world_size": self.env.world_size, "num_samples": self.num_samples,
                "drop_last": s.drop_last}

    def write_snapshot(self) -> str:
        """Every rank sends its RNG state to rank 0, which writes; all ranks wait until the file is complete."""
        started = time.perf_counter()
        path = snapshot_path(self.snapshot_prefix, self.progress.iteration)
        rng_per_rank = gather_to_main(capture_rng_state(), self.env)
        if self.env.is_main:
            self.flush_files()  # the records up to this snapshot are durable before the snapshot exists
            save_atomic(self.snapshot_state(rng_per_rank), path)
            if self.s.keep_last:
                prune_snapshots(self.snapshot_prefix, self.s.keep_last)
            logger.info("snapshot written: %s", path)
        barrier()
        self.last_snapshot_seconds = time.perf_counter() - started
        self.last_snapshot_path, self.last_snapshot_iteration = path, self.progress.iteration
        self.state.snapshot_requested = False
        for hook in self.callbacks.on_snapshot:
            hook(self.state, path)
        return path

    def choose_snapshot(self) -> str | None:
        """Rank 0 picks the snapshot (the newest valid one for 'auto') and tells the others, so all load the same."""
        spec = self.s.load_snapshot_path
        if spec is None:
            return None
        path = None
        if self.env.is_main:
            if spec == "auto":
                found = find_latest_valid(self.snapshot_prefix)
                path = found[0] if found else None
                if path is None:
                    logger.info("no snapshot found for prefix %r: starting from scratch", self.snapshot_prefix)
            else:
                path = str(spec)
        if tdist.is_available() and tdist.is_initialized():
            box = [path]
            tdist.broadcast_object_list(box, src=0)
            path = box[0]
        return path

    def resume(self) -> None:
        path = self.choose_snapshot()
        if path is None:
            return
        snap = load_snapshot(path)
        check_model_state(self.model, snap["model"], path, strict=self.s.strict_load)
        self.model.load_state_dict(snap["model"], strict=self.s.strict_load)
        try:
            self.optimizer.load_state_dict(snap["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise SnapshotError(f"the optimizer state in {path!r} does not fit this optimizer ({e}). HINT: build "
                                "the optimizer with the same parameter groups, in the same order, as the run that "
                                "wrote the snapshot.") from e
        if self.scheduler is not None and snap["scheduler"] is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        elif self.scheduler is not None or snap["scheduler"] is not None:
            logger.warning("snapshot %s %s but this run %s: the schedule %s", path,
                           "holds a scheduler state" if snap["scheduler"] is not None else "holds no scheduler state",
                           "has no scheduler" if self.scheduler is None else "has one",
                           "is dropped" if self.scheduler is None else "starts from its beginning")
        self.progress.load_state_dict(snap["progress"])
        if "epoch_loss" in snap:
            self._epoch_loss_sum = snap["epoch_loss"]["sum"].to(self.device)
            self._epoch_loss_count = int(snap["epoch_loss"]["count"])
        self.precision.load_state_dict(snap.get("grad_scaler"))
        if self.apply_data_position(path, snap["data"]):
            with warnings.catch_warnings():  # torch warns that no optimizer.step() ran yet in this process: expected
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.step_epoch_scheduler()  # the rest of the snapshot's epoch is skipped: that epoch has ended
        absent = self.callbacks.load_state_dict(snap.get("callbacks", {}))
        if absent:
            logger.warning("snapshot %s holds no state for callback(s) %s; they start fresh", path, absent)
        per_rank = snap.get("rng_per_rank") or [snap["rng"]]
        # Same world size: each rank its own streams (exact). Another world size: exactness is gone anyway.
        restore_rng_state(per_rank[self.env.rank % len(per_rank)])  # last: nothing above may draw from them
        self.last_snapshot_path, self.last_snapshot_iteration = path, self.progress.iteration
        if self.order is not None:
            self.order.add(f"# resumed from {path} at iteration {self.progress.iteration}")
        p = self.progress
        logger.info("resumed from %s: iteration %d, epoch %d, position %d of %s", path, p.iteration, p.epoch,
                    p.samples_in_epoch, self.num_samples)

    def apply_data_position(self, path: str, data: dict) -> bool:
        """Apply the saved position; True when the rest of the snapshot's epoch is skipped."""
        p, s = self.progress, self.s
        if self.sampler is None:
            return self.apply_loader_position(path, data)
        if data.get("kind", "dataset") != "dataset":
            raise SnapshotError(f"{path} was written by a run that trained from a DataLoader, and this run passes a "
                                "dataset: the data position cannot be carried over. HINT: pass the same kind of data "
                                "as the run that wrote it, or resume with restore_dataloader=False.")
        if data["seed"] != self.sampler.seed:
            logger.warning("snapshot %s was trained with seed %d, this call passes %d: the snapshot's seed is kept so "
                           "the data order continues", path, data["seed"], self.sampler.seed)
            self.sampler.seed = int(data["seed"])
        changed = [f"{k} {data[k]} -> {now}" for k, now in (("batch_size", s.batch_size), ("iter_size", s.iter_size),
                                                           ("world_size", self.env.world_size),
                                                           ("shuffle", s.shuffle))
                   if data.get(k) != now]
        if changed:
            logger.warning("resuming with %s: the data position is kept in samples (%d into epoch %d), so no "
                           "sample is skipped or repeated, but the run is no longer bit-identical to the "
                           "original", ", ".join(changed), p.samples_in_epoch, p.epoch)
        if data.get("num_samples") != self.num_samples:
            logger.warning("the dataset had %s samples when %s was written and has %d now", data.get("num_samples"),
                           path, self.num_samples)
            if p.samples_in_epoch >= self.num_samples:
                p.epoch, p.samples_in_epoch = p.epoch + 1, 0
                return True
        if not s.restore_dataloader and p.samples_in_epoch > 0:
            logger.info("restore_dataloader=False: skipping the rest of epoch %d (%d of %d samples were done); "
                        "training goes on at the start of epoch %d", p.epoch, p.samples_in_epoch, self.num_samples,
                        p.epoch + 1)
            p.epoch, p.samples_in_epoch = p.epoch + 1, 0
            return True
        return False

    def apply_loader_position(self, path: str, data: dict) -> bool:
        p = self.progress
        if not self.s.restore_dataloader and p.samples_in_epoch > 0:
            logger.info("restore_dataloader=False: skipping the rest of epoch %d (%d batches were done)", p.epoch,
                        p.samples_in_epoch)
            p.epoch, p.samples_in_epoch = p.epoch + 1, 0
            return True
        self.source.load_state_dict(data, p.samples_in_epoch, path)
        return False
