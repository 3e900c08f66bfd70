"""Draw a joint transform's crop from the images' sizes, before any pixel is decoded, so only the crop is decoded.

A torchvision v2 ``Compose`` that starts with flips (and per-pixel steps: ``ToImage``, ``ToDtype``, ``Normalize``) and
one of ``RandomResizedCrop``, ``RandomCrop``, ``CenterCrop``
or ``Resize`` decides its geometry from the image size alone. :class:`CropPlanner` makes exactly the draws of torch's
global RNG that the transform would make itself (the same calls in the same order: the flips' ``torch.rand(1)``, then
the crop's own ``make_params``), so a sample built from the decoded crop is bit-identical to ``transform(*images)``
on the whole images, and the RNG stream after it is the same: exact resume and the same samples for any number of
DataLoader workers both hold. Anything else at the head of the transform is not planned (the caller decodes whole
images, as before).

Optionally (``scaling=True``) a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size in libjpeg's DCT domain when the
crop is at least that many times larger than the output: much faster, but not bit-identical (see
docs/how-to/fast-data.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["Box", "CropPlan", "CropPlanner"]

_FLIPS = (v2.RandomHorizontalFlip, v2.RandomVerticalFlip)
# Deterministic per-pixel steps: they commute with cropping, so they run on the box (ToImage passes tv_tensors).
_POINTWISE = (v2.ToImage, v2.ToDtype, v2.Normalize)
_GEOMETRY = (v2.RandomResizedCrop, v2.RandomCrop, v2.CenterCrop, v2.Resize)
_SCALES = (8, 4, 2)  # libjpeg's DCT-domain factors, largest first


@dataclass(frozen=True)
class Box:
    """A rectangle of an image in stored (file) coordinates, as torchvision's crop parameters name it."""

    top: int
    left: int
    height: int
    width: int

    def is_whole(self, height: int, width: int) -> bool:
        return self.top == 0 and self.left == 0 and self.height == height and self.width == width


@dataclass
class CropPlan:
    """What to decode (``box`` of every image, ``scale``: a JPEG image may be decoded at 1/scale) and how to finish.

    ``finish`` is applied by :meth:`CropPlanner.finish` to the decoded boxes.
    """

    box: Box
    scale: int = 1
    flips: tuple[bool, ...] = ()  # per leading flip of the transform: applied (to the box, after decoding)
    head_params: dict[str, Any] | None = field(default=None)  # None: the box already is the head's output
    out_size: tuple[int, int] | None = None  # the head's output size, for a box decoded at 1/scale


def _fake_image(height: int, width: int) -> tv_tensors.Image:
    # make_params reads only the size: a stride-0 view stands in for the image without allocating it.
    return tv_tensors.Image(torch.zeros((), dtype=torch.uint8).expand(1, height, width))


