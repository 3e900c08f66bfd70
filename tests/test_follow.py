"""`python -m pixelz_dist.evaluate`: every snapshot of a run evaluated once, in order, one row each in
PREFIX_eval.jsonl, equal to evaluating the snapshot directly; nothing of the run touched; a pruned snapshot skipped
with one line; a torn last row cut off and redone; --use-ema; and --follow beside a real training run (two real
processes), which exits 0 once the run's final snapshot is evaluated.

The one-shot runs call the commands' ``main`` in this process (a fresh interpreter costs seconds here); the follower
test starts both commands as real processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import DIST_VARS, TESTS
from pixelz_dist.callbacks import Callback
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.data.multi_images import MultiImgsDataset
from pixelz_dist.distributed.preemption import Preempted
from pixelz_dist.errors import SnapshotError
from pixelz_dist.evaluation.evaluate import evaluate_model
from pixelz_dist.evaluation.follow import EvalRecord, SnapshotFollower
from pixelz_dist.evaluation.metrics import MeanIoU

JOBS = os.path.join(TESTS, "jobs")
METRIC = ["--val-miou", "3"]


@pytest.fixture
def seg(tmp_path, monkeypatch):
    """Segmentation folders (12 samples, 16 x 16) and the options that train and evaluate a SegNet on them."""
    monkeypatch.syspath_prepend(JOBS)
    from seg_model import make_seg_data

    folders = make_seg_data(tmp_path / "data")
    return ["--model", "seg_model:SegNet", "--data", *folders, "--modes", "RGB", "label", "--batch-size", "4",
            "--workers", "0"]


def train_in_process(args: list[str]) -> None:
    from pixelz_dist.train import main

    assert main(["--lr", "0.5", *args]) == 0


def evaluate_in_process(args: list[str]) -> int:
    from pixelz_dist.evaluate import main

    return main(args)


def rows(prefix) -> list[dict]:
    with open(f"{prefix}_eval.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def direct(path: str, folders: list[str], ema: bool = False) -> dict:
    """evaluate_model on the snapshot's weights, without the follower."""
    from seg_model import SegNet

    model = SegNet()
    snap = load_snapshot(path)
    model.load_state_dict(snap["ema"]["state_dict"] if ema else snap["model"])
    from torchvision.transforms import v2

    data = MultiImgsDataset(folders, v2.ToDtype(torch.float32, scale=True), modes=["RGB", "label"])
    return evaluate_model(model, data, 4, {"miou": MeanIoU(3)}, num_workers=0)


def files_of(folder) -> dict[str, int]:
    return {e.name: e.stat().st_mtime_ns for e in os.scandir(folder)}


def test_each_snapshot_once_in_order_equal_to_direct_evaluation_and_nothing_of_the_run_touched(tmp_path, seg):
    prefix = str(tmp_path / "run" / "s")
    # trained with random augmentation, which the saved configuration keeps: evaluation reads the samples whole
    train_in_process([*seg, "--crop", "16", "--hflip", "--scale-range", "0.5", "1.5", "--iters", "6",
                      "--snapshot-interval", "2", "--snapshot-prefix", prefix])
    before = files_of(tmp_path / "run")
    assert evaluate_in_process(["--config", f"{prefix}_config.toml", *METRIC]) == 0
    got = rows(prefix)
    assert [(r["iteration"], r["snapshot"], r["ema"]) for r in got] == [(2, "s_iter_2.pt", False),
                                                                        (4, "s_iter_4.pt", False),
                                                                        (6, "s_iter_6.pt", False)]
    folders = seg[seg.index("--data") + 1:seg.index("--modes")]
    for row in got:
        want = direct(f"{prefix}_iter_{row['iteration']}.pt", folders)
        assert {k: row[k] for k in ("loss", "miou")} == want, row
    assert got[0]["loss"] > got[-1]["loss"]  # the run learned: the rows are not all the same weights'
    after = files_of(tmp_path / "run")
    assert after.pop("s_eval.jsonl") and after == before  # no lock, temporary file or change of the run's files
    text = open(f"{prefix}_eval.jsonl", "rb").read()
    assert evaluate_in_process(["--config", f"{prefix}_config.toml", *METRIC]) == 0  # again: nothing to add
    assert open(f"{prefix}_eval.jsonl", "rb").read() == text
    # a follower killed while writing its last row: that row is cut off and the snapshot evaluated again
    with open(f"{prefix}_eval.jsonl", "r+b") as f:
        f.truncate(len(text) - 7)
    assert evaluate_in_process(["--config", f"{prefix}_config.toml", *METRIC]) == 0
    assert open(f"{prefix}_eval.jsonl", "rb").read() == text


