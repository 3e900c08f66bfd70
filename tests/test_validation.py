"""Validation during training: rows in the metrics file, TensorBoard, the best snapshots kept from keep_last and
PREFIX_best.pt, training unchanged by it, exact resume with it on; the command line on real PNG folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from conftest import DIST_VARS, TESTS
from pixelz_dist import Callback, evaluate_model, train_model
from pixelz_dist.callbacks import TensorBoardLogger, Validation
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.cli import options
from pixelz_dist.errors import ConfigError


class Net(nn.Module):
    """Regression with dropout: training draws random numbers, which validation must not disturb."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, y):
        pred = self.lin(self.drop(x)).squeeze(-1)
        return {"loss": ((pred - y) ** 2).mean(), "pred": pred}


def mae(output, batch):
    return (output["pred"] - batch[1]).abs()


class Drawing(TensorDataset):
    """Draws from the global RNG per sample, as a random augmentation would (the value is not used)."""

    def __getitem__(self, i):
        torch.rand(1)
        return super().__getitem__(i)


def datasets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(37, generator=g)
    return TensorDataset(x[:30], y[:30]), Drawing(x[30:], y[30:])  # 7 validation samples: batches 3, 3, 1


class StopAt(Callback):
    def __init__(self, iteration):
        self.iteration = iteration

    def on_iteration_end(self, state):
        if state.iteration == self.iteration:
            state.request_stop("test")


class Writer:
    """A SummaryWriter stand-in that records the scalars."""

    scalars: list = []

    def __init__(self, log_dir):
        pass

    def add_scalar(self, tag, value, step):
        Writer.scalars.append((tag, value, step))

    def close(self):
        pass


def train(prefix, validate=True, stop_at=None, resume=False, **kwargs):
    model = Net()
    train_set, val_set = datasets()
    callbacks = []
    if validate:
        callbacks += [Validation(val_set, 3, {"mae": mae}, interval=3, num_workers=0),
                      TensorBoardLogger(str(prefix) + "_tb", every=100, writer_factory=Writer)]
    if stop_at:
        callbacks.append(StopAt(stop_at))  # last: the others keep their places (their states' names)
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, train_set, 4, shuffle=True,
                snapshot_prefix=str(prefix), num_iters=12, display_iter=5, keep_last=1, num_workers=0,
                keep_best=2 if validate else None, callbacks=callbacks, load_snapshot_path="auto" if resume else None,
                **kwargs)
    return model


def val_rows(prefix):
    """The validation rows by iteration (a resumed run repeats rows after its snapshot: the last one counts)."""
    rows = [json.loads(line) for line in open(f"{prefix}_metrics.jsonl")]
    return {r["iteration"]: r for r in rows if "val_loss" in r}


def test_validation_rows_best_snapshots_and_tensorboard_and_training_unchanged(tmp_path):
    Writer.scalars = []
    trained = train(tmp_path / "v" / "s")
    plain = train(tmp_path / "p" / "s", validate=False)
    for a, b in zip(trained.parameters(), plain.parameters()):  # the random stream and the weights: untouched
        assert torch.equal(a, b)
    assert trained.training and trained.drop.training
    rows = val_rows(tmp_path / "v" / "s")
    assert sorted(rows) == [3, 6, 9, 12]
    assert set(rows[3]) == {"iteration", "epoch", "val_loss", "val_mae"}
    assert [(t, s) for t, _, s in Writer.scalars] == [(t, s) for s in (3, 6, 9, 12) for t in ("val/loss", "val/mae")]
    # the two best by val_loss are kept beside the newest (keep_last=1); PREFIX_best.pt is the best one
    best = sorted(rows, key=lambda it: rows[it]["val_loss"])[:2]
    kept = {it for it, _ in list_snapshots(str(tmp_path / "v" / "s"))}
    assert kept == {12, *best}
    best_file = tmp_path / "v" / "s_best.pt"
    assert os.path.samefile(best_file, tmp_path / "v" / f"s_iter_{best[0]}.pt")
    # the value measured at iteration N is that of the weights of snapshot N
    model = Net()
    model.load_state_dict(load_snapshot(str(best_file))["model"])
    again = evaluate_model(model, datasets()[1], 3, {"mae": mae}, num_workers=0)
    assert again == {"loss": rows[best[0]]["val_loss"], "mae": rows[best[0]]["val_mae"]}


