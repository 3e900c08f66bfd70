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

__all__ = ["decode_jpeg_region", "region_decoder_agrees", "region_decoder_available"]

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


_agrees: bool | None = None


def region_decoder_agrees() -> bool:
    """Whether the region decoder is built and gives, on this machine, the pixels of the whole-image decoder.

    Both are libjpeg-turbo here, but the region decoder links the system's libjpeg while simplejpeg brings its own; a
    build against another libjpeg could round differently. So once per process a small photo-like JPEG (4:2:0, odd
    size) is decoded both ways; on any difference region decoding is switched off with one warning, and images are
    decoded whole: slower, never different.
    """
    global _agrees
    if _agrees is None:
        _agrees = _jpeg_region is not None and _self_check()
    return _agrees


def _self_check() -> bool:
    import io

    from PIL import Image

    from . import images

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:45, 0:61]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 40, (45, 61, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85, subsampling=2)
    data = buf.getvalue()
    try:
        whole = images.decode_image(data, "<region decoder self-check>", "RGB", as_tensor=True).permute(1, 2, 0)
        boxes = [(0, 0, 45, 61), (7, 9, 20, 31), (17, 33, 28, 28), (44, 60, 1, 1)]
        same = all(np.array_equal(decode_jpeg_region(data, "RGB", b), whole[b[0]:b[0] + b[2], b[1]:b[1] + b[3]].numpy())
                   for b in boxes)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        logger.warning("JPEG region decoding switched off: its self-check failed (%s: %s)", type(exc).__name__, exc)
        return False
    if not same:
        logger.warning("JPEG region decoding switched off: the system libjpeg decodes a test image differently from "
                       "%s; images are decoded whole (exact, slower)", images.jpeg_backend())
    return same
