"""The learning-rate finder: both methods on real tiny models and real image files, the suggestion rule on curves
with a known answer, exact restoration of the caller's model / optimizer / RNGs, files and plot.

Every find_lr call here trains for real (a few hundred iterations at most); nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pixelz_dist import Callback, ConfigError, make_param_groups, train_model
from pixelz_dist.checkpoint.file_format import list_snapshots
from pixelz_dist.cli.demo import DemoDataset, TinySegNet
from pixelz_dist.lr_finder import LRFinderResult, find_lr, smooth_losses, suggest_lr


# -- tiny models ---------------------------------------------------------------------------------------------------
class TinyConv(nn.Module):
    """Two convolutions, no BatchNorm: past a certain rate plain SGD really diverges on it."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.c1 = nn.Conv2d(4, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 1, 1)

    def forward(self, rgb, hint, mask):
        logits = self.c2(torch.relu(self.c1(torch.cat([rgb, hint], dim=1))))
        return F.binary_cross_entropy_with_logits(logits, mask)


class LinReg(nn.Module):
    """Linear regression with a 'body' and a 'head' so that make_param_groups has two groups to make."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).view_as(p))

    def forward(self, x, y):
        return F.mse_loss(self.head(self.body(x)).squeeze(-1), y)


def regression_data(n: int = 32, d: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, x @ torch.linspace(0.25, 1.0, d) + 0.1 * torch.randn(n, generator=g))


class RecordLrs(Callback):
    """What the optimizer really used: the groups' lrs at each step (read at iteration end, after the step)."""

    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_iteration_end(self, state):
        self.lrs.append(list(state.lrs))


