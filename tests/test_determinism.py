"""deterministic=True / --deterministic: deterministic algorithms during the run, the process's settings restored
after, an op without a deterministic implementation named. (The GPU resume under it is in test_gpu.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from engine_helpers import LinReg, make_data
from pixelz_dist import Callback, NondeterministicOp, train_model
from pixelz_dist.engine.determinism import CUBLAS_VARIABLE
from test_failures import cli


class Flags(Callback):
    def __init__(self):
        self.seen = []

    def on_iteration_end(self, state):
        self.seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                          torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_VARIABLE)))


@pytest.fixture
def previous_settings(monkeypatch):
    """A process with benchmark on and no determinism, as many training scripts set it."""
    monkeypatch.delenv(CUBLAS_VARIABLE, raising=False)
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, \
        torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def train(model, **kw):
    flags = Flags()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, make_data(8), 4, num_iters=3,
                num_workers=0, callbacks=[flags], **kw)
    return flags


def test_deterministic_is_on_during_the_run_and_the_previous_settings_come_back(previous_settings):
    flags = train(LinReg(), deterministic=True)
    assert flags.seen == [(True, True, False, ":4096:8")] * 3
    assert not torch.are_deterministic_algorithms_enabled()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    assert CUBLAS_VARIABLE not in os.environ
    assert train(LinReg()).seen == [(False, False, True, None)] * 3  # off by default


class Scatters(LinReg):
    def forward(self, x, y):
        out = torch.zeros(8)
        out.put_(torch.arange(len(x)), self.lin(x).squeeze(-1))  # put_ has no deterministic implementation
        return ((out[: len(y)] - y) ** 2).mean()


def test_an_op_without_a_deterministic_implementation_is_named_and_settings_still_come_back(previous_settings):
    train(Scatters())  # runs without deterministic
    with pytest.raises(NondeterministicOp, match=r"the model runs put_, which has no deterministic implementation.*"
                                                 r"HINT: replace it"):
        train(Scatters(), deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert CUBLAS_VARIABLE not in os.environ


@pytest.mark.slow
def test_the_command_line_option(tmp_path):
    proc = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--iters", "2", "--workers",
               "0", "--deterministic")
    assert proc.returncode == 0, proc.stderr
    assert "--deterministic" in cli("--help").stdout


def test_nn_module_has_no_surprise():
    assert isinstance(Scatters(), nn.Module)
