"""What loading a snapshot costs each rank of a node: a private copy per rank (a plain ``torch.load``) against the
page cache's pages shared by all (``load_snapshot``: a read pass, then ``torch.load(mmap=True)``).

A snapshot-shaped file of ``--mb`` MB is written once; then ``--ranks`` processes load it at the same time, in each
mode, and report the growth of their anonymous memory (``Anonymous`` in ``/proc/self/smaps_rollup``: the process's
own pages, which nothing else shares and the kernel cannot drop; file pages of a mapping are the page cache's, one
copy per node) while they hold the loaded snapshot, and how long the load took. One JSON line per mode::

    python benchmarks/snapshot_load.py            # 256 MB, 2 processes: about 20 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def anonymous_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Anonymous line in /proc/self/smaps_rollup")


def load_once(path: str, mode: str) -> None:
    import torch

    from pixelz_dist.checkpoint.file_format import load_snapshot

    before = anonymous_bytes()
    started = time.perf_counter()
    if mode == "mmap":
        snap = load_snapshot(path)
    else:
        with open(path, "rb") as f:
            snap = torch.load(f, map_location="cpu", weights_only=True)
    seconds = time.perf_counter() - started
    total = sum(t.sum().item() for t in snap["model"].values())  # touch every value, as load_state_dict does
    grown = anonymous_bytes() - before
    print(json.dumps({"anonymous_growth_mb": grown / 2**20, "seconds": seconds, "check": total}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 32 MB snapshot: a smoke test")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.mb = 32
    if args.child:
        return load_once(*args.child)
    import torch

    from pixelz_dist.checkpoint.file_format import FORMAT_VERSION, save_snapshot

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "s_iter_1.pt")
        n = args.mb * 2**20 // 4 // 16
        snap = {"format_version": FORMAT_VERSION, "per_rank": ["rng"], "model": {f"w{i}": torch.randn(n)
                                                                                 for i in range(16)},
                "optimizer": {}, "scheduler": None, "progress": {"iteration": 1}, "data": {}, "rng": [{}]}
        save_snapshot(snap, path)
        del snap
        for mode in ("plain", "mmap"):
            children = [subprocess.Popen([sys.executable, __file__, "--child", path, mode], stdout=subprocess.PIPE,
                                         text=True) for _ in range(args.ranks)]
            results = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
            print(json.dumps({"benchmark": "snapshot_load", "mode": mode, "snapshot_mb": args.mb,
                              "ranks": args.ranks,
                              "anonymous_growth_mb_per_rank": round(
                                  statistics.mean(r["anonymous_growth_mb"] for r in results), 1),
                              "load_seconds": round(statistics.mean(r["seconds"] for r in results), 3)}))


if __name__ == "__main__":
    main()
