"""Distributed throughput on CPU/gloo: no_sync on vs off under gradient accumulation, and 2-process scaling.

    python benchmarks/ddp_throughput.py            # starts the torchrun jobs itself, prints one JSON line each
    python benchmarks/ddp_throughput.py --quick

Measurements (same model, same global batch = batch_size * iter_size * processes):
  * hand-written DDP loop, iter_size=4, with no_sync on the first 3 micro-batches vs without (4 all-reduces per step);
  * pixelz_dist.train_model under torchrun (which uses no_sync);
  * train_model with 1 process and the same global batch, for the 2-vs-1 scaling ratio.
On 2 cores the two processes compete with each other and with gloo's threads, so scaling is bounded well below 2x.
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
from torch.utils.data import TensorDataset

WIDTH, DEPTH, SAMPLES = 512, 4, 4096


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        for _ in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(WIDTH, 1))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.net(x), y)


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(SAMPLES, WIDTH, generator=g), torch.randn(SAMPLES, 1, generator=g))


def hand_loop(model, ds, batch, iter_size, steps, use_no_sync):
    """The minimal DDP accumulation loop, with or without no_sync; median seconds per optimizer step."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    x, y = ds.tensors
    stamps = []
    for s in range(steps * 4):
        for m in range(iter_size):
            i = ((s * iter_size + m) * world + rank) * batch % (SAMPLES - batch)
            ctx = ddp.no_sync() if use_no_sync and m < iter_size - 1 else _null()
            with ctx:
                (ddp(x[i:i + batch], y[i:i + batch]) / iter_size).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return statistics.median([b - a for a, b in zip(stamps[steps:], stamps[steps + 1:])])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def engine(ds, batch, iter_size, steps):
    """train_model's seconds per optimizer step: median over steps, timed by a callback (set-up excluded)."""
    import pixelz_dist

    class StepClock(pixelz_dist.Callback):
        def __init__(self):
            self.stamps = []

        def on_iteration_end(self, state):
            self.stamps.append(time.perf_counter())

    logging.getLogger("pixelz_dist").setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    clock = StepClock()
    pixelz_dist.train_model(model, opt, None, ds, batch, shuffle=True, num_iters=steps * 4, iter_size=iter_size,
                            num_workers=0, display_iter=10**9, callbacks=[clock])
    gaps = [b - a for a, b in zip(clock.stamps[steps:], clock.stamps[steps + 1:])]  # the first `steps` warm up
    return statistics.median(gaps)


def worker(args):
    torch.set_num_threads(1)
    ds = data()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = args.global_batch // (args.iter_size * world)
    rows = []
    if world > 1:
        tdist.init_process_group("gloo")
        for use in (True, False):
            torch.manual_seed(0)
            t = hand_loop(MLP(), ds, batch, args.iter_size, args.steps, use)
            rows.append({"variant": "hand DDP loop, no_sync" if use else "hand DDP loop, all-reduce every micro-batch",
                         "step_ms": t * 1e3})
        tdist.destroy_process_group()
    t = engine(ds, batch, args.iter_size, args.steps)  # makes (and ends) its own group under torchrun
    rows.append({"variant": "pixelz_dist.train_model", "step_ms": t * 1e3})
    if int(os.environ.get("RANK", "0")) == 0:
        for row in rows:
            row.update(processes=world, batch_per_process=batch, iter_size=args.iter_size,
                       global_batch=args.global_batch, samples_per_s=args.global_batch / (row["step_ms"] / 1e3),
                       params=sum(p.numel() for p in MLP().parameters()), backend="gloo", device="cpu",
                       torch=str(torch.__version__), threads_per_process=1)
            print("RESULT " + json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--iter-size", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=128)
    args = p.parse_args()
    args.steps = args.steps or (5 if args.quick else 20)
    if args.worker:
        return worker(args)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [__file__, "--worker", "--steps", str(args.steps), "--iter-size", str(args.iter_size),
              "--global-batch", str(args.global_batch)]
    results = {}
    for nproc in (2, 1):
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *common] if nproc > 1 \
            else [sys.executable, *common]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("RESULT "):
                row = json.loads(line[7:])
                row["benchmark"] = "ddp_throughput"
                results[(nproc, row["variant"])] = row
                print(json.dumps(row))
    two = results[(2, "pixelz_dist.train_model")]["samples_per_s"]
    one = results[(1, "pixelz_dist.train_model")]["samples_per_s"]
    sync = results[(2, "hand DDP loop, no_sync")]["step_ms"]
    nosync = results[(2, "hand DDP loop, all-reduce every micro-batch")]["step_ms"]
    print(json.dumps({"benchmark": "ddp_throughput", "variant": "summary", "scaling_2_vs_1": two / one,
                      "no_sync_speedup": nosync / sync,
                      "engine_vs_hand_no_sync": results[(2, "pixelz_dist.train_model")]["step_ms"] / sync,
                      "global_batch": args.global_batch, "iter_size": args.iter_size, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
