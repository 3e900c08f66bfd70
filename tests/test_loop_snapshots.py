"""Snapshots as train_model takes them, in one process: when (an interval in iterations or epochs, the final one,
keep_last), what they hold, resuming from them (restore_dataloader, the RNG, the plateau metric, another batch size,
"auto") and strict_load. The resume contract across killed processes is in test_resume.py.

Everything runs for real on tiny CPU models and tensors.
"""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import Dataset

from engine_helpers import (
    D,
    LinReg,
    RecordingPlateau,
    init_linear,
    load_snap,
    make_data,
    quick,
    read_order,
    snapshot_iters,
)
from pixelz_dist import SnapshotError, train_model
from pixelz_dist.callbacks import Callback
from pixelz_dist.distributed.preemption import Preempted


def after_resume(rows: list) -> list[dict]:
    markers = [i for i, r in enumerate(rows) if isinstance(r, str) and r.startswith("# resumed")]
    assert len(markers) == 1, rows
    return rows[markers[0] + 1:]


# -- when and what -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, iter_size, expected", [(2, 1, [3, 5, 8, 10]), (1, 3, [2, 4, 6, 8])])
def test_snapshot_interval_in_epochs(tmp_path, batch_size, iter_size, expected):
    prefix = tmp_path / "run" / "snap"
    quick(data=make_data(10), batch_size=batch_size, iter_size=iter_size, num_epochs=2, snapshot_interval=0.5,
          snapshot_prefix=str(prefix))
    assert snapshot_iters(prefix) == expected
    fractions = []
    for n in expected:
        snap = load_snap(prefix, n)
        assert snap["progress"]["iteration"] == n
        fractions.append(snap["data"]["epoch"] + snap["data"]["position"] / 10)
    # each snapshot is the first iteration at or past 0.5, 1.0, 1.5, 2.0 epochs
    assert [f >= t for f, t in zip(fractions, (0.5, 1.0, 1.5, 2.0))] == [True] * 4
    assert fractions[1] == 1.0 and fractions[3] == 2.0


def test_snapshot_interval_in_iterations(tmp_path):
    prefix = tmp_path / "snap"
    quick(num_iters=7, snapshot_interval=3, snapshot_prefix=str(prefix))
    assert snapshot_iters(prefix) == [3, 6, 7]


def test_final_snapshot_without_interval(tmp_path):
    prefix = tmp_path / "snap"
    model, _ = quick(num_epochs=1, snapshot_prefix=str(prefix))
    assert snapshot_iters(prefix) == [5]
    snap = load_snap(prefix, 5)
    for k, v in model.state_dict().items():
        assert torch.equal(snap["model"][k], v)


def test_no_prefix_writes_nothing_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="pixelz_dist")
    quick(num_epochs=1)
    assert os.listdir(tmp_path) == []
    warned = [r for r in caplog.records if "saves nothing" in r.getMessage()]
    assert len(warned) == 1 and warned[0].name == "pixelz_dist.engine.train_model"
    assert "no snapshot, not even a final one" in warned[0].getMessage() and "--snapshot-prefix DIR/NAME" in \
        warned[0].getMessage() and "snapshot_prefix='DIR/NAME'" in warned[0].getMessage()
    caplog.clear()
    quick(num_iters=1, snapshot_prefix=str(tmp_path / "s"))
    assert not [r for r in caplog.records if "saves nothing" in r.getMessage()]


def test_keep_last_keeps_the_newest(tmp_path):
    prefix = tmp_path / "snap"
    quick(num_epochs=2, snapshot_interval=0.5, snapshot_prefix=str(prefix), keep_last=2)
    assert snapshot_iters(prefix) == [8, 10]


