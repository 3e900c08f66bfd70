"""A training job for the distributed tests, started by torchrun (or plain python) with a JSON config.

Config keys: prefix, num_iters | num_epochs, iter_size, batch_size, workers, model ("mlp" | "demo"), data (a demo
folder, for "demo"), interval, resume, out (folder for per-rank records), kill_rank / kill_at (SIGKILL that rank
after that iteration on the first attempt only), raise_rank / raise_at (the dataset raises there), slow (seconds to
sleep per iteration), ready_at (write out/ready after that iteration), count_allreduce (record gradient all-reduces),
pid_file (write out/pid<RANK> at the start),
user_group (create the process group before train_model), repeat (train_model calls in one process),
hang_rank / hang_at (that rank sleeps for a minute there), timeout (dist_timeout),
y_scale (of the targets), train_kwargs (more train_model keyword arguments), display_iter (default 2),
count_collectives (record, per iteration, the blocking and the asynchronous torch.distributed.all_reduce calls),
stop_rank / stop_at / stop_on_every_rank (a callback requests a stop there: on that rank, or on every rank),
runs (a list of configs that update this one, each trained in turn, from a fresh model, in the same processes: the
tests of several facts share one job's start-up).
Each rank's record (out/rank<RANK>.json) holds the flat EMA weights (train_kwargs ema=DECAY; [] without).
"""

import gc
import json
import os
import signal
import sys
import time

import torch
from snapshot_wait import wait_until_durable
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from pixelz_dist import Callback, train_model
from pixelz_dist.cli.demo import DemoDataset, TinySegNet
from pixelz_dist.engine.ema import ema_model


class IndexedData(Dataset):
    """Deterministic regression data that also returns the sample index, so each rank can record what it saw."""

    def __init__(self, n, raise_at=None, y_scale=1.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = y_scale * (self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g))
        self.raise_at = raise_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.raise_at is not None and i == self.raise_at:
            raise RuntimeError(f"bad sample {i} on rank {os.environ.get('RANK')}")
        return self.x[i], self.y[i], torch.tensor(i)


class MLP(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))
        self.seen = []

    def forward(self, x, y, idx):
        self.seen.extend(idx.tolist())
        return nn.functional.mse_loss(self.net(x), y)


class Probe(Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", "0"))
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.allreduces = []
        self.calls = 0
        self.collectives = []  # per iteration: [blocking all_reduce calls, asynchronous ones]
        self._counts = [0, 0]
        self.stopped_at = None
        if cfg.get("count_collectives"):
            real = torch.distributed.all_reduce

            def counting_all_reduce(*args, **kwargs):
                self._counts[1 if kwargs.get("async_op") else 0] += 1
                return real(*args, **kwargs)

            torch.distributed.all_reduce = counting_all_reduce

    def on_train_start(self, state):
        if self.cfg.get("pid_file"):
            with open(os.path.join(self.cfg["out"], f"pid{self.rank}"), "w") as f:
                f.write(str(os.getpid()))
        if self.cfg.get("count_allreduce") and state.wrapped_model is not state.model:
            def counting_hook(_, bucket):
                self.calls += 1
                work = torch.distributed.all_reduce(bucket.buffer() / torch.distributed.get_world_size(),
                                                    async_op=True)
                return work.get_future().then(lambda fut: fut.value()[0])

            state.wrapped_model.register_comm_hook(None, counting_hook)

    def on_iteration_end(self, state):
        self.allreduces.append(self.calls)
        self.calls = 0
        self.collectives.append(self._counts)
        self._counts = [0, 0]
        if self.cfg.get("stop_at") == state.iteration and self.cfg.get("stop_rank") in (self.rank, "all"):
            state.request_stop("asked by the test", on_every_rank=bool(self.cfg.get("stop_on_every_rank")))
        if self.cfg.get("slow"):
            time.sleep(self.cfg["slow"])
        if self.cfg.get("ready_at") == state.iteration and self.rank == 0:
            open(os.path.join(self.cfg["out"], "ready"), "w").close()
        if self.cfg.get("hang_rank") == self.rank and self.cfg.get("hang_at") == state.iteration:
            time.sleep(60)  # a hung peer: the others must give up after dist_timeout, long before this ends
        if (self.cfg.get("kill_rank") == self.rank and self.cfg.get("kill_at") == state.iteration
                and self.attempt == 0):
            wait_until_durable(state)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, state):
        self.stopped_at = state.iteration