def test_use_ema_evaluates_the_moving_average_and_without_one_is_one_error_line(tmp_path, seg, capsys):
    prefix = str(tmp_path / "s")
    train_in_process([*seg, "--iters", "1", "--snapshot-prefix", prefix])
    capsys.readouterr()
    assert evaluate_in_process(["--config", f"{prefix}_config.toml", "--use-ema"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "s_iter_1.pt" in err[0] and "no EMA weights" in err[0] and "HINT" in err[0]
    assert not os.path.exists(f"{prefix}_eval.jsonl")
    # a run with EMA: the EMA rows and the trained weights' rows side by side in one file, each set once
    prefix = str(tmp_path / "ema")
    train_in_process([*seg, "--iters", "4", "--snapshot-interval", "2", "--ema", "0.5", "--snapshot-prefix", prefix])
    for _ in range(2):
        assert evaluate_in_process(["--config", f"{prefix}_config.toml", *METRIC, "--use-ema"]) == 0
        assert evaluate_in_process(["--config", f"{prefix}_config.toml", *METRIC]) == 0
    got = rows(prefix)
    assert [(r["iteration"], r["ema"]) for r in got] == [(2, True), (4, True), (2, False), (4, False)]
    folders = seg[seg.index("--data") + 1:seg.index("--modes")]
    for row in got:
        want = direct(f"{prefix}_iter_{row['iteration']}.pt", folders, ema=row["ema"])
        assert {k: row[k] for k in ("loss", "miou")} == want, row
    assert got[1]["loss"] != got[3]["loss"]  # the average is not the trained weights


class Pruner:
    """An evaluation that deletes the next snapshot while it runs, as keep_last would between listing and reading."""

    def __init__(self, victim: str):
        self.victim, self.seen = victim, []

    def __call__(self, snapshot, path):
        if os.path.exists(self.victim):
            os.unlink(self.victim)
        self.seen.append(os.path.basename(path))
        return {"loss": float(snapshot["progress"]["iteration"])}


def linear_run(prefix: str, **kwargs) -> None:
    from engine_helpers import quick

    quick(snapshot_prefix=prefix, **kwargs)


def test_a_snapshot_pruned_before_it_was_read_is_skipped_with_one_line(tmp_path, caplog):
    prefix = str(tmp_path / "s")
    linear_run(prefix, num_iters=6, snapshot_interval=2)
    pruner = Pruner(f"{prefix}_iter_4.pt")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        assert SnapshotFollower(prefix, pruner).run_once() == 2
    assert pruner.seen == ["s_iter_2.pt", "s_iter_6.pt"]
    assert [r["iteration"] for r in EvalRecord(f"{prefix}_eval.jsonl").read()] == [2, 6]
    lines = [r.getMessage() for r in caplog.records if "s_iter_4.pt" in r.getMessage()]
    assert lines == ["skipping s_iter_4.pt: removed before it could be read (keep_last pruned it)"]


class SigTerm(Callback):
    """Sends this process SIGTERM after ``at`` iterations, as a scheduler would: the run snapshots and exits 75."""

    def __init__(self, at: int):
        self.at = at

    def on_iteration_end(self, state):
        if state.iteration == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def fake_time():
    """``(clock, sleep)``: a clock that only sleeping moves."""
    now = [0.0]
    return (lambda: now[0]), (lambda seconds: now.__setitem__(0, now[0] + seconds))


def test_follow_ends_at_the_final_snapshot_also_when_rewritten_and_times_out_without_it(tmp_path):
    """A run preempted at its last iteration leaves no final snapshot: the follower evaluates what there is and times
    out. Resumed, the run rewrites that snapshot as the final one: the follower (this one, or a new one reading its
    rows back) ends without evaluating anything twice."""
    prefix = str(tmp_path / "s")
    with pytest.raises(Preempted):
        linear_run(prefix, num_iters=3, snapshot_interval=2, callbacks=[SigTerm(3)])
    seen = []

    def evaluate(snapshot, path):
        seen.append(os.path.basename(path))
        return {"loss": 0.5}

    clock, sleep = fake_time()
    follower = SnapshotFollower(prefix, evaluate, poll_seconds=1.0, timeout=5.0)
    with pytest.raises(SnapshotError, match=r"no new snapshot of .* for 5 s .*the newest is s_iter_3\.pt"):
        follower.follow(sleep=sleep, clock=clock)
    assert seen == ["s_iter_2.pt", "s_iter_3.pt"]
    linear_run(prefix, num_iters=3, load_snapshot_path="auto")  # trains nothing; snapshot 3 rewritten, final
    assert SnapshotFollower(prefix, evaluate, timeout=5.0).follow(sleep=sleep, clock=clock) == 0
    assert follower.follow(sleep=sleep, clock=clock) == 0
    assert seen == ["s_iter_2.pt", "s_iter_3.pt"]
    assert [r["snapshot"] for r in EvalRecord(f"{prefix}_eval.jsonl").read()] == seen


@pytest.mark.slow
def test_follower_beside_a_real_training_run_exits_0_after_the_final_snapshot(tmp_path, seg):
    """Two real processes on one prefix: the follower starts first (no snapshot yet), evaluates each snapshot as it
    appears, and exits 0 once the final one is evaluated; its rows equal direct evaluation."""
    prefix = str(tmp_path / "run" / "s")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([JOBS, env.get("PYTHONPATH", "")]))
    common = [sys.executable, "-m"]
    follower = subprocess.Popen([*common, "pixelz_dist.evaluate", *seg, "--snapshot-prefix", prefix, *METRIC,
                                 "--follow", "--poll-seconds", "0.2", "--timeout", "120"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        trainer = subprocess.run([*common, "pixelz_dist.train", *seg, "--model-arg", "delay=0.15", "--lr", "0.5",
                                  "--iters", "8", "--snapshot-interval", "2", "--keep-last", "0",  # all 4 compared
                                  "--snapshot-prefix", prefix],
                                 env=env, capture_output=True, text=True, timeout=180)
        followed, _ = follower.communicate(timeout=180)
    finally:
        follower.kill()
    assert trainer.returncode == 0, trainer.stderr
    assert follower.returncode == 0, followed
    assert "the run's final snapshot s_iter_8.pt is evaluated" in followed
    got = rows(prefix)
    assert [r["iteration"] for r in got] == [it for it, _ in reversed(list_snapshots(prefix))] == [2, 4, 6, 8]
    folders = seg[seg.index("--data") + 1:seg.index("--modes")]
    for row in got:
        want = direct(f"{prefix}_iter_{row['iteration']}.pt", folders)
        assert all(math.isclose(row[k], want[k], rel_tol=1e-9, abs_tol=1e-12) for k in want), (row, want)
    leftovers = sorted(n for n in os.listdir(tmp_path / "run") if not n.startswith("s_iter_"))
    assert leftovers == ["s.lock", "s_config.toml", "s_curves.png", "s_eval.jsonl", "s_metrics.jsonl", "s_order.tsv"]


@pytest.mark.parametrize("argv, expected", [
    ([], "which run to evaluate: pass --snapshot-prefix PREFIX"),
    (["--snapshot-prefix", "p", "--timeout", "5"], "--timeout is how long --follow waits"),
    (["--snapshot-prefix", "p", "--val-miou", "0"], "--val-miou must be >= 1"),
    (["--snapshot-prefix", "p", "--lr", "0.1"], "unrecognized arguments: --lr"),  # nothing is trained
])
def test_evaluate_usage_errors(tmp_path, capsys, argv, expected):
    from pixelz_dist.cli import options as cli

    with pytest.raises(SystemExit) as e:
        cli.parse("evaluate", ["--model", "m:f", "--dataset", "d:f", *argv])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_evaluate_reads_a_runs_saved_configuration_and_ignores_training_only_keys(tmp_path):
    from pixelz_dist.cli import options as cli

    cfg = tmp_path / "s_config.toml"
    cfg.write_text('demo = true\niters = 3\nlr = 0.2\nbatch_size = 4\nsnapshot_prefix = "runs/s"\nkeep_last = 2\n')
    o = cli.parse("evaluate", ["--config", str(cfg), "--follow", "--batch-size", "16"])
    assert (o.snapshot_prefix, o.batch_size, o.follow, o.poll_seconds) == ("runs/s", 16, True, 5.0)
    assert not hasattr(o, "lr") and not hasattr(o, "iters")


def test_the_follower_refuses_torchrun(tmp_path, seg, monkeypatch, capsys):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert evaluate_in_process([*seg, "--snapshot-prefix", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "error: python -m pixelz_dist.evaluate runs as one process, not under torchrun (WORLD_SIZE=2)" in err
