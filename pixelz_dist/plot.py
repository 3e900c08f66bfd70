"""``python -m pixelz_dist.plot PREFIX`` (also ``pixelz-plot``): draw a run's training curves to ``PREFIX_curves.png``.

PREFIX is the one the run wrote its records with (``--snapshot-prefix``, or ``train_model``'s ``log_prefix``); the
metrics file itself (``PREFIX_metrics.jsonl``) works too. Validation values (``val*`` keys of the metrics rows) and
the evaluation follower's ``PREFIX_eval.jsonl`` are drawn when present. Works on a run still training (it reads what
is written so far) and on a resumed one (the killed run's rows after the resume point are left out). Needs
matplotlib (``pip install "pixelz-dist[plot]"``).

Examples::

    python -m pixelz_dist.plot runs/a/snap                      # -> runs/a/snap_curves.png
    python -m pixelz_dist.plot runs/a/snap --out a.png --smoothing 0.9

Exit codes: 0 written, 2 no metrics to draw or matplotlib missing (one line ``error: ...``).
"""

from __future__ import annotations

import argparse
import sys

from .callbacks.plot_curves import DEFAULT_SMOOTHING, plot_curves
from .errors import PixelzError


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (also read by :mod:`pixelz_dist.cli.reference` for the docs)."""
    parser = argparse.ArgumentParser(prog="python -m pixelz_dist.plot", description=__doc__.split("\n")[0])
    parser.add_argument("prefix", help="the run's snapshot prefix (or log_prefix), or its *_metrics.jsonl")
    parser.add_argument("--out", metavar="PNG", help="the image written (default: PREFIX_curves.png)")
    parser.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                        help="EMA weight of the smoothed loss, in [0, 1): TensorBoard's slider (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = plot_curves(args.prefix, args.out, args.smoothing)
    except (PixelzError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
