"""``evaluate_model``: the loss and metrics of a model over a dataset, each sample counted exactly once.

Pseudocode::

    every rank: its contiguous slice of the dataset (no padding, see sharding.py), in batches
    model.eval(); with torch.no_grad():                 # the modes of every module put back afterwards
        for batch: output = model(*batch)
                   loss_sum += loss(output) * samples   (a per-sample loss vector: its sum)
                   function metrics: sum of their per-sample values; metric objects: update(output, batch)
    one all-reduce of (loss_sum, samples, function sums); metric objects: compute() (their own all-reduce)
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data.collate import NamedCollate
from ..data.device_feed import to_device
from ..distributed.env import default_num_workers, process_group, sum_over_ranks
from ..distributed.preemption import ignore_preemption_signals
from ..engine.model_call import call_model, extract_loss
from ..engine.precision import MixedPrecision
from ..errors import ConfigError, DataError
from .metrics import MetricAdapter, is_torchmetrics
from .sharding import batch_indices, collective_device_now, shard_range

logger = logging.getLogger(__name__)

__all__ = ["evaluate_model"]


def evaluate_model(model, dataset, batch_size, metrics=None, num_workers=None, *, collate_fn=None, device=None,
                   amp=None) -> dict[str, float]:
    """The mean loss over the samples of ``dataset`` and the value of each metric, in eval mode without gradients.

    Under torchrun every rank must call it (a process group is created for the call when none exists): each
    evaluates its own contiguous slice of the dataset, without the padding of torch's ``DistributedSampler``, and
    the results are summed over the ranks, so every sample counts exactly once and every rank gets the same values,
    equal to a single process's (up to float summation order).

    The loss: the model returns the mean loss of a batch (as for :func:`~pixelz_dist.train_model`), which is
    weighted by the batch's sample count, so a short last batch counts no more than its samples. A loss vector with
    one entry per sample (``reduction="none"``) is summed as it is; any other shape is reduced by its mean first.
    A model whose loss is not a mean over samples (a mean over pixels of masks with many ignored pixels, say) gets
    the mean of its batch means weighted by samples, not the mean over pixels.

    Args:
        model: an ``nn.Module`` whose forward takes a batch like ``train_model``'s and returns the loss (a scalar
            tensor, or a dict with ``"loss"`` and outputs such as ``"logits"`` for the metrics). A
            DistributedDataParallel wrapper is unwrapped (its forward may broadcast buffers, a collective that ranks
            with different numbers of batches would not all reach). Every module's mode is put back afterwards.
        dataset: a map-style dataset (``__len__`` and ``__getitem__``).
        batch_size: samples per batch and process.
        metrics: ``{name: metric}`` (or a list, named by each metric's ``name`` attribute, else its class or function
            name in lower case). A metric is an object with ``reset()``, ``update(output, batch)`` and ``compute()``
            (reduced over ranks, like :class:`~pixelz_dist.evaluation.metrics.MeanIoU`; a ``torchmetrics.Metric``
            is wrapped in :class:`~pixelz_dist.evaluation.metrics.MetricAdapter`), or a function
            ``fn(output, batch)`` returning one value per sample (a tensor of the batch's length; a 0-dim tensor or
            number counts as the batch's mean), averaged over the samples exactly like the loss.
        num_workers: DataLoader workers; None: as for training (``min(cpus // processes_per_node, 6)``), never more
            than this rank's batches.
        collate_fn: passed to the DataLoader.
        device: where the batches go; None: the device of the model's first parameter (or buffer; else the CPU).
        amp: None, ``"bf16"`` or ``"fp16"``: autocast around the forward.

    Returns:
        ``{"loss": float, <metric name>: float, ...}``, the same on every rank.

    Raises:
        ConfigError: invalid arguments or metric names. DataError: an empty dataset.
        ValueError / TypeError: a metric or the model's output that does not fit (the message says how).

    Example:
        >>> from pixelz_dist.evaluation.metrics import MeanIoU
        >>> evaluate_model(model, val_set, batch_size=16, metrics={"miou": MeanIoU(21)})  # doctest: +SKIP
        {'loss': 0.412, 'miou': 0.687}
    """
    named = check_arguments(dataset, batch_size, metrics, num_workers, amp)
    if isinstance(model, DistributedDataParallel):
        model = model.module
    with process_group() as env:
        device = torch.device(device) if device is not None else model_device(model)
        batches = batch_indices(shard_range(len(dataset), env.rank, env.world_size), batch_size)
        if num_workers is None:
            num_workers = default_num_workers(env.local_world_size if env.is_distributed else None)
        num_workers = min(num_workers, len(batches))
        objects = {n: m for n, m in named.items() if not is_function_metric(m)}
        functions = {n: m for n, m in named.items() if is_function_metric(m)}
        for metric in objects.values():
            metric.reset()
        sums = torch.zeros(2 + len(functions), dtype=torch.float64, device=device)  # loss * samples, samples, fns
        autocast = MixedPrecision(amp, device).context()
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                for indices, batch in zip(batches, loader(dataset, batches, num_workers, collate_fn, device)):
                    batch = to_device(batch, device)
                    count = len(indices)
                    if autocast is not None:
                        with autocast:
                            output = call_model(model, batch)
                    else:
                        output = call_model(model, batch)
                    sums[0] += loss_sum(output, count)
                    sums[1] += count
                    for k, (name, fn) in enumerate(functions.items(), 2):
                        sums[k] += values_sum(fn(output, batch), count, name)
                    for metric in objects.values():
                        metric.update(output, batch)
        finally:
            for module, training in modes:
                module.training = training
        loss_total, samples, *function_sums = sum_over_ranks(sums.unbind(), collective_device_now())
        results = {"loss": loss_total / samples}
        for name, total in zip(functions, function_sums):
            results[name] = total / samples
        for name, metric in objects.items():  # every rank, in the same order: compute() holds a collective
            results[name] = as_float(metric.compute(), name)
        return {name: results[name] for name in ("loss", *named)}


def check_arguments(dataset, batch_size, metrics, num_workers, amp) -> dict:
    """The metrics by name, after checking every argument (all problems in one ConfigError)."""
    problems = []
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        problems.append(f"dataset must be a map-style dataset (with __len__ and __getitem__), got "
                        f"{type(dataset).__name__}")
    elif len(dataset) == 0:
        raise DataError(f"the evaluation dataset ({type(dataset).__name__}) is empty: nothing to evaluate. HINT: "
                        "check the folders or the filter that built it.")
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if num_workers is not None and (not isinstance(num_workers, numbers.Integral) or num_workers < 0):
        problems.append(f"num_workers must be an integer >= 0 or None (automatic), got {num_workers!r}")
    if amp not in (None, "bf16", "fp16"):
        problems.append(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    named = {}
    if metrics is None:
        pass
    elif isinstance(metrics, Mapping):
        named = dict(metrics)
    elif isinstance(metrics, (list, tuple)):
        for m in metrics:
            name = metric_name(m)
            if name in named:
                problems.append(f"two metrics are named {name!r}; pass a dict {{name: metric}} to name them")
            named[name] = m
    else:
        problems.append(f"metrics must be a dict {{name: metric}} or a list, got {type(metrics).__name__}")
    for name, m in list(named.items()):
        if not isinstance(name, str) or not name or name == "loss":
            problems.append(f"metric name {name!r} is not allowed (a non-empty string other than 'loss')")
        if is_torchmetrics(m):
            named[name] = MetricAdapter(m)
        elif not is_function_metric(m) and not all(callable(getattr(m, a, None)) for a in ("reset", "update",
                                                                                            "compute")):
            problems.append(f"metric {name!r} ({type(m).__name__}) is neither a function fn(output, batch) nor an "
                            "object with reset(), update(output, batch) and compute()")
    if problems:
        raise ConfigError("invalid evaluate_model arguments:\n  - " + "\n  - ".join(problems))
    return named


def metric_name(metric) -> str:
    name = getattr(metric, "name", None)
    if isinstance(name, str) and name:
        return name
    if is_function_metric(metric):
        return getattr(metric, "__name__", type(metric).__name__).lower()
    return type(metric).__name__.lower()


def is_function_metric(metric) -> bool:
    return callable(metric) and not callable(getattr(metric, "update", None))


def model_device(model) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def loader(dataset, batches: list, num_workers: int, collate_fn, device: torch.device):
    """This rank's batches, in order (nothing at all for an empty slice)."""
    if not batches:
        return iter(())
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                           collate_fn=NamedCollate(collate_fn), pin_memory=device.type == "cuda",
                           worker_init_fn=ignore_preemption_signals,
                           generator=torch.Generator()))  # the global RNG is not drawn from: training stays exact


def loss_sum(output, count: int) -> torch.Tensor:
    """The batch's loss summed over its ``count`` samples."""
    raw = output.get("loss") if isinstance(output, Mapping) else output
    if isinstance(raw, torch.Tensor) and raw.dim() >= 1 and raw.shape[0] == count:
        return raw.detach().double().reshape(count, -1).mean(1).sum()  # per-sample losses
    return extract_loss(output).detach().double() * count


def values_sum(values, count: int, name: str) -> torch.Tensor | float:
    """A function metric's values of one batch, summed over its samples."""
    if isinstance(values, torch.Tensor):
        if values.dim() == 0:
            return values.detach().double() * count
        if values.shape[0] == count:
            return values.detach().double().reshape(count, -1).mean(1).sum()
        raise ValueError(f"metric {name!r} returned a tensor of shape {tuple(values.shape)} for a batch of {count} "
                         "samples. HINT: return one value per sample (shape (batch,)), or the batch's mean (0-dim).")
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return float(values) * count
    raise TypeError(f"metric {name!r} returned {type(values).__name__}; a function metric returns one value per sample "
                    "(a tensor of the batch's length) or the batch's mean (a number or 0-dim tensor)")


def as_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ""
    raise TypeError(f"metric {name!r}: compute() returned {type(value).__name__} {shape}; evaluate_model needs one "
                    "number. "
                    "HINT: wrap the metric so that compute() returns a scalar (per-class values: read them from the "
                    "metric object afterwards, as MeanIoU.iou_per_class).")
