"""The torch objects of a run as snapshot parts: ``state_dict`` / ``load_state_dict`` with the checks torch leaves out.

torch's own ``load_state_dict`` fails late and tersely (a ``KeyError: 'momentum'`` after half the state is in); each
part here checks first and says what does not fit and what to do. Errors name the part; the checkpointer adds the
snapshot's path.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ..errors import SnapshotError

logger = logging.getLogger(__name__)


def check_model_state(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Refuse a model state that does not fit, listing every mismatching key at once."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: snapshot {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    problems = []
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if strict and missing:
        problems.append(f"missing from the snapshot: {missing}")
    if strict and unexpected:
        problems.append(f"not in the model: {unexpected}")
    if problems:
        if shapes:  # strict_load=False does not help here: a tensor of another shape cannot be loaded at all
            hint = ("build the model with the same sizes (widths, classes, input channels) as the run that wrote "
                    "it; to start a new run from its matching weights, load them into your model yourself and train "
                    "without load_snapshot_path")
        else:
            hint = ("build the same architecture as the run that wrote it, or pass strict_load=False "
                    "(--no-strict-load) to load the keys both have")
        raise SnapshotError(f"its model state does not fit the model ({type(model).__name__}): "
                            + " | ".join(problems) + f". HINT: {hint}.")


class ModelState:
    """The model's weights and buffers; ``strict=False`` loads the keys both sides have (shapes must still match)."""

    def __init__(self, model: torch.nn.Module, strict: bool = True):
        self.model, self.strict = model, strict

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def precheck(self, state: dict, meta: dict) -> None:
        check_model_state(self.model, state, strict=self.strict)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=self.strict)


class OptimizerState:
    """The optimizer's state, refused before anything is loaded when it was written by another kind of optimizer or
    for other parameter groups (torch would fail half-way, with a bare ``KeyError: 'momentum'``)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def precheck(self, state: dict, meta: dict) -> None:
        mine = type(self.optimizer).__name__
        theirs = meta.get("optimizer")
        ours_groups, saved_groups = self.optimizer.param_groups, state.get("param_groups", [])
        if theirs is None:  # format 1 named no class: the hyper-parameters each kind has tell them apart
            keys = {k for g in ours_groups for k in g} - {"params", "initial_lr", "name"}
            saved = {k for g in saved_groups for k in g} - {"params", "initial_lr", "name"}
            theirs = mine if keys <= saved or saved <= keys else f"one with {sorted(saved - keys)}"
        if theirs != mine:
            raise SnapshotError(f"its optimizer is {theirs}, this run's is {mine}: an optimizer's state (momentum "
                                f"buffers, moment estimates, step counts) cannot be carried over to another kind. "
                                f"HINT: build a {theirs} as the run that wrote it did, or start a fresh run.")
        sizes, saved_sizes = [len(g["params"]) for g in ours_groups], [len(g["params"]) for g in saved_groups]
        if sizes != saved_sizes:
            raise SnapshotError(f"its optimizer has {len(saved_sizes)} parameter group(s) of {saved_sizes} "
                                f"parameters, this one {len(sizes)} of {sizes}. HINT: build the optimizer with the "
                                "same parameter groups, in the same order, as the run that wrote the snapshot (the "
                                "same make_param_groups keys).")

    def load_state_dict(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SnapshotError(f"its optimizer state does not fit this optimizer ({type(e).__name__}: {e}). HINT: "
                                "build the optimizer with the same parameter groups, in the same order, as the run "
                                "that wrote the snapshot.") from e
        self._own_memory(state)

    def _own_memory(self, state: dict) -> None:
        """Give the optimizer its own copy of any tensor it kept from the snapshot (torch keeps a CPU tensor of the
        right dtype as it is): snapshots are loaded memory-mapped, and a state still backed by the file would read it
        at its first use, after ``keep_last`` may have deleted it (on NFS, deleted by another node: a SIGBUS)."""
        loaded = {t.untyped_storage().data_ptr() for group in state.get("state", {}).values()
                  for t in group.values() if isinstance(t, torch.Tensor)}
        if not loaded:
            return
        for param_state in self.optimizer.state.values():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in loaded:
                    param_state[key] = value.clone()


class SchedulerState:
    """The LR scheduler (or None). A snapshot with a schedule loaded without one, or the reverse, is a warning."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self):
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load_state_dict(self, state) -> None:
        if self.scheduler is not None and state is not None:
            with warnings.catch_warnings():  # torch warns about the order of step() calls when states move: benign
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.load_state_dict(state)
        elif self.scheduler is not None or state is not None:
            logger.warning("the snapshot being loaded %s but this run %s: the schedule %s",
                           "holds a scheduler state" if state is not None else "holds no scheduler state",
                           "has no scheduler" if self.scheduler is None else "has one",
                           "is dropped" if self.scheduler is None else "starts from its beginning")
