"""Class-index maps, ``mode="label"``: the integers a segmentation loss needs, exactly as stored, never scaled.

A mask of class indices 0..4 saved as a PNG reads as something else through every image path: ``convert("RGB")``
gives its palette's colours, ``ToDtype(float32, scale=True)`` gives k/255 (which ``.long()`` makes all class 0),
bilinear resizing invents fractional classes, and a JPEG's compression blurs class edges into values of other
classes. A ``label`` folder is therefore read on a path of its own:

* decoding keeps the stored integers: a palette image's indices (never the palette's colours), grey levels, 16- and
  32-bit values, 1-bit as 0/1. The decoded image is ``L`` (8-bit files) or ``I`` (int32: 16- and 32-bit files), so
  the pixel cache and the crop-aware path store and cut it like any other image;
* a file whose values are not the classes is refused with a :class:`~pixelz_dist.errors.DataError` naming it: a
  colour image (RGB, RGBA, CMYK, ...), a float image, or a lossy one (JPEG, lossy WebP, JPEG-compressed TIFF).
  Nothing is converted silently;
* :class:`~pixelz_dist.data.multi_images.MultiImgsDataset` treats the folder as a mask in a joint v2 transform
  (nearest-neighbour geometry, never colour-jittered or rescaled) and returns each label map as an **int64 H x W**
  tensor, so a batch is ``B x H x W``: what ``F.cross_entropy(logits, target)`` takes, and what torchvision's
  references/segmentation make (``torch.as_tensor(target, dtype=torch.int64)`` on the palette PNG).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError
from .formats import lossy_kind

__all__ = ["LABEL", "LABEL_FILE_MODES", "check_lossless", "decode_label", "to_label_tensor"]

logger = logging.getLogger(__name__)

#: The mode name, for ``modes=[...]`` and ``--modes``.
LABEL = "label"
#: Pillow modes whose pixels are integers: palette indices, grey, 1-bit, 16-bit and 32-bit.
LABEL_FILE_MODES = frozenset({"P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_HINT = ("HINT: store one class index per pixel in a lossless one-channel file: a PNG in mode P (palette: its "
         "indices are used, its colours ignored), L (0..255) or I;16 (0..65535), e.g. "
         "Image.fromarray(classes.astype(np.uint8)).save('x.png')")


def check_lossless(data: bytes, path: str | os.PathLike[str]) -> None:
    """Refuse a lossy file in a label folder, with what it is and what to do.

    Raises:
        DataError: the file is a JPEG, a lossy WebP, a JPEG-compressed TIFF or a format not known to be lossless.
    """
    kind = lossy_kind(data)
    if kind is not None:
        raise DataError(f"label image {os.fspath(path)!r} is {kind}: lossy compression changes pixel values, so "
                        "they are not the class indices that were drawn (edges blur into other classes) and are "
                        f"never converted. {_HINT}, made from the original annotations (re-saving this file keeps "
                        "its errors)")


def decode_label(data: bytes, path: str | os.PathLike[str], exif: bool = True) -> Image.Image:
    """The class indices of a label file as an ``L`` (8-bit files) or ``I`` (int32: 16- and 32-bit files) image.

    Args:
        data: The file's bytes.
        path: The file, for messages.
        exif: Apply the EXIF orientation, as for every other folder of the sample (they must stay aligned).

    Raises:
        DataError: a lossy or colour file (see the module docstring), or one that cannot be decoded.
    """
    check_lossless(data, path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if exif:
                try:
                    ImageOps.exif_transpose(img, in_place=True)
                except Exception as exc:  # as images._decode_pil: keep the stored orientation
                    logger.debug("ignoring unreadable EXIF data (%s: %s)", type(exc).__name__, exc)
            file_mode = img.mode
            arr = np.array(img) if file_mode in LABEL_FILE_MODES else None  # P: the indices; 1: booleans
    except Exception as exc:
        raise DataError(f"cannot decode image {os.fspath(path)!r}: {type(exc).__name__}: {exc}") from exc
    if arr is None:
        bands = Image.getmodebands(file_mode) if file_mode in Image.MODES else 1
        what = (f"a {bands}-channel {file_mode} image: its pixels are colours" if bands > 1 else
                f"a {file_mode} image: its values are {'floats' if file_mode == 'F' else 'not integers'}")
        raise DataError(f"label image {os.fspath(path)!r} is {what}, not class indices, and a label map is never "
                        f"converted. {_HINT}; or map colours to indices in your own loader= (--dataset on the "
                        "command line)")
    if arr.dtype == np.uint8 or arr.dtype == np.bool_:
        return Image.fromarray(arr.astype(np.uint8, copy=False), "L")
    return Image.fromarray(arr.astype(np.int32), "I")  # 16-bit: int32 holds them exactly, and torch computes on it


def to_label_tensor(x: Any, where: str) -> torch.Tensor:
    """A label map as the int64 ``H x W`` tensor the dataset returns; integer values only, never rescaled.

    Accepts what the decoder, a loader or a transform gives: a one-channel PIL image of integers, an array or tensor
    ``H x W``, ``1 x H x W`` (tensors) or ``H x W x 1`` (arrays).

    Raises:
        ConfigError: a float or colour result (a transform that rescaled or interpolated the classes, a loader that
            converted them), or a shape that is not one value per pixel; ``where`` names the folder.
    """
    if isinstance(x, Image.Image):
        if x.mode not in LABEL_FILE_MODES:
            raise ConfigError(f"{where}: a label map came as a {x.mode} PIL image; class indices need a one-channel "
                              f"integer image. {_HINT}")
        x = np.array(x)
    if isinstance(x, np.ndarray):
        if x.ndim == 3 and x.shape[2] == 1:
            x = x[:, :, 0]
        x = torch.from_numpy(np.array(x, copy=True) if not x.flags.writeable else np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{where}: a label map came as {type(x).__name__}; expected an integer tensor, array or "
                          "PIL image")
    x = x.as_subclass(torch.Tensor)  # a tv_tensors.Mask from a transform
    if x.is_floating_point() or x.is_complex():
        raise ConfigError(f"{where}: the label map came out of the transform as {x.dtype}; class indices must stay "
                          "integers (a transform that rescales or interpolates them changes the classes). HINT: use "
                          "a joint v2 transform (the folder is a mask: nearest, never rescaled) and leave masks out "
                          "of ToDtype, or return integers from a per-folder transform")
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ConfigError(f"{where}: a label map must hold one class index per pixel (H x W or 1 x H x W), got "
                          f"shape {tuple(x.shape)}")
    return x.to(torch.int64)
