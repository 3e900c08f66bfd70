"""Fast image decoding: JPEG through libjpeg-turbo, everything else through Pillow, same pixels as Pillow.

Decoding is what starves a GPU when every sample is several photographs. Pillow's ``Image.open(p).convert("RGB")``
pays for a Python file object, a full-size copy and, at a few megapixels, a slow allocator path; a direct
libjpeg-turbo call does not. This module reads the file once, parses the JPEG markers itself (size, components,
EXIF orientation: a few microseconds), and hands the bytes to the fastest installed libjpeg-turbo binding. Anything
the fast path does not cover (PNG, TIFF, CMYK or 12-bit JPEG, ...) or fails on goes through Pillow, so the result
and the errors are Pillow's.

Backends, in the order measured fastest here (``benchmarks/DECODE.md``; all give Pillow's pixels at default
settings): ``simplejpeg`` (a declared dependency, libjpeg-turbo inside its wheel), ``turbojpeg`` (PyTurboJPEG 1.x,
needs the system ``libturbojpeg``), ``jpeg4py`` (needs the system ``libturbojpeg``), then ``pil``. Force one with
``set_jpeg_backend(name)`` or, for every process including DataLoader workers started with ``spawn``, the environment
variable ``PIXELZ_JPEG_BACKEND``. A backend that is missing or fails its start-up self-check is skipped with a
warning, never an error. torchvision.io's decoder is not offered: torchvision 0.29 deprecates it.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError
from .labels import LABEL, decode_label

__all__ = ["BACKENDS", "DECODE_VERSION", "ENV_VAR", "check_mode", "fast_img_loader", "jpeg_backend",
           "set_jpeg_backend"]

logger = logging.getLogger(__name__)

#: Bumped whenever a change to this module or :mod:`.labels` can change the pixels of a lossless image: the pixel
#: cache keys its entries on it (:func:`~pixelz_dist.data.pixel_cache.decoder_version`), so it never serves an older
#: decode.
DECODE_VERSION = 1
#: Environment variable read when the backend is first needed: a name from :data:`BACKENDS` or ``auto``.
ENV_VAR = "PIXELZ_JPEG_BACKEND"
#: JPEG backends, fastest first as measured by ``benchmarks/decode_throughput.py``; ``pil`` always works.
BACKENDS = ("simplejpeg", "turbojpeg", "jpeg4py", "pil")

#: Modes beyond Pillow's own: ``auto`` keeps grey and high-bit-depth images and makes the rest RGB (masks and depth
#: maps stay meaningful); ``unchanged`` keeps the decoded mode (palette masks keep their class indices); ``label``
#: reads class-index maps exactly and refuses colour and lossy files (:mod:`.labels`).
_SPECIAL_MODES = ("auto", "unchanged", LABEL)
#: Modes the libjpeg-turbo fast path serves; others (CMYK, YCbCr, ...) go through Pillow.
FAST_MODES = ("RGB", "L", "auto", "unchanged")
_AUTO_KEEP = frozenset({"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_PIL_MODES = frozenset(Image.MODES) | _AUTO_KEEP
#: ImageOps.exif_transpose's table, so both paths rotate the same way.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

Decoder = Callable[[bytes, str], np.ndarray]  # (jpeg bytes, "RGB" | "RGBX" | "GRAY") -> H x W x C uint8
_active: dict[str, object] = {"name": None, "decode": None}


def _load_simplejpeg() -> tuple[Decoder, str]:
    import simplejpeg

    def decode(data: bytes, fmt: str) -> np.ndarray:
        # strict (the default) raises on libjpeg warnings such as a truncated file; Pillow then decides.
        return simplejpeg.decode_jpeg(data, colorspace=fmt)

    return decode, f"simplejpeg {getattr(simplejpeg, '__version__', '?')}"


def _load_turbojpeg() -> tuple[Decoder, str]:
    import turbojpeg

    tj = turbojpeg.TurboJPEG()  # loads the system libturbojpeg; PyTurboJPEG 2.x needs libjpeg-turbo >= 3.0
    fmts = {"RGB": turbojpeg.TJPF_RGB, "RGBX": turbojpeg.TJPF_RGBX, "GRAY": turbojpeg.TJPF_GRAY}

    def decode(data: bytes, fmt: str) -> np.ndarray:
        # PyTurboJPEG reports libjpeg warnings (truncated data, ...) with warnings.warn and returns the damaged
        # image: make them errors so the file goes to Pillow, like the other backends.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return tj.decode(data, pixel_format=fmts[fmt])

    return decode, f"PyTurboJPEG {getattr(turbojpeg, '__version__', '?')} (system libturbojpeg)"


def _load_jpeg4py() -> tuple[Decoder, str]:
    import jpeg4py

    fmts = {"RGB": jpeg4py.TJPF_RGB, "RGBX": jpeg4py.TJPF_RGBX, "GRAY": jpeg4py.TJPF_GRAY}

    def decode(data: bytes, fmt: str) -> np.ndarray:
        out = jpeg4py.JPEG(np.frombuffer(data, np.uint8)).decode(pixfmt=fmts[fmt])
        return out[:, :, None] if out.ndim == 2 else out

    return decode, "jpeg4py (system libturbojpeg)"


_LOADERS: dict[str, Callable[[], tuple[Decoder, str]]] = {
    "simplejpeg": _load_simplejpeg,
    "turbojpeg": _load_turbojpeg,
    "jpeg4py": _load_jpeg4py,
}


def _self_check(decode: Decoder) -> None:
    # A binding can import and still be unusable (jpeg4py without libturbojpeg.so.0, an ABI mismatch): decode a tiny
    # JPEG and compare it with Pillow before trusting it with a training run.
    yy, xx = np.mgrid[0:16, 0:24]
    ref = np.stack([xx * 10, yy * 15, (xx + yy) * 6], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ref).save(buf, "JPEG", quality=90)
    with Image.open(buf) as img:
        expected = np.asarray(img.convert("RGB"), dtype=np.int16)
    got = decode(buf.getvalue(), "RGB")
    if got.shape != expected.shape or np.abs(got.astype(np.int16) - expected).max() > 1:
        raise RuntimeError("its pixels differ from Pillow's on a test image")


def check_mode(mode: str) -> str:
    """Return ``mode`` if :func:`fast_img_loader` accepts it.

    Raises:
        ConfigError: it does not, with the accepted values.
    """
    if mode not in _SPECIAL_MODES and mode not in _PIL_MODES:
        raise ConfigError(f"unknown image mode {mode!r}; HINT: use 'RGB', 'L', 'auto', 'unchanged', 'label' (class "
                          "indices) or a Pillow mode")
    return mode


def set_jpeg_backend(name: str | None = None) -> str:
    """Choose the JPEG decoder of this process, falling back along :data:`BACKENDS` when it cannot be used.

    Args:
        name: A name from :data:`BACKENDS`, ``"auto"`` (fastest installed), or ``None`` to read ``PIXELZ_JPEG_BACKEND``
            (unset: ``auto``). DataLoader workers started by ``fork`` inherit the choice; ``spawn`` ones read the
            environment variable again.

    Returns:
        The backend actually in use, so a caller that needs a particular one can check.

    Raises:
        ConfigError: ``name`` (or the environment variable) is not a known backend.
    """
    source = "argument"
    if name is None:
        name, source = os.environ.get(ENV_VAR, "").strip() or "auto", ENV_VAR
    name = name.lower()
    if name not in BACKENDS and name != "auto":
        raise ConfigError(
            f"unknown JPEG backend {name!r} (from {source}); HINT: use one of {', '.join(BACKENDS)} or 'auto'"
        )
    order = [n for n in BACKENDS if n != name]
    if name != "auto":
        order.insert(0, name)
    decode, label = None, "Pillow"
    for candidate in order:
        if candidate == "pil":
            name = "pil"
            break
        try:
            decode, label = _LOADERS[candidate]()
            _self_check(decode)
        except Exception as exc:  # ImportError, OSError from a missing shared library, the self-check, ...
            # Loud for the backend asked for and for simplejpeg (a declared dependency); optional ones are quiet.
            log = logger.warning if candidate in (name, "simplejpeg") else logger.debug
            log("JPEG backend %s unavailable (%s: %s); trying the next one", candidate, type(exc).__name__, exc)
            decode, label = None, "Pillow"
            continue
        name = candidate
        break
    _active["name"], _active["decode"] = name, decode
    in_worker = torch.utils.data.get_worker_info() is not None
    (logger.debug if in_worker else logger.info)("JPEG decoding with %s", label)
    return name


def jpeg_backend() -> str:
    """Name of the JPEG backend in use, choosing it (and logging it once) on first use."""
    if _active["name"] is None:
        set_jpeg_backend(None)
    return _active["name"]  # type: ignore[return-value]


def _exif_orientation(data: bytes, start: int, end: int) -> int:
    """Orientation tag (1..8) of the TIFF structure in ``data[start:end]``; 1 when absent or unreadable."""
    tiff = data[start:end]
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(tiff[:4])
    if order is None:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            kind = int.from_bytes(tiff[entry + 2 : entry + 4], order)
            size = {3: 2, 4: 4}.get(kind)  # SHORT as the standard says, LONG as some writers do
            value = int.from_bytes(tiff[entry + 8 : entry + 8 + size], order) if size else 1
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, components, orientation)`` of an 8-bit grey or colour JPEG libjpeg-turbo can take.

    ``None`` sends the file to Pillow: not a JPEG, CMYK/YCCK (Adobe's inverted CMYK needs Pillow's handling),
    12-bit, lossless or arithmetic-coded, or markers this parser does not understand.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end, orientation, exif_seen = 2, len(data), 1, False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        seg = pos + 4
        nxt = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and not exif_seen and data.startswith(b"Exif\x00\x00", seg):
            exif_seen = True  # Pillow, too, reads only the first Exif segment
            orientation = _exif_orientation(data, seg + 6, nxt)
        elif marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive (Huffman)
            if seg + 6 > end or data[seg] != 8 or data[seg + 5] not in (1, 3):
                return None
            height = int.from_bytes(data[seg + 1 : seg + 3], "big")
            width = int.from_bytes(data[seg + 3 : seg + 5], "big")
            return width, height, data[seg + 5], orientation
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another frame type, or scan data before any frame header
        pos = nxt
    return None


def _orient_hwc(t: torch.Tensor, orientation: int) -> torch.Tensor:
    # The tensor twins of _TRANSPOSE on an H x W x C tensor (checked against ImageOps.exif_transpose in the tests).
    if orientation in (2, 3):
        t = t.flip(1)
    if orientation in (3, 4):
        t = t.flip(0)
    if orientation == 5:
        t = t.transpose(0, 1)
    elif orientation == 6:
        t = t.rot90(-1, (0, 1))
    elif orientation == 7:
        t = t.flip((0, 1)).transpose(0, 1)
    elif orientation == 8:
        t = t.rot90(1, (0, 1))
    return t


def _decode_fast(decode: Decoder, data: bytes, header: tuple, mode: str, as_tensor: bool, fast_grey: bool, exif: bool):
    components, orientation = header[2:]
    if mode in _SPECIAL_MODES:
        mode = "L" if components == 1 else "RGB"
    if mode == "RGB":
        arr = decode(data, "RGB")  # a grey JPEG comes out replicated, as Pillow's convert("RGB") does
    elif components == 1 or fast_grey:
        arr = decode(data, "GRAY")  # the luma plane as stored: exact for grey files, Pillow's draft("L") otherwise
    else:
        # Pillow's own RGB -> L rounding, on a zero-copy view of an RGBX decode (Pillow stores RGB as 4 bytes).
        rgbx = np.ascontiguousarray(decode(data, "RGBX"))  # no-op for a whole decode; a region may be a view
        grey = Image.frombuffer("RGBX", rgbx.shape[1::-1], rgbx, "raw", "RGBX", 0, 1).convert("L")
        if not as_tensor:
            return grey.transpose(_TRANSPOSE[orientation]) if exif and orientation != 1 else grey
        del rgbx  # freed before the copy below: a lower peak lets the allocator reuse memory (1.5x faster at 4 MP)
        arr = np.array(grey)[:, :, None]
    if not exif:
        orientation = 1
    if as_tensor:
        return _orient_hwc(torch.from_numpy(arr), orientation).permute(2, 0, 1)
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return img.transpose(_TRANSPOSE[orientation]) if orientation != 1 else img


def _decode_pil(data: bytes, mode: str, as_tensor: bool, fast_grey: bool, exif: bool):
    with Image.open(io.BytesIO(data)) as img:
        if fast_grey and mode == "L" and img.format == "JPEG":
            img.draft("L", img.size)
        img.load()
        if exif:
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception as exc:  # unreadable EXIF: keep the stored orientation, as the JPEG fast path does
                logger.debug("ignoring unreadable EXIF data (%s: %s)", type(exc).__name__, exc)
        if mode == "auto":
            mode = img.mode if img.mode in _AUTO_KEEP else "RGB"
        if mode != "unchanged" and img.mode != mode:
            img = img.convert(mode)
    return _pil_to_tensor(img) if as_tensor else img


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(img)


def fast_img_loader(
    path: str | os.PathLike[str],
    mode: str = "RGB",
    *,
    as_tensor: bool = False,
    fast_grey: bool = False,
    exif: bool = True,
) -> Image.Image | torch.Tensor:
    """Decode an image file as fast as the installed libjpeg-turbo bindings allow, with Pillow's pixels.

    JPEG goes through the backend of :func:`jpeg_backend`; other formats, CMYK and 12-bit JPEG, and any file the
    fast decoder rejects go through Pillow, so what decodes with Pillow decodes here and what Pillow rejects is an
    error here too.

    EXIF policy: with ``exif=True`` (default) an Orientation tag is applied exactly like
    ``ImageOps.exif_transpose``, so the pixels come out upright as viewers show them. Pass ``exif=False`` when the
    labels were drawn on the stored, unrotated pixels.

    Args:
        path: The image file.
        mode: ``"RGB"``, ``"L"``, ``"auto"`` (keep grey, 16-bit and float images, make everything else RGB),
            ``"unchanged"`` (as decoded: palette masks keep their indices), ``"label"`` (class indices exactly as
            stored, as an ``L`` or int32 ``I`` image; colour and lossy files are a ``DataError``: see
            :mod:`~pixelz_dist.data.labels`), or any other Pillow mode.
        as_tensor: Return a ``C x H x W`` tensor (uint8 for 8-bit modes, as torchvision's ``pil_to_tensor``) straight
            from the decoder's buffer instead of a PIL image.
        fast_grey: With ``mode="L"``, take a colour JPEG's luma plane as stored instead of decoding colour and
            converting: about twice as fast, but grey levels differ from ``convert("L")`` by a few units.
        exif: Apply the EXIF orientation.

    Returns:
        A PIL image, or a tensor with ``as_tensor=True``.

    Raises:
        DataError: the file cannot be read or decoded, or (``mode="label"``) is not a class-index map; the message
            names it and the cause is chained.
        ConfigError: unknown ``mode`` or ``PIXELZ_JPEG_BACKEND``.
    """
    check_mode(mode)
    jpeg_backend()
    return decode_image(read_image_file(path), path, mode, as_tensor=as_tensor, fast_grey=fast_grey, exif=exif)


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file; a missing, unreadable or empty file is a ``DataError`` that names it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read image {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    if not data:
        raise DataError(f"cannot decode image {os.fspath(path)!r}: the file is empty (0 bytes). HINT: the copy or "
                        "download that made it was cut short: replace it, or skip bad files (on_error='skip', "
                        "--on-bad-file skip)")
    return data


def decode_image(
    data: bytes, path: str | os.PathLike[str], mode: str, *, as_tensor: bool, fast_grey: bool = False, exif: bool = True
) -> Image.Image | torch.Tensor:
    """:func:`fast_img_loader` on bytes already read (``path`` names the file in errors); ``mode`` already checked."""
    if mode == LABEL:  # never the JPEG fast path: a JPEG label file is refused, whatever the backend
        img = decode_label(data, path, exif)
        return _pil_to_tensor(img) if as_tensor else img
    try:
        decode = _active["decode"]
        if decode is not None and mode in FAST_MODES:
            header = _jpeg_header(data)
            if header is not None:
                try:
                    return _decode_fast(decode, data, header, mode, as_tensor, fast_grey, exif)
                except Exception as exc:
                    logger.debug("%s could not decode %r (%s); retrying with Pillow", _active["name"], os.fspath(path),
                                 exc)
        return _decode_pil(data, mode, as_tensor, fast_grey, exif)
    except Exception as exc:
        raise DataError(f"cannot decode image {os.fspath(path)!r}: {type(exc).__name__}: {exc}") from exc
