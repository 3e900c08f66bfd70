"""A sample's images opened for a crop: each one's size is known before its pixels are, then only the box is read.

Three kinds, chosen per file by :func:`open_source`:

* a JPEG that libjpeg-turbo can decode by region (:mod:`.jpeg_region`): the size comes from the file header, rows
  above the box are skipped, columns outside it are not converted, rows below it are never decoded;
* an image in the prepared pixel cache (:mod:`.pixel_cache`): the size from the entry's header, only the box's rows
  read;
* anything else: decoded whole, as before, and the box cut out of it.

The pixels of a box are those of the whole decode cut to the box (tested bit for bit); a file the region decoder
rejects is decoded whole the usual way, so a damaged file fails (or falls back to Pillow) exactly as it always did.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from . import images

if TYPE_CHECKING:
    from .crop_plan import Box  # torchvision behind it: imported by who crops

__all__ = ["open_source"]

logger = logging.getLogger(__name__)

_EOI = b"\xff\xd9"


class WholeImage:
    """An image decoded in full; a box is a view of it."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels
        self.size: tuple[int, int] = tuple(pixels.shape[-2:])

    def read(self, box: Box, scale: int = 1) -> tuple[torch.Tensor, bool]:
        if box.is_whole(*self.size):
            return self.pixels, False
        return self.pixels[:, box.top : box.top + box.height, box.left : box.left + box.width], False


class JpegRegion:
    """A JPEG whose box is decoded by libjpeg-turbo alone (``scale`` > 1: at 1/scale, in the DCT domain)."""

    def __init__(self, data: bytes, path: str, header: tuple, mode: str) -> None:
        self.data, self.path, self.header, self.mode = data, path, header, mode
        self.size = (header[1], header[0])

    def read(self, box: Box, scale: int = 1) -> tuple[torch.Tensor, bool]:
        if scale == 1 and box.is_whole(*self.size):
            return images.decode_image(self.data, self.path, self.mode, as_tensor=True), False
        region = partial(_region_decoder, box=(box.top, box.left, box.height, box.width), scale=scale)
        try:
            return images._decode_fast(region, self.data, self.header, self.mode, True, False, True), scale > 1
        except Exception as exc:  # damaged data, an unusual file: the whole decode decides, exactly as before
            logger.debug("region decode of %r failed (%s: %s); decoding it whole", self.path, type(exc).__name__, exc)
        whole = WholeImage(images.decode_image(self.data, self.path, self.mode, as_tensor=True))
        return whole.read(box)


def _region_decoder(data: bytes, fmt: str, *, box: tuple[int, int, int, int], scale: int) -> Any:
    from .jpeg_region import decode_jpeg_region

    out = decode_jpeg_region(data, fmt, box, scale)
    if scale == 1:
        return out
    # The decoder covers floor(start / k) .. ceil(end / k); rounding both ends instead halves the largest shift of
    # the window against the exact one (k - 1 -> k / 2 full-resolution pixels).
    top, left, height, width = box
    r0, c0 = top // scale, left // scale
    rows = slice(round(top / scale) - r0, max(round((top + height) / scale) - r0, round(top / scale) - r0 + 1))
    cols = slice(round(left / scale) - c0, max(round((left + width) / scale) - c0, round(left / scale) - c0 + 1))
    return out[rows, cols]


class CachedImage:
    """An image in the pixel cache: only the box's rows are read."""

    def __init__(self, cache: Any, path: str, mode: str, size: tuple[int, int]) -> None:
        self.cache, self.path, self.mode, self.size = cache, path, mode, size

    def read(self, box: Box, scale: int = 1) -> tuple[torch.Tensor, bool]:
        rows = self.cache.load(self.path, self.mode, as_tensor=True, rows=(box.top, box.top + box.height))
        return rows[:, :, box.left : box.left + box.width], False


def open_source(
    path: str, mode: str, *, cache: Any = None, regions: bool = True
) -> WholeImage | JpegRegion | CachedImage:
    """Open one image of a sample for a crop; reads the file (or its cache entry's header) but decodes only what
    has to be decoded now.

    Raises:
        DataError: the file is missing, unreadable or empty, or (decoded whole) cannot be decoded; names the file.
    """
    if cache is not None:
        size = cache.image_size(path, mode)
        if size is not None:
            return CachedImage(cache, path, mode, size)
    data = images.read_image_file(path)
    if regions and images._active["decode"] is not None and mode in images.FAST_MODES:
        header = images._jpeg_header(data)
        # Orientation 1 only (a rotated file's box would need mapping); EOI near the end: a truncated file is decoded
        # whole, so it fails as it always did instead of passing when the box lies above the cut.
        if header is not None and header[3] == 1 and _EOI in data[-64:]:
            return JpegRegion(data, path, header, mode)
    if cache is not None and not data.startswith(b"\xff\xd8"):
        return WholeImage(cache.load(path, mode, as_tensor=True))  # a miss: decodes and stores it
    return WholeImage(images.decode_image(data, os.fspath(path), mode, as_tensor=True))