def test_a_run_stopped_and_resumed_with_validation_equals_an_uninterrupted_one(tmp_path):
    # "max" of an error that falls as training goes on: the best snapshots are the early ones (3 and 6), which the
    # resumed run knows only from the snapshot it resumes from
    kw = dict(monitor="val_mae", monitor_mode="max")
    straight = train(tmp_path / "a" / "s", **kw)
    train(tmp_path / "b" / "s", stop_at=7, **kw)  # after the validation of 6 (whose snapshot is a best one), before 9
    assert sorted(val_rows(tmp_path / "b" / "s")) == [3, 6]
    resumed = train(tmp_path / "b" / "s", resume=True, **kw)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert val_rows(tmp_path / "a" / "s") == val_rows(tmp_path / "b" / "s")
    kept = [sorted(it for it, _ in list_snapshots(str(tmp_path / run / "s"))) for run in ("a", "b")]
    assert kept[0] == kept[1] == [3, 6, 12]
    final = [load_snapshot(list_snapshots(str(tmp_path / run / "s"))[0][1]) for run in ("a", "b")]
    assert final[0]["callbacks"] == final[1]["callbacks"]  # the best list and the last values alike
    best = best_iteration(tmp_path / "a" / "s")
    for run in ("a", "b"):
        assert os.path.samefile(tmp_path / run / "s_best.pt", tmp_path / run / f"s_iter_{best}.pt")


def best_iteration(prefix) -> int:
    rows = val_rows(prefix)
    return min(rows, key=lambda it: (-rows[it]["val_mae"], it))


def test_keep_best_needs_a_validation_that_reports_the_monitored_value(tmp_path):
    model = Net()
    train_set, val_set = datasets()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = dict(snapshot_prefix=str(tmp_path / "s"), num_iters=2, num_workers=0, keep_best=1)
    with pytest.raises(ConfigError, match="no validation runs.*HINT"):
        train_model(model, opt, None, train_set, 4, **kw)
    with pytest.raises(ConfigError, match="'val_miou' is not a value the validation reports \\(val_loss, val_mae\\)"):
        train_model(model, opt, None, train_set, 4, monitor="val_miou", monitor_mode="max",
                    callbacks=[Validation(val_set, 3, {"mae": mae})], **kw)
    with pytest.raises(ConfigError, match="monitor_mode='max'"):
        train_model(model, opt, None, train_set, 4, monitor="val_mae", callbacks=[Validation(val_set, 3)], **kw)
    with pytest.raises(ConfigError, match="keeps none. HINT: pass ema="):
        train_model(model, opt, None, train_set, 4, snapshot_prefix=str(tmp_path / "e"), num_iters=2, num_workers=0,
                    callbacks=[Validation(val_set, 3, use_ema=True)])


def test_use_ema_validates_the_moving_average_of_the_weights(tmp_path):
    model = Net()
    model.drop.p = 0.0
    train_set, val_set = datasets()
    ema, live = Validation(val_set, 3, interval=3, num_workers=0, use_ema=True), \
        Validation(val_set, 3, interval=3, num_workers=0, prefix="live")
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, train_set, 4, num_iters=6, ema=0.5,
                snapshot_prefix=str(tmp_path / "s"), num_workers=0, callbacks=[ema, live])
    snapshot = load_snapshot(str(tmp_path / "s_iter_6.pt"))
    for validation, weights in ((ema, snapshot["ema"]["state_dict"]), (live, snapshot["model"])):
        again = Net()
        again.load_state_dict(weights)
        assert validation.last[f"{validation.prefix}_loss"] == evaluate_model(again, val_set, 3, num_workers=0)["loss"]
    assert ema.last["val_loss"] != live.last["live_loss"]


def test_command_line_refuses_validation_options_without_val_data(tmp_path, capsys):
    base = ["--model", "val_model:SegNet", "--data", str(tmp_path), "--iters", "2"]
    for extra, message in ((["--keep-best", "1"], "--keep-best needs --val-data"),
                           (["--val-data", str(tmp_path), str(tmp_path)], "2 folders for 1 --data"),
                           (["--val-data", str(tmp_path), "--use-ema"], "--use-ema validates the moving average")):
        with pytest.raises(SystemExit) as info:
            options.parse("train", base + extra)
        assert info.value.code == 2
        assert message in capsys.readouterr().err


# -- the command line on real image folders ----------------------------------------------------------------------
def label_folders(root, n, seed):
    """rgb/ (lossless photos whose red channel is 50 * class) and labels/ (the classes, PNG mode L)."""
    rgb, labels = root / "rgb", root / "labels"
    rgb.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = rng.integers(0, 5, (16, 16)).astype(np.uint8)
        photo = np.stack([cls * 50, rng.integers(0, 255, (16, 16)), rng.integers(0, 255, (16, 16))], -1)
        Image.fromarray(photo.astype(np.uint8)).save(rgb / f"{i:03d}.png")
        Image.fromarray(cls, "L").save(labels / f"{i:03d}.png")
    return [str(rgb), str(labels)]


