"""``python -m pixelz_dist.find_lr``: the learning-rate finder from the command line (thin: parse, build, find, print).

The model, data and optimizer options are the training command's, so the suggestion is for the run you will start.
The suggestion goes to stdout; progress (one line per run, or a bar on a terminal with tqdm) to stderr.

Examples::

    python -m pixelz_dist.find_lr --demo                                  # 15 runs of 20 iterations, a few seconds
    python -m pixelz_dist.find_lr --demo --method sweep --plot lr.png     # one rising-rate run, and a plot
    torchrun --nproc_per_node=2 -m pixelz_dist.find_lr --demo --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import add_data_args, add_demo_args, add_run_args, build_demo_job, require_demo, setup_logging
from .dist import read_env
from .errors import PixelzError
from .log import logger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixelz_dist.find_lr",
                                description="Find a learning rate for training with pixelz_dist.")
    add_demo_args(p)
    add_data_args(p)
    add_run_args(p)
    p.add_argument("--method", choices=("runs", "sweep"), default="runs",
                   help="runs: one short run per rate, each from the same start (default); sweep: one run with the "
                        "rate rising every iteration (about --num-runs times cheaper)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--max-lr", type=float, default=10.0)
    p.add_argument("--num-runs", type=int, default=15, help="runs: rates tried, spaced exponentially (default 15)")
    p.add_argument("--iter-per-run", type=int, default=20, help="runs: iterations per rate (default 20)")
    p.add_argument("--num-iters", type=int, default=100, help="sweep: its length in iterations (default 100)")
    p.add_argument("--divergence-factor", type=float, default=4.0,
                   help="a loss above this times the reference counts as diverged (default 4)")
    p.add_argument("--stop-on-divergence", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the larger rates once a run diverged (default: yes)")
    p.add_argument("--resume", metavar="PATH", help="start every run from this snapshot (weights, optimizer and data "
                   "position)")
    p.add_argument("--restore-dataloader", action=argparse.BooleanOptionalAction, default=True,
                   help="with --resume: start at the snapshot's sample (default) or at the next epoch")
    p.add_argument("--result-file", help="the .npz written (plus a .json beside it); default: "
                   "DEMO_DIR/lr_finder/results.npz")
    p.add_argument("--plot", metavar="PNG", help="also draw the curve to this file (needs matplotlib)")
    return p


@record  # under torchrun, the failing rank's traceback is shown in the job summary
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_demo(parser, args, "find_lr")
    setup_logging()
    from .lr_finder import find_lr

    # The finder sets every rate itself; starting the optimizer at min_lr keeps the old tool's convention.
    model, dataset, optimizer, demo_dir = build_demo_job(args, lr=args.min_lr)
    torch.manual_seed(args.seed)  # dropout draws from the global RNG: the same --seed gives the same curve
    result_file = args.result_file or os.path.join(demo_dir, "lr_finder", "results.npz")
    try:
        model = find_lr(model, optimizer, dataset, args.batch_size, shuffle=args.shuffle, iter_size=args.iter_size,
                        load_snapshot_path=args.resume, restore_dataloader=args.restore_dataloader,
                        min_lr=args.min_lr, max_lr=args.max_lr, iter_per_run=args.iter_per_run,
                        num_runs=args.num_runs, result_file=result_file, method=args.method,
                        num_iters=args.num_iters, divergence_factor=args.divergence_factor,
                        stop_on_divergence=args.stop_on_divergence, seed=args.seed, num_workers=args.workers)
    except PixelzError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = model.lr_finder_result
    if not read_env().is_main:
        return 0
    if args.plot:
        try:
            logger.info("lr finder: plot written to %s", result.plot(args.plot))
        except ImportError as e:
            logger.warning("%s", e)
    if result.suggestion is None:
        print(f"no suggestion: {result.note}")
        return 1
    print(f"suggested lr: {result.suggestion:.3g}")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module rebinds the package attribute ``pixelz_dist.find_lr`` from the function to the module
    (the import system does it after the module runs, so it cannot be undone here). Calling the module calls the
    function, so ``pixelz_dist.find_lr(model, ...)`` keeps working in a process that imported the command line."""

    def __call__(self, *args, **kwargs):
        from .lr_finder import find_lr

        return find_lr(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