def main():
    cfg = json.loads(sys.argv[1])
    for one in cfg.pop("runs", None) or [{}]:  # several jobs' worth in one: torch is imported once (~10 s of CPU)
        train_one({**cfg, **one})


def train_one(cfg):
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    rank = int(os.environ.get("RANK", "0"))
    if cfg.get("model", "mlp") == "mlp":
        model = MLP(cfg.get("dropout", 0.0))
        raise_at = cfg.get("raise_at") if cfg.get("raise_rank") == rank else None
        dataset = IndexedData(cfg.get("n", 48), raise_at, cfg.get("y_scale", 1.0))
    else:
        model = TinySegNet(width=6, dropout=0.3)
        dataset = DemoDataset(cfg["data"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.8)
    probe = Probe(cfg)
    if cfg.get("user_group"):  # the user made the group: train_model must use it and leave it alone
        torch.distributed.init_process_group("gloo")
    try:
        for _ in range(cfg.get("repeat", 1) - 1):  # earlier runs in the same processes (as find_lr does)
            run({**cfg, "prefix": None, "interval": None}, model, optimizer, scheduler, dataset, probe)
        trained = run(cfg, model, optimizer, scheduler, dataset, probe)
    except SystemExit as e:  # Preempted: note the exit code each rank leaves with, then leave with it
        if cfg.get("out"):
            with open(os.path.join(cfg["out"], f"exit{rank}"), "w") as f:
                f.write(str(e.code))
        raise
    if cfg.get("out"):
        with open(os.path.join(cfg["out"], f"rank{rank}.json"), "w") as f:
            json.dump({"seen": getattr(trained, "seen", []), "allreduces": probe.allreduces,
                       "collectives": probe.collectives, "stopped_at": probe.stopped_at,
                       "class": type(trained).__name__,
                       "norm_classes": sorted({type(m).__name__ for m in trained.modules()
                                               if "Norm" in type(m).__name__}),
                       "attempt": probe.attempt,
                       "ema": [x for t in (ema_model(trained) or nn.Module()).state_dict().values()
                               for x in t.flatten().tolist()],
                       "group_alive_after": torch.distributed.is_initialized(),
                       # no garbage collection first: the wrapper must be gone by reference counting alone
                       "ddp_alive_after": sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())}, f)
    if cfg.get("user_group"):
        torch.distributed.destroy_process_group()


def run(cfg, model, optimizer, scheduler, dataset, probe):
    return train_model(model, optimizer, scheduler, dataset, cfg.get("batch_size", 2), shuffle=True,
                       snapshot_prefix=cfg.get("prefix"), num_iters=cfg.get("num_iters"),
                       num_epochs=cfg.get("num_epochs"), iter_size=cfg.get("iter_size", 1),
                       display_iter=cfg.get("display_iter", 2),
                       snapshot_interval=cfg.get("interval"), load_snapshot_path=cfg.get("resume"), seed=5,
                       num_workers=cfg.get("workers", 0), callbacks=[probe], dist_timeout=cfg.get("timeout", 60),
                       **cfg.get("train_kwargs", {}))


if __name__ == "__main__":
    main()
    # The job is done and its records are written: skip the interpreter's garbage collections at exit (over 300,000
    # objects of torch's, about 1.3 s a process). Not on an error: that way out stays the ordinary one.
    gc.freeze()
