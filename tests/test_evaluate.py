"""evaluate_model and MeanIoU in one process: eval mode without gradients (modes put back), the loss averaged over
samples (a short last batch weighs its samples), function and object metrics, the mean IoU against a hand count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pixelz_dist import evaluate_model
from pixelz_dist.errors import ConfigError, DataError
from pixelz_dist.evaluation.metrics import MeanIoU, MetricAdapter
from pixelz_dist.evaluation.sharding import shard_range


class Regression(nn.Module):
    """Squared error; records the grad mode and its modes at each forward; ``per_sample``: a loss vector."""

    def __init__(self, per_sample: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.drop = nn.Dropout(0.5)  # would change the loss if evaluation ran in train mode
        self.per_sample = per_sample
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x, y):
        self.seen.append((torch.is_grad_enabled(), self.training))
        errors = (self.lin(self.drop(x)).squeeze(-1) - y) ** 2
        return {"loss": errors if self.per_sample else errors.mean(), "pred": self.lin(x).squeeze(-1)}


def data(n: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, generator=g))


def direct(model: Regression, ds: TensorDataset) -> torch.Tensor:
    """Each sample's squared error, computed without evaluate_model."""
    x, y = ds.tensors
    with torch.no_grad():
        return ((model.lin(x).squeeze(-1) - y) ** 2).double()


def abs_error(output, batch):
    return (output["pred"] - batch[1]).abs()


@pytest.mark.parametrize("per_sample", [False, True])
def test_loss_is_the_mean_over_samples_with_a_short_last_batch_in_eval_mode_without_grad(per_sample):
    model = Regression(per_sample)
    model.train()
    model.drop.eval()  # a mixed model: each module gets its own mode back
    ds = data(7)  # batches of 3, 3 and 1: a mean of batch means would weigh the last sample 3 times too much
    result = evaluate_model(model, ds, batch_size=3, metrics={"mae": abs_error}, num_workers=0)
    errors = direct(model, ds)
    assert set(result) == {"loss", "mae"}
    assert result["loss"] == pytest.approx(errors.mean().item(), rel=1e-6)  # float32 batch means
    batch_means = torch.stack([errors[0:3].mean(), errors[3:6].mean(), errors[6:].mean()]).mean().item()
    assert result["loss"] != pytest.approx(batch_means, rel=1e-3)  # the test can tell the two apart
    x, y = ds.tensors
    with torch.no_grad():
        assert result["mae"] == pytest.approx((model.lin(x).squeeze(-1) - y).abs().double().mean().item(), rel=1e-6)
    assert model.seen == [(False, False)] * 3  # no_grad, eval mode, 3 forwards
    assert model.training and model.lin.training and not model.drop.training  # the modes put back
    assert torch.is_grad_enabled()


def test_modes_are_put_back_when_the_forward_raises():
    class Broken(Regression):
        def forward(self, x, y):
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_model(model, data(4), batch_size=2, num_workers=0)
    assert all(m.training for m in model.modules())


def test_workers_and_a_list_of_metrics_give_the_same_values():
    model = Regression()
    ds = data(9)
    single = evaluate_model(model, ds, batch_size=4, metrics=[abs_error], num_workers=0)
    workers = evaluate_model(model, ds, batch_size=2, metrics=[abs_error], num_workers=2)
    assert set(single) == {"loss", "abs_error"}
    assert single == pytest.approx(workers, rel=1e-6)


def test_bad_arguments_are_listed_together_and_an_empty_dataset_refused():
    with pytest.raises(ConfigError) as info:
        evaluate_model(Regression(), data(4), batch_size=0, metrics={"loss": abs_error, "x": object()}, amp="fp8")
    text = str(info.value)
    for part in ("batch_size must be", "amp must be", "'loss' is not allowed", "neither a function"):
        assert part in text
    with pytest.raises(DataError, match="empty"):
        evaluate_model(Regression(), data(0), batch_size=2)


# -- MeanIoU ----------------------------------------------------------------------------------------------------------
# Two 2 x 3 masks of 3 classes; 255 marks ignored pixels. Class 2 never appears (neither target nor prediction).
TARGET = torch.tensor([[[0, 0, 1], [1, 255, 1]],
                       [[0, 1, 1], [255, 255, 0]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 0]],
                     [[0, 1, 0], [1, 1, 0]]])
# Counted by hand over the 9 pixels not ignored (t: target, p: prediction):
#   class 0: TP 3 (t0 p0 three times), FN 1 (t0 p1), FP 2 (t1 p0 twice): IoU 3 / 6
#   class 1: TP 3, FN 2 (t1 p0 twice), FP 1 (t0 p1): IoU 3 / 6; class 2: absent, left out of the mean
HAND_MIOU = (3 / 6 + 3 / 6) / 2


