"""Prove that two runs saw the same samples in the same order: compare their per-iteration order records.

Usage::

    python -m pixelz_dist.verify runs/straight/snapshot runs/resumed/snapshot

Each argument is an order record (``*_order.tsv``) or the snapshot prefix that wrote it. Exit status 0 when both
records cover the same iterations and every iteration consumed the same global samples, 1 otherwise, 2 when a record
cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint.order_record import compare_order_records
from .errors import DataError


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (also read by :mod:`pixelz_dist.cli.reference` for the docs)."""
    parser = argparse.ArgumentParser(prog="python -m pixelz_dist.verify", description=__doc__.split("\n")[0])
    parser.add_argument("first", help="order record (*_order.tsv) or snapshot prefix of the first run")
    parser.add_argument("second", help="the same for the second run")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = compare_order_records(args.first, args.second)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.identical else 1


if __name__ == "__main__":
    sys.exit(main())
