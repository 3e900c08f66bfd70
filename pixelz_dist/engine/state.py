"""The training counter that snapshots save, and the read-only view of a run that callbacks get.

The data position (epoch, samples or batches into it) is the batch source's, not a counter here: see
:mod:`pixelz_dist.data.batch_source`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Progress:
    """``iteration`` counts optimizer steps (skipped ones included: the data was consumed)."""

    iteration: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])


def learning_rates(optimizer) -> list[float]:
    """Each param group's lr as a float (capturable / fused optimizers may hold a tensor)."""
    return [float(g["lr"]) for g in optimizer.param_groups]


class TrainState:
    """A read-only view of the run for callbacks; ``request_stop`` / ``request_snapshot`` (and, in
    ``on_after_backward``, ``skip_step`` / ``unscale_gradients``) are the only levers."""

    def __init__(self, engine):
        self._engine = engine

    iteration = property(lambda self: self._engine.progress.iteration, doc="optimizer steps done")
    epoch = property(lambda self: self._engine.source.epoch, doc="current epoch (0-based)")
    samples_in_epoch = property(lambda self: self._engine.source.samples_in_epoch,
                                doc="global samples consumed in the current epoch (all ranks together)")
    batches_in_epoch = property(lambda self: self._engine.source.batches_in_epoch,
                                doc="batches this rank consumed in the current epoch")
    epoch_fraction = property(lambda self: self._engine.source.epoch_fraction(),
                              doc="e.g. 2.5 = half way through epoch 3")
    total_iterations = property(lambda self: self._engine.total_iterations)
    by_epochs = property(lambda self: self._engine.s.num_epochs is not None,
                         doc="the run's length is in epochs (num_epochs), not in iterations (num_iters)")
    batch_size = property(lambda self: self._engine.s.batch_size, doc="samples per micro-batch and process")
    amp = property(lambda self: self._engine.s.amp, doc="the run's mixed precision: None, 'bf16' or 'fp16'")
    model = property(lambda self: self._engine.model, doc="the user's module (unwrapped)")
    wrapped_model = property(lambda self: self._engine.prepared.forward_model,
                             doc="what the loop calls: the DistributedDataParallel wrapper under torchrun")
    ema_model = property(lambda self: self._engine.ema.module if self._engine.ema is not None else None,
                         doc="the moving average of the weights (ema=DECAY): a module of the model's class, in eval "
                             "mode, on its device; None without EMA")
    optimizer = property(lambda self: self._engine.optimizer)
    scheduler = property(lambda self: self._engine.scheduler)
    loss = property(lambda self: self._engine.last_loss,
                    doc="mean loss of the last iteration as a detached tensor (reading it with .item() syncs)")
    lrs = property(lambda self: learning_rates(self._engine.optimizer), doc="each param group's lr, as floats")
    dataset = property(lambda self: self._engine.dataset, doc="what was passed as dataset (or the DataLoader)")
    snapshot_prefix = property(lambda self: self._engine.checkpointer.prefix)
    last_snapshot_path = property(lambda self: self._engine.checkpointer.last_path,
                                  doc="the newest durable snapshot, written or resumed from (None before any)")
    last_snapshot_iteration = property(lambda self: self._engine.checkpointer.durable_iteration)
    last_snapshot_seconds = property(lambda self: self._engine.checkpointer.last_seconds,
                                     doc="from the request of the last durable snapshot until it was durable, here "
                                         "(a background write included; None before any)")
    newest_snapshot = property(lambda self: self._engine.checkpointer.newest,
                               doc="(path, iteration) of the newest snapshot, durable or still being written in "
                                   "the background (durable before the process ends unless its write fails)")
    stop_reason = property(lambda self: self._engine.requests.stop_reason,
                           doc="why a stop was requested (None: none yet)")
    snapshot_requested = property(lambda self: self._engine.requests.snapshot)
    request_delay = property(lambda self: self._engine.requests.delay,
                             doc="iterations between a request on one rank and the iteration it acts after: 0 in "
                                 "one process, 1 under torchrun (the ranks agree on it without a blocking sync)")
    step_skipped = property(lambda self: self._engine.requests.skip_reason is not None,
                            doc="whether a callback already asked to skip this iteration's step")

    def global_loss(self) -> float:
        """Mean loss of the last iteration over all ranks (a collective: every rank must call it), as a float."""
        return self._engine.global_last_loss()

    def request_stop(self, reason: str = "requested by a callback", *, on_every_rank: bool = False) -> None:
        """Stop after the current iteration (under torchrun: after the next one, on every rank together); a final
        snapshot is written when snapshots are on.

        Pass ``on_every_rank=True`` only when every rank makes this same call at this iteration (a decision taken on
        :meth:`global_loss`, say): the stop then needs no agreement and happens after this iteration everywhere.
        """
        self._engine.requests.request_stop(reason, on_every_rank)

    def request_snapshot(self, *, on_every_rank: bool = False) -> None:
        """Write a snapshot after the current iteration (under torchrun: after the next one).

        Pass ``on_every_rank=True`` only when every rank makes this same call at this iteration (a validation that
        every rank runs): the snapshot then needs no agreement and holds this very iteration everywhere.
        """
        self._engine.requests.request_snapshot(on_every_rank)

    # -- levers for on_after_backward (gradients of the iteration are ready, the step has not happened) ------------
    def unscale_gradients(self) -> None:
        """With ``amp="fp16"``, divide the gradients by the loss scale now (once per step; no-op otherwise), so
        they can be measured or clipped in their true units."""
        self._engine.precision.unscale(self._engine.optimizer)

    def skip_step(self, reason: str = "skipped by a callback") -> None:
        """Do not apply this iteration's gradients (the weights stay; the data is consumed; counted in the log)."""
        self._engine.requests.skip_reason = reason

    def loss_is_finite(self) -> bool:
        """Whether this iteration's loss is finite on every rank (a host sync; a collective: all ranks call it)."""
        return self._engine.loss_is_finite()

    def log_value(self, name: str, value) -> None:
        """Add a value (tensor or number) to the log line and the metrics file: its mean over the display window
        and the ranks. Stays on the device until the line is written. Every rank must log the same names."""
        self._engine.reporter.meter.add_value(name, value if isinstance(value, torch.Tensor)
                                              else torch.tensor(float(value)))

    def report_validation(self, values: dict, *, seconds: float | None = None) -> None:
        """Report values measured at this iteration (a validation's: ``{"val_loss": 0.41, "val_miou": 0.68}``),
        each the same on every rank: one log line and one metrics-file row ``{"iteration": N, "epoch": ...,
        **values}`` written now (point values, not means over a display window), then every callback's
        ``on_validation(state, values)`` (TensorBoard, the best-snapshot tracker). Every rank calls it alike;
        ``seconds``: how long the measurement took, for the log line."""
        self._engine.report_validation(dict(values), seconds)