def logits_of(pred: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return nn.functional.one_hot(pred, classes).permute(0, 3, 1, 2).float()


def test_mean_iou_by_hand_with_ignore_index_and_an_absent_class_left_out():
    metric = MeanIoU(3, ignore_index=255)
    metric.update({"logits": logits_of(PRED[:1])}, (None, TARGET[:1]))
    metric.update({"logits": logits_of(PRED[1:])}, (None, TARGET[1:]))
    assert metric.compute() == pytest.approx(HAND_MIOU)
    assert metric.iou_per_class[:2].tolist() == pytest.approx([0.5, 0.5])
    assert math.isnan(metric.iou_per_class[2])
    assert metric.confusion.tolist() == [[3, 1, 0], [2, 3, 0], [0, 0, 0]]  # the 3 ignored pixels are not counted
    metric.reset()
    metric.update_masks(PRED, TARGET)  # class indices directly, one call
    assert metric.compute() == pytest.approx(HAND_MIOU)
    with pytest.raises(ValueError, match=r"the target holds \[255\].*ignore_index"):
        MeanIoU(3, ignore_index=None).update_masks(PRED, TARGET)
    with pytest.raises(ValueError, match="output\\['logits'\\].*HINT"):
        MeanIoU(3).update(torch.tensor(0.5), (None, TARGET))


class MaskSet(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return logits_of(PRED[i:i + 1])[0], TARGET[i]


class Segmenter(nn.Module):
    """Returns the given logits as its predictions: the metric's input is known exactly."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, target):
        logits = x * self.scale
        loss = nn.functional.cross_entropy(logits, target, ignore_index=255)
        return {"loss": loss, "logits": logits}


class FakeTorchMetric:
    """torchmetrics' protocol: update(preds, target); counts the pixels it saw."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.pixels = 0

    def update(self, preds, target):
        assert preds.dim() == 3  # argmax'd by the adapter's transform
        self.pixels += int((target != 255).sum())

    def compute(self):
        return torch.tensor(float(self.pixels))


def test_evaluate_model_with_mean_iou_and_an_adapted_torchmetrics_style_object():
    pixels = MetricAdapter(FakeTorchMetric(), preds_transform=lambda p: p.argmax(1))
    result = evaluate_model(Segmenter(), MaskSet(), batch_size=1, num_workers=0,
                            metrics={"miou": MeanIoU(3), "pixels": pixels})
    assert result["miou"] == pytest.approx(HAND_MIOU)
    assert result["pixels"] == 9.0
    assert math.isfinite(result["loss"])


def test_shards_cover_every_sample_once_without_padding():
    for n in range(0, 12):
        for world in range(1, 5):
            shards = [shard_range(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


# -- under torchrun ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_count_every_sample_once_and_equal_one_process(tmp_path):
    """7 samples on 2 ranks (3 + 4, batches of 2: uneven shards, short last batches), and 1 sample (rank 0's shard
    empty: it still joins every collective). Both ranks get the one-process values; the indices seen, together, are
    each sample once. Then the same validation inside train_model (DDP, keep_best): its values, measured at an
    iteration, are one process's evaluation of that iteration's snapshot, which PREFIX_best.pt names."""
    import json
    import os
    import subprocess
    import sys

    from conftest import DIST_VARS, TESTS

    jobs = os.path.join(TESTS, "jobs")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(jobs, "eval_job.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    sys.path.insert(0, jobs)
    try:
        import eval_job
    finally:
        sys.path.remove(jobs)
    single = eval_job.evaluate_all()
    for n in ("7", "1"):
        seen = [ranks[0][n]["indices"], ranks[1][n]["indices"]]
        assert sorted(seen[0] + seen[1]) == list(range(int(n)))  # each sample once, no padded duplicate
        assert single[n]["indices"] == list(range(int(n)))
        for record in ranks:
            assert record[n]["result"]["seen"] == int(n)
            assert record[n]["result"] == pytest.approx(single[n]["result"], rel=1e-6)
            assert record[n]["training"] is True
    assert seen == [[], [0]]  # the 1-sample run: rank 0's shard was empty

    from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot

    prefix = tmp_path / "run" / "s"
    rows = [json.loads(line) for line in open(f"{prefix}_metrics.jsonl")]
    val = {r["iteration"]: r for r in rows if "val_loss" in r}
    assert sorted(val) == [2, 4]
    assert val[2]["val_loss"] < val[4]["val_loss"]  # gradient ascent: the first validation is the best
    best = 2
    assert {it for it, _ in list_snapshots(str(prefix))} == {4, best}
    assert os.path.samefile(f"{prefix}_best.pt", f"{prefix}_iter_{best}.pt")
    for it in {4, best}:
        model = eval_job.Segmenter()
        model.load_state_dict(load_snapshot(f"{prefix}_iter_{it}.pt")["model"])
        again = evaluate_model(model, eval_job.Masks(7), 2, eval_job.val_metrics(), num_workers=0)
        assert {f"val_{k}": v for k, v in again.items()} == pytest.approx(
            {k: v for k, v in val[it].items() if k.startswith("val_")}, rel=1e-6)
