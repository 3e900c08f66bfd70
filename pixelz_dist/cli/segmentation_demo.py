"""Demo data and a model for the segmentation walkthrough: folders of photos and class-index label maps.

The built-in ``--demo`` trains a binary mask from an in-memory dataset class; a segmentation team's data is two
parallel folders (photos, label maps whose pixel values are class indices) read through ``--data ... --modes RGB
label``. This writes exactly that, so the tutorial (docs/tutorial.md) runs as written on any machine:

    python -m pixelz_dist.make_demo demo_seg        # demo_seg/{train,val}/{images,labels}

Classes: 0 background, 1 ellipse, 2 rectangle; the shapes' colours are random, so the network must learn shape,
not colour. Pixels on a shape's anti-aliased border are labelled 255 (``IGNORE_INDEX``), as segmentation datasets
mark uncertain pixels (VOC, Cityscapes).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..errors import ConfigError
from ..fileio import atomic_write

__all__ = ["CLASSES", "IGNORE_INDEX", "SegmentationNet", "make_segmentation_demo"]

logger = logging.getLogger(__name__)

CLASSES = ("background", "ellipse", "rectangle")
IGNORE_INDEX = 255
SPLITS = ("train", "val")


def _draw(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    background = rng.integers(0, 256, size=3)
    photo = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8), "RGB")
    label = Image.new("L", (size, size), 0)
    border = Image.new("L", (size, size), 0)
    draw_photo, draw_label, draw_border = ImageDraw.Draw(photo), ImageDraw.Draw(label), ImageDraw.Draw(border)
    for _ in range(int(rng.integers(1, 4))):
        w, h = (int(v) for v in rng.integers(max(4, size // 5), max(5, size // 2), size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = (x0, y0, x0 + w, y0 + h)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = 1 if rng.random() < 0.5 else 2
        draw = ImageDraw.ImageDraw.ellipse if shape == 1 else ImageDraw.ImageDraw.rectangle
        draw(draw_photo, box, fill=colour)
        draw(draw_label, box, fill=shape)
        draw(draw_border, box, outline=1)
    noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0.0, 10.0, size=(size, size, 3))
    labels = np.where(np.asarray(border) > 0, IGNORE_INDEX, np.asarray(label)).astype(np.uint8)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), Image.fromarray(labels, "L")


def make_segmentation_demo(root: str | os.PathLike[str], train_samples: int = 160, val_samples: int = 40,
                           size: int = 48, seed: int = 0) -> dict[str, list[str]]:
    """Write ``root/{train,val}/images/NNNNN.jpg`` and ``root/{train,val}/labels/NNNNN.png``.

    Returns:
        ``{"train": [images_dir, labels_dir], "val": [...]}``, the folders in ``--data`` order.
    """
    if train_samples < 1 or val_samples < 0:
        raise ConfigError(f"the demo needs at least one training sample and no negative count, got "
                          f"train_samples={train_samples}, val_samples={val_samples}")
    if size < 16:
        raise ConfigError(f"size must be >= 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    folders = {}
    for split, count in zip(SPLITS, (train_samples, val_samples)):
        dirs = [os.path.join(os.fspath(root), split, sub) for sub in ("images", "labels")]
        folders[split] = dirs
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        for i in range(count):
            photo, label = _draw(rng, size)
            with atomic_write(os.path.join(dirs[0], f"{i:05d}.jpg"), durable=False) as f:
                photo.save(f, format="JPEG", quality=95)
            with atomic_write(os.path.join(dirs[1], f"{i:05d}.png"), durable=False) as f:
                label.save(f, format="PNG")
    logger.info("segmentation demo: wrote %d training and %d validation samples of %dx%d to %s", train_samples,
                val_samples, size, size, root)
    return folders


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegmentationNet(nn.Module):
    """A small encoder-decoder (two downsamplings, so a pixel sees enough of its shape to tell an ellipse from a
    rectangle) whose forward returns ``{"loss", "logits"}``: the loss trains it, the logits feed metrics (mIoU).

    Args:
        num_classes: output channels (the demo has 3).
        width: channels of the first stage.
        ignore_index: label value left out of the loss.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if num_classes < 2 or width < 1:
            raise ConfigError(f"num_classes must be >= 2 and width >= 1, got {num_classes} and {width}")
        self.ignore_index = int(ignore_index)
        self.stem = _block(3, width)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _block(width, 2 * width))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _block(2 * width, 2 * width))
        self.up = _block(4 * width, width)
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits, ``N x classes x H x W`` (H and W multiples of 4)."""
        s = self.stem(image)
        d1 = self.down1(s)
        d2 = F.interpolate(self.down2(d1), size=d1.shape[-2:], mode="nearest")
        u = F.interpolate(self.up(torch.cat([d1, d2], 1)), size=s.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([s, u], 1))

    def forward(self, image: torch.Tensor, target: torch.Tensor | None = None) -> dict:
        logits = self.predict(image)
        out = {"logits": logits}
        if target is not None:
            out["loss"] = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        return out
