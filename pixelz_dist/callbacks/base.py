"""The seam for extra behaviour: callbacks that see a read-only view of training
(:class:`~pixelz_dist.engine.state.TrainState`) and may ask for a stop or a snapshot.

Events, in loop order: ``on_train_start``, ``on_epoch_start``, ``on_after_backward`` (gradients of the whole
iteration are ready, before ``optimizer.step``), ``on_iteration_end``, ``on_epoch_end``, ``on_snapshot``,
``on_train_end``; and ``on_validation(state, values)`` whenever a validation reports its values
(:meth:`~pixelz_dist.engine.state.TrainState.report_validation`, from ``on_iteration_end`` or ``on_epoch_end``).
A callback with ``state_dict`` / ``load_state_dict`` is saved in and restored from snapshots.

Built-in behaviours (gradient clipping, stop criteria, the non-finite guard) are callbacks too: see
:mod:`pixelz_dist.callbacks.builtin`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

EVENTS = ("on_train_start", "on_epoch_start", "on_after_backward", "on_iteration_end", "on_epoch_end",
          "on_snapshot", "on_train_end", "on_validation")


class Callback:
    """Base class: override the events you need. Each receives the :class:`TrainState` (``on_snapshot`` also the
    path written). ``on_snapshot`` runs on every rank once the file is durable: for a periodic snapshot written in
    the background (``snapshot_async``, the default) that is a few iterations after the one it holds, which its path
    names (``..._iter_N.pt``) and ``state.last_snapshot_iteration`` gives.

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

    def on_validation(self, state, values): ...


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

    def load_state_dict(self, state: dict) -> None:
        """Restore stateful callbacks; one that has no saved state starts fresh (with a warning)."""
        absent = []
        for key, cb in zip(self.keys(), self.callbacks):
            if hasattr(cb, "load_state_dict"):
                if key in state:
                    cb.load_state_dict(state[key])
                else:
                    absent.append(key)
        if absent:
            logger.warning("the snapshot holds no state for callback(s) %s; they start fresh", absent)
