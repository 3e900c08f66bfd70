"""Callbacks: the :class:`Callback` base and its dispatcher, the built-ins that ``train_model``'s keyword arguments
switch on (gradient clipping, stop criteria, time budget, non-finite guard), the progress bar, TensorBoard and the
training curves (:class:`PlotCurves`)."""

from .base import Callback
from .builtin import GradientClipping, NonFiniteGuard, NonFiniteLossError, StopOnLoss, TimeBudget
from .plot_curves import PlotCurves
from .progress_bar import ProgressBar
from .tensorboard import TensorBoardLogger
from .validation import Validation

__all__ = ["Callback", "GradientClipping", "NonFiniteGuard", "NonFiniteLossError", "PlotCurves", "ProgressBar",
           "StopOnLoss", "TensorBoardLogger", "TimeBudget", "Validation"]
