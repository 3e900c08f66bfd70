"""A prepared pixel cache: lossless images (PNG, TIFF, BMP, ...) inflated once, read back at memory speed, by rows.

Decoding a PNG costs milliseconds per megapixel on every epoch and no decoder is much faster than Pillow's, so the
decoded pixels are stored once, uncompressed, exactly as :func:`~pixelz_dist.data.images.fast_img_loader` returns
them, and read back with one ``pread`` of the rows a crop needs (``benchmarks/pixel_cache_formats.py`` measured raw
arrays against zstd and lz4 row blocks: raw reads fastest; the price is disk, 1 byte per pixel and channel, 2 for
16-bit). JPEG and lossy WebP are never stored: libjpeg-turbo decodes them fast, and by region.

An entry is one file ``ROOT/ab/<sha256 of path, mode, exif flag, format version>.px``: a small JSON header (the
source file's path, size, ``mtime_ns``, inode and ``ctime_ns``, the decoder's version, the image's mode, shape, dtype
and palette), padded to 64 bytes, then the ``H x W x C`` array. Any change of the source file makes its entry a miss:
it is decoded again and the same entry file is replaced (one entry per file and mode, however often it is edited).
Size and ``mtime_ns`` alone miss a file rewritten at the same size whose time was put back (``cp -p``, ``tar -x``,
``rsync -t``, ``os.utime``); the change time cannot be put back (only the kernel sets it, to now, on every write,
``utime``, rename or ``chmod``) and a file replaced by another has another inode. The price: a copy of the dataset or
a ``chmod -R`` makes every entry a miss once. Entries of another decoder (:func:`decoder_version`) are misses too.

Entries are written to a temporary file in the same folder and renamed, so several ranks and DataLoader workers can
fill the cache at once and a reader never sees a partial entry; a torn or foreign file is a miss and is rewritten. A
folder that cannot be written (full disk, read-only, permissions) costs one warning per process, after which this
process only reads the cache: training goes on, with the original pixels. :meth:`PixelCache.prune` removes entries
whose source file is gone, entries of an older format, and temporary files of killed writers
(``python -m pixelz_dist.prepare --prune``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from ..fileio import atomic_write
from . import images
from .formats import is_lossless
from .labels import LABEL, check_lossless

__all__ = ["FORMAT_VERSION", "PixelCache", "PruneSummary", "STALE_TEMP_SECONDS", "decoder_version", "is_lossless"]

logger = logging.getLogger(__name__)

#: Bumped whenever the entry layout changes; part of the entry name, so old entries are never misread.
#: 2: the source's inode, ctime_ns and the decoder's version in the header.
FORMAT_VERSION = 2
#: A temporary entry file this old is a killed writer's: a live one writes its file in one go right after decoding,
#: so its modification time is seconds old. Removing a live writer's file would not harm it either: its rename fails
#: and that entry is simply not stored (see ``_store``).
STALE_TEMP_SECONDS = 3600
_KEY_FIELDS = ("size", "mtime_ns", "ino", "ctime_ns")
_MAGIC = b"PXZCACHE"
_PREFIX = struct.Struct("<8sHI")  # magic, format version, length of the JSON header that follows
_ALIGN = 64  # pixels start on a 64-byte boundary
_FIRST_READ = 4096  # one read usually covers the whole header (a palette makes it ~1.6 KB)
#: Folders this process gave up writing to (one warning each), by absolute path.
_unwritable: dict[str, str] = {}


def decoder_version() -> str:
    """What decodes the pixels this cache stores; an entry written under another is a miss.

    Our decoding code's :data:`~pixelz_dist.data.images.DECODE_VERSION`, and Pillow's version: Pillow decodes every
    lossless format (JPEGs are never cached) and does the mode conversions (RGB -> L rounding, palettes, 16-bit) and
    the EXIF rotation, which have changed between its releases; its wheels carry the codecs (zlib, libtiff, libwebp).
    libjpeg-turbo's version does not matter here, for the same reason.
    """
    return f"pixelz_dist decode {images.DECODE_VERSION}; Pillow {PIL.__version__}"


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


@dataclass
class PruneSummary:
    """What :meth:`PixelCache.prune` removed: entries (by why) and temporary files, with their bytes."""

    gone: int = 0  # entries whose source file no longer exists
    old: int = 0  # entries of another format version, or unreadable
    entry_bytes: int = 0
    temps: int = 0  # temporary files of killed writers
    temp_bytes: int = 0


def _is_hex(name: str) -> bool:
    return all(c in "0123456789abcdef" for c in name)


class PixelCache:
    """Decoded pixels of lossless images under ``root``, keyed by path, mode and EXIF flag, checked against the file's
    size, ``mtime_ns``, inode and ``ctime_ns`` and the decoder's version.

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

    def prune(self, temp_age: float = STALE_TEMP_SECONDS) -> PruneSummary:
        """Remove what no reader will use again; for ``python -m pixelz_dist.prepare --prune``.

        That is: entries whose source file is gone (the path in their header no longer exists), entries of another
        format version or that cannot be read, and temporary files not modified for ``temp_age`` seconds (left by a
        killed writer; see :data:`STALE_TEMP_SECONDS`). Only the files this cache writes are looked at (``ab/<32 hex
        digits>.px`` and their hidden ``.tmp`` files); an entry whose source cannot be checked (permission denied, a
        stale NFS handle, an I/O error) is kept. Run it where every source path is visible: an entry of a folder that
        is not mounted here counts as gone. Safe while other processes read and fill the cache.
        """
        summary, now = PruneSummary(), time.time()
        try:
            with os.scandir(self.root) as it:
                folders = [e.path for e in it
                           if len(e.name) == 2 and _is_hex(e.name) and e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return summary
        for folder in folders:
            with os.scandir(folder) as it:
                files = [e for e in it if e.is_file(follow_symlinks=False)]
            for e in files:
                try:
                    st = e.stat(follow_symlinks=False)
                    if e.name.endswith(".px") and len(e.name) == 35 and _is_hex(e.name[:32]):
                        why = self._prune_reason(e.path)
                        if why is None:
                            continue
                        os.unlink(e.path)
                        setattr(summary, why, getattr(summary, why) + 1)
                        summary.entry_bytes += st.st_size
                    elif e.name.startswith(".") and e.name.endswith(".tmp") and ".px." in e.name:
                        if now - st.st_mtime < temp_age:
                            continue  # a live writer's, possibly
                        os.unlink(e.path)
                        summary.temps += 1
                        summary.temp_bytes += st.st_size
                except FileNotFoundError:
                    continue  # replaced or removed meanwhile
        return summary

    @classmethod
    def _prune_reason(cls, entry: str) -> str | None:
        """``"gone"`` (its source file no longer exists), ``"old"`` (another format, or unreadable) or ``None``."""
        fd = os.open(entry, os.O_RDONLY)
        try:
            parsed = cls._header(fd)
        except Exception:
            parsed = None
        finally:
            os.close(fd)
        if parsed is None or not isinstance(parsed[0].get("path"), str):
            return "old"
        try:
            os.stat(parsed[0]["path"])
        except (FileNotFoundError, NotADirectoryError):
            return "gone"
        except OSError:
            return None  # cannot tell: keep it
        return None

    # -- reading ------------------------------------------------------------------------------------------------------
    def _source_key(self, path: str | os.PathLike[str]) -> tuple[int, ...] | None:
        """The source file's state, in the order of ``_KEY_FIELDS``; ``None`` when it cannot be stat'ed."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns

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
                        and meta.get("exif") == exif and tuple(meta.get(k) for k in _KEY_FIELDS) == key
                        and meta.get("decoder") == decoder_version()):
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
    def _decode_and_store(self, path, mode: str, exif: bool, key: tuple[int, ...], data: bytes
                          ) -> tuple[Image.Image, np.ndarray, bool]:
        """fast_img_loader's PIL image of a lossless file, its array, and whether the entry was written."""
        img = images.decode_image(data, path, mode, as_tensor=False, exif=exif)
        arr = np.array(img)  # what torchvision's pil_to_tensor makes its tensor from
        stored = self.root not in _unwritable and self._store(path, mode, exif, key, img, arr)
        return img, arr, stored

    def _store(self, path, mode: str, exif: bool, key: tuple[int, ...], img: Image.Image, arr: np.ndarray) -> bool:
        meta = {"path": os.path.abspath(os.fspath(path)), **dict(zip(_KEY_FIELDS, key)), "decoder": decoder_version(),
                "mode": mode, "exif": exif, "pil_mode": img.mode, "shape": [arr.shape[0], arr.shape[1], arr[0, 0].size],
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
        except FileNotFoundError as exc:  # our temporary file or folder was pruned meanwhile: a lost race, not a fault
            logger.debug("pixel cache entry for %r not stored (%s)", os.fspath(path), exc)
            return False
        except OSError as exc:
            _unwritable[self.root] = f"{type(exc).__name__}: {exc.strerror or exc}"
            logger.warning(
                "pixel cache %r cannot be written (%s); training goes on without storing images there (entries "
                "already in it are still read). HINT: free space or fix the folder's permissions, or pick another "
                "--cache-dir", self.root, _unwritable[self.root])
            return False
