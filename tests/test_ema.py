"""The moving average of the weights (engine/ema.py): its values step by step, skipped steps, the snapshot part
"ema" and an exact resume with it. Real training of a tiny BatchNorm network on the CPU, in this process."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from engine_helpers import load_snap, make_data
from pixelz_dist import Callback, train_model
from pixelz_dist.engine.ema import ema_model, ema_state_dict
from pixelz_dist.engine.precision import MixedPrecision
from pixelz_dist.errors import ConfigError

DECAY = 0.75


class BNNet(nn.Module):
    """Linear -> BatchNorm -> Dropout -> Linear, squared error: weights, float buffers, an int buffer, and RNG."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.drop, self.lin2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(dropout), \
            nn.Linear(4, 1)

    def forward(self, x, y):
        return ((self.lin2(self.drop(self.bn(self.lin1(x)))).squeeze(-1) - y) ** 2).mean()


class Weights(Callback):
    """The model's state after every iteration, and what TrainState.ema_model shows."""

    def __init__(self, skip_at=()):
        self.after, self.skip_at, self.ema_seen = [], set(skip_at), []

    def on_train_start(self, state):
        self.after.append({k: v.clone() for k, v in state.model.state_dict().items()})

    def on_after_backward(self, state):
        if state.iteration + 1 in self.skip_at:
            state.skip_step("test")

    def on_iteration_end(self, state):
        self.after.append({k: v.clone() for k, v in state.model.state_dict().items()})
        self.ema_seen.append(state.ema_model)


def train(model=None, num_iters=3, callbacks=(), **kwargs):
    model = model if model is not None else BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = train_model(model, opt, None, make_data(12), 4, num_iters=num_iters, num_workers=0, callbacks=callbacks,
                      display_iter=100, **kwargs)
    return out, opt


def hand_ema(states: list[dict], buffers: str, applied: list[bool]) -> dict:
    """ema_0 = the starting weights; after each applied step: decay * ema + (1 - decay) * weights."""
    ema = {k: v.clone() for k, v in states[0].items()}
    for state, was_applied in zip(states[1:], applied, strict=True):
        if not was_applied:
            continue
        for k, v in state.items():
            average = v.is_floating_point() and (buffers == "average" or "running" not in k)
            ema[k] = DECAY * ema[k] + (1 - DECAY) * v if average else v.clone()
    return ema


def assert_close_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=f"EMA of {k}")
        else:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_ema_is_the_hand_computed_average_over_three_steps(buffers):
    rec = Weights()
    model, _ = train(callbacks=[rec], ema=DECAY, ema_buffers=buffers)
    averaged = ema_model(model)
    assert isinstance(averaged, BNNet) and averaged is not model and not averaged.training
    assert all(m is averaged for m in rec.ema_seen)  # TrainState.ema_model during training is the same module
    assert not any(p.requires_grad for p in averaged.parameters())
    want = hand_ema(rec.after, buffers, [True] * 3)
    assert_close_states(averaged.state_dict(), want)
    # the average really moved away from both the start and the end
    assert not torch.equal(averaged.lin1.weight, rec.after[0]["lin1.weight"])
    assert not torch.equal(averaged.lin1.weight, model.lin1.weight)
    assert torch.equal(averaged.bn.num_batches_tracked, model.bn.num_batches_tracked)  # integer buffers: copied
    if buffers == "copy":
        assert torch.equal(averaged.bn.running_mean, model.bn.running_mean)
    else:
        assert not torch.equal(averaged.bn.running_mean, model.bn.running_mean)


def test_no_ema_without_the_argument():
    rec = Weights()
    model, _ = train(callbacks=[rec])
    assert ema_model(model) is None and rec.ema_seen == [None] * 3


def test_a_skipped_step_leaves_the_ema_and_the_snapshot_holds_it_model_shaped(tmp_path):
    rec = Weights(skip_at={2})
    prefix = str(tmp_path / "snap")
    model, _ = train(num_iters=3, callbacks=[rec], ema=DECAY, snapshot_prefix=prefix)
    assert torch.equal(rec.after[1]["lin1.weight"], rec.after[2]["lin1.weight"])  # the step was skipped
    want = hand_ema(rec.after, "average", [True, False, True])
    assert_close_states(ema_model(model).state_dict(), want)
    snap = load_snap(prefix, 3)
    assert set(snap["ema"]) == {"decay", "include_buffers", "num_updates", "state_dict"}
    assert (snap["ema"]["decay"], snap["ema"]["include_buffers"], snap["ema"]["num_updates"]) == (DECAY, True, 2)
    state = ema_state_dict(snap)
    assert list(state) == list(snap["model"])
    assert_close_states(state, want)
    fresh = BNNet()
    fresh.load_state_dict(state)  # a follower loads it into a plain model
    assert ema_state_dict({"model": {}}) is None


