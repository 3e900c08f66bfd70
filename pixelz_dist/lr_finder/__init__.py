"""The learning-rate finder: the search (``find_lr``: runs or a sweep, each an ordinary ``train_model`` run), the
control callback and starting point, the curve and its suggestion, and the result file."""

from .curve import smooth_losses, suggest_lr
from .multigpu import find_lr_multigpu
from .result import LRFinderResult
from .search import find_lr

__all__ = ["LRFinderResult", "find_lr", "find_lr_multigpu", "smooth_losses", "suggest_lr"]
