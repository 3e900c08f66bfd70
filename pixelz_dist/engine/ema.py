"""An exponential moving average (EMA) of the model's weights, kept during training and saved in snapshots.

After every optimizer step that was *applied* (not one skipped by ``on_nonfinite="skip"``, a callback's
``skip_step`` or fp16's GradScaler on inf / NaN gradients)::

    ema = decay * ema + (1 - decay) * weights          # torch.lerp(ema, weights, 1 - decay), foreach

starting from the weights the run starts with (a fresh model's, or a resumed snapshot's). The average is a
:class:`torch.optim.swa_utils.AveragedModel` with torch's :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`, kept on
the model's device; under torchrun every rank keeps its own copy of the unwrapped module (the weights are the same
everywhere after each step, so the averages are too).

Buffers (``ema_buffers``):

- ``"average"`` (the default): floating-point buffers (BatchNorm's running mean and variance) are averaged like the
  weights, integer ones (``num_batches_tracked``) copied. The running statistics then belong to the averaged
  weights rather than to the last step's: what torchvision's classification reference (``AveragedModel(...,
  use_buffers=True)``) and timm's ``ModelEmaV2/V3`` do, and what evaluates best in their experience.
- ``"copy"``: buffers are the live model's, copied after each step (torch's ``use_buffers=False``).

In a snapshot the EMA is the part ``"ema"``: ``{"decay", "include_buffers", "num_updates", "state_dict"}``, the
``state_dict`` shaped exactly like the plain model's, so that a fresh model loads it (:func:`ema_state_dict`).
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..checkpoint.parts import check_model_state
from ..errors import SnapshotError

__all__ = ["EMA", "BUFFER_MODES", "ema_model", "ema_state_dict"]

logger = logging.getLogger(__name__)

BUFFER_MODES = ("average", "copy")

# model -> its EMA module, for the model train_model returned (ema_model(model)); weak: the registry keeps nothing
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ema_and_copy(decay: float):
    """torch's EMA update for floating-point tensors; integer buffers are copied (torch's own fallback would store a
    truncated ``decay * a + (1 - decay) * b`` in ``num_batches_tracked``)."""
    ema = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged) -> None:
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            ema(averaged, current, num_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    return update


class EMA:
    """The moving average of one model's weights (a snapshot part).

    Args:
        model: the plain (unwrapped) module being trained; copied now, so call this before any SyncBatchNorm
            conversion or DDP wrapping.
        decay: in (0, 1); the weight of the past at each step (0.999: about the last 1000 steps count).
        buffers: ``"average"`` or ``"copy"`` (see the module docstring).
        strict: refuse a snapshot's EMA whose keys differ from the model's (as ``strict_load``).
    """

    def __init__(self, model: nn.Module, decay: float, buffers: str = "average", strict: bool = True):
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.decay, self.buffers, self.strict = float(decay), buffers, strict
        # n_averaged stays on the CPU (device=None): AveragedModel reads it on every update, which would be a host
        # sync per step were it on the GPU. The module copy is moved with to().
        self.averaged = AveragedModel(_frozen_copy(model), multi_avg_fn=_ema_and_copy(self.decay),
                                      use_buffers=buffers == "average")
        self.averaged.n_averaged.fill_(1)  # the copy is the first term: the next update averages, not copies

    @property
    def module(self) -> nn.Module:
        """The averaged weights as a module of the model's class (in eval mode; no gradients)."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        """Optimizer steps averaged in since the EMA started (from a fresh model or a snapshot)."""
        return int(self.averaged.n_averaged) - 1

    def to(self, device: torch.device | None, channels_last: bool = False) -> EMA:
        """Put the copy where the model trains (under torchrun the engine moves the model after the copy; None:
        leave it where the model was, a model spread over several devices included)."""
        if device is not None:
            self.averaged.module.to(device)
        if channels_last:
            self.averaged.module.to(memory_format=torch.channels_last)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s weights after an applied optimizer step."""
        self.averaged.update_parameters(model)

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Start over from ``model``'s current weights (a resume from a snapshot that holds no EMA)."""
        for mine, theirs in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            mine.copy_(theirs)
        self.averaged.n_averaged.fill_(1)

    # -- snapshot part ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"decay": self.decay, "include_buffers": self.buffers == "average", "num_updates": self.num_updates,
                "state_dict": self.module.state_dict()}

    def precheck(self, state, meta: dict) -> None:
        if state is None:
            return
        if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
            raise SnapshotError("its 'ema' part is not an EMA state (a dict with a 'state_dict'). HINT: resume from "
                                "a snapshot written by train_model, or start without ema.")
        try:
            check_model_state(self.module, state["state_dict"], strict=self.strict)
        except SnapshotError as e:
            raise SnapshotError(f"its EMA {e}") from None

    def load_state_dict(self, state) -> None:
        """Restore the average; ``None`` (a snapshot written without EMA): the caller restarts it from the loaded
        weights (:meth:`restart_from`), with a warning."""
        if state is None:
            return
        self.module.load_state_dict(state["state_dict"], strict=self.strict)
        self.averaged.n_averaged.fill_(int(state.get("num_updates", 0)) + 1)
        saved_decay, saved_buffers = state.get("decay"), state.get("include_buffers")
        if saved_decay is not None and float(saved_decay) != self.decay:
            logger.warning("the snapshot's EMA was kept with decay %g, this run's is %g: the average goes on with "
                           "%g", saved_decay, self.decay, self.decay)
        if saved_buffers is not None and bool(saved_buffers) != (self.buffers == "average"):
            logger.warning("the snapshot's EMA %s buffers, this run %s them (ema_buffers=%r)",
                           "averaged" if saved_buffers else "copied", "averages" if self.buffers == "average"
                           else "copies", self.buffers)