def test_snapshot_contents_load_with_weights_only(tmp_path):
    prefix = tmp_path / "snap"
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    train_model(model, opt, sched, make_data(10), 2, snapshot_prefix=str(prefix), num_iters=4, iter_size=2,
                seed=7, num_workers=0)
    snap = torch.load(f"{prefix}_iter_4.pt", weights_only=True)
    for key in ("format_version", "model", "optimizer", "scheduler", "progress", "data", "rng"):
        assert key in snap
    assert snap["format_version"] == 3
    assert snap["per_rank"] == ["rng"]  # our own dataset's position is global: one state for all ranks
    assert snap["progress"] == {"iteration": 4}
    data = snap["data"]
    assert (data["kind"], data["epoch"], data["position"]) == ("dataset", 1, 4)  # global samples into epoch 1
    assert (data["seed"], data["batch_size"], data["iter_size"], data["world_size"]) == (7, 2, 2, 1)
    (rng,) = snap["rng"]  # one per rank
    assert set(rng) >= {"torch", "numpy", "python"}
    assert isinstance(rng["torch"], torch.Tensor)
    assert snap["meta"]["optimizer"] == "SGD"
    assert snap["scheduler"]["last_epoch"] == 1
    assert set(snap["optimizer"]["state"]) == {0, 1}  # momentum buffers
    for k, v in model.state_dict().items():
        assert torch.equal(snap["model"][k], v)


# -- resuming ----------------------------------------------------------------------------------------------------------

class Indexed(Dataset):
    """TensorDataset-like samples that also carry their index."""

    def __init__(self, n=10):
        self.base = make_data(n)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, torch.tensor(i)


class IndexModel(LinReg):
    def __init__(self, shift=0.0):
        super().__init__(shift=shift)
        self.seen: list[int] = []

    def forward(self, x, y, idx):
        self.seen.extend(idx.tolist())
        return super().forward(x, y)


def position(snap: dict) -> tuple[int, int, int]:
    """(iteration, epoch, global samples into the epoch) of a snapshot."""
    return snap["progress"]["iteration"], snap["data"]["epoch"], snap["data"]["position"]


def first_run(tmp_path, plateau=False):
    """One epoch of 10 samples, batch 2, shuffled; snapshots at 0.5 (iteration 3, sample 6) and 1.0 (iteration 5)."""
    prefix = tmp_path / "a" / "snap"
    model = IndexModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = RecordingPlateau(opt, patience=100) if plateau else None
    train_model(model, opt, sched, Indexed(), 2, shuffle=True, snapshot_prefix=str(prefix), num_epochs=1,
                snapshot_interval=0.5, num_workers=0)
    assert snapshot_iters(prefix) == [3, 5]
    assert position(load_snap(prefix, 3)) == (3, 0, 6)
    return prefix, model


def resumed_run(tmp_path, src, name, batch_size=2, num_epochs=2, **kwargs):
    prefix = tmp_path / name / "snap"
    model = IndexModel(shift=1.0)  # other weights: the snapshot must overwrite them
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_model(model, opt, kwargs.pop("scheduler", None), Indexed(), batch_size, shuffle=True,
                snapshot_prefix=str(prefix), num_epochs=num_epochs, load_snapshot_path=f"{src}_iter_3.pt",
                num_workers=0, **kwargs)
    return prefix, model


def test_restore_dataloader_true_resumes_at_the_same_sample(tmp_path):
    src, first = first_run(tmp_path)
    prefix, model = resumed_run(tmp_path, src, "b", restore_dataloader=True)
    rows = after_resume(read_order(prefix))
    assert (rows[0]["iteration"], rows[0]["epoch"], rows[0]["from"], rows[0]["to"]) == (4, 0, 6, 8)
    assert [r["iteration"] for r in rows] == list(range(4, 11))
    # the resumed run sees the rest of epoch 0 in the original order, then all of epoch 1
    assert model.seen[:4] == first.seen[6:10]
    assert sorted(first.seen[:6] + model.seen[:4]) == list(range(10))
    assert sorted(model.seen[4:]) == list(range(10))
    # and ends bit-identical to an uninterrupted run
    ref = IndexModel()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    train_model(ref, ref_opt, None, Indexed(), 2, shuffle=True, num_epochs=2, num_workers=0)
    assert ref.seen == first.seen[:6] + model.seen
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


