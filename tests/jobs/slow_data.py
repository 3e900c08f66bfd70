"""A ``--dataset`` factory for the command-line and SLURM tests: the demo's files, each sample ``delay`` s slower,
so that a job runs long enough to be signalled mid-run."""

import time

import torch
from torch import nn

from pixelz_dist.cli.demo import DemoDataset, TinySegNet, make_demo_dataset


class SlowDemo(DemoDataset):
    def __init__(self, root, delay):
        super().__init__(root)
        self.delay = delay

    def __getitem__(self, index):
        time.sleep(self.delay)
        return super().__getitem__(index)


def make(root: str, num_samples: int = 16, delay: float = 0.02) -> SlowDemo:
    make_demo_dataset(root, num_samples=num_samples, size=16, seed=1)
    return SlowDemo(root, delay)


def not_a_dataset():
    return 42


class TwoFolderNet(nn.Module):
    """A ``--model`` for ``--data RGB_FOLDER MASK_FOLDER``: one convolution, its logits against the mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, rgb, mask):
        return nn.functional.binary_cross_entropy_with_logits(self.conv(rgb), (mask > 0.5).float())


class TinySegNetPlus(TinySegNet):
    """The demo's network with one more buffer: same shapes, one key its snapshots lack (for --no-strict-load)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calibration", torch.ones(1))


def per_rank(root: str) -> DemoDataset:
    """The demo's files, one sample fewer on rank 1: ranks that see different data (a copy not yet finished)."""
    import os

    make_demo_dataset(root, num_samples=12, size=16, seed=1)
    dataset = DemoDataset(root)
    if os.environ.get("RANK") == "1":
        return torch.utils.data.Subset(dataset, range(len(dataset) - 1))
    return dataset
