"""Command-line pieces shared by the entry points (``python -m pixelz_dist.train`` / ``pixelz_dist.find_lr``).

One definition of the model / data / optimizer options, so the finder measures exactly what training will run.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import torch

from .dist import read_env
from .log import ensure_handler, logger

DEMO_ONLY = ("only --demo is available in this version: pass --demo, or call pixelz_dist.{verb} from Python for "
             "your own model and data")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", action="store_true", help="use the built-in demo: a tiny segmentation network on a "
                   "synthetic multi-image dataset of real image files")
    p.add_argument("--demo-dir", help="where the demo images go (default: a temporary folder)")
    p.add_argument("--demo-samples", type=int, default=64, help="number of demo samples (default 64)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iter-size", type=int, default=1, help="micro-batches per optimizer step")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: automatic)")


def require_demo(p: argparse.ArgumentParser, args: argparse.Namespace, verb: str) -> None:
    if not args.demo:
        p.error(DEMO_ONLY.format(verb=verb))


def setup_logging() -> None:
    """INFO lines on stderr when nothing else configured logging; ranks other than 0 only warn."""
    ensure_handler()
    if not read_env().is_main:
        logger.setLevel(logging.WARNING)


def demo_dir(args: argparse.Namespace) -> str:
    return args.demo_dir or os.path.join(tempfile.gettempdir(), "pixelz_dist_demo")


def build_demo_job(args: argparse.Namespace, lr: float):
    """The demo's model and dataset, and the optimizer the demo trains with (SGD, momentum 0.9) at ``lr``.

    Returns:
        ``(model, dataset, optimizer, demo_dir)``.
    """
    from .demo import build_demo

    root = demo_dir(args)
    model, dataset = build_demo(root, num_samples=args.demo_samples, seed=args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, dataset, optimizer, root
