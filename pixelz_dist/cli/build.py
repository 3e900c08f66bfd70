"""The objects a command-line run trains: model, dataset, optimizer and scheduler, from resolved options.

``--data DIR [DIR ...]`` gives a :class:`~pixelz_dist.data.multi_images.MultiImgsDataset` over the folders whose
samples are float tensors in [0, 1] (one per folder, ``C x H x W``, decoded with ``--modes``), except ``label``
folders: class indices as int64 ``H x W``, never scaled. A batch reaches the model as ``model(*images)``.
``--crop``, ``--hflip`` and ``--scale-range`` add the joint augmentation of :mod:`~pixelz_dist.data.augment` (one
draw for all folders of a sample; label maps nearest and padded with ``--ignore-index``); anything else belongs to a
``--dataset`` factory.
Schedulers: ``step`` (``--step-size``, ``--gamma``), ``multistep`` (``--milestones``, ``--gamma``), ``cosine``
(``T_max`` = the run's length in epochs, or in iterations with ``--schedule-on-iter``; ``--eta-min``) and
``onecycle`` (``max_lr`` = ``--lr``, ``total_steps`` = the run's iterations, always stepped per iteration) and
``poly`` (``PolynomialLR``: ``x (1 - t / T) ** --poly-power``, ``T`` the run's length as for cosine: 0 at its end).
Warmup (``--warmup-iters``) is train_model's, on top of any of them.
"""

from __future__ import annotations

import logging
import math
import random
from argparse import Namespace

import numpy as np
import torch
from torch import nn

from ..data.sampler import batches_in
from ..distributed.env import read_env
from ..engine.param_groups import make_param_groups
from ..errors import ConfigError, DataError
from .imports import call_factory

__all__ = ["build_dataset_and_model", "build_metrics", "build_optimizer", "build_scheduler", "build_validation",
           "folder_dataset", "total_iterations"]

logger = logging.getLogger(__name__)


def _is_dataset(obj) -> bool:
    return hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


def build_dataset_and_model(opts: Namespace, *, augment: bool = True):
    """``(model, dataset)``: the demo's, or the ``--model`` factory's and the ``--data`` / ``--dataset`` one.

    ``augment=False`` (evaluation) leaves out the random augmentation of ``--data`` (``--crop``, ``--hflip``,
    ``--scale-range``, kept in a training run's saved configuration) and of the demo: every sample is read whole.

    torch's, numpy's and Python's global RNGs are seeded with ``--seed`` first, so the initial weights and the
    training loop's own random draws (dropout) are the same in every run with that seed.

    Raises:
        ConfigError: a factory that does not resolve or returns the wrong kind of object.
        DataError: folders that are missing, empty or do not pair up.
    """
    seed_everything(opts.seed)
    if opts.demo:
        from .demo import build_demo

        return build_demo(opts.demo_dir, num_samples=opts.demo_samples, seed=opts.seed, augment=augment)
    model = call_factory(opts.model, "--model", opts.model_arg, lambda m: isinstance(m, nn.Module),
                         "a torch.nn.Module")
    if opts.dataset:
        dataset = call_factory(opts.dataset, "--dataset", opts.dataset_arg, _is_dataset,
                               "a map-style dataset (with __len__ and __getitem__)")
    else:
        dataset = folder_dataset(opts, opts.data, augment=augment)
    return model, dataset


def folder_dataset(opts: Namespace, folders: list[str], *, augment: bool = False):
    """A :class:`MultiImgsDataset` over ``folders`` as ``--data`` builds it (``--modes``, bad files, cache), its
    images scaled to float [0, 1].

    Args:
        opts: The resolved options.
        folders: ``--data`` for training; other folders (validation) are decoded alike.
        augment: Add ``--crop`` / ``--hflip`` / ``--scale-range`` (training only: validation sees whole images), and
            log the augmentation and whether only the crop is decoded.
    """
    from ..data.augment import describe, joint_augmentation
    from ..data.multi_images import MultiImgsDataset

    flags = dict(crop=opts.crop, hflip=opts.hflip, scale_range=opts.scale_range, pad_value=opts.pad_value,
                 ignore_value=opts.ignore_index) if augment else {}
    # A joint transform: label folders are masks (nearest, padded with the ignore index, never scaled to floats).
    dataset = MultiImgsDataset(folders, joint_augmentation(**flags), modes=opts.modes, on_error=opts.on_bad_file,
                               cache_dir=opts.cache_dir)
    if augment and (opts.crop is not None or opts.hflip):
        if dataset.crop_aware:
            how = ("crop-aware decoding: the crop is drawn from the file sizes, then only its pixels are decoded "
                   "(cached images: its rows)" if dataset.region_decoding else "crop-aware decoding: the crop is "
                   "drawn from the file sizes, cached images read by rows; JPEGs decoded whole (the JPEG region "
                   "decoder is not built, see docs/how-to/fast-data.md)")
        elif opts.crop is not None and opts.scale_range is not None:
            how = "whole images decoded: the random rescale before the crop needs every pixel"
        elif opts.crop is not None:
            how = "whole images decoded (crop-aware decoding unavailable)"
        else:
            how = "whole images decoded (no crop)"
        logger.info("augmentation (one draw per sample, all folders): %s; %s", describe(**flags), how)
    return dataset


