"""Wall time of the learning-rate finder's two methods on the built-in demo, side by side in one process.

Both methods search the same range (``--min-lr`` to ``--max-lr``) on the same demo model, data and optimizer (SGD,
momentum 0.9, the training demo's). ``runs`` tries ``--num-runs`` rates for ``--iter-per-run`` iterations each;
``sweep`` is measured at three lengths: ``--iter-per-run`` iterations (the cost of one run: the "num_runs times
cheaper" setting), its default 100, and ``num_runs * iter_per_run`` (the same number of iterations as ``runs``).
Rounds are interleaved (runs, sweeps, runs, ...) after one warm-up round of each that is discarded; each
measurement is the median of ``--rounds`` rounds. One JSON line per measurement goes to stdout::

    python benchmarks/lr_finder_timing.py            # about a minute here
    python benchmarks/lr_finder_timing.py --quick    # smoke run, same output format

``overhead_per_run_ms`` (runs only) estimates what a run costs beyond its iterations, priced at the long sweep's
per-iteration time: restoring model / optimizer / RNGs and building the run's DataLoader and engine (with 0
workers it is within the noise, a few ms either way; with workers, every run starts them anew).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

try:
    import pixelz_dist
except ImportError:  # run from a fresh checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pixelz_dist

from pixelz_dist.cli.demo import build_demo
from pixelz_dist.lr_finder import find_lr


def measure(args, root: str, method: str, num_iters: int) -> tuple[float, object]:
    model, dataset = build_demo(root, num_samples=args.samples, seed=args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.min_lr, momentum=0.9)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    find_lr(
        model,
        optimizer,
        dataset,
        args.batch_size,
        shuffle=True,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        iter_per_run=args.iter_per_run,
        num_runs=args.num_runs,
        method=method,
        num_iters=num_iters,
        result_file=None,
        num_workers=args.workers,
        progress_bar=False,
    )
    return time.perf_counter() - t0, model.lr_finder_result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 4 runs of 5 iterations")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-runs", type=int, default=15)
    p.add_argument("--iter-per-run", type=int, default=20)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--max-lr", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=64, help="demo samples (default 64, the demo's)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers (default 0: the timing of the finder, "
        "not of worker start-up, which every run pays again)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.num_runs, args.iter_per_run = 1, 4, 5
    torch.set_num_threads(args.threads)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # one process, whatever launched us
        os.environ.pop(name, None)
    log = logging.getLogger("pixelz_dist")
    log.addHandler(logging.NullHandler())
    log.setLevel(logging.ERROR)

    budget = args.num_runs * args.iter_per_run
    variants = [("runs", args.iter_per_run), ("sweep", args.iter_per_run), ("sweep", 100), ("sweep", budget)]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    results = {}
    with tempfile.TemporaryDirectory(prefix="pixelz_lr_bench_") as root:
        build_demo(root, num_samples=args.samples, seed=args.seed)  # write the files once, outside the timings
        for r in range(args.rounds + 1):
            for v in variants if r % 2 == 0 else variants[::-1]:
                seconds, result = measure(args, root, *v)
                if r > 0:  # round 0 is the warm-up
                    times[v].append(seconds)
                    results[v] = result
    common = {
        "benchmark": "lr_finder_timing",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pixelz_dist": pixelz_dist.__version__,
        "python": platform.python_version(),
        "model": "TinySegNet",
        "samples": args.samples,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "min_lr": args.min_lr,
        "max_lr": args.max_lr,
        "rounds": args.rounds,
    }
    runs_s = statistics.median(times[variants[0]])
    long_sweep = variants[-1]
    per_iter_s = statistics.median(times[long_sweep]) / max(int(results[long_sweep].ran.sum()), 1)
    for v in variants:
        method, n = v
        res, med = results[v], statistics.median(times[v])
        iterations = int(res.ran.sum()) if method == "sweep" else int((~np.isnan(res.losses)).sum())
        row = {
            **common,
            "method": method,
            "num_runs": args.num_runs if method == "runs" else None,
            "iter_per_run": args.iter_per_run if method == "runs" else None,
            "num_iters": n if method == "sweep" else None,
            "rates_tried": args.num_runs if method == "runs" else n,
            "iterations_run": iterations,
            "median_s": round(med, 3),
            "rounds_s": [round(t, 3) for t in times[v]],
            "ms_per_iteration": round(med / max(iterations, 1) * 1e3, 2),
            "runs_over_this": round(runs_s / med, 2),
            "suggestion": res.suggestion,
        }
        if method == "runs":
            row["overhead_per_run_ms"] = round((med - iterations * per_iter_s) / args.num_runs * 1e3, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
