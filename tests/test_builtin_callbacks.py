"""Gradient clipping, stop criteria, the time budget, the non-finite guard and epoch-start resets, end to end."""

import json
import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pixelz_dist import Callback, train_model
from pixelz_dist.callbacks.builtin import NonFiniteLossError, TimeBudget
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.errors import ConfigError


class Regression(nn.Module):
    def __init__(self, slow=0.0, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.slow = slow

    def forward(self, x, y):
        if self.slow:
            time.sleep(self.slow)
        return nn.functional.mse_loss(self.net(x), y)


def data(n=32, scale=10.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, scale * (x @ torch.randn(4, 1, generator=g)))


def metrics(prefix):
    with open(f"{prefix}_metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- gradient clipping ------------------------------------------------------------------------------------------------
def manual_clipped_step(ds, batch, iter_size, max_norm):
    """What one clipped SGD step (lr 1) over ``iter_size`` micro-batches must give, and the pre-clip norm."""
    model = Regression()
    for k in range(iter_size):
        x, y = ds.tensors[0][k * batch:(k + 1) * batch], ds.tensors[1][k * batch:(k + 1) * batch]
        (model(x, y) / iter_size).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    return model, norm.item()


@pytest.mark.parametrize("iter_size", [1, 3])
def test_clip_grad_norm_clips_the_accumulated_gradient_and_logs_the_pre_clip_norm(tmp_path, iter_size):
    ds = data()
    model = Regression()
    before = flat(model)
    prefix = str(tmp_path / "s")
    train_model(model, torch.optim.SGD(model.parameters(), lr=1.0), None, ds, 4, num_iters=1, iter_size=iter_size,
                display_iter=1, snapshot_prefix=prefix, clip_grad_norm=0.01)
    assert (flat(model) - before).norm() <= 0.01 + 1e-6  # the step is bounded by the clip
    expected, norm = manual_clipped_step(ds, 4, iter_size, 0.01)
    torch.testing.assert_close(flat(model), flat(expected))
    row = metrics(prefix)[0]
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 1  # unclipped it would have been large


def test_clip_grad_value_bounds_every_element(tmp_path):
    ds = data()
    model = Regression()
    before = flat(model)
    train_model(model, torch.optim.SGD(model.parameters(), lr=1.0), None, ds, 8, num_iters=1, clip_grad_value=0.002)
    step = (flat(model) - before).abs()
    assert step.max() <= 0.002 + 1e-7 and step.max() > 0.0019


def test_clipping_with_fp16_unscales_first(tmp_path, caplog):
    """Under a GradScaler the raw gradients are 65536x too large; the clip and the logged norm must see true units."""
    ds = data(n=4)  # one batch: every iteration sees it, and skipped (overflowing) steps leave the weights alone
    prefix = str(tmp_path / "s")
    model = Regression()
    train_model(model, torch.optim.SGD(model.parameters(), lr=1.0), None, ds, 4, num_iters=30, display_iter=1,
                snapshot_prefix=prefix, clip_grad_norm=0.01, amp="fp16")
    _, norm = manual_clipped_step(ds, 4, 1, 0.01)
    norms = [r["grad_norm"] for r in metrics(prefix)]
    first_finite = next(n for n in norms if math.isfinite(n))  # the scaler backs off from 65536 until no overflow
    assert first_finite == pytest.approx(norm, rel=2e-2)
    scale = load_snapshot(list_snapshots(prefix)[0][1])["grad_scaler"]["scale"]
    assert scale < 65536.0  # the GradScaler's state is in the snapshot


# -- stop criteria ----------------------------------------------------------------------------------------------------
def test_stop_loss_below_stops_early_with_a_final_snapshot(tmp_path, caplog):
    ds = data(scale=1.0)
    prefix = str(tmp_path / "s")
    model = Regression()
    caplog.set_level("INFO", logger="pixelz_dist")
    train_model(model, torch.optim.Adam(model.parameters(), lr=0.02), None, ds, 8, num_iters=2000,
                snapshot_prefix=prefix, stop_loss_below=0.05)
    (it, path), = list_snapshots(prefix)
    assert 10 < it < 2000
    assert "is below stop_loss_below=0.05" in caplog.text


def test_stop_patience_stops_when_the_smoothed_loss_stops_improving(tmp_path):
    ds = data()
    prefix = str(tmp_path / "s")
    model = Regression()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.0), None, ds, 32, num_iters=500,
                snapshot_prefix=prefix, stop_patience=5, stop_min_delta=1e-6)
    assert list_snapshots(prefix)[0][0] == 6  # a best at 1, then 5 iterations without improvement


