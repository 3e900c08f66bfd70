"""The seam for extra behaviour: callbacks that see a read-only view of training and may ask for a stop or a snapshot.

Events, in loop order: ``on_train_start``, ``on_epoch_start``, ``on_after_backward`` (gradients of the whole
iteration are ready, before ``optimizer.step``), ``on_iteration_end``, ``on_epoch_end``, ``on_snapshot``,
``on_train_end``. A callback with ``state_dict`` / ``load_state_dict`` is saved in and restored from snapshots.

Built-in behaviours (gradient clipping, stop criteria, the non-finite guard) are callbacks too: see
:mod:`pixelz_dist.callbacks`.
"""

from __future__ import annotations

EVENTS = ("on_train_start", "on_epoch_start", "on_after_backward", "on_iteration_end", "on_epoch_end",
          "on_snapshot", "on_train_end")


class Callback:
    """Base class: override the events you need. Each receives the :class:`TrainState` (``on_snapshot`` also the
    path written).

    Set ``changes_dataset = True`` on a callback that changes the dataset in ``on_epoch_start`` (a curriculum):
    DataLoader workers are then restarted each epoch so that they see the change (persistent workers keep a copy).
    A dataset with a ``set_epoch(epoch)`` method gets it called before each epoch, with the same effect.
    """

    changes_dataset = False

    def on_train_start(self, state): ...

    def on_epoch_start(self, state): ...

    def on_after_backward(self, state): ...

    def on_iteration_end(self, state): ...

    def on_epoch_end(self, state): ...

    def on_snapshot(self, state, path): ...

    def on_train_end(self, state): ...


class TrainState:
    """A read-only view of the run for callbacks. ``request_stop`` / ``request_snapshot`` are the only levers."""

    def __init__(self, engine):
        self._engine = engine
        self.stop_reason: str | None = None
        self.snapshot_requested = False

    iteration = property(lambda self: self._engine.progress.iteration, doc="optimizer steps done")
    epoch = property(lambda self: self._engine.progress.epoch, doc="current epoch (0-based)")
    samples_in_epoch = property(lambda self: self._engine.progress.samples_in_epoch,
                                doc="global samples consumed in the current epoch")
    epoch_fraction = property(lambda self: self._engine.epoch_fraction(), doc="e.g. 2.5 = half way through epoch 3")
    total_iterations = property(lambda self: self._engine.total_iters)
    model = property(lambda self: self._engine.model, doc="the user's module (unwrapped)")
    wrapped_model = property(lambda self: self._engine.forward_model,
                             doc="what the loop calls: the DistributedDataParallel wrapper under torchrun")
    optimizer = property(lambda self: self._engine.optimizer)
    scheduler = property(lambda self: self._engine.scheduler)
    loss = property(lambda self: self._engine.last_loss,
                    doc="mean loss of the last iteration as a detached tensor (reading it with .item() syncs)")
    lrs = property(lambda self: [g["lr"] for g in self._engine.optimizer.param_groups])
    dataset = property(lambda self: self._engine.dataset, doc="what was passed as dataset (or the DataLoader)")
    snapshot_prefix = property(lambda self: self._engine.snapshot_prefix)
    last_snapshot_path = property(lambda self: self._engine.last_snapshot_path,
                                  doc="the snapshot written or resumed from most recently (None before any)")
    last_snapshot_iteration = property(lambda self: self._engine.last_snapshot_iteration)
    last_snapshot_seconds = property(lambda self: self._engine.last_snapshot_seconds,
                                     doc="how long writing the last snapshot took here (None before any)")

    def global_loss(self) -> float:
        """Mean loss of the last iteration over all ranks (a collective: every rank must call it), as a float."""
        return self._engine.global_last_loss()

    def request_stop(self, reason: str = "requested by a callback") -> None:
        """Stop after the current iteration; a final snapshot is written when snapshots are on."""
        self.stop_reason = reason

    def request_snapshot(self) -> None:
        """Write a snapshot after the current iteration."""
        self.snapshot_requested = True

    # -- levers for on_after_backward (gradients of the iteration are ready, the step has not happened) ------------
    def unscale_gradients(self) -> None:
        """With ``amp="fp16"``, divide the gradients by the loss scale now (once per step; no-op otherwise), so
        they can be measured or clipped in their true units."""
        self._engine.unscale_gradients()

    @property
    def step_skipped(self) -> bool:
        """Whether a callback already asked to skip this iteration's step."""
        return self._engine._skip_reason is not None

    def skip_step(self, reason: str = "skipped by a callback") -> None:
        """Do not apply this iteration's gradients (the weights stay; the data is consumed; counted in the log)."""
        self._engine.skip_step(reason)

    def loss_is_finite(self) -> bool:
        """Whether this iteration's loss is finite on every rank (a host sync; a collective: all ranks call it)."""
        return self._engine.loss_is_finite()

    def log_value(self, name: str, value) -> None:
        """Add a value (tensor or number) to the log line and the metrics file: its mean over the display window
        and the ranks. Stays on the device until the line is written. Every rank must log the same names."""
        self._engine.log_value(name, value)


class CallbackList:
    """Dispatches each event only to callbacks that override it, so unused events cost nothing in the loop."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks or ())
        for cb in self.callbacks:
            unknown = [n for n in dir(cb) if n.startswith("on_") and n not in EVENTS and callable(getattr(cb, n))]
            if unknown:
                raise TypeError(f"callback {type(cb).__name__} defines {unknown}, which are not events. "
                                f"HINT: the events are {list(EVENTS)}.")
        for event in EVENTS:
            handlers = [getattr(cb, event) for cb in self.callbacks
                        if getattr(type(cb), event, None) is not getattr(Callback, event)
                        and callable(getattr(cb, event, None))]
            setattr(self, event, handlers)
        self.changes_dataset = any(getattr(cb, "changes_dataset", False) for cb in self.callbacks)

    def keys(self) -> list[str]:
        return [f"{i}:{type(cb).__qualname__}" for i, cb in enumerate(self.callbacks)]

    def state_dict(self) -> dict:
        return {key: cb.state_dict() for key, cb in zip(self.keys(), self.callbacks) if hasattr(cb, "state_dict")}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore stateful callbacks; returns the keys that had no saved state."""
        absent = []
        for key, cb in zip(self.keys(), self.callbacks):
            if hasattr(cb, "load_state_dict"):
                if key in state:
                    cb.load_state_dict(state[key])
                else:
                    absent.append(key)
        return absent
