"""Python-API jobs that go wrong while DataLoader workers run, for tests/test_failures.py (JSON config in argv[1]).

Modes: ``model_raises`` (the model's forward raises at iteration ``at``); ``ragged_caught`` (a sample of another shape
makes the batch fail; the caller catches the error and goes on, then the script ends); ``file_deleted`` (a folder's
image is deleted after the first iteration); ``worker_killed`` (a callback SIGKILLs a DataLoader worker at iteration 2,
as the kernel's OOM killer would) and ``worker_exits`` (the dataset calls ``os._exit(3)`` in a worker), both with
``source`` ``dataset`` (train_model on a dataset), ``user_loader`` (on a DataLoader) or ``find_lr``: they print the
caught error as JSON. Every mode uses ``workers`` DataLoader workers; the test checks that the process ends in seconds
(a process whose workers outlive an error never exits).
"""

import json
import os
import signal
import sys
import time

import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pixelz_dist import Callback, MultiImgsDataset, WorkerDied, find_lr, train_model


class Shapes(Dataset):
    def __init__(self, n=40, odd=None, exit_at=None):
        self.n, self.odd, self.exit_at = n, odd, exit_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.exit_at and get_worker_info() is not None:
            os._exit(3)
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


class KillAWorker(Callback):
    """At iteration 2 (of the first run), SIGKILL one of this process's DataLoader workers, as the OOM killer does."""

    def __init__(self):
        self.victim = None

    def on_iteration_end(self, state):
        if state.iteration == 2 and self.victim is None:
            workers = [p for p in psutil.Process().children() if p.name() == "pt_data_worker"]
            self.victim = workers[-1].pid
            os.kill(self.victim, signal.SIGKILL)
            time.sleep(10)  # torch's SIGCHLD handler raises in here: wherever the main thread happens to be


def worker_dies(cfg, workers):
    """Train (or find the lr) until a worker dies; print what was caught."""
    killer = KillAWorker() if cfg["mode"] == "worker_killed" else Callback()
    data = Shapes(exit_at=9 if cfg["mode"] == "worker_exits" else None)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        if cfg["source"] == "dataset":
            train_model(model, optimizer, None, data, 4, num_iters=50, num_workers=workers, callbacks=[killer])
        elif cfg["source"] == "user_loader":
            loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=workers)
            train_model(model, optimizer, None, loader, None, num_iters=50, callbacks=[killer])
        else:
            find_lr(model, optimizer, data, 4, num_workers=workers, num_runs=3, iter_per_run=20, result_file=None,
                    callbacks=[killer])
    except WorkerDied as e:
        print(json.dumps({"message": str(e), "worker": e.worker, "pid": e.pid, "signal": e.signal,
                          "exit_code_of_worker": e.exit_code_of_worker, "runtime_error": isinstance(e, RuntimeError),
                          "exit_code": e.exit_code, "victim": getattr(killer, "victim", None)}), flush=True)


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
    elif mode in ("worker_killed", "worker_exits"):
        worker_dies(cfg, workers)
    elif mode == "file_deleted":
        folders = cfg["folders"]
        data = MultiImgsDataset(folders, [features, target])
        model = Net()
        doomed = data.files[0][cfg.get("delete", len(data) - 1)]
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, data, 2, num_iters=100,
                    num_workers=workers, callbacks=[DeleteAfterFirst(doomed)])


if __name__ == "__main__":
    main()
