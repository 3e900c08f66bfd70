"""Data: multi-image datasets and fast decoding, the resumable sampler and per-batch seeding, the batch sources that
own the data position (a dataset, or your DataLoader), and getting batches onto the device."""

from .images import fast_img_loader, set_jpeg_backend
from .multi_images import IMAGE_EXTENSIONS, MultiImgsDataset, natural_key, pil_loader, scan_images
from .sampler import ResumableBatchSampler

__all__ = ["IMAGE_EXTENSIONS", "MultiImgsDataset", "ResumableBatchSampler", "fast_img_loader", "natural_key",
           "pil_loader", "scan_images", "set_jpeg_backend"]
