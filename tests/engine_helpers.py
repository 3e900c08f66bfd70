"""Small real things the engine tests share: a linear regression that counts its forwards and records its losses,
a counting SGD, a plateau scheduler that remembers its metrics, readers for snapshots and the order record, and
``quick``, train_model with small defaults.

Imported by the test modules as ``engine_helpers`` (tests/ is on sys.path, as for ``conftest``).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import TensorDataset

from pixelz_dist import train_model

D = 3


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
