"""``python -m pixelz_dist.prepare`` (also ``pixelz-prepare``): fill a pixel cache before training. Thin on purpose.

Example::

    python -m pixelz_dist.prepare --data data/rgb data/hint data/mask --modes RGB L L --cache-dir /scratch/pixels
    python -m pixelz_dist.train --data data/rgb data/hint data/mask --modes RGB L L --cache-dir /scratch/pixels ...
    python -m pixelz_dist.prepare --cache-dir /scratch/pixels --prune   # drop entries of deleted files, dead temps

The lossless images (PNG, TIFF, BMP, ...) are decoded once, in parallel (``--workers``, default: the CPUs this
process may use), and stored as training will read them; JPEGs are left alone. A second run stores only new or edited
files, and an edited one is stored again even when its size and modification time were put back. Exit codes: 0
done, 2 a usage error, bad folders, or files that could not be cached (named; the others are).
The work is done by :mod:`pixelz_dist.cli.fill_cache`.
"""

from __future__ import annotations

import sys

from .cli.fill_cache import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
