"""Linear warmup (engine/warmup.py) on top of any scheduler, the poly schedule (cli/build.py), and an exact resume at,
before and after the warmup's end: in this process, and through ``python -m pixelz_dist.train``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from torch import nn

from engine_helpers import load_snap, make_data
from pixelz_dist import Callback, train_model
from pixelz_dist.cli.build import build_scheduler
from pixelz_dist.errors import ConfigError

LR = 0.2


class LrsUsed(Callback):
    """The rate each optimizer step runs at (read after backward, before the step)."""

    def __init__(self):
        self.lrs = []

    def on_after_backward(self, state):
        self.lrs.append(state.lrs[0])


def warm(k: int, iters: int, factor: float) -> float:
    return factor + (1 - factor) * k / iters if k < iters else 1.0


def train(scheduler=None, num_iters=None, callbacks=(), model=None, **kwargs):
    model = model if model is not None else nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = scheduler(opt) if scheduler is not None else None

    def loss(x, y):
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    holder = LossModel(model, loss)
    train_model(holder, opt, sched, make_data(12), 4, num_iters=num_iters, num_workers=0, callbacks=callbacks,
                display_iter=100, **kwargs)
    return opt, sched


class LossModel(nn.Module):
    def __init__(self, inner, loss):
        super().__init__()
        self.inner, self.loss = inner, loss

    def forward(self, x, y):
        return self.loss(x, y)


def test_warmup_rises_linearly_to_the_constant_rate():
    rec = LrsUsed()
    opt, _ = train(num_iters=6, callbacks=[rec], warmup_iters=4, warmup_factor=0.1)
    assert rec.lrs == pytest.approx([LR * warm(k, 4, 0.1) for k in range(6)], rel=1e-12)
    assert rec.lrs[0] == pytest.approx(LR * 0.1) and rec.lrs[4:] == [LR, LR]
    assert opt.param_groups[0]["lr"] == LR


def test_warmup_counts_iterations_under_a_scheduler_stepped_per_epoch():
    """3 iterations per epoch, StepLR halving each epoch, a warmup of 5 iterations across the first boundary."""
    rec = LrsUsed()
    _, sched = train(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), num_epochs=3,
                     callbacks=[rec], warmup_iters=5, warmup_factor=0.01)
    assert rec.lrs == pytest.approx([LR * 0.5 ** (k // 3) * warm(k, 5, 0.01) for k in range(9)], rel=1e-12)
    assert sched.get_last_lr() == [LR * 0.125]  # the scheduler never saw the factor


def poly_options(**kw) -> Namespace:
    base = dict(scheduler="poly", poly_power=0.9, iters=None, epochs=None, batch_size=4, iter_size=1,
                schedule_on_iter=False, eta_min=0.0)
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("per_iteration", [True, False])
def test_poly_reaches_zero_at_the_end_of_the_run(per_iteration):
    rec = LrsUsed()
    opts = poly_options(iters=6 if per_iteration else None, epochs=None if per_iteration else 3,
                        schedule_on_iter=per_iteration)
    opt, sched = train(lambda o: build_scheduler(o, opts, 12, 1), num_iters=opts.iters, num_epochs=opts.epochs,
                       schedule_on_iter=per_iteration, callbacks=[rec])
    assert isinstance(sched, torch.optim.lr_scheduler.PolynomialLR)
    steps = 6 if per_iteration else 3
    per_step = [LR * (1 - t / steps) ** 0.9 for t in range(steps)]
    expected = per_step if per_iteration else [lr for lr in per_step for _ in range(3)]
    assert rec.lrs == pytest.approx(expected, rel=1e-9)
    assert opt.param_groups[0]["lr"] == 0.0


# -- exact resume across the warmup's end --------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.drop, self.lin2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), \
            nn.Linear(4, 1)

    def forward(self, x, y):
        return ((self.lin2(self.drop(self.bn(self.lin1(x)))).squeeze(-1) - y) ** 2).mean()


def run(prefix, stop_at=None, resume=None, rec=None):
    class Stop(Callback):
        def on_iteration_end(self, state):
            if state.iteration == stop_at:
                state.request_stop("test")

    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=3, power=0.9)  # per epoch: 3 epochs of 3
    train_model(model, opt, sched, make_data(12), 4, shuffle=True, num_iters=8, num_workers=0, display_iter=100,
                snapshot_prefix=str(prefix), load_snapshot_path=resume, warmup_iters=5, warmup_factor=0.05,
                callbacks=[Stop()] + ([rec] if rec else []))


def assert_same_run(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["scheduler"] == b["scheduler"] and a["warmup"] == b["warmup"]


@pytest.mark.parametrize("stop_at", [2, 3, 5, 7])  # in the warmup (mid-epoch, at an epoch's end), at its end, after
def test_resume_at_and_after_the_warmup_is_exact(tmp_path, stop_at):
    straight, resumed = LrsUsed(), LrsUsed()
    run(tmp_path / "a" / "snap", rec=straight)
    b = tmp_path / "b" / "snap"
    run(b, stop_at=stop_at)
    assert (load_snap(b, stop_at)["warmup"] is None) == (stop_at >= 5)
    run(b, resume="auto", rec=resumed)
    assert resumed.lrs == straight.lrs[stop_at:]  # the same floats, not approximately
    assert_same_run(load_snap(tmp_path / "a" / "snap", 8), load_snap(b, 8))


def test_resume_with_another_lr_during_the_warmup_scales_the_schedule(tmp_path):
    """A changed lr on resume applies to the scheduler's rate, under the factor (not lost at the next step)."""
    prefix = tmp_path / "snap"
    run(prefix, stop_at=2)
    rec = LrsUsed()
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=2 * LR)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=3, power=0.9)
    train_model(model, opt, sched, make_data(12), 4, shuffle=True, num_iters=8, num_workers=0, display_iter=100,
                snapshot_prefix=str(prefix), load_snapshot_path="auto", warmup_iters=5, warmup_factor=0.05,
                callbacks=[rec])
    expected = [2 * LR * (1 - (k // 3) / 3) ** 0.9 * warm(k, 5, 0.05) for k in range(2, 8)]
    assert rec.lrs == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kwargs,match", [(dict(warmup_iters=-1), "warmup_iters must be"),
                                          (dict(warmup_iters=2.5), "warmup_iters must be"),
                                          (dict(warmup_iters=3, warmup_factor=0), "warmup_factor must be"),
                                          (dict(warmup_iters=3, warmup_factor=1.5), "warmup_factor must be")])
def test_bad_warmup_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        train(num_iters=2, **kwargs)


# -- through the command line ----------------------------------------------------------------------------------------
def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pixelz_dist.train", "--no-curves", *args], env=env,
                          capture_output=True, text=True, timeout=240)  # no curves: ~0.7 s of CPU a run


