"""The checkpointer over named parts: what a rewind does to newer snapshots, pruning, reading a snapshot once, and a
part that does not fit being named."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import pixelz_dist.checkpoint.file_format as file_format
from engine_helpers import LinReg, make_data
from pixelz_dist import SnapshotError, train_model
from pixelz_dist.checkpoint.checkpointer import Checkpointer
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot, prune_snapshots, save_snapshot
from pixelz_dist.distributed.env import DistEnv
from pixelz_dist.engine.state import Progress


def train(prefix, num_iters, **kw):
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_model(model, opt, None, make_data(24), 4, shuffle=True, snapshot_prefix=str(prefix),
                num_iters=num_iters, num_workers=0, **kw)
    return model


def test_rewinding_to_an_older_snapshot_sets_the_newer_ones_aside_and_keep_last_keeps_the_new_branch(
        tmp_path, caplog):
    prefix = tmp_path / "s"
    train(prefix, 10, snapshot_interval=2)
    assert [it for it, _ in list_snapshots(str(prefix))] == [10, 8, 6, 4, 2]
    caplog.set_level(logging.WARNING, logger="pixelz_dist")
    # Rewind (after a loss spike, say) to iteration 4 with another learning rate, keeping 2 snapshots: before the
    # fix, pruning by iteration number deleted each new snapshot at once (6, 8, 10 are "newer").
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_model(model, opt, None, make_data(24), 4, shuffle=True, snapshot_prefix=str(prefix), num_iters=7,
                num_workers=0, snapshot_interval=1, keep_last=2, load_snapshot_path=f"{prefix}_iter_4.pt")
    assert [it for it, _ in list_snapshots(str(prefix))] == [7, 6]
    newest = load_snapshot(f"{prefix}_iter_7.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(newest["model"][k], v), k  # the new branch's, not the abandoned run's
    abandoned = sorted(n for n in os.listdir(tmp_path) if ".abandoned-" in n)
    assert [n.split(".abandoned-")[0] for n in abandoned] == ["s_iter_10.pt", "s_iter_6.pt", "s_iter_8.pt"]
    warning = next(r.getMessage() for r in caplog.records if "abandoned" in r.getMessage())
    assert "resumed from iteration 4" in warning and "3 newer snapshot(s)" in warning
    # 'auto' continues the new branch
    resumed = LinReg()
    opt = torch.optim.SGD(resumed.parameters(), lr=0.01, momentum=0.9)
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        train_model(resumed, opt, None, make_data(24), 4, shuffle=True, snapshot_prefix=str(prefix), num_iters=8,
                    num_workers=0, load_snapshot_path="auto")
    assert f"resumed from {prefix}_iter_7.pt" in caplog.text


def test_pruning_never_deletes_the_snapshot_just_written(tmp_path):
    prefix = str(tmp_path / "s")
    for it in (30, 20, 5):
        save_snapshot({"format_version": 2, "it": it}, file_format.snapshot_path(prefix, it))
    prune_snapshots(prefix, 2, keep=file_format.snapshot_path(prefix, 5))
    assert [it for it, _ in list_snapshots(prefix)] == [30, 5]  # the newest other one, and the one just written
    prune_snapshots(prefix, 1, keep=file_format.snapshot_path(prefix, 5))
    assert [it for it, _ in list_snapshots(prefix)] == [5]


def test_resume_auto_reads_the_newest_snapshot_once(tmp_path, monkeypatch):
    prefix = tmp_path / "s"
    train(prefix, 6, snapshot_interval=3)
    loads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        loads.append(os.path.basename(str(getattr(path, "name", path))))  # a path or an open file
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    train(prefix, 8, load_snapshot_path="auto")
    assert loads == ["s_iter_6.pt"]


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = int(state["n"])


class PerRankCounter(Counter):
    per_rank = True


class Picky:
    def state_dict(self):
        return {"shape": 3}

    def load_state_dict(self, state):
        if state["shape"] != 4:
            raise SnapshotError(f"its picky part has shape {state['shape']}, this run needs 4")


def parts(**named) -> dict:
    """The parts a train_model snapshot must have (plain counters here), then ``named``."""
    return {"model": Counter(), "optimizer": Counter(), "scheduler": Counter(), "progress": Progress(),
            "data": Counter(), "rng": PerRankCounter(), **named}


def test_parts_round_trip_and_a_part_that_does_not_fit_is_named(tmp_path):
    env = DistEnv()
    counter = Counter()
    counter.n = 5
    saved = parts(counter=counter)
    saved["progress"].iteration = 9
    path = Checkpointer(str(tmp_path / "p"), saved, env).save(9)
    snap = load_snapshot(path)
    assert snap["counter"] == {"n": 5} and snap["rng"] == [{"n": 0}] and snap["format_version"] == 3
    assert snap["per_rank"] == ["rng"]  # the part said so (per_rank = True), not the checkpointer
    fresh = parts(counter=Counter())
    loader = Checkpointer(None, fresh, env)
    loader.load(path)
    assert (fresh["progress"].iteration, fresh["counter"].n) == (9, 5)
    assert (loader.last_path, loader.last_iteration) == (path, 9)
    with pytest.raises(SnapshotError, match=r"has no 'absent' part"):
        Checkpointer(None, parts(absent=Counter()), env).load(path)
    picky = Checkpointer(str(tmp_path / "q"), parts(picky=Picky()), env).save(2)
    with pytest.raises(SnapshotError, match=r"cannot resume from .*q_iter_2\.pt.*picky part has shape 3"):
        Checkpointer(None, parts(picky=Picky()), env).load(picky)
