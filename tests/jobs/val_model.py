"""A ``--model`` for the validation tests: a 1x1 convolution segmenter over ``--data rgb/ labels/ --modes RGB label``
whose forward returns ``{"loss": ..., "logits": ...}`` (what ``--val-miou`` reads)."""

import torch
from torch import nn
from torch.nn import functional as F


class SegNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, rgb, target):
        logits = self.conv(rgb)
        return {"loss": F.cross_entropy(logits, target), "logits": logits}