class DropoutReg(nn.Module):
    """Training draws random numbers (dropout): an exact resume needs the snapshot's RNG state."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.lin = nn.Linear(D, 1)
        init_linear(self.lin, shift)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, y):
        return ((self.lin(self.drop(x)).squeeze(-1) - y) ** 2).mean()


def test_resume_is_bit_identical_with_random_training(tmp_path):
    prefix = tmp_path / "a" / "snap"

    def run(model, **kwargs):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = StepLR(opt, step_size=2, gamma=0.5)
        torch.manual_seed(123)
        train_model(model, opt, sched, make_data(10), 2, shuffle=True, seed=5, num_workers=0, **kwargs)
        return model

    ref = run(DropoutReg(), num_epochs=3)
    run(DropoutReg(), num_iters=7, snapshot_prefix=str(prefix))
    torch.manual_seed(999)  # whatever the global RNG holds now, the snapshot's state must win
    resumed = run(DropoutReg(shift=1.0), num_epochs=3, load_snapshot_path=f"{prefix}_iter_7.pt")
    for p, q in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_restore_dataloader_false_starts_the_next_epoch(tmp_path):
    src, first = first_run(tmp_path)
    prefix, model = resumed_run(tmp_path, src, "b", restore_dataloader=False)
    rows = after_resume(read_order(prefix))
    assert (rows[0]["iteration"], rows[0]["epoch"], rows[0]["from"]) == (4, 1, 0)
    assert [(r["epoch"], r["from"], r["to"]) for r in rows] == [(1, 0, 2), (1, 2, 4), (1, 4, 6), (1, 6, 8),
                                                                (1, 8, 10)]
    assert len(model.seen) == 10 and sorted(model.seen) == list(range(10))
    assert position(load_snap(prefix, 8)) == (8, 2, 0)
    # epoch 1's order is the same as in an uninterrupted run (a function of seed and epoch)
    ref_prefix = tmp_path / "ref" / "snap"
    ref = IndexModel()
    train_model(ref, torch.optim.SGD(ref.parameters(), lr=0.05), None, Indexed(), 2, shuffle=True, num_epochs=2,
                snapshot_prefix=str(ref_prefix), num_workers=0)
    ref_rows = [r for r in read_order(ref_prefix) if r["epoch"] == 1]
    assert [r["digest"] for r in ref_rows] == [r["digest"] for r in rows]
    assert ref.seen[10:] == model.seen


def test_restore_dataloader_false_plateau_gets_only_the_new_epochs_losses(tmp_path):
    """The partial epoch that restore_dataloader=False skips must not leak into the next epoch's plateau metric."""
    src, _ = first_run(tmp_path, plateau=True)  # its snapshot at iteration 3 carries 3 losses of epoch 0
    prefix = tmp_path / "b" / "snap"
    model = IndexModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = RecordingPlateau(opt, patience=100)
    train_model(model, opt, sched, Indexed(), 2, shuffle=True, snapshot_prefix=str(prefix), num_epochs=2,
                load_snapshot_path=f"{src}_iter_3.pt", restore_dataloader=False, num_workers=0)
    # the skipped epoch 0 ends at the resume (stepped with its 3 losses), epoch 1 with its own 5 only
    assert len(model.losses) == 5 and len(sched.seen) == 2
    snap = load_snap(src, 3)["epoch_loss"]
    assert sched.seen[0] == pytest.approx(snap["sum"].item() / 3, rel=1e-6) and snap["count"] == 3
    assert sched.seen[1] == pytest.approx(sum(model.losses) / 5, rel=1e-5)


