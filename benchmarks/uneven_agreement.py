"""What the ranks' agreement on an epoch's end costs per step, on CPU/gloo with 2 processes.

    python benchmarks/uneven_agreement.py            # starts torchrun itself; about a minute here
    python benchmarks/uneven_agreement.py --quick

A user's DataLoader under torchrun: the ranks agree once per epoch when every loader has a length, and once per
window (here: per step) when one has none (see ``pixelz_dist/engine/uneven.py``). Measured, in the same processes:

  * ``window_call``: the agreement alone, ``UnevenEpochs.window`` (a blocking all-gather of one int64 on the gloo
    group), median microseconds over ``--calls`` calls;
  * ``with_length`` / ``without_length``: ``train_model`` on the same small MLP over an ``IterableDataset`` of equal
    shards, with and without ``__len__``, median milliseconds per optimizer step (timed by a callback, the first
    quarter discarded), rounds interleaved (with, without, without, with, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

import pixelz_dist  # noqa: E402
from pixelz_dist.engine.uneven import UnevenEpochs  # noqa: E402

WIDTH = 64


class Shard(IterableDataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
        self.x, self.y = torch.randn(n, WIDTH, generator=g), torch.randn(n, 1, generator=g)

    def __iter__(self):
        return zip(self.x, self.y)


class SizedShard(Shard):
    def __len__(self):
        return len(self.x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.net(x), y)


class StepClock(pixelz_dist.Callback):
    def __init__(self):
        self.stamps = []

    def on_iteration_end(self, state):
        self.stamps.append(time.perf_counter())


def train(sized: bool, steps: int, batch: int) -> float:
    """Median seconds per optimizer step of one train_model call (its own process group)."""
    model = MLP()
    clock = StepClock()
    loader = DataLoader((SizedShard if sized else Shard)(steps * batch), batch_size=batch)
    pixelz_dist.train_model(model, torch.optim.SGD(model.parameters(), lr=1e-3), None, loader, None, num_epochs=1,
                            display_iter=10**9, callbacks=[clock])
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return statistics.median(gaps[len(gaps) // 4:])


def worker(args) -> None:
    torch.set_num_threads(1)
    logging.getLogger("pixelz_dist").setLevel(logging.WARNING)
    world = int(os.environ["WORLD_SIZE"])
    tdist.init_process_group("gloo")
    agree = UnevenEpochs(world)
    for _ in range(50):
        agree.window(1, 1)
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        agree.window(1, 1)
        times.append(time.perf_counter() - t0)
    tdist.destroy_process_group()
    rows = [{"variant": "window_call", "us": statistics.median(times) * 1e6, "calls": args.calls}]
    step = {True: [], False: []}
    for r in range(args.rounds):
        for sized in ((True, False) if r % 2 == 0 else (False, True)):
            step[sized].append(train(sized, args.steps, args.batch))
    for sized in (True, False):
        rows.append({"variant": "with_length" if sized else "without_length",
                     "step_ms": statistics.median(step[sized]) * 1e3, "rounds": args.rounds, "steps": args.steps})
    rows.append({"variant": "summary", "per_step_cost_us": (statistics.median(step[False])
                                                            - statistics.median(step[True])) * 1e6,
                 "paired_ratio": statistics.median(b / a for a, b in zip(step[True], step[False]))})
    if int(os.environ["RANK"]) == 0:
        for row in rows:
            row.update(benchmark="uneven_agreement", processes=world, batch=args.batch, width=WIDTH, backend="gloo",
                       device="cpu", torch=str(torch.__version__), threads_per_process=1, cores=os.cpu_count())
            print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--calls", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    args.steps = args.steps or (100 if args.quick else 400)
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.calls = args.calls or (200 if args.quick else 2000)
    if args.worker:
        return worker(args)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", __file__, "--worker", "--steps", str(args.steps),
           "--rounds", str(args.rounds), "--calls", str(args.calls), "--batch", str(args.batch)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if line.startswith("RESULT "):
            print(line[7:])


if __name__ == "__main__":
    main()