@pytest.mark.slow
def test_train_command_validates_label_folders_every_epoch_and_keeps_the_best_miou_snapshot(tmp_path):
    prefix = tmp_path / "run" / "s"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pixelz_dist.train", "--model", "val_model:SegNet", "--data",
         *label_folders(tmp_path / "train", 8, 0), "--modes", "RGB", "label", "--val-data",
         *label_folders(tmp_path / "val", 5, 1), "--val-miou", "5", "--val-interval", "1", "--val-batch-size", "2",
         "--epochs", "3", "--batch-size", "2", "--lr", "0.5", "--workers", "0", "--keep-best", "1", "--keep-last", "1",
         "--monitor-key", "val_miou", "--monitor-mode", "max", "--snapshot-prefix", str(prefix), "--no-shuffle"],
        cwd=os.path.join(TESTS, "jobs"), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation at iter 4 | epoch 1.00 | val_loss" in proc.stderr
    rows = val_rows(prefix)
    assert sorted(rows) == [4, 8, 12]  # 8 samples in batches of 2: an epoch is 4 iterations, validated at its end
    assert all(0 <= r["val_miou"] <= 1 for r in rows.values())
    best = max(rows, key=lambda it: (rows[it]["val_miou"], -it))
    assert {it for it, _ in list_snapshots(str(prefix))} == {12, best}
    assert os.path.samefile(f"{prefix}_best.pt", f"{prefix}_iter_{best}.pt")


# -- the best-snapshot tracker alone ----------------------------------------------------------------------------------
class FakeState:
    """What KeepBest reads of the run, and the snapshot requests it makes."""

    def __init__(self, prefix):
        self.snapshot_prefix, self.iteration, self.last_snapshot_iteration = prefix, 0, -1
        self.requests = []

    def request_snapshot(self, *, on_every_rank=False):
        self.requests.append((self.iteration, on_every_rank))


def test_keep_best_ranks_by_mode_skips_nan_and_links_best_pt_with_a_copy_where_links_fail(tmp_path, monkeypatch):
    from pixelz_dist.checkpoint.best import KeepBest

    prefix = str(tmp_path / "s")
    state = FakeState(prefix)
    keep = KeepBest(2, "val_miou", "max")
    keep.on_train_start(state)

    def validated(iteration, value, durable=True):
        state.iteration = iteration
        keep.on_validation(state, {"val_loss": 1.0, "val_miou": value})
        if durable:
            (tmp_path / f"s_iter_{iteration}.pt").write_bytes(b"weights of %d" % iteration)
            state.last_snapshot_iteration = iteration
            keep.on_snapshot(state, f"{prefix}_iter_{iteration}.pt")

    validated(1, 0.5)
    validated(2, float("nan"))  # never a best one, no snapshot asked for it
    validated(3, 0.7)
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    validated(4, 0.6)  # enters the top 2 (0.7, 0.6), pushes 0.5 out
    validated(5, 0.6)  # a tie with 4: the earlier stays, no snapshot asked
    assert state.requests == [(1, True), (3, True), (4, True)]
    assert keep.best == [(0.7, 3), (0.6, 4)]
    assert keep.protected_snapshots() == {str(tmp_path / "s_iter_3.pt"), str(tmp_path / "s_iter_4.pt")}
    assert (tmp_path / "s_best.pt").read_bytes() == b"weights of 3"
    validated(6, 0.9)  # a new best while hard links fail: a copy, renamed into place
    assert (tmp_path / "s_best.pt").read_bytes() == b"weights of 6"
    assert not os.path.samefile(tmp_path / "s_best.pt", tmp_path / "s_iter_6.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # a resume from the snapshot of a value still pending counts it; other pending values are dropped
    state.iteration = 7
    keep.on_validation(state, {"val_miou": 0.95})
    saved = keep.state_dict()
    again = KeepBest(2, "val_miou", "max")
    again.load_state_dict(saved)
    state.last_snapshot_iteration = 7
    (tmp_path / "s_iter_7.pt").write_bytes(b"weights of 7")
    monkeypatch.undo()
    again.on_train_start(state)
    assert again.best == [(0.95, 7), (0.9, 6)] and again.pending == {}
    assert os.path.samefile(tmp_path / "s_best.pt", tmp_path / "s_iter_7.pt")