def test_restore_dataloader_false_steps_the_epoch_scheduler_for_the_skipped_epoch(tmp_path):
    """The epoch counter and a per-epoch schedule stay aligned when the rest of an epoch is skipped."""
    def build():
        model = IndexModel()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    src = tmp_path / "a" / "snap"
    train_model(*build(), Indexed(), 2, shuffle=True, snapshot_prefix=str(src), num_iters=3, num_workers=0)
    model, opt, sched = build()
    train_model(model, opt, sched, Indexed(), 2, shuffle=True, num_epochs=2, num_workers=0,
                load_snapshot_path=f"{src}_iter_3.pt", restore_dataloader=False)
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_resume_plateau_mid_epoch_keeps_the_epoch_mean(tmp_path):
    """With restore_dataloader=True the epoch's loss mean spans both runs, as in an uninterrupted run."""
    prefix_a = tmp_path / "a" / "snap"
    model = IndexModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = RecordingPlateau(opt, patience=100)
    train_model(model, opt, sched, Indexed(), 2, snapshot_prefix=str(prefix_a), num_iters=3, num_workers=0)
    first_losses = list(model.losses)
    model_b = IndexModel()
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05)
    sched_b = RecordingPlateau(opt_b, patience=100)
    train_model(model_b, opt_b, sched_b, Indexed(), 2, num_epochs=1, num_workers=0,
                load_snapshot_path=f"{prefix_a}_iter_3.pt")
    assert len(model_b.losses) == 2 and len(sched_b.seen) == 1
    assert sched_b.seen[0] == pytest.approx(sum(first_losses + model_b.losses) / 5, rel=1e-5)


def test_resume_with_another_batch_size_keeps_the_sample_position(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    src, first = first_run(tmp_path)
    prefix, model = resumed_run(tmp_path, src, "b", batch_size=4)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and r.name.startswith("pixelz_dist.")]
    assert any("batch_size 2 -> 4" in m for m in warnings_), warnings_
    snap_pos = load_snap(src, 3)["data"]["position"]
    rows = after_resume(read_order(prefix))
    assert rows[0]["from"] == snap_pos == 6
    assert [(r["epoch"], r["from"], r["to"]) for r in rows] == [(0, 6, 10), (1, 0, 4), (1, 4, 8), (1, 8, 10)]
    # no sample skipped or repeated in epoch 0
    assert sorted(first.seen[:6] + model.seen[:4]) == list(range(10))
    assert model.seen[:4] == first.seen[6:10]


def test_resume_auto_picks_the_newest_snapshot(tmp_path):
    prefix = tmp_path / "snap"
    quick(num_iters=4, snapshot_interval=2, snapshot_prefix=str(prefix))
    model, opt = quick(num_iters=6, snapshot_prefix=str(prefix), load_snapshot_path="auto")
    assert opt.steps == 2 and model.forwards == 2
    assert snapshot_iters(prefix) == [2, 4, 6]


def test_resume_auto_without_snapshots_starts_fresh(tmp_path):
    prefix = tmp_path / "snap"
    model, opt = quick(num_iters=3, snapshot_prefix=str(prefix), load_snapshot_path="auto")
    assert opt.steps == 3
    assert snapshot_iters(prefix) == [3]


# -- strict_load -------------------------------------------------------------------------------------------------------

def test_snapshot_of_another_architecture_is_refused(tmp_path):
    prefix = tmp_path / "snap"
    quick(num_iters=2, snapshot_prefix=str(prefix))
    wider = LinReg(d=D + 2)
    before = wider.lin.weight.detach().clone()
    for strict in (True, False):
        with pytest.raises(SnapshotError) as info:
            quick(model=wider, data=make_data(d=D + 2), num_iters=4, load_snapshot_path=f"{prefix}_iter_2.pt",
                  strict_load=strict)
        msg = str(info.value)
        assert "lin.weight" in msg and "(1, 3)" in msg and "(1, 5)" in msg
    assert wider.forwards == 0 and torch.equal(wider.lin.weight, before)


