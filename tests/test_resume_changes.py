"""A resume whose call differs from the run that wrote the snapshot: what is kept from the snapshot (the data seed,
the stop criterion's progress), what is taken from the call (optimizer hyper-parameters of several groups, OneCycle's
max_lr), what is said (a scheduler on one side only, a grown or shrunk dataset), and Ctrl-C caught from Python. Last,
the set_epoch call a user's DataLoader gets every epoch (what makes a resumed run's later epochs the same).

All in-process, on the linear regression of ``engine_helpers`` (10 samples, batch 2: 5 iterations per epoch).
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from engine_helpers import CountingSGD, LinReg, load_snap, make_data, quick, read_order, snapshot_iters
from pixelz_dist import Callback, Interrupted, SnapshotError, train_model


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_weights(a, b):
    assert all(torch.equal(p, q) for p, q in zip(weights(a), weights(b)))


# -- kept from the snapshot --------------------------------------------------------------------------------------------
def test_a_resume_keeps_the_snapshots_data_seed_and_says_so(tmp_path, caplog):
    """Another seed= on resume would change the rest of the epoch's order: the snapshot's seed is kept."""
    straight, _ = quick(num_iters=8, shuffle=True, seed=5)
    prefix = str(tmp_path / "s")
    quick(num_iters=3, shuffle=True, seed=5, snapshot_prefix=prefix)
    caplog.set_level("WARNING", logger="pixelz_dist")
    resumed, _ = quick(num_iters=8, shuffle=True, seed=9, snapshot_prefix=prefix, load_snapshot_path="auto")
    assert "the snapshot was trained with seed 5, this call passes 9: the snapshot's seed is kept" in caplog.text
    assert_same_weights(straight, resumed)
    assert load_snap(prefix, 8)["data"]["seed"] == 5


def test_the_stop_criterion_counts_on_across_a_resume(tmp_path):
    """stop_patience's count of iterations without improvement is in the snapshot: the resumed run stops where the
    uninterrupted one did (a fresh count would stop 3 iterations later)."""
    # min_delta so large that only the first iteration is an improvement: the stop comes after 1 + 4 iterations
    stop = dict(stop_patience=4, stop_min_delta=1e9)
    straight, _ = quick(num_iters=20, snapshot_prefix=str(tmp_path / "a"), **stop)
    assert snapshot_iters(tmp_path / "a") == [5]
    prefix = str(tmp_path / "b")
    quick(num_iters=3, snapshot_prefix=prefix, **stop)
    resumed, _ = quick(num_iters=20, snapshot_prefix=prefix, load_snapshot_path="auto", **stop)
    assert snapshot_iters(prefix) == [3, 5]
    assert_same_weights(straight, resumed)


# -- taken from the call -----------------------------------------------------------------------------------------------
def adam(model, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_lr=0.01):
    return torch.optim.AdamW([{"params": [model.lin.weight], "name": "weight", "weight_decay": weight_decay},
                              {"params": [model.lin.bias], "name": "bias", "lr": bias_lr}],
                             lr=0.02, betas=betas, eps=eps, weight_decay=0.0)


def test_changed_betas_eps_and_weight_decay_of_several_groups_are_applied_and_said(tmp_path, caplog):
    prefix = str(tmp_path / "s")
    model = LinReg()
    quick(model, num_iters=3, optimizer=adam(model), snapshot_prefix=prefix)
    model = LinReg()
    opt = adam(model, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, bias_lr=0.03)
    caplog.set_level("WARNING", logger="pixelz_dist")
    quick(model, num_iters=5, optimizer=opt, snapshot_prefix=prefix, load_snapshot_path="auto")
    weight, bias = opt.param_groups
    assert (weight["betas"], weight["eps"], weight["weight_decay"]) == ((0.8, 0.99), 1e-6, 0.1)
    assert (bias["betas"], bias["eps"], bias["weight_decay"], bias["lr"]) == ((0.8, 0.99), 1e-6, 0.0, 0.03)
    for said in ("group weight: betas [0.9, 0.999] -> [0.8, 0.99]", "group weight: eps 1e-08 -> 1e-06",
                 "group weight: weight_decay 0.0 -> 0.1", "group bias: lr 0.01 -> 0.03",
                 "group bias: betas [0.9, 0.999] -> [0.8, 0.99]"):
        assert said in caplog.text, said
    assert "group bias: weight_decay" not in caplog.text  # unchanged in that group
    recorded = load_snap(prefix, 5)["meta"]["hyperparameters"]
    assert [g["weight_decay"] for g in recorded] == [0.1, 0.0] and recorded[0]["betas"] == [0.8, 0.99]


def one_cycle(model, max_lr):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=20)


def test_a_changed_one_cycle_max_lr_scales_the_rest_of_the_cycle(tmp_path, caplog):
    model = LinReg()
    opt, sched = one_cycle(model, 0.1)
    quick(model, num_iters=8, optimizer=opt, scheduler=sched, schedule_on_iter=True)
    straight_lr = opt.param_groups[0]["lr"]
    prefix = str(tmp_path / "s")
    model = LinReg()
    opt, sched = one_cycle(model, 0.1)
    quick(model, num_iters=4, optimizer=opt, scheduler=sched, schedule_on_iter=True, snapshot_prefix=prefix)
    model = LinReg()
    opt, sched = one_cycle(model, 0.2)
    caplog.set_level("WARNING", logger="pixelz_dist")
    quick(model, num_iters=8, optimizer=opt, scheduler=sched, schedule_on_iter=True, snapshot_prefix=prefix,
          load_snapshot_path="auto")
    assert "lr 0.004 -> 0.008" in caplog.text  # the cycle's start, max_lr / 25
    group = opt.param_groups[0]
    assert group["max_lr"] == pytest.approx(0.2) and group["initial_lr"] == pytest.approx(0.008)
    assert sched.last_epoch == 8 and group["lr"] == pytest.approx(2 * straight_lr, rel=1e-9)


def test_a_scheduler_on_one_side_only_is_a_warning_and_the_lr_goes_on_from_the_snapshot(tmp_path, caplog):
    caplog.set_level("WARNING", logger="pixelz_dist")
    prefix = str(tmp_path / "a")
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    quick(model, num_iters=4, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, 0.5),
          schedule_on_iter=True, snapshot_prefix=prefix)
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    quick(model, num_iters=6, optimizer=opt, snapshot_prefix=prefix, load_snapshot_path="auto")
    assert ("the snapshot being loaded holds a scheduler state but this run has no scheduler: the schedule is "
            "dropped") in caplog.text
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # as the schedule left it, not decayed further

    caplog.clear()
    prefix = str(tmp_path / "b")
    quick(num_iters=4, snapshot_prefix=prefix)  # quick's optimizer: a CountingSGD at lr 0.05
    model = LinReg()
    opt = CountingSGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    quick(model, num_iters=6, optimizer=opt, scheduler=sched, schedule_on_iter=True, snapshot_prefix=prefix,
          load_snapshot_path="auto")
    assert ("the snapshot being loaded holds no scheduler state but this run has one: the schedule starts from its "
            "beginning") in caplog.text
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.025)  # two steps of a new schedule


# -- a dataset that grew or shrank -------------------------------------------------------------------------------------
def test_a_grown_or_shrunk_dataset_is_refused_mid_epoch_and_starts_the_next_epoch_on_the_new_list(tmp_path, caplog):
    prefix = str(tmp_path / "mid")
    quick(num_iters=3, data=make_data(10), snapshot_prefix=prefix)  # 6 samples into epoch 0
    with pytest.raises(SnapshotError, match=r"the dataset changed since the snapshot, which was taken 6 samples "
                                            r"into epoch 0: 10 samples when the snapshot was written, 12 now\..*"
                                            r"allow_changed_data=True"):
        quick(num_iters=5, data=make_data(12), snapshot_prefix=prefix, load_snapshot_path="auto")
    assert snapshot_iters(prefix) == [3]  # nothing trained, nothing written
    caplog.set_level("WARNING", logger="pixelz_dist")
    # shrunk to 6 samples with allow_changed_data: position 6 is past the end, so epoch 0 is over
    quick(num_iters=5, data=make_data(6), snapshot_prefix=prefix, load_snapshot_path="auto",
          allow_changed_data=True)
    assert ("(10 samples when the snapshot was written, 6 now); allow_changed_data: the snapshot was taken 6 "
            "samples into epoch 0, past the end of the new list, so that epoch is over; epoch 1 starts on the new "
            "list") in caplog.text
    assert "seen twice" not in caplog.text
    rows = [r for r in read_order(prefix) if isinstance(r, dict)]
    assert [(r["iteration"], r["epoch"], r["from"], r["to"]) for r in rows[3:]] == [(4, 1, 0, 2), (5, 1, 2, 4)]

    caplog.clear()
    prefix = str(tmp_path / "boundary")
    quick(num_iters=5, data=make_data(10), snapshot_prefix=prefix)  # the end of epoch 0
    quick(num_iters=11, data=make_data(12), snapshot_prefix=prefix, load_snapshot_path="auto")
    assert "the dataset changed since the snapshot" in caplog.text and "epoch 1 starts on the new list" in caplog.text
    snap = load_snap(prefix, 11)
    assert (snap["data"]["epoch"], snap["data"]["position"]) == (2, 0)  # epoch 1 had 6 batches of the new list


# -- Ctrl-C from Python ------------------------------------------------------------------------------------------------
class CtrlC(Callback):
    def __init__(self, at):
        self.at = at

    def on_iteration_end(self, state):
        if state.iteration == self.at:
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal sends


def test_ctrl_c_is_an_interrupted_exception_after_a_snapshot_and_the_run_resumes(tmp_path):
    prefix = str(tmp_path / "s")
    before = signal.getsignal(signal.SIGINT)
    model = LinReg()
    try:
        quick(model, num_iters=50, snapshot_prefix=prefix, callbacks=[CtrlC(at=3)])
    except KeyboardInterrupt as e:  # what a script catches, or not (then Python exits with 130, as from any Ctrl-C)
        caught = e
    else:
        pytest.fail("train_model returned after Ctrl-C")
    assert isinstance(caught, Interrupted)
    assert caught.snapshot_path == f"{prefix}_iter_3.pt" and snapshot_iters(prefix) == [3]
    assert str(caught) == (f"interrupted (Ctrl-C); snapshot {prefix}_iter_3.pt; resume with "
                           "load_snapshot_path='auto' (--resume auto)")
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert_same_weights(load_snap_model(prefix, 3), model)
    quick(num_iters=5, snapshot_prefix=prefix, load_snapshot_path="auto")
    assert snapshot_iters(prefix) == [3, 5]


def load_snap_model(prefix, iteration) -> LinReg:
    model = LinReg()
    model.load_state_dict(load_snap(prefix, iteration)["model"])
    return model


def test_a_dataloader_of_the_users_gets_set_epoch_on_its_sampler_and_dataset_every_epoch():
    """The call people forget (a DistributedSampler without it shuffles every epoch alike): train_model makes it,
    on the loader's sampler, its batch sampler's sampler and its dataset, before each epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    class EpochData(TensorDataset):
        def __init__(self, *tensors):
            super().__init__(*tensors)
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    class EpochSampler(torch.utils.data.SequentialSampler):
        def __init__(self, data):
            super().__init__(data)
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    data = make_data(8)
    dataset = EpochData(*data.tensors)
    sampler = EpochSampler(dataset)
    model = LinReg()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None,
                DataLoader(dataset, batch_size=4, sampler=sampler), None, num_epochs=3)
    assert sampler.epochs == [0, 1, 2] and dataset.epochs == [0, 1, 2]
    inner = EpochSampler(dataset)
    batches = torch.utils.data.BatchSampler(inner, 4, drop_last=False)
    model = LinReg()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, DataLoader(dataset, batch_sampler=batches),
                None, num_epochs=2)
    assert inner.epochs == [0, 1]
