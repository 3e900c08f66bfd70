"""The joint augmentation of ``--data``: random rescale, random crop (padded when the image is smaller), flip.

What users of torchvision's ``references/segmentation`` expect, built from ``torchvision.transforms.v2`` and run once
per sample over all of its images (:class:`~pixelz_dist.data.multi_images.MultiImgsDataset`'s joint transform), so
one draw places the crop and decides the flip for every folder alike:

1. ``RandomScale(LO, HI)`` (``--scale-range``): every image of the sample resized by one factor drawn uniformly from
   ``[LO, HI]`` of its *own* size. The references draw a shorter side in ``[0.5, 2] x base_size`` instead; with images
   of one size the two are the same, and a factor also suits datasets whose images differ in size.
2. ``v2.RandomCrop(SIZE, pad_if_needed=True)`` (``--crop``): an image smaller than the crop is padded on both sides
   by the shortfall, then cropped, so it lands at a random place inside the crop. Images are padded with
   ``--pad-value`` (stored pixel units: before the scaling to [0, 1]), label maps with ``--ignore-index``.
3. ``v2.RandomHorizontalFlip(0.5)`` (``--hflip``).
4. ``v2.ToDtype(float32, scale=True)``: images to [0, 1]; label maps are left alone (int64 on return).

Label folders are ``tv_tensors.Mask``: v2 resizes them with nearest neighbour and keeps their integer dtype, so a
label map only ever holds values of its file or the ignore value. Every other folder is a ``tv_tensors.Image`` and
is resized bilinearly (antialiased), which is right for inputs and for continuous ground truth (an ``L`` alpha matte,
a depth map): only class indices must not be interpolated.

Draws come from torch's global RNG, which the training engine seeds per batch (:mod:`~pixelz_dist.data.seeding`):
augmented runs are reproducible, independent of the number of DataLoader workers, and resume bit-exactly.
Crop-aware decoding (:mod:`~pixelz_dist.data.crop_plan`) applies to a crop without a rescale: the crop is drawn from
the file header's size and only its pixels are decoded. A rescale before the crop needs every pixel (a resized
pixel depends on its neighbours), so with ``--scale-range`` whole images are decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["RandomScale", "describe", "joint_augmentation"]

#: The probability of ``--hflip``, as in torchvision's segmentation references.
HFLIP_PROB = 0.5


class RandomScale(v2.Transform):
    """Resize all inputs by one factor drawn uniformly from ``scale_range``, relative to their own size.

    v2's ``Resize`` kernels do the work: images with ``interpolation``, masks with nearest neighbour (integer dtype
    kept). The factor is one draw of ``torch.rand(1)`` per call, shared by every input of the call.

    Args:
        scale_range: ``(lo, hi)``, ``0 < lo <= hi``; ``(0.5, 2.0)`` halves to doubles each side.
        interpolation: For images (masks always use nearest).
        antialias: For images, when shrinking.
    """

    def __init__(self, scale_range: Sequence[float], interpolation: Any = v2.InterpolationMode.BILINEAR,
                 antialias: bool = True) -> None:
        super().__init__()
        lo, hi = (float(x) for x in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {tuple(scale_range)}")
        self.scale_range = (lo, hi)
        self.interpolation = interpolation
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        scale = lo + float(torch.rand(1)) * (hi - lo)
        return dict(size=[max(1, round(height * scale)), max(1, round(width * scale))])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=self.interpolation,
                                 antialias=self.antialias)

    def extra_repr(self) -> str:
        return f"scale_range={self.scale_range}"


def crop_size(crop: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from one number (a square) or two; raises ValueError for anything else."""
    size = list(crop) if isinstance(crop, Sequence) else [crop]
    if len(size) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"a crop is one positive size or height and width, got {crop!r}")
    return (size[0], size[-1])


def joint_augmentation(crop: int | Sequence[int] | None = None, hflip: bool = False,
                       scale_range: Sequence[float] | None = None, pad_value: float = 0,
                       ignore_value: int = 255) -> v2.Transform:
    """The joint v2 transform of ``--crop`` / ``--hflip`` / ``--scale-range``, ending with ``ToDtype(float32)``.

    Args:
        crop: Output size: one number (square) or ``(height, width)``; None: no crop (each sample keeps its size).
        hflip: Flip each sample horizontally with probability 0.5.
        scale_range: ``(lo, hi)``: resize by a factor drawn from ``[lo, hi]`` before the crop.
        pad_value: What images are padded with, in stored units (0..255 for 8-bit images).
        ignore_value: What label maps (``tv_tensors.Mask``) are padded with: the loss's ``ignore_index``. Outside
            0..255 the masks are widened to int64 first, since an 8-bit label map cannot hold it.

    Returns:
        A ``v2.Compose`` (``v2.ToDtype`` alone when nothing is asked for: the plain ``--data`` transform).

    Example::

        t = joint_augmentation(crop=480, hflip=True, scale_range=(0.5, 2.0))
        ds = MultiImgsDataset(["data/rgb", "data/labels"], t, modes=["RGB", "label"])
    """
    steps: list[Any] = []
    if crop is not None and not 0 <= ignore_value <= 255:
        steps.append(v2.ToDtype({tv_tensors.Mask: torch.int64, "others": None}))
    if scale_range is not None:
        steps.append(RandomScale(scale_range))
    if crop is not None:
        steps.append(v2.RandomCrop(crop_size(crop), pad_if_needed=True,
                                   fill={tv_tensors.Image: pad_value, tv_tensors.Mask: ignore_value}))
    if hflip:
        # After the crop (the references flip before it: the same distribution), so it moves only the crop's pixels.
        steps.append(v2.RandomHorizontalFlip(HFLIP_PROB))
    to_float = v2.ToDtype(torch.float32, scale=True)  # images to [0, 1]; masks (label maps) are left alone
    return v2.Compose([*steps, to_float]) if steps else to_float


def describe(crop: int | Sequence[int] | None, hflip: bool, scale_range: Sequence[float] | None, pad_value: float,
             ignore_value: int) -> str:
    """One phrase for the log line, e.g. ``random scale 0.5-2 x, crop 32 x 32 (padded: images 0, labels 255)``."""
    parts = []
    if scale_range is not None:
        parts.append(f"random scale {scale_range[0]:g}-{scale_range[1]:g} x")
    if crop is not None:
        h, w = crop_size(crop)
        parts.append(f"random crop {h} x {w} (padded: images {pad_value:g}, labels {ignore_value})")
    if hflip:
        parts.append(f"horizontal flip p={HFLIP_PROB:g}")
    return ", ".join(parts) if parts else "none"