class WithBuffer(LinReg):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1))


def test_strict_load_lists_missing_keys_and_can_be_relaxed(tmp_path):
    prefix = tmp_path / "snap"
    src, _ = quick(num_iters=2, snapshot_prefix=str(prefix))
    model = WithBuffer()
    with pytest.raises(SnapshotError, match="scale"):
        quick(model=model, num_iters=3, load_snapshot_path=f"{prefix}_iter_2.pt")
    assert model.forwards == 0
    model, opt = quick(model=WithBuffer(), num_iters=2, load_snapshot_path=f"{prefix}_iter_2.pt", strict_load=False)
    assert opt.steps == 0  # already at iteration 2
    assert torch.equal(model.lin.weight, src.lin.weight)


# -- the final snapshot's mark (meta["final"]) -------------------------------------------------------------------------

class Signal(Callback):
    """Sends this process ``signum`` after ``at`` iterations (as a scheduler would: the loop snapshots, then exits);
    requests a stop instead with ``signum=None``. Records the snapshots announced."""

    def __init__(self, at: int, signum=signal.SIGTERM):
        self.at, self.signum, self.snapshots = at, signum, []

    def on_iteration_end(self, state):
        if state.iteration == self.at:
            if self.signum is None:
                state.request_stop("enough")
            else:
                os.kill(os.getpid(), self.signum)

    def on_snapshot(self, state, path):
        self.snapshots.append(os.path.basename(path))


def finals(prefix) -> dict[int, bool]:
    return {it: load_snap(prefix, it)["meta"]["final"] for it in snapshot_iters(prefix)}


def test_only_the_snapshot_that_ends_the_run_is_final(tmp_path):
    """By iterations and by epochs, ending between periodic snapshots or on one (then written once, final), and
    stopped by a callback's request."""
    quick(num_iters=7, snapshot_interval=3, snapshot_prefix=str(tmp_path / "a"))
    assert finals(tmp_path / "a") == {3: False, 6: False, 7: True}
    seen = Signal(at=99)
    quick(num_iters=6, snapshot_interval=3, snapshot_prefix=str(tmp_path / "b"), callbacks=[seen])
    assert finals(tmp_path / "b") == {3: False, 6: True} and seen.snapshots == ["b_iter_3.pt", "b_iter_6.pt"]
    quick(num_epochs=2, snapshot_interval=1, snapshot_prefix=str(tmp_path / "c"))
    assert finals(tmp_path / "c") == {5: False, 10: True}
    quick(num_iters=10, snapshot_interval=2, snapshot_prefix=str(tmp_path / "d"), callbacks=[Signal(3, None)])
    assert finals(tmp_path / "d") == {2: False, 3: True}


def test_a_preemption_snapshot_is_not_final_and_the_resumed_run_ends_with_one(tmp_path):
    prefix = str(tmp_path / "snap")
    with pytest.raises(Preempted):
        quick(num_iters=6, snapshot_interval=4, snapshot_prefix=prefix, callbacks=[Signal(2)])
    assert finals(prefix) == {2: False}
    quick(num_iters=6, snapshot_interval=4, snapshot_prefix=prefix, load_snapshot_path="auto")
    assert finals(prefix) == {2: False, 4: False, 6: True}
    # preempted at its last iteration: the resumed run trains nothing, and rewrites that snapshot as the final one
    other = str(tmp_path / "last")
    with pytest.raises(Preempted):
        quick(num_iters=3, snapshot_prefix=other, callbacks=[Signal(3)])
    assert finals(other) == {3: False}
    model, opt = quick(num_iters=3, snapshot_prefix=other, load_snapshot_path="auto")
    assert opt.steps == 0 and finals(other) == {3: True}
    assert torch.equal(load_snap(other, 3)["model"]["lin.weight"], model.lin.weight)
