"""evaluate_model under torchrun (or plain python): a tiny segmenter on 7 samples, and on 1 (an empty shard); then
train_model with a Validation on 7 samples and keep_best.

Usage: ``eval_job.py OUT_DIR``; each rank writes ``OUT_DIR/rank{RANK}.json`` with its results and the indices it
evaluated. The test compares them with :func:`evaluate_all` run in one process; the training writes its snapshots,
``s_best.pt`` and ``s_metrics.jsonl`` under ``OUT_DIR/run/``.
"""

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import Dataset

from pixelz_dist import evaluate_model, train_model
from pixelz_dist.callbacks import Validation
from pixelz_dist.evaluation.metrics import MeanIoU

CLASSES = 3


class Masks(Dataset):
    """Sample i: a 1 x 4 x 4 image, its class mask (some pixels 255, ignored) and the index i."""

    def __init__(self, n: int, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 4, 4, generator=g)
        self.masks = torch.randint(0, CLASSES, (n, 4, 4), generator=g)
        self.masks[torch.rand(n, 4, 4, generator=g) < 0.2] = 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i], torch.tensor(i)


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, CLASSES, 1)

    def forward(self, image, mask, index):
        logits = self.conv(image)
        # a mean over samples (each sample's mean over its valid pixels), as evaluate_model's weighting assumes
        pixels = nn.functional.cross_entropy(logits, mask, ignore_index=255, reduction="none").flatten(1)
        valid = (mask != 255).flatten(1).sum(1).clamp(min=1)
        return {"loss": (pixels.sum(1) / valid).mean(), "logits": logits}


class Seen:
    """An object metric that records the indices it was given and counts them over all ranks in compute()."""

    def __init__(self):
        self.indices = []

    def reset(self):
        self.indices = []

    def update(self, output, batch):
        self.indices.extend(batch[2].tolist())

    def compute(self):
        from pixelz_dist.evaluation.sharding import sum_tensor_over_ranks

        return sum_tensor_over_ranks(torch.tensor(float(len(self.indices)), dtype=torch.float64))


def pixel_accuracy(output, batch):
    """Per sample: the share of its non-ignored pixels predicted right."""
    pred, mask = output["logits"].argmax(1), batch[1]
    valid = mask != 255
    return ((pred == mask) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


def evaluate_all() -> dict:
    model = Segmenter()
    out = {}
    for n in (7, 1):
        seen = Seen()
        result = evaluate_model(model, Masks(n), batch_size=2, num_workers=0,
                                metrics={"miou": MeanIoU(CLASSES, target_index=1), "acc": pixel_accuracy, "seen": seen})
        out[str(n)] = {"result": result, "indices": seen.indices, "training": model.training}
    return out


def val_metrics() -> dict:
    return {"miou": MeanIoU(CLASSES, target_index=1), "acc": pixel_accuracy}


def train_with_validation(prefix: str) -> None:
    """4 iterations of batches of 2 per rank, validated every 2 on 7 samples; the best val_loss snapshot kept.

    Gradient ascent (``maximize=True``): the validation loss rises, so the best snapshot is the first one validated
    (iteration 2), which only a snapshot of that very iteration can hold (not one agreed an iteration later)."""
    model = Segmenter()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, maximize=True)
    train_model(model, optimizer, None, Masks(12, seed=6), 2, num_iters=4, snapshot_prefix=prefix, keep_best=1,
                keep_last=1, display_iter=2, num_workers=0,
                callbacks=[Validation(Masks(7), 2, val_metrics(), interval=2, num_workers=0)])


if __name__ == "__main__":
    folder = sys.argv[1]
    records = evaluate_all()
    with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(records, f)
    train_with_validation(os.path.join(folder, "run", "s"))