class FakeClock:
    """Seconds that pass only when the model runs: the budget's decisions become exact, whatever the machine."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_budget_stops_before_the_budget_with_a_snapshot_that_resumes_exactly(tmp_path):
    ds = data(n=40)
    clock = FakeClock()

    class OneSecondPerStep(Regression):
        def forward(self, x, y):
            clock.now += 1.0
            return super().forward(x, y)

    def run(prefix, n, model_class=Regression, **kw):
        model = model_class(dropout=0.3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        return train_model(model, opt, sched, ds, 4, shuffle=True, num_iters=n, snapshot_prefix=prefix, **kw)

    run(str(tmp_path / "a"), 10_000, OneSecondPerStep, callbacks=[TimeBudget(10.0, margin=0.5, clock=clock)])
    (k, _), = list_snapshots(str(tmp_path / "a"))
    # after iteration 6: 6 s used + 1 s for the next iteration + 3 s guessed for the first snapshot + 0.5 s >= 10 s
    assert k == 6 and clock.now == 6.0
    resumed = run(str(tmp_path / "a"), k + 7, load_snapshot_path="auto")
    straight = run(str(tmp_path / "b"), k + 7)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


# -- non-finite guard ----------------------------------------------------------------------------------------------
def poisoned(n=32, bad=13):
    ds = data(n)
    ds.tensors[0][bad] = float("nan")
    return ds


def test_nonfinite_raise_names_the_iteration_and_the_last_good_snapshot(tmp_path):
    prefix = str(tmp_path / "s")
    model = Regression()
    with pytest.raises(NonFiniteLossError, match=r"iteration 4 .*last good snapshot is .*s_iter_2\.pt"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, poisoned(), 4, num_iters=8,
                    snapshot_prefix=prefix, snapshot_interval=2, on_nonfinite="raise")
    assert torch.isfinite(flat(model)).all()  # the bad step was not applied


def test_nonfinite_skip_drops_the_step_and_counts_it(tmp_path):
    prefix = str(tmp_path / "s")
    model = Regression()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, poisoned(), 4, num_iters=8,
                display_iter=4, snapshot_prefix=prefix, on_nonfinite="skip")
    assert torch.isfinite(flat(model)).all()
    rows = metrics(prefix)
    assert rows[0]["skipped_steps"] == 1 and "skipped_steps" not in rows[1]
    assert math.isfinite(rows[0]["loss"])  # the skipped loss is left out of the window's mean
    without_guard = Regression()
    train_model(without_guard, torch.optim.SGD(without_guard.parameters(), lr=0.01), None, poisoned(), 4,
                num_iters=8)
    assert not torch.isfinite(flat(without_guard)).all()  # the control: without the guard the weights are lost


def test_builtin_arguments_are_checked():
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as e:
        train_model(model, opt, None, data(), 4, num_iters=1, clip_grad_norm=-1, on_nonfinite="ignore",
                    amp="fp8", stop_patience=0, time_budget=0)
    for name in ("clip_grad_norm", "on_nonfinite", "amp", "stop_patience", "time_budget"):
        assert name in str(e.value)


# -- epoch start ------------------------------------------------------------------------------------------------------
class Curriculum(Dataset):
    """Returns its epoch with every sample: what a worker sees shows whether set_epoch reached it."""

    def __init__(self):
        self.epoch = -1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(self.epoch)]), torch.tensor([float(i)])


class SeesEpochs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, epoch, i):
        self.seen.extend(epoch.flatten().tolist())
        return (self.w * i).pow(2).mean()


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_set_epoch_reaches_the_workers_every_epoch(workers):
    model = SeesEpochs()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, Curriculum(), 4, num_epochs=3,
                num_workers=workers)
    assert model.seen == [0.0] * 8 + [1.0] * 8 + [2.0] * 8


class CurriculumCallback(Callback):
    changes_dataset = True

    def on_epoch_start(self, state):
        state.dataset.epoch = 10 * state.epoch


def test_an_epoch_start_callback_that_changes_the_dataset_reaches_the_workers():
    class Plain(Curriculum):
        set_epoch = None

    model = SeesEpochs()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, Plain(), 4, num_epochs=2, num_workers=2,
                callbacks=[CurriculumCallback()])
    assert model.seen == [0.0] * 8 + [10.0] * 8
