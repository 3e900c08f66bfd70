"""The training loop behind train_model: iterations, gradient accumulation, batches and losses, schedulers,
snapshots and resume, logging and metrics, callbacks.

Everything runs for real on tiny CPU models and tensors; only GPU memory queries are patched.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.utils.data import Dataset, TensorDataset

import pixelz_dist
import pixelz_dist.engine.report as pixelz_log
from pixelz_dist import Callback, SnapshotError, TrainState, train_model

D = 3


# -- helpers -----------------------------------------------------------------------------------------------------

def make_data(n: int = 10, d: int = D, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randn(n, generator=g))


def init_linear(lin: nn.Linear, shift: float = 0.0) -> None:
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-0.5, 0.5, lin.weight.numel()).view_as(lin.weight) + shift)
        lin.bias.fill_(0.1 + shift)


class LinReg(nn.Module):
    """Squared-error linear regression; counts forwards and records every micro-batch loss it computes."""

    def __init__(self, d: int = D, shift: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(d, 1)
        init_linear(self.lin, shift)
        self.forwards = 0
        self.losses: list[float] = []

    def per_sample(self, x, y):
        return (self.lin(x).squeeze(-1) - y) ** 2

    def forward(self, x, y):
        self.forwards += 1
        loss = self.per_sample(x, y).mean()
        self.losses.append(loss.item())
        return loss


class CountingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


class RecordingPlateau(ReduceLROnPlateau):
    """Remembers every metric it is stepped with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def step(self, metrics, epoch=None):
        self.seen.append(float(metrics))
        return super().step(metrics)


class GradRecorder(Callback):
    """At on_after_backward: the parameters (not yet stepped) and the accumulated gradients of the iteration."""

    def __init__(self):
        self.records = []

    def on_after_backward(self, state):
        named = list(state.model.named_parameters())
        self.records.append(({k: p.detach().clone() for k, p in named}, {k: p.grad.clone() for k, p in named}))


def hand_grads(params: dict, xs, ys) -> dict:
    """Mean over samples of the per-sample gradients of the squared error, computed without the library."""
    per_sample = []
    for x, y in zip(xs, ys):
        w = params["lin.weight"].clone().requires_grad_()
        b = params["lin.bias"].clone().requires_grad_()
        loss = ((x @ w.T + b).squeeze() - y) ** 2
        per_sample.append(torch.autograd.grad(loss, [w, b]))
    return {"lin.weight": torch.stack([g[0] for g in per_sample]).mean(0),
            "lin.bias": torch.stack([g[1] for g in per_sample]).mean(0)}


def snapshot_iters(prefix) -> list[int]:
    folder, base = os.path.split(str(prefix))
    if not os.path.isdir(folder):
        return []
    return sorted(int(n[len(base) + 6:-3]) for n in os.listdir(folder)
                  if n.startswith(base + "_iter_") and n.endswith(".pt"))


def load_snap(prefix, iteration: int) -> dict:
    return torch.load(f"{prefix}_iter_{iteration}.pt", map_location="cpu", weights_only=True)


def read_order(prefix) -> list:
    """Rows of {prefix}_order.tsv as dicts; comment lines (resume markers) kept as strings."""
    with open(f"{prefix}_order.tsv", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].split("\t") == ["iteration", "epoch", "from", "to", "digest"]
    rows = []
    for line in lines[1:]:
        if line.startswith("#"):
            rows.append(line)
            continue
        it, ep, lo, hi, digest = line.split("\t")
        rows.append({"iteration": int(it), "epoch": int(ep), "from": int(lo), "to": int(hi), "digest": digest})
    return rows


def after_resume(rows: list) -> list[dict]:
    markers = [i for i, r in enumerate(rows) if isinstance(r, str) and r.startswith("# resumed")]
    assert len(markers) == 1, rows
    return rows[markers[0] + 1:]


def read_metrics(prefix) -> list[dict]:
    path = f"{prefix}_metrics.jsonl"
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def quick(model=None, data=None, lr=0.05, **kwargs):
    """train_model with small defaults: SGD, batch 2, no workers."""
    model = model if model is not None else LinReg()
    data = data if data is not None else make_data()
    opt = kwargs.pop("optimizer", None) or CountingSGD(model.parameters(), lr=lr)
    kwargs.setdefault("num_workers", 0)
    sched = kwargs.pop("scheduler", None)
    batch_size = kwargs.pop("batch_size", 2)
    out = train_model(model, opt, sched, data, batch_size, **kwargs)
    return out, opt


