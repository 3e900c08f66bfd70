"""The process's global random generators — torch's (CPU and CUDA), numpy's and Python's ``random`` — captured and
put back in one place.

Exact resume depends on each of them being where it was: the snapshot stores them (one per rank), per-batch seeding
must leave the training process's streams untouched, a skipped bad sample must draw as if it had not been tried,
replaying a DataLoader's epoch must not consume draws, and the learning-rate finder restarts every run from the same
point. They all use :func:`capture` and :meth:`RandomState.restore`, or :func:`preserved` around a block.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class RandomState:
    """The states :func:`capture` took (None: that generator was not asked for and is left alone)."""

    torch: torch.Tensor | None = None
    numpy: tuple | None = None
    python: tuple | None = None
    cuda: list | None = None

    def restore(self) -> None:
        """Put back every generator this state holds."""
        if self.torch is not None:
            torch.default_generator.set_state(self.torch)
        if self.numpy is not None:
            np.random.set_state(self.numpy)
        if self.python is not None:
            random.setstate(self.python)
        if self.cuda is not None and torch.cuda.is_available():
            if len(self.cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(self.cuda)
            else:  # another GPU count: restore what we can, the rest keeps its state
                for i, s in enumerate(self.cuda[: torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(s, i)

    def to_dict(self) -> dict[str, Any]:
        """A form ``torch.load(weights_only=True)`` reads back: numpy's keys as a tensor, tuples as lists."""
        state: dict[str, Any] = {}
        if self.torch is not None:
            state["torch"] = self.torch
        if self.numpy is not None:
            name, keys, pos, has_gauss, cached = self.numpy
            state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                              "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        if self.python is not None:
            version, internal, gauss_next = self.python
            state["python"] = {"version": version, "internal": list(internal), "gauss_next": gauss_next}
        if self.cuda is not None:
            state["cuda"] = self.cuda
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RandomState:
        """The inverse of :meth:`to_dict` (snapshots of every format store this form)."""
        n, p = state.get("numpy"), state.get("python")
        return cls(
            torch=state.get("torch"),
            numpy=None if n is None else (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                          n["cached_gaussian"]),
            python=None if p is None else (p["version"], tuple(p["internal"]), p["gauss_next"]),
            cuda=state.get("cuda"))


def capture(*, numpy: bool = True, python: bool = True, cuda: bool = False) -> RandomState:
    """The current states of torch's CPU generator and, as asked, numpy's, Python's and (when CUDA has started)
    every GPU's. Capturing numpy's costs the most (a copy of its 624-word key), so callers on hot paths say which
    they need."""
    return RandomState(
        torch=torch.default_generator.get_state(),
        numpy=np.random.get_state() if numpy else None,
        python=random.getstate() if python else None,
        cuda=torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() and torch.cuda.is_initialized()
        else None)


@contextmanager
def preserved(*, numpy: bool = True, python: bool = True, cuda: bool = False):
    """Within the block, draw freely: the generators named are put back as they were when it ends, however it ends."""
    state = capture(numpy=numpy, python=python, cuda=cuda)
    try:
        yield state
    finally:
        state.restore()