class SGDScheduleFree(torch.optim.Optimizer):
    """Schedule-free SGD (Defazio et al., 2024; the ``schedulefree`` package's algorithm, warm-up-free): no LR
    scheduler, an iterate average instead. Its param groups carry state of their own (``k``, ``weight_sum``,
    ``lr_max``) that the finder must restore along with the per-parameter ``z``."""

    def __init__(self, params, lr=1.0, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum, k=0, weight_sum=0.0, lr_max=-1.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, k = group["lr"], group["k"]
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = lr_max ** 2
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                p.lerp_(state["z"], ckp1)
                p.add_(p.grad, alpha=lr * (group["momentum"] * (1 - ckp1) - 1))
                state["z"].sub_(p.grad, alpha=lr)
            group["k"] = k + 1


def assert_state_equal(a, b, where="state"):
    """Bit-identical nested state dicts."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a!r} != {b!r}"


def clone_state(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


# -- the suggestion rule ----------------------------------------------------------------------------------------
def test_suggestion_is_the_steepest_descent_before_the_minimum_on_a_known_curve():
    x = np.linspace(-6, 0, 61)  # log10(lr), 10 points per decade
    lrs = 10 ** x
    curve = 1.0 - 0.4 * np.tanh((x + 3) / 0.5)  # falls fastest exactly at lr = 1e-3, flattens near 0.6
    curve[x >= -1.5] = curve[x <= -1.5][-1] + 3 * (x[x >= -1.5] + 1.5)  # minimum at 10**-1.5, then a rise
    # a steeper fall *after* the minimum (a spike that recovers) must not be chosen
    curve[(x >= -0.6) & (x < -0.3)] = 3.0
    lr, note = suggest_lr(lrs, curve)
    assert lr == pytest.approx(1e-3, rel=1e-9)
    assert "steepest descent" in note
    # non-finite points (diverged or skipped) are ignored
    curve_nan = curve.copy()
    curve_nan[-10:] = np.nan
    assert suggest_lr(lrs, curve_nan)[0] == pytest.approx(1e-3, rel=1e-9)


def test_no_suggestion_when_the_loss_never_falls_or_too_few_points():
    lrs = np.geomspace(1e-4, 1, 9)
    lr, note = suggest_lr(lrs, np.linspace(1.0, 2.0, 9))
    assert lr is None and "lower min_lr" in note
    lr, note = suggest_lr(lrs, [1.0, 0.5] + [np.nan] * 7)
    assert lr is None and "2 usable point" in note
    # a curve still falling at max_lr gets its suggestion and a hint
    lr, note = suggest_lr(lrs, np.linspace(2.0, 1.0, 9) ** 2)
    assert lr is not None and lr < 1 and "larger max_lr" in note


def test_ema_with_bias_correction():
    assert np.allclose(smooth_losses([2.0] * 7, 0.9), 2.0)  # no pull towards 0 at the start
    values = [1.0, 3.0, 2.0]
    expected, avg = [], 0.0
    for i, v in enumerate(values):
        avg = 0.8 * avg + 0.2 * v
        expected.append(avg / (1 - 0.8 ** (i + 1)))
    assert np.allclose(smooth_losses(values, 0.8), expected)
    assert smooth_losses(values, 0.8)[0] == 1.0
    assert np.array_equal(smooth_losses(values, 0.0), values)


# -- the runs method --------------------------------------------------------------------------------------------
def test_runs_leave_model_optimizer_and_rngs_bit_identical(demo_root):
    """BatchNorm buffers, dropout's RNG draws, AdamW's moments after real steps, leftover gradients, a sub-module in
    eval mode: all exactly as before. The returned object is the model itself (the seed's ``model = find_lr(...)``)."""
    torch.manual_seed(0)
    model, dataset = TinySegNet(width=4), DemoDataset(demo_root)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_model(model, optimizer, None, dataset, 8, num_iters=3, num_workers=0, display_iter=100)
    model.head.eval()
    loss = model(*[t.unsqueeze(0) for t in dataset[0]])
    loss.backward()  # leftover gradients the finder must neither use nor lose
    weights, opt_state = clone_state(model.state_dict()), clone_state(optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state(), np.random.get_state()[1].copy()

    returned = find_lr(model, optimizer, dataset, 8, shuffle=True, min_lr=1e-4, max_lr=1e-1, num_runs=4,
                       iter_per_run=3, result_file=None, num_workers=0)

    assert returned is model
    assert_state_equal(weights, model.state_dict(), "model")
    assert_state_equal(opt_state, optimizer.state_dict(), "optimizer")
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng[0], torch.get_rng_state()) and np.array_equal(rng[1], np.random.get_state()[1])
    result = model.lr_finder_result
    assert isinstance(result, LRFinderResult) and result.method == "runs"
    # every run started from the same weights, optimizer state, RNGs and data position: same first loss
    assert result.ran.all() and np.all(result.losses[:, 0] == result.losses[0, 0])
    assert len(set(result.losses[:, -1].tolist())) == 4  # and the rates made a difference


def test_runs_grid_files_and_seed_keys(tmp_path):
    model, data = LinReg(), regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.123)  # need not be min_lr any more
    path = tmp_path / "out" / "lr.npz"
    find_lr(model, optimizer, data, 8, min_lr=1e-4, max_lr=1e-1, num_runs=4, iter_per_run=4, result_file=str(path))
    result = model.lr_finder_result
    assert np.allclose(result.lrs, [1e-4, 1e-3, 1e-2, 1e-1], rtol=1e-12)  # exponential, both ends included
    assert result.losses.shape == (4, 4) and result.final_losses.shape == (4,)
    assert np.array_equal(result.final_losses, result.losses[:, -1])
    assert np.allclose(result.mean_losses, result.losses.mean(axis=1))
    with np.load(path, allow_pickle=False) as z:
        assert {"lrs", "losses", "final_losses", "mean_losses", "smoothed", "diverged", "suggestion", "method",
                "settings", "lr_list", "loss_list"} <= set(z.files)
        assert np.array_equal(z["lr_list"], result.lrs) and np.array_equal(z["loss_list"], result.mean_losses)
        assert str(z["method"]) == "runs" and json.loads(str(z["settings"]))["num_runs"] == 4
    summary = json.loads((tmp_path / "out" / "lr.json").read_text())
    assert summary["method"] == "runs" and summary["suggestion"] == result.suggestion
    assert summary["lrs"] == result.lrs.tolist() and summary["settings"]["iter_per_run"] == 4
    again = LRFinderResult.load(str(path))
    assert again.suggestion == result.suggestion and np.array_equal(again.losses, result.losses)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_divergence_flags_the_run_and_skips_larger_rates():
    data = regression_data()
    model = LinReg()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    find_lr(model, optimizer, data, 8, min_lr=1e-3, max_lr=1e3, num_runs=7, iter_per_run=6, result_file=None)
    r = model.lr_finder_result
    first = int(np.argmax(r.diverged))
    assert r.diverged.any() and not r.diverged[:first].any()
    assert r.ran[:first + 1].all() and not r.ran[first + 1:].any()  # the larger rates were skipped
    assert np.isnan(r.losses[first + 1:]).all() and np.isnan(r.smoothed[first:]).all()
    assert r.suggestion is not None and r.suggestion < r.lrs[first]
    # without stop_on_divergence every rate runs; diverging runs are still cut short
    find_lr(model, optimizer, data, 8, min_lr=1e-3, max_lr=1e3, num_runs=7, iter_per_run=6, result_file=None,
            stop_on_divergence=False)
    r2 = model.lr_finder_result
    assert r2.ran.all() and r2.diverged[-1] and np.isnan(r2.losses[-1, -1])


def test_iter_size_accumulates_like_a_bigger_batch():
    """The engine's accumulation is reused: 2 micro-batches of 4 record the losses of batches of 8."""
    data = regression_data()
    results = {}
    for batch_size, iter_size in ((8, 1), (4, 2)):
        model = LinReg()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        find_lr(model, optimizer, data, batch_size, iter_size=iter_size, min_lr=1e-3, max_lr=0.3, num_runs=3,
                iter_per_run=5, result_file=None)
        results[iter_size] = model.lr_finder_result
    assert np.allclose(results[1].losses, results[2].losses, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert results[2].settings["iter_size"] == 2


def test_param_groups_keep_their_ratios(caplog):
    data = regression_data()
    model = LinReg()
    # group 0 is 'head' (10x the default lr): the rates reported are the head's, the body follows at 1/10
    optimizer = torch.optim.SGD(make_param_groups(model, {"head": 1e-3}), lr=1e-4)
    recorder = RecordLrs()
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        find_lr(model, optimizer, data, 8, min_lr=1e-4, max_lr=1e-2, num_runs=3, iter_per_run=2, result_file=None,
                callbacks=[recorder])
    assert len(recorder.lrs) == 6
    for k, lr in enumerate(np.geomspace(1e-4, 1e-2, 3)):
        for used in recorder.lrs[2 * k:2 * k + 2]:
            assert used == pytest.approx([lr, lr / 10], rel=1e-12)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]  # restored
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "group 0's (head, lr 0.001) is not min_lr" in warning and "default: x0.1" in warning
    assert model.lr_finder_result.settings["group_scales"] == pytest.approx([1.0, 0.1])
    # the old tool's set-up (group 0 at min_lr) keeps the old rule and gets no warning
    caplog.clear()
    optimizer = torch.optim.SGD(make_param_groups(model, {"head": 1e-4}), lr=1e-5)
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        find_lr(model, optimizer, data, 8, min_lr=1e-4, max_lr=1e-2, num_runs=3, iter_per_run=2, result_file=None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_schedule_free_optimizer_without_scheduler_is_restored():
    data = regression_data()
    model = LinReg()
    optimizer = SGDScheduleFree(model.parameters(), lr=0.01)
    train_model(model, optimizer, None, data, 8, num_iters=3, display_iter=100)  # z, k, weight_sum now set
    before = clone_state(optimizer.state_dict())
    weights = clone_state(model.state_dict())
    find_lr(model, optimizer, data, 8, min_lr=1e-3, max_lr=1.0, num_runs=4, iter_per_run=4, result_file=None)
    assert_state_equal(before, optimizer.state_dict(), "optimizer")
    assert_state_equal(weights, model.state_dict(), "model")
    r = model.lr_finder_result
    assert np.all(r.losses[r.ran, 0] == r.losses[0, 0]) and r.suggestion is not None


def test_runs_from_a_snapshot_start_at_its_weights_and_data_position(tmp_path):
    data = regression_data(n=40)
    model = LinReg()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prefix = str(tmp_path / "snap")
    train_model(model, optimizer, None, data, 8, shuffle=True, num_iters=3, snapshot_prefix=prefix,
                display_iter=100)  # 24 of 40 samples: mid-epoch
    snapshot = list_snapshots(prefix)[0][1]
    expected = RecordLosses()  # what a plain resume sees at its first iteration
    reference_model = LinReg()
    train_model(reference_model, torch.optim.SGD(reference_model.parameters(), lr=0.01, momentum=0.9), None, data,
                8, shuffle=True, num_iters=4, load_snapshot_path=snapshot, callbacks=[expected], display_iter=100)

    other = LinReg()  # different weights: the snapshot's must be used, then these put back
    with torch.no_grad():
        other.head.bias.fill_(5.0)
    weights = clone_state(other.state_dict())
    opt = torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9)
    find_lr(other, opt, data, 8, shuffle=True, load_snapshot_path=snapshot, min_lr=1e-3, max_lr=0.1, num_runs=3,
            iter_per_run=3, result_file=None)
    r = other.lr_finder_result
    assert np.all(r.losses[:, 0] == expected.losses[0])  # the snapshot's weights at the snapshot's sample
    assert_state_equal(weights, other.state_dict(), "model")
    assert opt.state == {}  # the snapshot's momentum buffers are gone again
    # restore_dataloader=False starts at the next epoch: another first batch
    find_lr(other, opt, data, 8, shuffle=True, load_snapshot_path=snapshot, restore_dataloader=False, min_lr=1e-3,
            max_lr=0.1, num_runs=2, iter_per_run=2, result_file=None)
    assert other.lr_finder_result.losses[0, 0] != expected.losses[0]


class RecordLosses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_iteration_end(self, state):
        self.losses.append(state.global_loss())


# -- the sweep ------------------------------------------------------------------------------------------------
def test_sweep_raises_the_rate_every_step_and_stops_on_divergence():
    data = regression_data()
    model = LinReg()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    recorder = RecordLrs()
    find_lr(model, optimizer, data, 8, method="sweep", min_lr=1e-4, max_lr=1e3, num_iters=60, result_file=None,
            callbacks=[recorder])
    r = model.lr_finder_result
    ran = int(r.ran.sum())
    assert r.method == "sweep" and np.allclose(r.lrs, np.geomspace(1e-4, 1e3, 60))
    assert 10 < ran < 60 and r.diverged[ran - 1] and not r.diverged[:10].any()  # stopped early
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(r.lrs[:ran].tolist(), rel=1e-12)
    assert np.isnan(r.losses[ran:]).all() and np.isfinite(r.losses[:ran - 1]).all()
    assert r.settings["smoothing"] == pytest.approx(1 - 10 / 60)
    # the curve's x is the rate each EMA point stands for: never ahead of the rate of its iteration
    assert np.all(r.curve_lrs <= r.lrs * (1 + 1e-12)) and r.curve_lrs[0] == pytest.approx(1e-4)
    assert r.suggestion is not None and r.suggestion < r.lrs[ran - 1]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3]