def build_validation(opts: Namespace):
    """The :class:`~pixelz_dist.callbacks.validation.Validation` of ``--val-data`` (None without it)."""
    if not opts.val_data:
        return None
    from ..callbacks.validation import Validation

    return Validation(folder_dataset(opts, opts.val_data), batch_size=opts.val_batch_size or opts.batch_size,
                      metrics=build_metrics(opts) or None, interval=opts.val_interval, num_workers=opts.workers,
                      use_ema=opts.use_ema)


def place_model(model: nn.Module, device: str) -> torch.device:
    """Move the model to ``--device`` (auto: a GPU when there is one). Under torchrun the trainer itself puts each
    process on the GPU of its LOCAL_RANK, so the model is left where it is."""
    if read_env().is_distributed:
        return torch.device("cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from e
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but torch sees no CUDA GPU here (torch {torch.__version__}); use "
                          "--device cpu or auto")
    model.to(target)
    return target


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, opts: Namespace, lr: float | None = None) -> torch.optim.Optimizer:
    """``--optimizer`` over ``make_param_groups(model, --param-lr, --no-decay-norm-bias)`` at ``lr`` (default
    ``--lr``)."""
    groups = make_param_groups(model, opts.param_lr or None,
                               no_decay_norm_bias=getattr(opts, "no_decay_norm_bias", False))
    lr = opts.lr if lr is None else lr
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, weight_decay=opts.weight_decay)


def iterations_per_epoch(num_samples: int, batch_size: int, iter_size: int, world_size: int) -> int:
    """Optimizer steps in one epoch: global batches of ``batch_size x world_size``, windows of ``iter_size``.

    Raises:
        ConfigError: a count below 1 (the parser refuses them first; this guards a direct call).
        DataError: no samples: a schedule over the run's length would have none.
    """
    bad = [f"{name} must be >= 1, got {value}" for name, value in (("batch_size", batch_size), ("iter_size", iter_size),
                                                                 ("world_size", world_size)) if value < 1]
    if bad:
        raise ConfigError("; ".join(bad))
    if num_samples < 1:
        raise DataError("the dataset is empty: nothing to train on, and no length for the schedule. HINT: check the "
                        "folders or the --dataset factory")
    return math.ceil(batches_in(num_samples, batch_size * world_size) / iter_size)


def total_iterations(opts: Namespace, num_samples: int, world_size: int) -> int:
    """The run's length in optimizer steps (``--iters``, or ``--epochs`` times the steps of an epoch)."""
    if opts.iters is not None:
        return opts.iters
    return opts.epochs * iterations_per_epoch(num_samples, opts.batch_size, opts.iter_size, world_size)


def build_scheduler(optimizer: torch.optim.Optimizer, opts: Namespace, num_samples: int, world_size: int):
    """The ``--scheduler`` (or None); its unit is the epoch, or the iteration with ``--schedule-on-iter``."""
    sched = torch.optim.lr_scheduler
    if opts.scheduler == "none":
        return None
    if opts.scheduler == "step":
        return sched.StepLR(optimizer, step_size=opts.step_size, gamma=opts.gamma)
    if opts.scheduler == "multistep":
        return sched.MultiStepLR(optimizer, milestones=opts.milestones, gamma=opts.gamma)
    iters = total_iterations(opts, num_samples, world_size)
    if opts.scheduler == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]  # each group peaks at its own rate (--param-lr)
        return sched.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=iters)
    if opts.schedule_on_iter:
        length = iters
    else:
        length = opts.epochs or math.ceil(iters / iterations_per_epoch(num_samples, opts.batch_size, opts.iter_size,
                                                                       world_size))
    if opts.scheduler == "poly":  # (1 - t / T) ** power: exactly 0 after the run's last step
        return sched.PolynomialLR(optimizer, total_iters=max(1, length), power=opts.poly_power)
    return sched.CosineAnnealingLR(optimizer, T_max=max(1, length), eta_min=opts.eta_min)


def build_metrics(opts: Namespace) -> dict:
    """The metrics by name, for ``evaluate_model`` (in-loop validation and ``python -m pixelz_dist.evaluate``):
    ``--val-miou CLASSES`` gives ``miou``, a :class:`~pixelz_dist.evaluation.metrics.MeanIoU` that leaves out the
    ``--ignore-index`` pixels."""
    from ..evaluation.metrics import MeanIoU

    return {"miou": MeanIoU(opts.val_miou, ignore_index=opts.ignore_index)} if opts.val_miou else {}
