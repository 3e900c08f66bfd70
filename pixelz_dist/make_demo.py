"""Write the segmentation walkthrough's demo data: photos and class-index label maps, split in train and val.

Usage::

    python -m pixelz_dist.make_demo demo_seg [--train 160] [--val 40] [--size 48] [--seed 0]

Writes ``demo_seg/{train,val}/images/*.jpg`` and ``demo_seg/{train,val}/labels/*.png`` (0 background, 1 ellipse,
2 rectangle, 255 ignored border pixels). The model for it is ``pixelz_dist.cli.segmentation_demo:SegmentationNet``.
"""

from __future__ import annotations

import argparse
import sys

from .cli.segmentation_demo import make_segmentation_demo
from .errors import ConfigError
from .log import ensure_handler


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (also read by :mod:`pixelz_dist.cli.reference` for the docs)."""
    parser = argparse.ArgumentParser(prog="python -m pixelz_dist.make_demo", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder to write into (created)")
    parser.add_argument("--train", type=int, default=160, help="training samples (default: %(default)s)")
    parser.add_argument("--val", type=int, default=40, help="validation samples (default: %(default)s)")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the pictures drawn (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ensure_handler()
    try:
        folders = make_segmentation_demo(args.root, args.train, args.val, args.size, args.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, dirs in folders.items():
        print(f"{split}: {' '.join(dirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