@pytest.mark.parametrize("method", ["runs", "sweep"])
def test_training_at_the_suggestion_lowers_the_loss_and_at_100x_it_does_not(demo_root, method):
    """The check a user makes by hand: a short run at the suggestion trains; at 100x it is worse or diverges."""
    images = DemoDataset(demo_root, augment=False)  # the demo's JPEG / PNG files, decoded once
    dataset = TensorDataset(*(torch.stack(column) for column in zip(*(images[i] for i in range(len(images))))))
    torch.manual_seed(1)
    model = TinyConv()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    find_lr(model, optimizer, dataset, 8, shuffle=True, method=method, min_lr=1e-4, max_lr=100, num_runs=10,
            iter_per_run=15, num_iters=60, result_file=None, num_workers=0)
    suggestion = model.lr_finder_result.suggestion
    assert suggestion is not None

    def train_at(lr):
        trial = TinyConv()
        trial.load_state_dict(model.state_dict())
        recorder = RecordLosses()
        train_model(trial, torch.optim.SGD(trial.parameters(), lr=lr, momentum=0.9), None, dataset, 8, shuffle=True,
                    num_iters=30, num_workers=0, callbacks=[recorder], display_iter=100)
        return recorder.losses[0], float(np.mean(recorder.losses[-5:]))

    start, at_suggestion = train_at(suggestion)
    _, at_100x = train_at(100 * suggestion)
    assert at_suggestion < 0.5 * start
    assert not at_100x < at_suggestion  # NaN (diverged) counts as worse