class CropPlanner:
    """Splits a joint v2 transform into a plannable head (flips, then one crop or resize) and the rest.

    Args:
        transform: The dataset's joint transform.
        scaling: Allow DCT-domain downscaling of JPEG images (not bit-identical).

    Attributes:
        supported: Whether the transform starts with a head this planner handles; when False, decode whole images.
    """

    def __init__(self, transform: Callable[..., Any], *, scaling: bool = False) -> None:
        steps: Sequence[Any] = transform.transforms if type(transform) is v2.Compose else [transform]
        k = 0
        while k < len(steps) and type(steps[k]) in _FLIPS + _POINTWISE:
            k += 1
        # Exact types: a subclass may draw its parameters differently.
        self.supported = k < len(steps) and type(steps[k]) in _GEOMETRY
        self.lead: list[Any] = list(steps[:k])
        self.head: Any = steps[k] if self.supported else None
        rest = list(steps[k + 1 :])
        self.rest: Callable[..., Any] | None = (rest[0] if len(rest) == 1 else v2.Compose(rest)) if rest else None
        # Flips and per-pixel steps after the crop run step by step (see _run_simple); anything else through v2.
        self._simple_rest = rest if all(type(t) in _FLIPS + _POINTWISE for t in rest) else None
        self.scaling = scaling

    def plan(self, height: int, width: int) -> CropPlan:
        """Draw the head's random parameters for an image of this size, as ``transform`` would, and plan the decode."""
        hflip = vflip = False
        flips = []
        for step in self.lead:
            if type(step) not in _FLIPS:
                continue
            # _RandomApplyTransform.forward: `if torch.rand(1) >= self.p: return inputs`
            applied = not bool(torch.rand(1) >= step.p)
            flips.append(applied)
            if type(step) is v2.RandomHorizontalFlip:
                hflip ^= applied
            else:
                vflip ^= applied
        head = self.head
        whole = Box(0, 0, height, width)
        plan = CropPlan(box=whole, flips=tuple(flips), head_params={})
        if type(head) is v2.RandomResizedCrop:
            p = head.make_params([_fake_image(height, width)])
            plan.box = Box(p["top"], p["left"], p["height"], p["width"])
            plan.head_params = dict(top=0, left=0, height=p["height"], width=p["width"])
            plan.out_size = tuple(head.size)
        elif type(head) is v2.RandomCrop:
            p = head.make_params([_fake_image(height, width)])
            if p["needs_pad"]:
                plan.head_params = p  # padding: decode everything and let the transform pad and crop
            else:
                plan.box = Box(p["top"], p["left"], p["height"], p["width"]) if p["needs_crop"] else whole
                plan.head_params = None
        elif type(head) is v2.CenterCrop:
            crop_h, crop_w = head.size
            if crop_h <= height and crop_w <= width:  # F.center_crop's anchor; larger crops pad: decode everything
                plan.box = Box(int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0)), crop_h, crop_w)
                plan.head_params = None
        else:  # Resize: all pixels are needed; only the scaled decode can save work
            plan.out_size = tuple(
                F._geometry._compute_resized_output_size((height, width), size=head.size, max_size=head.max_size)
            ) if head.size is not None or head.max_size is not None else None
        if self.scaling and plan.out_size is not None:
            plan.scale = _dct_scale(plan.box, plan.out_size)
        # The box in the file's coordinates: the flips come first in the transform, the crop is of the flipped image.
        box = plan.box
        plan.box = Box(
            height - box.top - box.height if vflip else box.top,
            width - box.left - box.width if hflip else box.left,
            box.height,
            box.width,
        )
        return plan

    def finish(self, plan: CropPlan, boxes: Sequence[Any], scaled: Sequence[bool] | None = None) -> Any:
        """Apply the plan's flips and head, then the rest of the transform, to the decoded ``boxes`` (tv_tensors).

        ``scaled[i]``: box ``i`` was decoded at ``1/plan.scale`` and is resized to the head's output size instead.
        """
        decisions = iter(plan.flips)
        boxes = _run_simple(self.lead, list(boxes), lambda step: next(decisions))
        out = []
        for i, x in enumerate(boxes):
            if scaled is not None and scaled[i]:
                x = F.resize(x, list(plan.out_size), interpolation=self.head.interpolation,
                             antialias=self.head.antialias)
            elif plan.head_params is not None:
                x = self.head.transform(x, plan.head_params)
            out.append(x)
        if self._simple_rest is not None:
            out = _run_simple(self._simple_rest, out, lambda step: not bool(torch.rand(1) >= step.p))
        elif self.rest is not None:
            return self.rest(*out)
        return out[0] if len(out) == 1 else tuple(out)


def _run_simple(steps: Sequence[Any], xs: list[Any], applied: Callable[[Any], bool]) -> list[Any]:
    """Flips and per-pixel steps on tv_tensors, exactly as their ``forward`` would run them, without its per-call cost.

    ``forward`` flattens the inputs, asks which need the step and calls ``transform(x, params)`` on those; for these
    steps ``params`` is empty, ``ToImage`` passes tv_tensors through and the others take every tv_tensor (and decide
    inside ``transform``, e.g. ``ToDtype(torch.float32)`` leaves masks alone). A flip draws ``torch.rand(1)`` as
    ``forward`` does; ``applied(step)`` makes (or replays) that draw.
    """
    for step in steps:
        kind = type(step)
        if kind is v2.ToImage or (kind in _FLIPS and not applied(step)):
            continue
        xs = [step.transform(x, {}) for x in xs]
    return xs


def _dct_scale(box: Box, out_size: tuple[int, int]) -> int:
    """The largest libjpeg factor whose decode of ``box`` is still at least ``out_size`` in both directions."""
    out_h, out_w = out_size
    for k in _SCALES:
        if math.floor(box.height / k) >= out_h and math.floor(box.width / k) >= out_w:
            return k
    return 1
