"""pixelz_dist: a small PyTorch training library with exact resume, gradient accumulation and per-parameter lrs.

``import pixelz_dist as train_pixelz`` is a drop-in upgrade of the single-file ``train_pixelz`` tool. The names
below are the public API; the subpackages (``engine``, ``checkpoint``, ``data``, ``distributed``, ``callbacks``,
``lr_finder``, ``cli``) show how it is built.
"""

from . import _moved
from ._version import __version__
from .callbacks.base import Callback
from .checkpoint.order_record import compare_order_records
from .data.images import fast_img_loader, set_jpeg_backend
from .data.multi_images import MultiImgsDataset
from .distributed.preemption import PREEMPTION_EXIT_CODE, Interrupted, Preempted
from .engine.ema import ema_model, ema_state_dict
from .engine.multigpu import train_model_multigpu
from .engine.param_groups import make_param_groups
from .engine.state import TrainState
from .engine.train_model import train_model
from .errors import (
    WORKER_DIED_EXIT_CODE,
    ConfigError,
    DataError,
    NondeterministicOp,
    PixelzError,
    SnapshotError,
    WorkerDied,
)
from .evaluation.evaluate import evaluate_model
from .lr_finder.multigpu import find_lr_multigpu
from .lr_finder.result import LRFinderResult
from .lr_finder.search import find_lr

_moved.install()

__all__ = ["train_model", "evaluate_model", "train_model_multigpu", "find_lr", "find_lr_multigpu", "LRFinderResult",
           "make_param_groups", "MultiImgsDataset", "fast_img_loader", "set_jpeg_backend",
           "Callback", "TrainState", "compare_order_records", "Preempted", "Interrupted",
           "PREEMPTION_EXIT_CODE",
           "PixelzError", "ConfigError", "DataError", "SnapshotError", "NondeterministicOp", "WorkerDied",
           "WORKER_DIED_EXIT_CODE", "__version__"]
__all__ += ["ema_model", "ema_state_dict"]  # the moving average of the weights (train_model(..., ema=DECAY))


def __getattr__(name: str):
    return _moved.old_module(name)
