"""A snapshot written by a thread or by a process: what each costs the training steps that run meanwhile.

The main thread runs short steps (a chain of small matmuls + tanh: Python between torch calls, as a training loop
has) while a 256 MB state already staged in host memory is serialised and written with fsync:

- ``thread``: ``torch.save`` on a thread of this process (what ``checkpoint/background_write.py`` does): the GIL is
  shared with the training thread;
- ``process``: the state staged in shared memory (``share_memory_()``, filled by a copy as the staging does) and
  written by a writer process started beforehand (spawn: a fork of a process with CUDA or gloo threads is unsafe),
  which receives the tensors through ``torch.multiprocessing`` (file descriptors, no copy).

Reported per kind, medians of ``--rounds``: the steps' median and worst time while the write runs, the extra step
time summed over the write, and the write's wall time; the steps' median with no write beside them. One JSON line
per kind::

    python benchmarks/snapshot_writer_kind.py            # about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import torch
import torch.multiprocessing as mp


def write(state, path):
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def writer_process(requests, done):
    torch.set_num_threads(1)
    while True:
        item = requests.get()
        if item is None:
            return
        state, path = item
        write(state, path)
        del state
        done.put(path)


def step(x, w):
    for _ in range(30):
        x = torch.tanh(x @ w)
    return x


def timed_steps(x, w, until_done, warm=20):
    """Step times while ``until_done()`` is False (at least ``warm`` steps before it is asked)."""
    times = []
    while True:
        started = time.perf_counter()
        step(x, w)
        times.append(time.perf_counter() - started)
        if len(times) > warm and until_done():
            return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 MB, one round: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.rounds = 32, 1
    torch.set_num_threads(1)
    n = args.mb * 2**20 // 4 // 16
    live = {f"w{i}": torch.randn(n) for i in range(16)}
    x, w = torch.randn(64, 256), torch.randn(256, 256) / 16
    quiet = statistics.median(timed_steps(x, w, lambda: True, warm=200))
    ctx = mp.get_context("spawn")
    requests, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=writer_process, args=(requests, done), daemon=True)
    proc.start()
    shared = {k: torch.empty_like(v).share_memory_() for k, v in live.items()}
    private = {k: torch.empty_like(v) for k, v in live.items()}  # the thread's staging buffers, reused as the library's
    with tempfile.TemporaryDirectory() as folder:  # the writer has started (imported torch) before anything is timed
        requests.put(({"w": torch.zeros(1).share_memory_()}, os.path.join(folder, "warm.pt")))
        done.get(timeout=120)
    results = {"thread": [], "process": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for kind in ("thread", "process"):
                path = os.path.join(folder, f"{kind}{r}.pt")
                started = time.perf_counter()
                if kind == "thread":
                    for k, v in live.items():
                        private[k].copy_(v)
                    thread = threading.Thread(target=write, args=(private, path))
                    thread.start()
                    times = timed_steps(x, w, lambda t=thread: not t.is_alive(), warm=0)
                else:
                    for k, v in live.items():
                        shared[k].copy_(v)
                    requests.put((shared, path))
                    times = timed_steps(x, w, lambda: not done.empty(), warm=0)
                    done.get()
                wall = time.perf_counter() - started
                results[kind].append({"median": statistics.median(times), "worst": max(times),
                                      "extra": sum(t - quiet for t in times), "wall": wall})
                os.unlink(path)
        requests.put(None)
        proc.join(timeout=30)
    for kind, rows in results.items():
        print(json.dumps({"benchmark": "snapshot_writer_kind", "kind": kind, "state_mb": args.mb,
                          "quiet_step_ms": round(quiet * 1e3, 2),
                          "step_median_ms": round(statistics.median(r["median"] for r in rows) * 1e3, 2),
                          "step_worst_ms": round(statistics.median(r["worst"] for r in rows) * 1e3, 1),
                          "extra_step_time_ms": round(statistics.median(r["extra"] for r in rows) * 1e3),
                          "write_wall_ms": round(statistics.median(r["wall"] for r in rows) * 1e3),
                          "cpus": os.cpu_count(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
