"""The process's random state as a snapshot part (see :mod:`pixelz_dist.random_state`, which captures it)."""

from __future__ import annotations

from ..random_state import RandomState, capture


class RNGState:
    """Every global RNG that influences training, one state per rank (the checkpointer gathers them and gives each
    rank its own back), in the form ``weights_only`` loading accepts."""

    per_rank = True

    def state_dict(self) -> dict:
        return capture(cuda=True).to_dict()

    def load_state_dict(self, state: dict) -> None:
        RandomState.from_dict(state).restore()
