"""``python -m pixelz_dist.train``: the command-line entry point (thin: parse, build, train, report).

Examples::

    python -m pixelz_dist.train --demo                                   # one process, CPU, under a minute
    torchrun --nproc_per_node=1 -m pixelz_dist.train --demo --iters 200
    python -m pixelz_dist.train --demo --snapshot-prefix runs/demo/snap --resume auto
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import add_data_args, add_demo_args, add_run_args, build_demo_job, require_demo, setup_logging
from .errors import PixelzError
from .log import logger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixelz_dist.train", description="Train a model with pixelz_dist.")
    add_demo_args(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, help="train for this many iterations (optimizer steps)")
    length.add_argument("--epochs", type=int, help="train for this many epochs (default for the demo: 5)")
    add_data_args(p)
    p.add_argument("--lr", type=float, default=0.05)
    add_run_args(p)
    p.add_argument("--display-iter", type=int, default=5)
    p.add_argument("--snapshot-prefix", help="write snapshots to PREFIX_iter_N.pt (demo default: "
                   "DEMO_DIR/snapshots/demo)")
    p.add_argument("--snapshot-interval", type=float, default=None,
                   help="in epochs when training by --epochs (0.5 = twice per epoch), in iterations with --iters")
    p.add_argument("--keep-last", type=int, default=None, help="keep only the K newest snapshots")
    p.add_argument("--resume", metavar="auto|PATH", help="resume from a snapshot file, or 'auto': the newest valid "
                   "snapshot of --snapshot-prefix")
    return p


@record  # under torchrun, the failing rank's traceback is shown in the job summary
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_demo(parser, args, "train_model")
    setup_logging()
    from .trainer import train_model

    if args.iters is None and args.epochs is None:
        args.epochs = 5
    model, dataset, optimizer, demo_dir = build_demo_job(args, lr=args.lr)
    prefix = args.snapshot_prefix or os.path.join(demo_dir, "snapshots", "demo")
    logger.info("demo data in %s (%d samples), snapshots under %s", demo_dir, len(dataset), prefix)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs or args.iters)
    try:
        train_model(model, optimizer, scheduler, dataset, args.batch_size, shuffle=args.shuffle,
                    snapshot_prefix=prefix, num_iters=args.iters, num_epochs=args.epochs, iter_size=args.iter_size,
                    display_iter=args.display_iter, snapshot_interval=args.snapshot_interval,
                    load_snapshot_path=args.resume, schedule_on_iter=args.iters is not None, seed=args.seed,
                    num_workers=args.workers, keep_last=args.keep_last)
    except PixelzError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