# -- 3. an iteration is one optimizer step of iter_size micro-batches ---------------------------------------------

def test_iteration_is_one_step_of_iter_size_micro_batches(tmp_path):
    prefix = tmp_path / "snap"
    model = LinReg()
    steps_seen = []

    class StepsAtIterationEnd(Callback):
        def on_iteration_end(self, state):
            steps_seen.append((state.iteration, opt.steps, model.forwards))

    opt = CountingSGD(model.parameters(), lr=0.05)
    train_model(model, opt, None, make_data(12), 2, snapshot_prefix=str(prefix), num_iters=5, iter_size=3,
                snapshot_interval=2, num_workers=0, callbacks=[StepsAtIterationEnd()])
    assert opt.steps == 5
    assert model.forwards == 15
    assert steps_seen == [(i, i, 3 * i) for i in range(1, 6)]
    assert snapshot_iters(prefix) == [2, 4, 5]
    for n in (2, 4, 5):
        assert load_snap(prefix, n)["progress"]["iteration"] == n
    rows = read_order(prefix)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [(r["epoch"], r["from"], r["to"]) for r in rows] == [(0, 0, 6), (0, 6, 12), (1, 0, 6), (1, 6, 12),
                                                                (2, 0, 6)]


def test_windows_never_span_epochs_with_num_iters(tmp_path):
    # 10 samples / batch 2 = 5 micro-batches per epoch: windows of 3 and 2
    model, opt = quick(data=make_data(10), num_iters=4, iter_size=3, snapshot_prefix=str(tmp_path / "s"))
    assert opt.steps == 4 and model.forwards == 3 + 2 + 3 + 2
    rows = read_order(tmp_path / "s")
    assert [(r["epoch"], r["from"], r["to"]) for r in rows] == [(0, 0, 6), (0, 6, 10), (1, 0, 6), (1, 6, 10)]


# -- 4. the short last window is divided by its own length -------------------------------------------------------

def test_tail_window_gradient_is_the_mean_of_its_micro_batches():
    data = make_data(10)
    model = LinReg()
    p0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = CountingSGD(model.parameters(), lr=1.0)
    rec = GradRecorder()
    train_model(model, opt, None, data, 1, shuffle=False, num_epochs=1, iter_size=4, num_workers=0, callbacks=[rec])
    assert opt.steps == 3 and model.forwards == 10
    xs, ys = data.tensors
    windows = [range(0, 4), range(4, 8), range(8, 10)]
    assert len(rec.records) == 3
    total = {k: torch.zeros_like(v) for k, v in p0.items()}
    for (params, grads), idx in zip(rec.records, windows):
        expected = hand_grads(params, xs[list(idx)], ys[list(idx)])
        for k in expected:
            torch.testing.assert_close(grads[k], expected[k])
            total[k] += grads[k]
    # the last window: halved, not quartered
    params, grads = rec.records[2]
    summed = {k: v * 2 for k, v in hand_grads(params, xs[8:10], ys[8:10]).items()}
    assert not torch.allclose(grads["lin.weight"], summed["lin.weight"] / 4)
    torch.testing.assert_close(grads["lin.weight"], summed["lin.weight"] / 2)
    # the first window equals the mean of 4 hand gradients, taken at the initial parameters
    torch.testing.assert_close(rec.records[0][0]["lin.weight"], p0["lin.weight"])
    # SGD lr=1 without momentum: the final parameters are the initial ones minus the three applied gradients
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), p0[k] - total[k])


