"""Metrics for :func:`~pixelz_dist.evaluation.evaluate.evaluate_model`: a mean IoU for class-index masks, and an
adapter for torchmetrics-style objects.

The metric protocol (an object with three methods)::

    metric.reset()                  # before an evaluation
    metric.update(output, batch)    # per batch: what the model returned, and the batch it was given (on the device)
    metric.compute()                # after the last batch, on every rank: the value over all ranks (a collective)

``update`` sees the model's whole output and the whole batch, so one metric can read logits from a dict and the
target from any position of the batch. torchmetrics objects take ``update(preds, target)`` instead: wrap them in
:class:`MetricAdapter`, which picks the two out (``evaluate_model`` wraps a ``torchmetrics.Metric`` itself, with the
defaults below). A plain function ``fn(output, batch)`` returning one value per sample is a metric too: see
``evaluate_model``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .sharding import sum_tensor_over_ranks

__all__ = ["MeanIoU", "MetricAdapter", "pick_output", "pick_target"]


def pick_output(output, key: str, who: str) -> torch.Tensor:
    """``output[key]`` of a dict (or ``output.key`` of an object); a tensor output is taken whole."""
    if isinstance(output, Mapping):
        if key in output:
            return output[key]
        found = f"a dict with keys {sorted(map(str, output))}"
    elif isinstance(output, torch.Tensor):
        if output.dim() > 0:
            return output
        found = "only a scalar (the loss)"
    elif getattr(output, key, None) is not None:
        return getattr(output, key)
    else:
        found = type(output).__name__
    raise ValueError(f"{who} reads the predictions from the model's output[{key!r}], but the forward returned "
                     f"{found}. HINT: return {{'loss': loss, {key!r}: logits}} from forward (train_model accepts "
                     f"it), or pass output_key= naming the entry that holds the predictions.")


def pick_target(batch, index, who: str) -> torch.Tensor:
    """``batch[index]``: a position of a tuple / list batch, or a key of a dict batch."""
    try:
        return batch[index]
    except (IndexError, KeyError, TypeError):
        what = (f"a dict with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else
                f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else
                type(batch).__name__)
        raise ValueError(f"{who} reads the target from batch[{index!r}], but the batch is {what}. HINT: pass "
                         "target_index= (a position, or a key for dict batches).") from None


class MeanIoU:
    """Mean intersection over union of class-index masks, from a confusion matrix summed over batches and ranks.

    Each update adds ``bincount(target * C + pred)`` (pixels whose target is ``ignore_index`` left out) to a
    ``C x C`` int64 matrix on the predictions' device; ``compute`` sums the matrices of all ranks (one all-reduce)
    and returns the mean over classes of ``TP / (TP + FP + FN)``. A class absent from both the targets and the
    predictions of the whole evaluation has no IoU (0 / 0): it is left out of the mean (its entry of
    :attr:`iou_per_class` is NaN), as torchvision's references and MMSegmentation do; a class predicted but never
    present counts with IoU 0.

    Args:
        num_classes: ``C``; targets (other than ``ignore_index``) must lie in ``[0, C)``.
        ignore_index: target value of pixels that count for nothing (255: the border / void label of VOC and
            Cityscapes); None: every pixel counts.
        output_key: where the predictions are in the model's output (a dict, or an object with that attribute); a
            tensor output is taken whole. Float predictions ``B x C x ...`` are logits or probabilities (argmax over
            dim 1); integer ones ``B x ...`` are class indices.
        target_index: where the target mask is in the batch: a position (-1: the last item), or a dict key.

    Attributes:
        iou_per_class: after :meth:`compute`, a float64 tensor of ``C`` IoUs (NaN for absent classes).
        confusion: after :meth:`compute`, the all-ranks ``C x C`` matrix (rows: target, columns: prediction).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, output_key: str = "logits",
                 target_index: int | str = -1):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.output_key, self.target_index = output_key, target_index
        self.iou_per_class: torch.Tensor | None = None
        self.confusion: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self._counts: torch.Tensor | None = None  # this rank's flattened C*C counts

    def update(self, output, batch) -> None:
        self.update_masks(pick_output(output, self.output_key, "MeanIoU"),
                          pick_target(batch, self.target_index, "MeanIoU"))

    def update_masks(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch given as predictions (logits ``B x C x ...`` or class indices ``B x ...``) and target."""
        c = self.num_classes
        if preds.is_floating_point() or preds.dim() == target.dim() + 1:
            if preds.dim() != target.dim() + 1 or preds.shape[1] != c:
                raise ValueError(f"MeanIoU({c} classes): logits of shape {tuple(preds.shape)} for a target of shape "
                                 f"{tuple(target.shape)}; expected {(target.shape[0], c, *target.shape[1:])}. "
                                 "HINT: the logits' dim 1 holds the classes; check num_classes.")
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(f"MeanIoU: predictions of shape {tuple(preds.shape)}, target of shape "
                             f"{tuple(target.shape)}. HINT: resize the logits to the mask's size inside forward.")
        target = target.to(preds.device).long().reshape(-1)
        preds = preds.long().reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, preds = target[keep], preds[keep]
        bad = (target < 0) | (target >= c)
        if bool(bad.any()):  # one host sync per batch: a stray label would silently land in another class's cell
            values = sorted(set(target[bad].unique().tolist()))[:5]
            raise ValueError(f"MeanIoU({c} classes, ignore_index={self.ignore_index!r}): the target holds "
                             f"{values}, outside [0, {c}). HINT: set num_classes, or ignore_index= to the value "
                             "that marks pixels to ignore.")
        counts = torch.bincount(target * c + preds.clamp(0, c - 1), minlength=c * c)
        self._counts = counts if self._counts is None else self._counts.add_(counts.to(self._counts.device))

    def compute(self) -> float:
        """The mean IoU over all ranks (a collective: every rank calls it, an empty shard too); NaN when no
        class occurred at all."""
        c = self.num_classes
        local = self._counts if self._counts is not None else torch.zeros(c * c, dtype=torch.int64)
        self.confusion = confusion = sum_tensor_over_ranks(local).view(c, c).cpu()
        true_pos = confusion.diagonal().double()
        union = confusion.sum(0).double() + confusion.sum(1).double() - true_pos
        iou = torch.where(union > 0, true_pos / union.clamp(min=1), torch.full_like(union, float("nan")))
        self.iou_per_class = iou
        present = ~iou.isnan()
        return float(iou[present].mean()) if bool(present.any()) else float("nan")


class MetricAdapter:
    """A torchmetrics-style object (``update(preds, target)`` / ``compute()`` / ``reset()``) as a metric of
    :func:`~pixelz_dist.evaluation.evaluate.evaluate_model`.

    Args:
        metric: e.g. ``torchmetrics.classification.MulticlassJaccardIndex(5, ignore_index=255)``. Under torchrun a
            torchmetrics object reduces its state over the ranks in ``compute`` itself; it is moved to the batch's
            device (``.to``) on its first update when it is a module.
        output_key / target_index: as for :class:`MeanIoU`.
        preds_transform: applied to the predictions before ``update`` (e.g. ``lambda x: x.argmax(1)``).
    """

    def __init__(self, metric, output_key: str = "logits", target_index: int | str = -1, preds_transform=None):
        self.metric, self.output_key, self.target_index = metric, output_key, target_index
        self.preds_transform = preds_transform
        self._moved = False

    def reset(self) -> None:
        self.metric.reset()

    def update(self, output, batch) -> None:
        name = type(self.metric).__name__
        preds = pick_output(output, self.output_key, name)
        target = pick_target(batch, self.target_index, name)
        if self.preds_transform is not None:
            preds = self.preds_transform(preds)
        if not self._moved and isinstance(self.metric, torch.nn.Module):
            self.metric.to(preds.device)
            self._moved = True
        self.metric.update(preds, target)

    def compute(self):
        return self.metric.compute()


def is_torchmetrics(obj) -> bool:
    """A ``torchmetrics.Metric`` (checked without importing torchmetrics, an optional package)."""
    return any(cls.__module__.startswith("torchmetrics") and cls.__name__ == "Metric" for cls in type(obj).__mro__)
