"""The loop behind train_model (engine/loop.py): an iteration is one optimizer step of iter_size micro-batches, the
short last window is divided by its own length, the batch forms and loss forms a model may take and return, and the
trained model is returned.

Everything runs for real on tiny CPU models and tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

import pixelz_dist
from engine_helpers import CountingSGD, D, LinReg, load_snap, make_data, quick, read_order, snapshot_iters
from pixelz_dist import Callback, train_model


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


# -- iterations and gradient accumulation ------------------------------------------------------------------------------

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


# -- batch forms and loss forms ----------------------------------------------------------------------------------------

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


# -- the return value --------------------------------------------------------------------------------------------------

def test_returns_the_same_model_object_trained():
    model = LinReg()
    before = model.lin.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = pixelz_dist.train_model(model, opt, None, make_data(), 2, num_epochs=1, num_workers=0)
    assert out is model
    assert not torch.equal(out.lin.weight, before)
