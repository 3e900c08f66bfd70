"""Where the model trains and what wraps it: device placement, SyncBatchNorm, DistributedDataParallel, torch.compile.

All of it is decided and undone here, in this order (torchtitan's and the DDP tutorial's order)::

    prepared = prepare_model(model, env, ...)   # device, SyncBN, channels_last: the plain module, ready to load into
    ...load a snapshot into `model`...          # before DDP: its constructor broadcasts rank 0's weights
    forward = prepared.wrap()                   # DDP (under torchrun), then torch.compile
    ...train with `forward`...
    prepared.undo()                             # the user's module again: no wrapper, their BatchNorm classes

Snapshots and the return value of ``train_model`` are always the plain module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .env import DistEnv, default_backend, local_gpu

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    """Decisions that depend on the hardware, made in one place so tests can check them with any GPU count."""

    device: torch.device
    backend: str | None
    sync_bn: bool
    pin_memory: bool
    local_processes: int | None


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def plan_devices(env: DistEnv, model_device: torch.device, sync_bn: bool, has_batchnorm: bool,
                 cuda_available: bool | None = None, backend: str | None = None) -> DevicePlan:
    """Where this process trains and how.

    Single process: the model stays where the user put it. Under torchrun: ``cuda:LOCAL_RANK`` (nccl) when CUDA is
    available, else the CPU (gloo). SyncBatchNorm only on GPUs: torch refuses it on CPU tensors, so on a CPU job each
    process normalises with its own batch statistics (a warning says so).
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not env.is_distributed:
        return DevicePlan(model_device, None, False, model_device.type == "cuda", None)
    device = local_gpu(env) if cuda else torch.device("cpu")
    chosen = backend or default_backend(cuda)
    convert = bool(sync_bn and has_batchnorm and device.type == "cuda")
    if sync_bn and has_batchnorm and not convert:
        logger.warning("sync_bn: SyncBatchNorm needs GPU tensors, so on this CPU job each of the %d processes "
                       "normalises with its own batch statistics", env.world_size)
    return DevicePlan(device, chosen, convert, device.type == "cuda", env.local_world_size)


def convert_sync_batchnorm(model: nn.Module) -> dict[str, type]:
    """Turn BatchNorm layers into SyncBatchNorm in place; returns {module name: original class} to undo it."""
    originals = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and not isinstance(m, nn.SyncBatchNorm)}
    if not originals:
        return {}
    if "" in originals:
        raise TypeError("the model itself is a BatchNorm layer; wrap it in a module whose forward returns the loss")
    for name in originals:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(parent, child)))
    return originals


def revert_sync_batchnorm(model: nn.Module, originals: dict[str, type]) -> None:
    """Put the user's BatchNorm classes back, keeping the trained parameters (same objects) and statistics."""
    for name, cls in originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        sync = getattr(parent, child)
        bn = cls(sync.num_features, eps=sync.eps, momentum=sync.momentum, affine=sync.affine,
                 track_running_stats=sync.track_running_stats, device="meta")
        if sync.affine:
            bn.weight, bn.bias = sync.weight, sync.bias
        bn.running_mean, bn.running_var = sync.running_mean, sync.running_var
        bn.num_batches_tracked = sync.num_batches_tracked
        bn.train(sync.training)
        if hasattr(sync, "qconfig"):
            bn.qconfig = sync.qconfig
        setattr(parent, child, bn)


class PreparedModel:
    """The user's module placed for this process, and what the loop calls (see the module docstring)."""

    def __init__(self, model: nn.Module, env: DistEnv, *, sync_bn: bool = True, channels_last: bool = False,
                 compile=False, ddp_kwargs: dict | None = None, backend: str | None = None):
        self.model, self.env = model, env
        self.plan = plan_devices(env, model_device(model), sync_bn, has_batchnorm(model), backend=backend)
        self.device = self.plan.device
        self.compile, self.ddp_kwargs = compile, ddp_kwargs or {}
        if env.is_distributed:
            model.to(self.device)
        self._sync_bn_originals = convert_sync_batchnorm(model) if self.plan.sync_bn else {}
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.ddp: DistributedDataParallel | None = None
        self.forward_model: nn.Module = model

    def wrap(self) -> nn.Module:
        """DDP under torchrun, then torch.compile when asked; returns what the loop calls."""
        if self.env.is_distributed:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **self.ddp_kwargs)
            self.forward_model = self.ddp
        if self.compile:
            self.forward_model = torch.compile(self.forward_model, **(self.compile if isinstance(self.compile, dict)
                                                                      else {}))
        return self.forward_model

    def undo(self) -> None:
        """The plain module again, with the user's BatchNorm classes (idempotent)."""
        self.ddp, self.forward_model = None, self.model
        if self._sync_bn_originals:
            revert_sync_batchnorm(self.model, self._sync_bn_originals)
            self._sync_bn_originals = {}


def prepare_model(model: nn.Module, env: DistEnv, **options) -> PreparedModel:
    """Place ``model`` for this process (see :class:`PreparedModel` for the options); call ``wrap()`` after loading
    a snapshot into it and ``undo()`` when training ends."""
    return PreparedModel(model, env, **options)