def test_fp16_step_dropped_by_the_grad_scaler_is_reported():
    """The fp16 path: GradScaler skips a step with inf gradients; precision.step says so (no EMA update then)."""
    lin = nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    amp = MixedPrecision("fp16", torch.device("cpu"))
    for bad, expected in ((False, True), (True, False), (False, True)):
        before = lin.weight.detach().clone()
        amp.scaler.scale(lin(torch.ones(1, 2)).sum()).backward()
        if bad:
            lin.weight.grad[0, 0] = float("inf")
        assert amp.step(opt, report_skip=True) is expected
        assert torch.equal(before, lin.weight) != expected
        opt.zero_grad()


def run(prefix, num_iters=7, stop_at=None, resume=None, ema=DECAY, **kwargs):
    class Stop(Callback):
        def on_iteration_end(self, state):
            if state.iteration == stop_at:
                state.request_stop("test")

    model = BNNet(dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_model(model, opt, sched, make_data(12), 4, shuffle=True, num_iters=num_iters, num_workers=0,
                display_iter=100, snapshot_prefix=str(prefix), load_snapshot_path=resume, ema=ema,
                callbacks=[Stop()], **kwargs)
    return model


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k} differs"


@pytest.mark.parametrize("stop_at", [2, 5])  # mid-epoch (3 iterations per epoch), and in the next epoch
def test_stop_and_resume_gives_the_same_ema_and_weights_bit_for_bit(tmp_path, stop_at):
    run(tmp_path / "a" / "snap")
    b = tmp_path / "b" / "snap"
    run(b, stop_at=stop_at)
    assert load_snap(b, stop_at)["ema"]["num_updates"] == stop_at
    run(b, resume="auto")
    straight, resumed = load_snap(tmp_path / "a" / "snap", 7), load_snap(b, 7)
    assert_same_tensors(straight["model"], resumed["model"], "model")
    assert_same_tensors(straight["ema"]["state_dict"], resumed["ema"]["state_dict"], "EMA")
    assert straight["ema"]["num_updates"] == resumed["ema"]["num_updates"] == 7


def test_resume_without_ema_in_the_snapshot_starts_it_from_the_loaded_weights(tmp_path, caplog):
    prefix = tmp_path / "snap"
    run(prefix, stop_at=3, ema=None)
    assert "ema" not in load_snap(prefix, 3)
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        run(prefix, num_iters=4, resume="auto")
    assert "holds no EMA" in caplog.text
    snap3, snap4 = load_snap(prefix, 3), load_snap(prefix, 4)
    assert snap4["ema"]["num_updates"] == 1
    want = {k: DECAY * snap3["model"][k] + (1 - DECAY) * v if v.is_floating_point() else v
            for k, v in snap4["model"].items()}
    assert_close_states(snap4["ema"]["state_dict"], want)


def test_resume_with_ema_off_ignores_the_snapshots_ema(tmp_path, caplog):
    prefix = tmp_path / "snap"
    run(prefix, stop_at=3)
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        model = run(prefix, num_iters=4, resume="auto", ema=None)
    assert "which this run does not keep" in caplog.text
    assert ema_model(model) is None and "ema" not in load_snap(prefix, 4)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.9"])
def test_decay_must_be_between_0_and_1(bad):
    with pytest.raises(ConfigError, match="ema must be a decay between 0 and 1"):
        train(ema=bad)


def test_ema_buffers_must_be_average_or_copy():
    with pytest.raises(ConfigError, match="ema_buffers must be"):
        train(ema=0.9, ema_buffers="mean")


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_every_rank_keeps_the_average_that_the_snapshot_holds(tmp_path):
    """2 gloo processes: the EMA tracks the unwrapped module, the same on both ranks, and rank 0 saves it."""
    from test_distributed import final, torchrun

    out = tmp_path / "out"
    out.mkdir()
    cfg = dict(prefix=str(tmp_path / "snap"), num_iters=6, out=str(out),
               train_kwargs={"ema": 0.9, "warmup_iters": 3})
    proc = torchrun(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text())["ema"] for r in (0, 1)]
    snap = final(str(tmp_path / "snap"))
    flat = [x for t in ema_state_dict(snap).values() for x in t.flatten().tolist()]
    assert ranks[0] == ranks[1] == flat and flat  # the same floats everywhere
    assert flat != [x for t in snap["model"].values() for x in t.flatten().tolist()]
    assert snap["ema"]["num_updates"] == 6 and snap["warmup"] is None
