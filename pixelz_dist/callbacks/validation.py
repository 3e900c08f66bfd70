"""Validation during training: :class:`Validation` runs :func:`~pixelz_dist.evaluation.evaluate.evaluate_model`
every ``interval`` epochs (or iterations, when training by ``num_iters``) and reports the values.

Under torchrun every rank runs it at the same point and evaluates its own slice of the validation set; the values
are reduced over the ranks, so they are the same everywhere. The model goes back to the modes it had (train mode),
and the random generators (torch, CUDA, numpy, Python) are put back as they were: training with validation on draws
the same random numbers, and reaches the same weights, as training without it.
"""

from __future__ import annotations

import time

from ..errors import ConfigError
from ..evaluation.evaluate import check_arguments, evaluate_model
from ..random_state import preserved
from .base import Callback

__all__ = ["Validation"]

SAME_AS_TRAINING = "train"


class Validation(Callback):
    """Evaluate on ``dataset`` during training; values reported as ``{prefix}_loss``, ``{prefix}_<metric>``.

    The values go to a log line, to the metrics file (a row ``{"iteration": N, "epoch": ..., "val_loss": ...}``
    written at once), to TensorBoard (``val/loss``, ...) with ``--tensorboard``, and to every callback's
    ``on_validation(state, values)`` (``keep_best`` chooses snapshots by one of them).

    Args:
        dataset: a map-style validation dataset (see ``evaluate_model``: every sample counted once, no padding).
        batch_size: samples per batch and process; None: the training's ``batch_size``.
        metrics: as for ``evaluate_model``: ``{name: metric}``, e.g. ``{"miou": MeanIoU(21)}``.
        interval: every ``interval`` epochs (at an epoch's end) when training by ``num_epochs``, every ``interval``
            iterations when training by ``num_iters``.
        num_workers: DataLoader workers (started for each validation); None: as for training.
        collate_fn: for the validation DataLoader.
        amp: autocast of the validation forward: ``"train"`` (the run's ``amp``), None, ``"bf16"`` or ``"fp16"``.
        use_ema: evaluate the moving average of the weights (``state.ema_model``; needs ``ema=DECAY``) instead of
            the model being trained.
        prefix: the values' key prefix (``"val"``); a second validation set needs another (``"val2"``).

    Attributes:
        last: ``{"iteration": N, "val_loss": ..., ...}`` of the last validation (saved in snapshots), or None.
    """

    def __init__(self, dataset, batch_size: int | None = None, metrics=None, interval: int = 1, *,
                 num_workers: int | None = None, collate_fn=None, amp=SAME_AS_TRAINING, use_ema: bool = False,
                 prefix: str = "val"):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ConfigError(f"Validation interval must be an integer >= 1 (epochs, or iterations when training by "
                              f"num_iters), got {interval!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"Validation prefix must be a non-empty string such as 'val', got {prefix!r}")
        self.metrics = check_arguments(dataset, 1 if batch_size is None else batch_size, metrics, num_workers,
                                       None if amp == SAME_AS_TRAINING else amp)
        self.dataset, self.batch_size, self.interval = dataset, batch_size, interval
        self.num_workers, self.collate_fn, self.amp = num_workers, collate_fn, amp
        self.use_ema, self.prefix = use_ema, prefix
        self.by_epochs = True
        self.last: dict | None = None

    @property
    def validation_keys(self) -> list[str]:
        """The keys this validation reports (what ``monitor=`` may name)."""
        return [f"{self.prefix}_{name}" for name in ("loss", *self.metrics)]

    def on_train_start(self, state):
        if self.use_ema and getattr(state, "ema_model", None) is None:
            raise ConfigError("Validation(use_ema=True) evaluates the moving average of the weights, but this run "
                              "keeps none. HINT: pass ema=0.999 to train_model (--ema 0.999), or use_ema=False "
                              "(leave out --use-ema).")
        self.by_epochs = state.by_epochs

    def on_iteration_end(self, state):
        if not self.by_epochs and state.iteration % self.interval == 0:
            self.validate(state)

    def on_epoch_end(self, state):
        if self.by_epochs and state.epoch % self.interval == 0:
            self.validate(state)

    def validate(self, state) -> dict:
        """Evaluate now (every rank), report the values, return them."""
        model = state.ema_model if self.use_ema else state.model
        started = time.perf_counter()
        with preserved(numpy=True, python=True, cuda=True):  # training's random stream stays as it was
            results = evaluate_model(model, self.dataset, self.batch_size or state.batch_size, self.metrics,
                                     self.num_workers, collate_fn=self.collate_fn,
                                     amp=state.amp if self.amp == SAME_AS_TRAINING else self.amp)
        values = {f"{self.prefix}_{name}": value for name, value in results.items()}
        self.last = {"iteration": state.iteration, **values}
        state.report_validation(values, seconds=time.perf_counter() - started)
        return values

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last")
