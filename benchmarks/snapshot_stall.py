"""How long a periodic snapshot holds up training, against a plain ``torch.save`` + ``fsync`` of the same state.

One process, side by side in one run: the same model (``--params`` parameters, fp32: 64 M = 256 MB by default) is
trained by ``train_model`` with a snapshot every ``--interval`` iterations, once with synchronous snapshots
(``snapshot_async=False``) and once with background ones (the default), after a plain save of a snapshot-shaped state
of the same size has been timed. The stall of a snapshot taken after iteration k is the time between
``on_iteration_end`` of k and of k + 1, minus the median of that interval over iterations far from any snapshot. The
first snapshot of a run is reported apart: its host buffers are new memory, faulted in by the copy. ``blocked_ms`` is
the time the training thread spent inside the snapshot call itself (gathering, checking and copying the state; for a
synchronous snapshot, also the write), ``spread`` the extra time of the seven iterations after it (the background
write's own CPU time, taken from training where cores are short: not a stall, but not free). One JSON line per
measurement::

    python benchmarks/snapshot_stall.py                  # about 2 minutes on 2 cores
    python benchmarks/snapshot_stall.py --params 25e6 --folder /dev/shm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from pixelz_dist import Callback, train_model
from pixelz_dist.checkpoint.checkpointer import Checkpointer


class Wide(nn.Module):
    """Square linear layers: the parameter count of a large model at a small step cost."""

    def __init__(self, params: int, width: int = 2048):
        super().__init__()
        layers = max(1, round(params / (width * width)))
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x).square().mean()


class Times(Callback):
    def __init__(self):
        self.ends: dict[int, float] = {}

    def on_iteration_end(self, state):
        self.ends[state.iteration] = time.perf_counter()


def plain_save_seconds(model: nn.Module, optimizer, folder: str, repeats: int = 3) -> float:
    """``torch.save`` + fsync of the model and optimizer state (what a snapshot holds, but the counters)."""
    best = float("inf")
    for i in range(repeats):
        path = os.path.join(folder, f"plain{i}.pt")
        started = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        best = min(best, time.perf_counter() - started)
        os.unlink(path)
    return best


class BlockedTime:
    """Times every ``Checkpointer.save`` call: how long the training thread is held up by the call itself."""

    def __init__(self):
        self.seconds: list[float] = []
        self._save = Checkpointer.save

    def __enter__(self):
        def timed(checkpointer, *args, **kwargs):
            started = time.perf_counter()
            try:
                return self._save(checkpointer, *args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)

        Checkpointer.save = timed
        return self

    def __exit__(self, *exc):
        Checkpointer.save = self._save


def run(args, snapshot_async: bool, folder: str) -> dict:
    torch.manual_seed(0)
    model = Wide(int(args.params))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    data = torch.utils.data.TensorDataset(torch.randn(args.batch * args.iters, 2048))
    times = Times()
    prefix = os.path.join(folder, f"{'async' if snapshot_async else 'sync'}/s")
    with BlockedTime() as blocked:
        train_model(model, optimizer, None, data, args.batch, num_iters=args.iters, snapshot_prefix=prefix,
                    snapshot_interval=args.interval, keep_last=2, num_workers=0, display_iter=10**6,
                    callbacks=[times], snapshot_async=snapshot_async)
    ends = times.ends
    steps = {k: ends[k + 1] - ends[k] for k in range(1, args.iters) if k + 1 in ends}
    snapshots = list(range(args.interval, args.iters, args.interval))
    near = {k + d for k in snapshots for d in range(0, 8)}
    median = statistics.median(v for k, v in steps.items() if k not in near)
    stalls = [(steps[k] - median) * 1e3 for k in snapshots]
    spread = [sum(steps[k + d] - median for d in range(1, 8) if k + d in steps) * 1e3 for k in snapshots]
    return {"model": model, "optimizer": optimizer, "median_step_ms": median * 1e3, "first_stall_ms": stalls[0],
            "stall_ms": statistics.median(stalls[1:]), "stalls_ms": [round(s, 1) for s in stalls],
            "spread_ms": statistics.median(spread[1:]),
            "blocked_ms": statistics.median(blocked.seconds[1:len(snapshots)]) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=64e6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--interval", type=int, default=12)
    parser.add_argument("--folder", default=None, help="where snapshots go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="8 M parameters, 36 iterations: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.params, args.iters = 8e6, 36
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        sync = run(args, False, folder)
        background = run(args, True, folder)
        plain = plain_save_seconds(background["model"], background["optimizer"], folder) * 1e3
    size_mb = sum(p.numel() * p.element_size() for p in background["model"].parameters()) / 2**20
    common = {"benchmark": "snapshot_stall", "state_mb": round(size_mb), "cpu_threads": 1,
              "torch": torch.__version__}
    print(json.dumps({**common, "measure": "plain torch.save + fsync", "ms": round(plain, 1)}))
    for name, result in (("synchronous snapshot", sync), ("background snapshot", background)):
        print(json.dumps({**common, "measure": name, "blocked_ms": round(result["blocked_ms"], 1),
                          "blocked_over_plain_save": round(result["blocked_ms"] / plain, 3),
                          "stall_ms": round(result["stall_ms"], 1),
                          "first_stall_ms": round(result["first_stall_ms"], 1), "stalls_ms": result["stalls_ms"],
                          "spread_ms": round(result["spread_ms"], 1),
                          "median_step_ms": round(result["median_step_ms"], 1),
                          "stall_over_plain_save": round(result["stall_ms"] / plain, 3)}))


if __name__ == "__main__":
    main()
