"""pixelz_dist: a small PyTorch training library with exact resume, gradient accumulation and per-parameter lrs.

``import pixelz_dist as train_pixelz`` is a drop-in upgrade of the single-file ``train_pixelz`` tool.
"""

__version__ = "0.1.0"

from .data import MultiImgsDataset  # noqa: E402
from .errors import ConfigError, DataError, PixelzError, SnapshotError  # noqa: E402
from .hooks import Callback, TrainState  # noqa: E402
from .images import fast_img_loader, set_jpeg_backend  # noqa: E402
from .lr_finder import LRFinderResult, find_lr  # noqa: E402
from .multigpu import find_lr_multigpu, train_model_multigpu  # noqa: E402
from .order_record import compare_order_records  # noqa: E402
from .param_groups import make_param_groups  # noqa: E402
from .trainer import train_model  # noqa: E402

__all__ = ["train_model", "train_model_multigpu", "find_lr", "find_lr_multigpu", "LRFinderResult",
           "make_param_groups", "MultiImgsDataset", "fast_img_loader", "set_jpeg_backend",
           "Callback", "TrainState", "compare_order_records",
           "PixelzError", "ConfigError", "DataError", "SnapshotError", "__version__"]
