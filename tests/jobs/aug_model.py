"""A ``--model`` for ``--data rgb/ labels/ --modes RGB label --crop ... --hflip --scale-range ...``.

Checks what the augmentation promises about the target it is given (int64, the photo's geometry, only class values or
the ignore index, padding in the same place as the photo's), then trains a 3 x 3 convolution on it: not symmetric,
so a flip drawn differently in a resumed run changes the weights.
"""

import torch
from torch import nn
from torch.nn import functional as F


class AugNet(nn.Module):
    def __init__(self, classes: int = 5, ignore_index: int = 255):
        super().__init__()
        self.classes, self.ignore_index = classes, ignore_index
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, rgb, target):
        assert target.dtype == torch.int64, target.dtype
        assert target.shape == (rgb.shape[0], *rgb.shape[2:]), (tuple(target.shape), tuple(rgb.shape))
        values = set(target.unique().tolist())
        assert values <= set(range(self.classes)) | {self.ignore_index}, values
        padded = target == self.ignore_index
        assert torch.all(rgb.permute(1, 0, 2, 3)[:, padded] == 0), "the photo is not padded where its label map is"
        return F.cross_entropy(self.conv(rgb), target, ignore_index=self.ignore_index)
