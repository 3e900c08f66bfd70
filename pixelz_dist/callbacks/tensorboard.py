"""TensorBoard logging as a :class:`~pixelz_dist.callbacks.base.Callback` (the ``[tensorboard]`` extra).

Every ``every`` iterations all ranks average the last iteration's loss (one collective) and rank 0 writes the
scalars ``train/loss``, ``train/lr`` (``train/lr/<group name>`` with several param groups) and ``train/epoch``, indexed
by the iteration.
"""

from __future__ import annotations

from ..distributed.env import read_env
from ..errors import ConfigError
from .base import Callback

__all__ = ["TensorBoardLogger", "check_tensorboard"]

INSTALL_HINT = 'pip install "pixelz-dist[tensorboard]"'


def check_tensorboard() -> None:
    """Raises ConfigError, with the command that installs it, when TensorBoard cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}). HINT: {INSTALL_HINT}") from e


class TensorBoardLogger(Callback):
    """Writes training scalars under ``log_dir``; ``writer_factory(log_dir)`` defaults to ``SummaryWriter``."""

    def __init__(self, log_dir: str, every: int = 20, writer_factory=None):
        self.log_dir = log_dir
        self.every = max(1, int(every))
        self.writer_factory = writer_factory
        self.writer = None

    def on_train_start(self, state):
        if read_env().is_main:
            if self.writer_factory is None:
                check_tensorboard()
                from torch.utils.tensorboard import SummaryWriter

                self.writer_factory = SummaryWriter
            self.writer = self.writer_factory(self.log_dir)

    def on_iteration_end(self, state):
        if state.iteration % self.every:
            return
        loss = state.global_loss()  # a collective: every rank calls it, rank 0 writes
        if self.writer is None:
            return
        step = state.iteration
        self.writer.add_scalar("train/loss", loss, step)
        groups = state.optimizer.param_groups
        for i, (group, lr) in enumerate(zip(groups, state.lrs)):
            tag = "train/lr" if len(groups) == 1 else f"train/lr/{group.get('name', i)}"
            self.writer.add_scalar(tag, lr, step)
        self.writer.add_scalar("train/epoch", state.epoch_fraction, step)

    def on_validation(self, state, values):
        """A validation's values (``val_loss`` -> ``val/loss``), at its iteration; rank 0 writes."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key.replace("_", "/", 1), value, state.iteration)

    def on_train_end(self, state):
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
