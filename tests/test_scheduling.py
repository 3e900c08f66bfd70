"""Scheduler stepping (engine/scheduling.py): once per epoch by default, once per iteration with schedule_on_iter,
and ReduceLROnPlateau stepped with the mean training loss of the epoch or of the iteration.

Everything runs for real on tiny CPU models and tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from engine_helpers import LinReg, RecordingPlateau, make_data, quick
from pixelz_dist import Callback, train_model


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
