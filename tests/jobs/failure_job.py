"""Python-API jobs that go wrong while DataLoader workers run, for tests/test_failures.py (JSON config in argv[1]).

Modes: ``model_raises`` (the model's forward raises at iteration ``at``); ``ragged_caught`` (a sample of another shape
makes the batch fail; the caller catches the error and goes on, then the script ends); ``file_deleted`` (a folder's
image is deleted after the first iteration). Every mode uses ``workers`` DataLoader workers; the test checks that
the process ends in seconds (a process whose workers outlive an error never exits).
"""

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import Dataset

from pixelz_dist import Callback, MultiImgsDataset, train_model


class Shapes(Dataset):
    def __init__(self, n=40, odd=None):
        self.n, self.odd = n, odd

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        size = 5 if i == self.odd else 4
        return torch.full((size,), float(i)), torch.tensor([float(i % 3)])


class Net(nn.Module):
    def __init__(self, raise_at=None):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.calls, self.raise_at = 0, raise_at

    def forward(self, x, y):
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError(f"the model failed at call {self.calls}")
        return nn.functional.mse_loss(self.lin(x.flatten(1)[:, :4]), y)


def features(image):
    return torch.zeros(4)


def target(image):
    return torch.zeros(1)


class DeleteAfterFirst(Callback):
    def __init__(self, path):
        self.path = path

    def on_iteration_end(self, state):
        if state.iteration == 1 and os.path.exists(self.path):
            os.remove(self.path)


def main():
    cfg = json.loads(sys.argv[1])
    mode, workers = cfg["mode"], cfg.get("workers", 2)
    torch.manual_seed(0)
    if mode == "model_raises":
        model = Net(raise_at=cfg.get("at", 3))
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, Shapes(), 4, num_iters=50,
                    num_workers=workers, shuffle=True)
    elif mode == "ragged_caught":
        model = Net()
        try:
            train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, Shapes(odd=cfg.get("odd", 13)), 4,
                        num_iters=50, num_workers=workers)
        except Exception as e:  # the caller handles it and carries on; the process must still end normally
            message = str(e).rsplit(f"{type(e).__name__}: ", 1)[-1]  # the worker's own message, not its traceback
            print(f"caught: {type(e).__name__}: {message}", flush=True)
    elif mode == "file_deleted":
        folders = cfg["folders"]
        data = MultiImgsDataset(folders, [features, target])
        model = Net()
        doomed = data.files[0][cfg.get("delete", len(data) - 1)]
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, data, 2, num_iters=100,
                    num_workers=workers, callbacks=[DeleteAfterFirst(doomed)])


if __name__ == "__main__":
    main()
