"""Decode only a box of a JPEG: libjpeg-turbo skips the rows above it, converts only its columns and stops below it.

A random crop keeps a fraction of the decoded pixels; this decodes (mostly) that fraction. The work is done by the
optional C extension ``_jpeg_region`` (built against the system libjpeg; see setup.py). Without it
:func:`region_decoder_available` is False and callers decode whole images.

At ``scale_denom=1`` the box is bit for bit the whole decode cut to the box (the one libjpeg-turbo gives through
simplejpeg, and Pillow): the C side decodes one iMCU of margin around the box, because skipping rows and cropping
columns restart chroma upsampling at the edge of what is decoded. With ``scale_denom`` k in {2, 4, 8} libjpeg scales
in the DCT domain to ``ceil(H / k) x ceil(W / k)`` and the result covers rows ``floor(top / k) .. ceil((top + h) / k)``
and columns ``floor(left / k) .. ceil((left + w) / k)`` of that image: the smallest window that holds the box.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["decode_jpeg_region", "region_decoder_available"]

logger = logging.getLogger(__name__)

try:
    from . import _jpeg_region
except ImportError as exc:  # built without a compiler or libjpeg's headers: whole decodes only
    _jpeg_region = None
    logger.debug("JPEG region decoding unavailable (%s); images are decoded whole", exc)

_FORMATS = ("RGB", "GRAY", "RGBX")
_SCALES = (1, 2, 4, 8)
_MARGIN_IMCUS = 1  # iMCUs decoded around the box and cut away: what makes the box exact (see the module docstring)


def region_decoder_available() -> bool:
    """Whether the C extension is built, i.e. whether :func:`decode_jpeg_region` can be called."""
    return _jpeg_region is not None


def decode_jpeg_region(
    data: bytes, fmt: str, box: tuple[int, int, int, int], scale_denom: int = 1
) -> np.ndarray:
    """Decode one box of a JPEG.

    Args:
        data: the JPEG file's bytes (any bytes-like object).
        fmt: ``"RGB"``, ``"GRAY"`` (the luma plane of a colour file) or ``"RGBX"`` (X = 255), as the other backends.
        box: ``(top, left, height, width)`` in full-resolution pixels, inside the image.
        scale_denom: 1, 2, 4 or 8: decode at 1/scale_denom in the DCT domain (see the module docstring for the window).

    Returns:
        An ``H x W x C`` uint8 array (C = 3, 1 or 4) over a buffer of its own.

    Raises:
        ValueError: a bad argument, a box outside the image, or data libjpeg cannot decode without a warning (corrupt,
            truncated, not a JPEG); the message says which.
        RuntimeError: the extension is not built (check :func:`region_decoder_available` first).
    """
    if _jpeg_region is None:
        raise RuntimeError(
            "pixelz_dist.data._jpeg_region is not built; check region_decoder_available() before calling, or "
            "reinstall with a C compiler and libjpeg's headers (Debian: apt-get install gcc libjpeg62-turbo-dev)"
        )
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, not {fmt!r}")
    if scale_denom not in _SCALES:
        raise ValueError(f"scale_denom must be one of {_SCALES}, not {scale_denom!r}")
    top, left, height, width = (int(v) for v in box)
    buf, out_h, out_w, channels = _jpeg_region.decode_region(
        data, fmt, top, left, height, width, scale_denom, _MARGIN_IMCUS
    )
    return np.frombuffer(buf, dtype=np.uint8).reshape(out_h, out_w, channels)
