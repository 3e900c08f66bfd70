"""tensorboard.py: scalars every N iterations through SummaryWriter (a fake one here; the real one in
test_train_cli.py), and a one-line hint when TensorBoard is not installed."""

import sys

import pytest
import torch

from pixelz_dist.callbacks.tensorboard import TensorBoardLogger, check_tensorboard
from pixelz_dist.engine.param_groups import make_param_groups
from pixelz_dist.engine.train_model import train_model
from pixelz_dist.errors import ConfigError


class FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def close(self):
        self.closed = True


def test_scalars_every_n_iterations():
    writers = []
    model = torch.nn.Linear(2, 1)

    def factory(log_dir):
        writers.append(FakeWriter(log_dir))
        return writers[-1]

    logger = TensorBoardLogger("runs/x", every=2, writer_factory=factory)
    opt = torch.optim.SGD(make_param_groups(model, {"bias": 0.5}), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    train_model(_LossModel(model), opt, None, data, 2, num_iters=4, num_workers=0, callbacks=[logger])
    (writer,) = writers
    assert writer.log_dir == "runs/x" and writer.closed
    assert writer.scalars == [(t, s) for s in (2, 4) for t in ("train/loss", "train/lr/bias", "train/lr/default",
                                                             "train/epoch")]


class _LossModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).square().mean()


def test_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r'pip install "pixelz-dist\[tensorboard\]"'):
        check_tensorboard()
