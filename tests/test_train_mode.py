"""Every step trains in train mode, whatever the model arrived in or a callback did between steps; the model is
returned in the modes it arrived in. Real BatchNorm and dropout, real training runs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pixelz_dist import Callback, train_model


class BNNet(nn.Module):
    """BatchNorm and dropout: in eval mode the statistics freeze and dropout is off. Records the mode of each call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(8, 1)
        self.modes: list[tuple[bool, bool, bool]] = []

    def forward(self, x, y):
        self.modes.append((self.training, self.body[1].training, self.body[3].training))
        return nn.functional.mse_loss(self.head(self.body(x)).squeeze(-1), y)


def data(n=32):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(3 + 2 * torch.randn(n, 4, generator=g), torch.randn(n, generator=g))


def run(model, callbacks=(), epochs=3, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return train_model(model, opt, None, data(), 8, shuffle=True, num_epochs=epochs, num_workers=0,
                       callbacks=list(callbacks), **kw)


class Validation(Callback):
    """A validation pass that forgets to switch back: model.eval() at each epoch's end."""

    def __init__(self, model, part=None):
        self.model, self.part = model, part

    def on_epoch_end(self, state):
        (self.part or self.model).eval()


class EvalPartEveryStep(Callback):
    def __init__(self, module):
        self.module = module

    def on_iteration_end(self, state):
        self.module.eval()


def test_a_model_that_arrives_in_eval_mode_trains_in_train_mode_and_goes_back_in_eval(caplog):
    model = BNNet().eval()
    mean_before = model.body[1].running_mean.clone()
    caplog.set_level("WARNING", logger="pixelz_dist")
    run(model)
    assert model.modes and all(all(m) for m in model.modes)  # every forward in train mode
    assert not torch.equal(model.body[1].running_mean, mean_before)  # the statistics learned the data (mean ~3)
    assert not model.training and not any(m.training for m in model.modules())  # back as it came
    warnings = [r.getMessage() for r in caplog.records if "eval mode" in r.getMessage()]
    assert len(warnings) == 1 and "received the model with 7 of its 7 modules in eval mode (body.0 " \
        "(Linear), body.1 (BatchNorm1d), body.2 (ReLU) and 2 more)" in warnings[0]


def test_a_callback_that_leaves_the_model_in_eval_mode_does_not_change_training(caplog):
    reference = BNNet()
    run(reference)
    model = BNNet()
    caplog.set_level("WARNING", logger="pixelz_dist")
    run(model, [Validation(model)])
    assert all(all(m) for m in model.modes)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the same run, bit for bit
    assert model.training  # it arrived in train mode
    warnings = [r.getMessage() for r in caplog.records if "eval mode" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("before iteration 5, the model had")  # once, not per epoch


def test_a_submodule_put_in_eval_mode_between_steps_is_put_back():
    model = BNNet()
    run(model, [EvalPartEveryStep(model.body[1])], epochs=1)
    assert all(all(m) for m in model.modes)


def test_modes_of_parts_come_back_as_they_arrived():
    model = BNNet()
    model.body[3].eval()  # dropout off, the rest in train mode
    run(model, epochs=1)
    assert model.training and model.body[1].training and not model.body[3].training
    assert all(all(m) for m in model.modes)