def test_iter_size_one_matches_a_plain_loop():
    data = make_data(6)
    model = LinReg()
    ref = LinReg()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    xs, ys = data.tensors
    for _ in range(2):
        for i in range(0, 6, 2):
            ref_opt.zero_grad()
            ref(xs[i:i + 2], ys[i:i + 2]).backward()
            ref_opt.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_model(model, opt, None, data, 2, num_epochs=2, num_workers=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# -- 5. batch forms and loss forms -------------------------------------------------------------------------------

class DictData(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"x": x, "y": y}


class RowData(Dataset):
    """Each sample is one tensor: the features then the target."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return torch.cat([x, y.view(1)])


class KwargsOnly(LinReg):
    def forward(self, *, x, y):
        return super().forward(x, y)


class LoneTensor(LinReg):
    def forward(self, batch):
        assert isinstance(batch, torch.Tensor) and batch.shape[1] == D + 1
        return super().forward(batch[:, :D], batch[:, D])


def tuple_collate(samples):
    return tuple(torch.stack(column) for column in zip(*samples))


def list_collate(samples):
    return [torch.stack(column) for column in zip(*samples)]


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "tensor"])
def test_batch_forms_reach_the_model(form):
    base = make_data(8)
    ref, _ = quick(data=base, num_epochs=2)
    if form == "tuple":
        model, opt = quick(data=base, num_epochs=2, collate_fn=tuple_collate)
    elif form == "list":
        model, opt = quick(data=base, num_epochs=2, collate_fn=list_collate)
    elif form == "dict":
        model, opt = quick(model=KwargsOnly(), data=DictData(base), num_epochs=2)
    else:
        model, opt = quick(model=LoneTensor(), data=RowData(base), num_epochs=2)
    assert opt.steps == 8 and model.forwards == 8
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


@dataclass
class Output:
    loss: torch.Tensor
    prediction: torch.Tensor


class Returns(LinReg):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x, y):
        self.forwards += 1
        per_sample = self.per_sample(x, y)
        loss = per_sample.mean()
        pred = self.lin(x)
        return {
            "scalar": lambda: loss,
            "dict": lambda: {"loss": loss, "logits": pred},
            "object": lambda: Output(loss=loss, prediction=pred),
            "per_sample": lambda: per_sample,
            "per_sample_2d": lambda: per_sample.view(-1, 1).expand(-1, 2),
            "tuple": lambda: (loss, pred),
            "float": lambda: loss.item(),
            "dict_without_loss": lambda: {"logits": pred, "total": loss},
            "dict_with_float_loss": lambda: {"loss": loss.item()},
            "namespace": lambda: SimpleNamespace(total=loss),
            "none": lambda: None,
        }[self.form]()


@pytest.mark.parametrize("form", ["dict", "object", "per_sample", "per_sample_2d"])
def test_loss_forms_train_like_a_scalar_loss(form):
    data = make_data(8)
    ref, _ = quick(model=Returns("scalar"), data=data, num_epochs=2, iter_size=2)
    model, opt = quick(model=Returns(form), data=data, num_epochs=2, iter_size=2)
    assert opt.steps == 4
    assert not torch.equal(model.lin.weight, LinReg().lin.weight)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_non_scalar_loss_is_reduced_by_its_mean():
    data = make_data(4)
    rec = GradRecorder()
    quick(model=Returns("per_sample"), data=data, batch_size=4, num_iters=1, callbacks=[rec])
    (params, grads), = rec.records
    expected = hand_grads(params, *data.tensors)
    for k in expected:
        torch.testing.assert_close(grads[k], expected[k])
    # the sum would be 4 times larger
    assert not torch.allclose(grads["lin.weight"], 4 * expected["lin.weight"])


@pytest.mark.parametrize("form, words", [("tuple", ["tuple"]), ("float", ["float"]),
                                         ("dict_without_loss", ["dict", "logits", "total"]),
                                         ("dict_with_float_loss", ["float"]), ("namespace", ["SimpleNamespace"]),
                                         ("none", ["NoneType"])])
def test_unusable_model_output_is_a_type_error_naming_it(form, words):
    model = Returns(form)
    before = model.lin.weight.detach().clone()
    with pytest.raises(TypeError) as info:
        quick(model=model, num_epochs=1)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert "loss" in str(info.value)
    assert torch.equal(model.lin.weight, before)  # no step was taken


# -- 6. schedulers -------------------------------------------------------------------------------------------------

class LrRecorder(Callback):
    def __init__(self):
        self.lrs = []
        self.losses = []

    def on_iteration_end(self, state):
        self.lrs.append(state.lrs[0])
        self.losses.append(state.loss.item())


def test_scheduler_steps_once_per_epoch_by_default():
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = LrRecorder()
    train_model(model, opt, StepLR(opt, step_size=1, gamma=0.5), make_data(6), 2, num_epochs=3, num_workers=0,
                callbacks=[rec])
    assert rec.lrs == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.125)


def test_scheduler_steps_per_iteration_with_schedule_on_iter():
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = LrRecorder()
    train_model(model, opt, StepLR(opt, step_size=1, gamma=0.5), make_data(6), 2, num_iters=5, iter_size=2,
                schedule_on_iter=True, num_workers=0, callbacks=[rec])
    assert rec.lrs == pytest.approx([0.1 * 0.5 ** k for k in range(1, 6)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 5)


def test_no_scheduler():
    rec = LrRecorder()
    model, opt = quick(lr=0.07, num_epochs=2, callbacks=[rec])
    assert rec.lrs == pytest.approx([0.07] * 10)
    assert opt.steps == 10


def test_plateau_gets_the_mean_training_loss_of_each_epoch():
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = RecordingPlateau(opt, patience=100)
    rec = LrRecorder()
    # 10 samples, batch 2, iter_size 2: windows of 2, 2, 1 micro-batches per epoch
    train_model(model, opt, sched, make_data(10), 2, num_epochs=2, iter_size=2, num_workers=0, callbacks=[rec])
    assert len(model.losses) == 10 and len(sched.seen) == 2
    for epoch in range(2):
        losses = model.losses[5 * epoch:5 * epoch + 5]
        assert sched.seen[epoch] == pytest.approx(sum(losses) / 5, rel=1e-5)
    # state.loss is the mean loss of each iteration's micro-batches
    windows = [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]
    assert rec.losses == pytest.approx([sum(model.losses[a:b]) / (b - a) for a, b in windows], rel=1e-5)


def test_plateau_per_iteration_gets_the_mean_loss_of_the_iteration():
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = RecordingPlateau(opt, patience=100)
    train_model(model, opt, sched, make_data(10), 2, num_iters=4, iter_size=3, schedule_on_iter=True,
                num_workers=0)
    windows = [(0, 3), (3, 5), (5, 8), (8, 10)]  # 5 micro-batches per epoch: windows of 3 and 2
    assert sched.seen == pytest.approx([sum(model.losses[a:b]) / (b - a) for a, b in windows], rel=1e-5)


def test_plateau_really_reduces_the_lr():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, y):
            return (self.w * 0).sum() + 1.0  # a loss that never improves

    model = Constant()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = ReduceLROnPlateau(opt, patience=0, factor=0.5)
    train_model(model, opt, sched, make_data(4), 2, num_epochs=3, num_workers=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # epoch 1 sets the best, epochs 2 and 3 halve


# -- 8. snapshots: when, what, how many ----------------------------------------------------------------------------

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


def test_no_prefix_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick(num_epochs=1)
    assert os.listdir(tmp_path) == []


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
    assert snap["format_version"] == 2
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


# -- 9, 10. resuming -----------------------------------------------------------------------------------------------

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


# -- 11. logging and metrics -----------------------------------------------------------------------------------

def test_log_lines_and_metrics_rows_every_display_iter(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    metric_files = tmp_path / "snap_metrics.jsonl", tmp_path / "snap_order.tsv"
    on_disk = []

    class Watch(Callback):
        def on_iteration_end(self, state):
            on_disk.append((len(read_metrics(prefix)), os.path.exists(metric_files[1])))

    model, _ = quick(data=make_data(10), batch_size=1, num_iters=10, display_iter=5, snapshot_prefix=str(prefix),
                     lr=0.01, callbacks=[Watch()])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert len(lines) == 2
    assert "iter 5/10" in lines[0] and "iter 10/10" in lines[1]
    for line in lines:
        for word in ("epoch", "loss", "lr", "samples/s", "data", "eta"):
            assert word in line, (word, line)
    rows = read_metrics(prefix)
    assert len(rows) == 2
    assert [r["iteration"] for r in rows] == [5, 10]
    for row, (a, b) in zip(rows, [(0, 5), (5, 10)]):
        for key in ("iteration", "loss", "lr", "samples_per_s", "data_wait", "eta_s"):
            assert key in row
        assert row["loss"] == pytest.approx(sum(model.losses[a:b]) / 5, rel=1e-5)
        assert row["lr"] == [pytest.approx(0.01)]
        assert row["samples_per_s"] > 0 and 0 <= row["data_wait"]
    assert rows[1]["eta_s"] == pytest.approx(0, abs=1e-6)
    # nothing is written per iteration: the files only grow at display (after iteration_end of iterations 5, 10)
    assert on_disk == [(0, False)] * 5 + [(1, True)] * 5


def test_final_partial_window_is_displayed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    quick(num_iters=7, display_iter=5, snapshot_prefix=str(prefix))
    assert [r["iteration"] for r in read_metrics(prefix)] == [5, 7]
    assert sum(r.getMessage().startswith("iter ") for r in caplog.records) == 2


def test_display_gpu_on_cpu_warns_once_per_run_and_adds_no_fields(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    quick(num_iters=4, display_iter=1, display_gpu=True, snapshot_prefix=str(prefix))
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and "display_gpu" in warnings_[0].getMessage()
    quick(num_iters=2, display_iter=1, display_gpu=True)  # a second run in the same process warns again
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    rows = read_metrics(prefix)
    assert len(rows) == 4 and not any(k.startswith("gpu") for row in rows for k in row)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert len(lines) == 6 and not any("gpu" in line for line in lines)


def test_gpu_memory_fields_in_mib(monkeypatch):
    mib = 1024 * 1024
    asked = []

    def fake(value):
        def query(device=None):
            asked.append(device)
            return value
        return query

    monkeypatch.setattr(torch.cuda, "memory_allocated", fake(3 * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", fake(8 * mib + mib // 2))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake(5 * mib))
    device = torch.device("cuda", 0)
    fields = pixelz_log.gpu_memory_fields(device)
    assert fields == {"gpu_allocated_mib": 3.0, "gpu_reserved_mib": 8.5, "gpu_peak_mib": 5.0}
    assert asked == [device] * 3


# -- 12. callbacks -----------------------------------------------------------------------------------------------

class Trace(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, state):
        self.events.append(("train_start", state.iteration))

    def on_epoch_start(self, state):
        self.events.append(("epoch_start", state.epoch))

    def on_after_backward(self, state):
        self.events.append(("after_backward", state.iteration))

    def on_iteration_end(self, state):
        self.events.append(("iteration_end", state.iteration))

    def on_epoch_end(self, state):
        self.events.append(("epoch_end", state.epoch))

    def on_snapshot(self, state, path):
        self.events.append(("snapshot", os.path.basename(path), os.path.isfile(path)))

    def on_train_end(self, state):
        self.events.append(("train_end", state.iteration))


def test_events_fire_in_loop_order(tmp_path):
    trace = Trace()
    quick(data=make_data(4), num_epochs=1, snapshot_prefix=str(tmp_path / "snap"), callbacks=[trace])
    assert trace.events == [("train_start", 0), ("epoch_start", 0), ("after_backward", 0), ("iteration_end", 1),
                            ("after_backward", 1), ("iteration_end", 2), ("epoch_end", 1),
                            ("snapshot", "snap_iter_2.pt", True), ("train_end", 2)]


def test_duck_typed_callback_without_base_class(tmp_path):
    seen = []

    class Plain:
        def on_iteration_end(self, state):
            seen.append(state.iteration)

    quick(data=make_data(4), num_epochs=2, callbacks=[Plain()])
    assert seen == [1, 2, 3, 4]


def test_request_stop_stops_after_that_iteration_with_a_final_snapshot(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    trace = Trace()

    class StopAt3(Callback):
        def on_iteration_end(self, state):
            if state.iteration == 3:
                state.request_stop("enough")

    model, opt = quick(num_epochs=5, snapshot_prefix=str(prefix), callbacks=[StopAt3(), trace])
    assert opt.steps == 3 and model.forwards == 3
    assert snapshot_iters(prefix) == [3]
    assert load_snap(prefix, 3)["progress"]["iteration"] == 3
    assert trace.events[-2:] == [("snapshot", "snap_iter_3.pt", True), ("train_end", 3)]
    assert any("stopped at iteration 3" in r.getMessage() and "enough" in r.getMessage() for r in caplog.records)


def test_request_stop_at_an_epoch_end(tmp_path):
    prefix = tmp_path / "snap"

    class StopAfterEpoch(Callback):
        def on_epoch_end(self, state):
            state.request_stop()

    model, opt = quick(num_epochs=5, snapshot_prefix=str(prefix), callbacks=[StopAfterEpoch()])
    assert opt.steps == 5
    assert snapshot_iters(prefix) == [5]


def test_request_snapshot_writes_one(tmp_path):
    prefix = tmp_path / "snap"
    written = []

    class SnapAt2(Callback):
        def on_iteration_end(self, state):
            if state.iteration == 2:
                state.request_snapshot()

        def on_snapshot(self, state, path):
            written.append((state.iteration, path, state.last_snapshot_path))

    quick(num_epochs=1, snapshot_prefix=str(prefix), callbacks=[SnapAt2()])
    assert snapshot_iters(prefix) == [2, 5]
    assert load_snap(prefix, 2)["progress"]["iteration"] == 2
    assert [(w[0], os.path.basename(w[1])) for w in written] == [(2, "snap_iter_2.pt"), (5, "snap_iter_5.pt")]
    assert all(w[1] == w[2] for w in written)


class Counter(Callback):
    def __init__(self):
        self.count = 0
        self.loaded = None

    def on_iteration_end(self, state):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.count = state["count"]


def test_callback_state_is_saved_and_restored(tmp_path):
    prefix = tmp_path / "snap"
    first = Counter()
    quick(num_iters=3, snapshot_prefix=str(prefix), callbacks=[first])
    snap = load_snap(prefix, 3)
    assert {"count": 3} in snap["callbacks"].values()
    again = Counter()
    quick(num_iters=5, snapshot_prefix=str(prefix), load_snapshot_path=f"{prefix}_iter_3.pt", callbacks=[again])
    assert again.loaded == {"count": 3}
    assert again.count == 5
    assert {"count": 5} in load_snap(prefix, 5)["callbacks"].values()


def test_misspelled_event_is_a_type_error():
    class Typo(Callback):
        def on_iter_end(self, state):
            pass

    model = LinReg()
    with pytest.raises(TypeError, match="on_iter_end"):
        quick(model=model, num_epochs=1, callbacks=[Typo()])
    assert model.forwards == 0


def test_train_state_is_read_only():
    errors = {}

    class Poke(Callback):
        def on_iteration_end(self, state):
            assert isinstance(state, TrainState)
            for name, value in (("iteration", 3), ("epoch", 1), ("samples_in_epoch", 0), ("model", None),
                                ("optimizer", None), ("loss", None), ("lrs", [1.0])):
                try:
                    setattr(state, name, value)
                except AttributeError as e:
                    errors[name] = e
                else:
                    errors[name] = None

    model, opt = quick(num_iters=2, callbacks=[Poke()])
    assert set(errors) == {"iteration", "epoch", "samples_in_epoch", "model", "optimizer", "loss", "lrs"}
    assert all(isinstance(e, AttributeError) for e in errors.values()), errors
    assert opt.steps == 2  # the run went on unchanged


# -- 13. the return value ------------------------------------------------------------------------------------------

def test_returns_the_same_model_object_trained():
    model = LinReg()
    before = model.lin.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = pixelz_dist.train_model(model, opt, None, make_data(), 2, num_epochs=1, num_workers=0)
    assert out is model
    assert not torch.equal(out.lin.weight, before)


# -- 14. strict_load ------------------------------------------------------------------------------------------------

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


def test_window_meter_sums_every_loss_and_keeps_none_of_them():
    """The display window's loss: every loss counted (across buffer folds and within one step's list), summed in
    float64, and no loss tensor or its graph kept alive once its step is recorded."""
    import weakref

    meter = pixelz_log.WindowMeter()
    w = torch.ones((), requires_grad=True)
    expected, refs = 0.0, []
    for step in range(50):  # 3 losses per step (iter_size=3): 150 losses, folds fall inside a step's list
        losses = [(w * (3 * step + k + 0.25)).mean() for k in range(3)]
        for loss in losses:
            (loss / 3).backward()
        meter.add_losses(losses)
        expected += sum(3 * step + k + 0.25 for k in range(3))
        refs += [weakref.ref(loss) for loss in losses]
        del losses, loss
    assert all(r() is None for r in refs)
    assert meter.loss_count == 150
    total = meter.total_loss()
    assert total.dtype == torch.float64 and total.item() == expected
    assert meter.total_loss().item() == expected  # reading it twice adds nothing
    meter.reset(0.0)
    assert meter.total_loss() is None and meter.loss_count == 0
    meter.add_losses([torch.tensor(1.5), torch.tensor(2.0, dtype=torch.bfloat16)])
    assert meter.total_loss().item() == 3.5
