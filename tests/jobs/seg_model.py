"""A ``--model`` for ``--data rgb/ labels/ --modes RGB label`` that returns ``{"loss", "logits"}``: what
``--metric miou`` measures. ``delay``: seconds each training forward sleeps (a run slow enough to be followed)."""

import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F


class SegNet(nn.Module):
    def __init__(self, classes: int = 3, delay: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)
        self.delay = delay

    def forward(self, rgb, target):
        if self.training and self.delay:
            time.sleep(self.delay)
        logits = self.conv(rgb)
        return {"loss": F.cross_entropy(logits, target, ignore_index=255), "logits": logits}


def make_seg_data(root, samples: int = 12, size: int = 16, seed: int = 0) -> list[str]:
    """``root/rgb/*.png`` and ``root/label/*.png`` (class = red // 86, one corner 255: ignored); the two folders."""
    rng = np.random.default_rng(seed)
    folders = [f"{root}/rgb", f"{root}/label"]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    for i in range(samples):
        rgb = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        label = (rgb[..., 0] // 86).astype(np.uint8)
        label[:2, :2] = 255
        Image.fromarray(rgb, "RGB").save(f"{folders[0]}/{i:03d}.png")
        Image.fromarray(label, "L").save(f"{folders[1]}/{i:03d}.png")
    return folders
