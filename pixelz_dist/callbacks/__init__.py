"""Callbacks: the :class:`Callback` base and its dispatcher, the built-ins that ``train_model``'s keyword arguments
switch on (gradient clipping, stop criteria, time budget, non-finite guard), the progress bar and TensorBoard."""

from .base import Callback
from .builtin import GradientClipping, NonFiniteGuard, NonFiniteLossError, StopOnLoss, TimeBudget
from .progress_bar import ProgressBar
from .tensorboard import TensorBoardLogger
from .validation import Validation

__all__ = ["Callback", "GradientClipping", "NonFiniteGuard", "NonFiniteLossError", "ProgressBar", "StopOnLoss",
           "TensorBoardLogger", "TimeBudget", "Validation"]
