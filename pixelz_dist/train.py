"""``python -m pixelz_dist.train``: the command-line entry point (thin: parse, build, train, report).

Examples::

    python -m pixelz_dist.train --demo                                   # one process, CPU, under a minute
    torchrun --nproc_per_node=1 -m pixelz_dist.train --demo --iters 200
    python -m pixelz_dist.train --demo --snapshot-prefix runs/demo/snap --resume auto
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

from .errors import PixelzError
from .log import ensure_handler, logger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixelz_dist.train", description="Train a model with pixelz_dist.")
    p.add_argument("--demo", action="store_true", help="train the built-in demo: a tiny segmentation network on a "
                   "synthetic multi-image dataset of real image files")
    p.add_argument("--demo-dir", help="where the demo images go (default: a temporary folder)")
    p.add_argument("--demo-samples", type=int, default=64, help="number of demo samples (default 64)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, help="train for this many iterations (optimizer steps)")
    length.add_argument("--epochs", type=int, help="train for this many epochs (default for the demo: 5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iter-size", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: automatic)")
    p.add_argument("--display-iter", type=int, default=5)
    p.add_argument("--snapshot-prefix", help="write snapshots to PREFIX_iter_N.pt (demo default: "
                   "DEMO_DIR/snapshots/demo)")
    p.add_argument("--snapshot-interval", type=float, default=None,
                   help="in epochs when training by --epochs (0.5 = twice per epoch), in iterations with --iters")
    p.add_argument("--keep-last", type=int, default=None, help="keep only the K newest snapshots")
    p.add_argument("--resume", metavar="auto|PATH", help="resume from a snapshot file, or 'auto': the newest valid "
                   "snapshot of --snapshot-prefix")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.demo:
        build_parser().error("only --demo is available in this version: pass --demo, or call "
                             "pixelz_dist.train_model from Python for your own model and data")
    ensure_handler()
    if os.environ.get("RANK", "0") != "0":
        logger.setLevel(logging.WARNING)
    from .demo import build_demo
    from .trainer import train_model

    demo_dir = args.demo_dir or os.path.join(tempfile.gettempdir(), "pixelz_dist_demo")
    prefix = args.snapshot_prefix or os.path.join(demo_dir, "snapshots", "demo")
    if args.iters is None and args.epochs is None:
        args.epochs = 5
    model, dataset = build_demo(demo_dir, num_samples=args.demo_samples, seed=args.seed)
    logger.info("demo data in %s (%d samples), snapshots under %s", demo_dir, len(dataset), prefix)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
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
