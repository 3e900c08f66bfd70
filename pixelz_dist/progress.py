"""The training counters, in one small stateful object that snapshots save and restore."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Progress:
    """``iteration`` counts optimizer steps; ``samples_in_epoch`` counts *global* samples consumed in ``epoch``."""

    iteration: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
