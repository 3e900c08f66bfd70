"""A prepared pixel cache: lossless images (PNG, TIFF, BMP, ...) inflated once, read back at memory speed, by rows.

Decoding a PNG costs milliseconds per megapixel on every epoch and no decoder is much faster than Pillow's, so the
decoded pixels are stored once, uncompressed, exactly as :func:`~pixelz_dist.data.images.fast_img_loader` returns
them, and read back with one ``pread`` of the rows a crop needs (``benchmarks/pixel_cache_formats.py`` measured raw
arrays against zstd and lz4 row blocks: raw reads fastest; the price is disk, 1 byte per pixel and channel, 2 for
16-bit). JPEG and lossy WebP are never stored: libjpeg-turbo decodes them fast, and by region.

An entry is one file ``ROOT/ab/<sha256 of path, mode, exif flag, format version>.px``: a small JSON header (the
source file's size and ``mtime_ns``, the image's mode, shape, dtype and palette), padded to 64 bytes, then the
``H x W x C`` array. An edited image gets a new size or ``mtime_ns``, so its entry no longer matches: it is decoded
again and the same entry file is replaced (one entry per file and mode, however often it is edited). Entries are
written to a temporary file in the same folder and renamed, so several ranks and DataLoader workers can fill the
cache at once and a reader never sees a partial entry; a torn or foreign file is a miss and is rewritten. A folder
that cannot be written (full disk, read-only, permissions) costs one warning per process, after which this process
only reads the cache: training goes on, with the original pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..fileio import atomic_write
from . import images
from .formats import is_lossless
from .labels import LABEL, check_lossless

__all__ = ["FORMAT_VERSION", "PixelCache", "is_lossless"]

logger = logging.getLogger(__name__)

#: Bumped whenever the entry layout changes; part of the entry name, so old entries are never misread.
FORMAT_VERSION = 1
_MAGIC = b"PXZCACHE"
_PREFIX = struct.Struct("<8sHI")  # magic, format version, length of the JSON header that follows
_ALIGN = 64  # pixels start on a 64-byte boundary
_FIRST_READ = 4096  # one read usually covers the whole header (a palette makes it ~1.6 KB)
#: Folders this process gave up writing to (one warning each), by absolute path.
_unwritable: dict[str, str] = {}


def _tensor(arr: np.ndarray) -> torch.Tensor:
    # torchvision's pil_to_tensor, on the array it would have made: HWC -> CHW view.
    return torch.as_tensor(arr).view(arr.shape[0], arr.shape[1], arr.shape[2] if arr.ndim == 3 else 1).permute(2, 0, 1)


def _pil(arr: np.ndarray, meta: dict) -> Image.Image:
    """The PIL image whose ``np.array`` is ``arr``, with the mode and palette it was decoded with."""
    mode, (h, w) = meta["pil_mode"], arr.shape[:2]
    if mode == "1":
        img = Image.frombytes("1", (w, h), arr.tobytes(), "raw", "1;8")
    else:
        img = Image.frombytes(mode, (w, h), arr.tobytes())
    if meta.get("palette") is not None:
        img.putpalette(bytes.fromhex(meta["palette"]), meta["palette_mode"])
    transparency = _transparency_from_json(meta.get("transparency"))
    if transparency is not None:
        img.info["transparency"] = transparency  # what convert("RGBA") reads: part of the decode, kept with it
    return img


def _transparency_to_json(value: Any) -> Any:
    # Pillow's forms: an int (P, L), a tuple of ints (RGB) or bytes (per palette entry).
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, tuple):
        return {"tuple": list(value)}
    return value if isinstance(value, int) else None


def _transparency_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return bytes.fromhex(value["bytes"]) if "bytes" in value else tuple(value["tuple"])
    return value


def _row_range(rows: tuple[int, int], height: int) -> tuple[int, int]:
    top, bottom, _ = slice(*rows).indices(height)  # exactly what full[:, top:bottom] would cover
    return top, max(top, bottom)


class PixelCache:
    """Decoded pixels of lossless images under ``root``, keyed by path, size, ``mtime_ns``, mode and EXIF flag.

    Picklable (it holds the folder name only; every read opens and closes its file), so a dataset holding one can go
    to DataLoader workers and ranks. Any number of processes may fill the same folder at once.

    Example::

        cache = PixelCache("/scratch/pixels")
        mask = cache.load("data/mask/0001.png", "L", as_tensor=True)              # 1 x H x W uint8
        band = cache.load("data/mask/0001.png", "L", as_tensor=True, rows=(100, 356))  # reads those rows only

    Args:
        root: The cache folder; made when the first entry is written.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def entry_path(self, path: str | os.PathLike[str], mode: str, *, exif: bool = True) -> str:
        """Where the entry of ``path`` decoded in ``mode`` lives (whether or not it exists)."""
        key = f"{os.path.abspath(os.fspath(path))}\0{mode}\0{int(exif)}\0{FORMAT_VERSION}"
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.root, digest[:2], digest[2:34] + ".px")

    def image_size(self, path: str | os.PathLike[str], mode: str, *, exif: bool = True) -> tuple[int, int] | None:
        """``(height, width)`` from a current entry's header, without reading pixels; ``None`` on a miss.

        A miss includes a missing source file (the caller reads it and gets the usual error), an edited one, and a
        file that is never cached (JPEG).
        """
        found = self._open_entry(path, mode, exif)
        if found is None:
            return None
        fd, meta, _ = found
        os.close(fd)
        return meta["shape"][0], meta["shape"][1]

    def load(
        self,
        path: str | os.PathLike[str],
        mode: str = "RGB",
        *,
        as_tensor: bool,
        rows: tuple[int, int] | None = None,
        exif: bool = True,
    ) -> Image.Image | torch.Tensor:
        """Exactly ``fast_img_loader(path, mode, as_tensor=as_tensor, exif=exif)``, from the cache when it can.

        Args:
            path: The image file.
            mode: As for :func:`~pixelz_dist.data.images.fast_img_loader`.
            as_tensor: Return a ``C x H x W`` tensor instead of a PIL image.
            rows: ``(top, bottom)``: only those rows, as ``full[:, top:bottom]``; read alone from a cache entry.
                Tensors only.
            exif: Apply the EXIF orientation (part of the entry's key).

        Raises:
            DataError: the file is missing, empty or cannot be decoded (``fast_img_loader``'s error, unchanged).
            TypeError: ``rows`` with ``as_tensor=False``.
        """
        if rows is not None and not as_tensor:
            raise TypeError("PixelCache.load(rows=...) needs as_tensor=True; HINT: crop the PIL image instead")
        images.check_mode(mode)
        found = self._open_entry(path, mode, exif)
        if found is not None:
            pixels = self._read_pixels(*found, rows)
            if pixels is not None:
                return _tensor(pixels) if as_tensor else _pil(pixels, found[1])
        key = self._source_key(path)  # before reading: an edit during the read makes the entry stale, never wrong
        data = images.read_image_file(path)
        images.jpeg_backend()
        if key is None or not is_lossless(data):
            pixels = images.decode_image(data, path, mode, as_tensor=as_tensor, exif=exif)
        else:
            img, arr, _ = self._decode_and_store(path, mode, exif, key, data)
            pixels = _tensor(arr) if as_tensor else img
        return pixels if rows is None else pixels[:, slice(*rows)]

    def fill(self, path: str | os.PathLike[str], mode: str, *, exif: bool = True) -> str:
        """Make the entry of ``path`` current; for ``python -m pixelz_dist.prepare``.

        Returns:
            ``"current"`` (nothing to do), ``"stored"``, ``"not lossless"`` (never cached) or ``"not stored"`` (this
            process cannot write the cache: see the warning).

        Raises:
            DataError: the file is missing, empty or cannot be decoded.
        """
        images.check_mode(mode)
        found = self._open_entry(path, mode, exif)
        if found is not None:
            os.close(found[0])
            return "current"
        key = self._source_key(path)
        data = images.read_image_file(path)
        if key is None or not is_lossless(data):
            if mode == LABEL:
                check_lossless(data, path)  # a lossy label file is refused here, as training would refuse it
            return "not lossless"  # not decoded either: a JPEG is checked when training reads it, as always
        images.jpeg_backend()
        return "stored" if self._decode_and_store(path, mode, exif, key, data)[2] else "not stored"

    # -- reading ------------------------------------------------------------------------------------------------------
    def _source_key(self, path: str | os.PathLike[str]) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _open_entry(self, path, mode: str, exif: bool) -> tuple[int, dict, int] | None:
        """``(fd, header, pixel offset)`` of a current, whole entry, or ``None``. The caller closes ``fd``."""
        key = self._source_key(path)
        if key is None:
            return None
        try:
            fd = os.open(self.entry_path(path, mode, exif=exif), os.O_RDONLY)
        except OSError:
            return None
        try:
            parsed = self._header(fd)
            if parsed is not None:
                meta, offset = parsed
                if (meta.get("path") == os.path.abspath(os.fspath(path)) and meta.get("mode") == mode
                        and meta.get("exif") == exif and (meta.get("size"), meta.get("mtime_ns")) == key):
                    return fd, meta, offset
        except Exception as exc:  # an unreadable or foreign file is a miss, never an error
            logger.debug("pixel cache entry for %r unreadable (%s: %s)", os.fspath(path), type(exc).__name__, exc)
        os.close(fd)
        return None

    @staticmethod
    def _header(fd: int) -> tuple[dict, int] | None:
        first = os.pread(fd, _FIRST_READ, 0)
        if len(first) < _PREFIX.size:
            return None
        magic, version, length = _PREFIX.unpack_from(first)
        if magic != _MAGIC or version != FORMAT_VERSION:
            return None
        end = _PREFIX.size + length
        raw = first[_PREFIX.size : end] if end <= len(first) else os.pread(fd, length, _PREFIX.size)
        meta = json.loads(raw)
        offset = -(-end // _ALIGN) * _ALIGN
        h, w, c = meta["shape"]
        if os.fstat(fd).st_size != offset + h * w * c * np.dtype(meta["dtype"]).itemsize:
            return None  # torn or foreign
        return meta, offset

    @staticmethod
    def _read_pixels(fd: int, meta: dict, offset: int, rows: tuple[int, int] | None) -> np.ndarray | None:
        try:
            h, w, c = meta["shape"]
            top, bottom = (0, h) if rows is None else _row_range(rows, h)
            dtype = np.dtype(meta["dtype"])
            shape = (bottom - top, w, c) if meta["channels_axis"] else (bottom - top, w)
            row_bytes = w * c * dtype.itemsize
            buf = np.empty((bottom - top) * row_bytes, np.uint8)  # read straight into the array the tensor wraps
            view, done = memoryview(buf), 0
            while done < buf.size:
                got = os.preadv(fd, [view[done:]], offset + top * row_bytes + done)
                if got <= 0:
                    return None  # shrunk under us: a miss
                done += got
            return buf.view(dtype).reshape(shape)
        except OSError:
            return None
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------------------------------
    def _decode_and_store(self, path, mode: str, exif: bool, key: tuple[int, int], data: bytes
                          ) -> tuple[Image.Image, np.ndarray, bool]:
        """fast_img_loader's PIL image of a lossless file, its array, and whether the entry was written."""
        img = images.decode_image(data, path, mode, as_tensor=False, exif=exif)
        arr = np.array(img)  # what torchvision's pil_to_tensor makes its tensor from
        stored = self.root not in _unwritable and self._store(path, mode, exif, key, img, arr)
        return img, arr, stored

    def _store(self, path, mode: str, exif: bool, key: tuple[int, int], img: Image.Image, arr: np.ndarray) -> bool:
        meta = {"path": os.path.abspath(os.fspath(path)), "size": key[0], "mtime_ns": key[1], "mode": mode,
                "exif": exif, "pil_mode": img.mode, "shape": [arr.shape[0], arr.shape[1], arr[0, 0].size],
                "channels_axis": arr.ndim == 3, "dtype": arr.dtype.str, "palette": None, "palette_mode": None}
        if img.mode in ("P", "PA") and img.palette is not None:
            meta["palette_mode"] = img.palette.mode
            meta["palette"] = img.palette.tobytes().hex()
        meta["transparency"] = _transparency_to_json(img.info.get("transparency"))
        header = json.dumps(meta, separators=(",", ":")).encode("utf-8", "surrogateescape")
        prefix = _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header)) + header
        prefix += b" " * (-len(prefix) % _ALIGN)
        entry = self.entry_path(path, mode, exif=exif)
        try:
            # durable=False: the entry can always be made again, and fsync per image would slow filling a lot.
            with atomic_write(entry, durable=False) as f:
                f.write(prefix)
                f.write(np.ascontiguousarray(arr).data)
            return True
        except OSError as exc:
            _unwritable[self.root] = f"{type(exc).__name__}: {exc.strerror or exc}"
            logger.warning(
                "pixel cache %r cannot be written (%s); training goes on without storing images there (entries "
                "already in it are still read). HINT: free space or fix the folder's permissions, or pick another "
                "--cache-dir", self.root, _unwritable[self.root])
            return False