def metrics_lrs(prefix) -> dict[int, float]:
    with open(f"{prefix}_metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["iteration"]: row["lr"][0] for row in rows if "lr" in row}  # one rate per group


@pytest.mark.slow
def test_cli_poly_warmup_ema_resume_at_4_and_7_is_bitwise_identical(tmp_path):
    """--scheduler poly --warmup-iters 5 --iters 12 --ema, resumed from its snapshots of iterations 4 (in the warmup)
    and 7 (after it): the same weights, EMA, optimizer, schedule and logged rates as the run straight through."""
    common = ["--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "16", "--batch-size", "4",
              "--workers", "0", "--scheduler", "poly", "--schedule-on-iter", "--warmup-iters", "5", "--iters", "12",
              "--ema", "0.8", "--no-decay-norm-bias", "--weight-decay", "0.01", "--optimizer", "adamw",
              "--lr", "0.01", "--display-iter", "1", "--snapshot-interval", "1", "--no-async-snapshots",
              "--keep-last", "0"]  # every snapshot: the resumes below start from 4 and 7
    straight = str(tmp_path / "a" / "snap")
    done = cli(*common, "--snapshot-prefix", straight)
    assert done.returncode == 0, done.stderr
    lrs = metrics_lrs(straight)
    assert lrs[12] == 0.0 and lrs[4] < lrs[5]  # poly down to 0; the warmup still rising at 4
    final = load_snap(straight, 12)
    assert [g["weight_decay"] for g in final["optimizer"]["param_groups"]] == [0.01, 0.0]
    for stop in (4, 7):
        prefix = str(tmp_path / f"from{stop}" / "snap")
        os.makedirs(os.path.dirname(prefix))
        shutil.copy(f"{straight}_iter_{stop}.pt", f"{prefix}_iter_{stop}.pt")  # what a run killed after it leaves
        resumed = cli(*common, "--snapshot-prefix", prefix, "--resume", "auto")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed from {prefix}_iter_{stop}.pt" in resumed.stderr
        again = load_snap(prefix, 12)
        assert_same_run(final, again)
        for k, v in final["ema"]["state_dict"].items():
            assert torch.equal(v, again["ema"]["state_dict"][k]), f"EMA {k} differs after a resume at {stop}"
        assert again["ema"]["num_updates"] == 12
        assert {it: lr for it, lr in metrics_lrs(prefix).items() if it > stop} == \
            {it: lr for it, lr in lrs.items() if it > stop}


@pytest.mark.parametrize("args,message", [(["--ema", "1"], "--ema is a decay"),
                                          (["--warmup-iters", "-2"], "--warmup-iters must be >= 0"),
                                          (["--warmup-iters", "3", "--warmup-factor", "0"], "--warmup-factor must"),
                                          (["--scheduler", "poly", "--poly-power", "0"], "--poly-power must")])
def test_cli_refuses_bad_values_before_building_anything(args, message, capsys):
    from pixelz_dist.cli.options import parse

    with pytest.raises(SystemExit) as exit_info:
        parse("train", ["--demo", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_passes_the_schedule_and_ema_options_to_train_model():
    from pixelz_dist.cli.checks import train_model_keywords
    from pixelz_dist.cli.options import parse

    opts = parse("train", ["--demo", "--ema", "0.99", "--ema-buffers", "copy", "--warmup-iters", "7",
                           "--no-decay-norm-bias"])
    passed = train_model_keywords(vars(opts))  # what train.main hands train_model
    assert {k: passed[k] for k in ("warmup_iters", "warmup_factor", "ema", "ema_buffers")} == {
        "warmup_iters": 7, "warmup_factor": 0.001, "ema": 0.99, "ema_buffers": "copy"}
    assert opts.no_decay_norm_bias is True and parse("train", ["--demo"]).no_decay_norm_bias is False