# -- arguments, plot, logging -------------------------------------------------------------------------------------
def test_bad_arguments_are_listed_together():
    model, data = LinReg(), regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigError) as e:
        find_lr(model, optimizer, data, 8, min_lr=1.0, max_lr=0.1, num_runs=1, iter_per_run=1, method="runs",
                divergence_factor=0.5, load_snapshot_path="auto", result_file=None)
    text = str(e.value)
    for fragment in ("0 < min_lr < max_lr", "num_runs", "iter_per_run", "divergence_factor", "'auto'"):
        assert fragment in text
    with pytest.raises(ConfigError, match="method must be one of"):
        find_lr(model, optimizer, data, 8, method="grid", result_file=None)
    with pytest.raises(ConfigError, match="may not set"):
        find_lr(model, optimizer, data, 8, result_file=None, train_kwargs={"num_iters": 3})
    zero = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ConfigError, match="every param group has lr 0"):
        find_lr(model, zero, data, 8, num_runs=2, iter_per_run=2, result_file=None)


def test_plot_writes_a_png_and_explains_a_missing_matplotlib(tmp_path, monkeypatch):
    model, data = LinReg(), regression_data()
    find_lr(model, torch.optim.SGD(model.parameters(), lr=1e-3), data, 8, min_lr=1e-3, max_lr=1e3, num_runs=7,
            iter_per_run=4, result_file=None)
    result = model.lr_finder_result
    png = tmp_path / "lr.png"
    assert result.plot(str(png)) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "pixelz-dist\[plot\]"'):
        result.plot(str(tmp_path / "again.png"))
    assert not (tmp_path / "again.png").exists()


def test_one_log_line_per_run_and_no_inner_training_lines(caplog):
    model, data = LinReg(), regression_data()
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        find_lr(model, torch.optim.SGD(model.parameters(), lr=1e-3), data, 8, min_lr=1e-3, max_lr=1e-1,
                num_runs=3, iter_per_run=2, result_file=None, progress_bar=False)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in messages if m.startswith("lr finder run")] == [
        "lr finder run 1/3", "lr finder run 2/3", "lr finder run 3/3"]
    assert not [m for m in messages if m.startswith(("training ", "iter "))]
    assert any(m.startswith("lr finder: suggested lr") for m in messages)
    assert all(not isinstance(f, logging.Filter) or type(f).__name__ != "_QuietInnerRuns"
               for f in logging.getLogger("pixelz_dist").filters)
