"""progress_bar.py: a tqdm bar on a terminal only; log lines keep going (above the bar)."""

import io
import logging

import torch

from pixelz_dist.callbacks.progress_bar import ProgressBar, want_progress_bar
from pixelz_dist.engine.train_model import train_model


class Tty(io.StringIO):
    def isatty(self):
        return True


class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return ((self.w * x) ** 2).sum()


def test_only_on_a_terminal(monkeypatch):
    assert not want_progress_bar(io.StringIO())
    assert want_progress_bar(Tty())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not want_progress_bar(Tty())


def test_bar_counts_iterations_and_shows_epoch_and_loss(caplog):
    out = Tty()
    bar = ProgressBar(refresh_every=2, file=out)
    data = torch.utils.data.TensorDataset(torch.randn(12, 2))
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        model = Quadratic()
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, data, 2, num_epochs=2,
                    num_workers=0, display_iter=3, callbacks=[bar])
    text = out.getvalue()
    assert "12/12" in text and "epoch 2" in text and "loss=" in text
    assert bar.bar is None  # closed at the end of training
    assert any("iter 12/12" in r.getMessage() for r in caplog.records)
