"""How long ``MultiImgsDataset`` takes to pair 100 000 file names (two folders of 50 000) without opening an image,
beside the floor: listing the same two folders with ``os.scandir``. Both timed in one run, rounds interleaved.

    python benchmarks/dataset_scan.py            # 2 x 50 000 empty files in a temporary folder, 5 rounds
    python benchmarks/dataset_scan.py --quick    # 2 x 5 000, 2 rounds

The files are empty (names are all construction reads; a test checks that no image is opened). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in
    sys.path.insert(0, _ROOT)

import pixelz_dist  # noqa: E402


def listing(folders) -> int:
    return sum(1 for folder in folders for _ in os.scandir(folder))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--per-folder", type=int, default=None, help="files per folder (default 50000; quick 5000)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds of each (default 5; quick 2)")
    args = p.parse_args(argv)
    n = args.per_folder or (5000 if args.quick else 50_000)
    rounds = args.rounds or (2 if args.quick else 5)
    root = tempfile.mkdtemp(prefix="pixelz_scan_")
    try:
        folders = [os.path.join(root, "input"), os.path.join(root, "target")]
        for folder, ext in zip(folders, (".jpg", ".png")):
            os.makedirs(folder)
            for i in range(n):
                open(os.path.join(folder, f"img{i:06d}{ext}"), "wb").close()
        times = {"scandir": [], "MultiImgsDataset": []}
        for r in range(rounds + 1):  # round 0 warms the directory cache
            for which in (("scandir", "MultiImgsDataset") if r % 2 else ("MultiImgsDataset", "scandir")):
                t0 = time.perf_counter()
                count = listing(folders) if which == "scandir" else len(pixelz_dist.MultiImgsDataset(folders))
                dt = time.perf_counter() - t0
                assert count in (n, 2 * n), count
                if r:
                    times[which].append(dt)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "dataset_scan", "python": platform.python_version(), "pixelz_dist": pixelz_dist.__version__,
        "folders": 2, "files_per_folder": n, "rounds": rounds,
        "scandir_s": round(med["scandir"], 4), "multi_imgs_dataset_s": round(med["MultiImgsDataset"], 4),
        "ratio": round(med["MultiImgsDataset"] / med["scandir"], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