def resume(ema: EMA | None, model: nn.Module, snapshot: dict) -> None:
    """After a snapshot was loaded into ``model`` (and ``ema``): one without an EMA starts it from its weights (a
    warning); an EMA this run does not keep (``ema`` None) is ignored (a note)."""
    if ema is None:
        if snapshot.get("ema") is not None:
            logger.info("the snapshot holds an EMA of the weights, which this run does not keep (ema=None): ignored")
    elif snapshot.get("ema") is None:
        logger.warning("the snapshot holds no EMA of the weights: the EMA (decay %g) starts from its weights",
                       ema.decay)
        ema.restart_from(model)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy without gradients, in eval mode: the EMA is only ever evaluated or averaged into."""
    grads = {}
    for p in model.parameters():  # deepcopy would copy the gradients too: leave them out of the copy
        if p.grad is not None:
            grads[p], p.grad = p.grad, None
    try:
        clone = copy.deepcopy(model)
    finally:
        for p, g in grads.items():
            p.grad = g
    clone.requires_grad_(False)
    return clone.eval()


def register(model: nn.Module, ema: EMA) -> None:
    """Make ``ema`` findable from ``model`` (:func:`ema_model`): train_model returns the plain model itself."""
    _REGISTRY[model] = ema.module


def ema_model(model: nn.Module) -> nn.Module | None:
    """The EMA module of a model that ``train_model(..., ema=DECAY)`` trained (and returned); None without EMA.

    Example:
        >>> model = train_model(model, optimizer, None, data, 8, num_iters=1000, ema=0.999)  # doctest: +SKIP
        >>> averaged = ema_model(model)           # same class as model, eval mode, on the model's device
    """
    return _REGISTRY.get(model)


def ema_state_dict(snapshot: dict) -> dict | None:
    """The EMA weights a snapshot holds, shaped like ``model.state_dict()`` (None: written without EMA).

    Example:
        >>> snap = torch.load("runs/a/snap_iter_1000.pt", weights_only=True)   # doctest: +SKIP
        >>> model.load_state_dict(ema_state_dict(snap) or snap["model"])       # doctest: +SKIP
    """
    state = snapshot.get("ema")
    if not isinstance(state, dict):
        return None
    return state.get("state_dict")
