"""Built-in demo: a synthetic segmentation task stored as real image files, and a tiny network for it.

The files go through the same :class:`~pixelz_dist.data.MultiImgsDataset` path as user data, so the demo
exercises folder matching, decoding and worker pickling, not just in-memory tensors. Everything is small enough to
train for a few epochs on one CPU core in seconds, which makes it the fixture for resume and reproducibility checks.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from torch.utils.data import Dataset

from ..data.multi_images import IMAGE_EXTENSIONS, MultiImgsDataset
from ..errors import ConfigError
from ..fileio import atomic_write

__all__ = [
    "DemoDataset",
    "TinySegNet",
    "build_demo",
    "make_demo_dataset",
    "to_mask",
    "to_tensor_grey",
    "to_tensor_rgb",
]

logger = logging.getLogger(__name__)

#: Sub-folder and extension of each image of a demo sample, in sample order.
DEMO_FOLDERS = (("rgb", ".jpg"), ("hint", ".png"), ("mask", ".png"))
_DEMO_NAME = re.compile(r"^\d{5,}\.(jpg|png)$")


def _expected_names(num_samples: int, ext: str) -> set[str]:
    return {f"{i:05d}{ext}" for i in range(num_samples)}


def _image_names(folder: str) -> set[str]:
    try:
        with os.scandir(folder) as it:
            return {
                e.name
                for e in it
                if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            }
    except FileNotFoundError:
        return set()


def _files_ready(dirs: list[str], num_samples: int, size: int) -> bool:
    for d, (_, ext) in zip(dirs, DEMO_FOLDERS):
        if _image_names(d) != _expected_names(num_samples, ext):
            return False
    # Names alone would let a run with another size reuse stale files; reading one header is cheap.
    try:
        with Image.open(os.path.join(dirs[0], f"00000{DEMO_FOLDERS[0][1]}")) as img:
            return img.size == (size, size)
    except OSError:
        return False


def _draw_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    background = rng.integers(0, 256, size=3)
    rgb = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    draw_rgb, draw_mask = ImageDraw.Draw(rgb), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        w, h = (int(v) for v in rng.integers(max(2, size // 6), max(3, size // 2), size=2))
        x0 = int(rng.integers(0, size - w))
        y0 = int(rng.integers(0, size - h))
        box = (x0, y0, x0 + w, y0 + h)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw_rgb.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=255)
        else:
            draw_rgb.rectangle(box, fill=colour)
            draw_mask.rectangle(box, fill=255)
    noisy = np.asarray(rgb, dtype=np.float32) + rng.normal(0.0, 12.0, size=(size, size, 3))
    rgb = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 16))), dtype=np.float32)
    hint = np.clip(blurred + rng.normal(0.0, 25.0, size=(size, size)), 0, 255).astype(np.uint8)
    return rgb, Image.fromarray(hint, "L"), mask


def make_demo_dataset(root: str | os.PathLike[str], num_samples: int = 64, size: int = 32, seed: int = 0) -> list[str]:
    """Write the demo's photo / hint / mask files under ``root``, or reuse them when already there.

    Files are ``root/rgb/00000.jpg`` (noisy RGB with random ellipses and rectangles), ``root/hint/00000.png``
    (grey, a blurred and noisy mask) and ``root/mask/00000.png`` (0/255 ground truth). Output depends only on
    ``seed``; existing folders holding exactly the expected files at the expected size are left untouched so
    repeated demo runs (and several ranks sharing a root) do not rewrite them.

    Returns:
        The three folder paths, in sample order ``[rgb, hint, mask]``.
    """
    if int(num_samples) < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if int(size) < 8:
        raise ConfigError(f"size must be >= 8 pixels, got {size}")
    num_samples, size = int(num_samples), int(size)
    root = os.fspath(root)
    dirs = [os.path.join(root, sub) for sub, _ in DEMO_FOLDERS]
    if _files_ready(dirs, num_samples, size):
        logger.debug("demo dataset: reusing %d samples in %s", num_samples, root)
        return dirs

    for d, (_, ext) in zip(dirs, DEMO_FOLDERS):
        os.makedirs(d, exist_ok=True)
        keep = _expected_names(num_samples, ext)
        for name in _image_names(d):  # leftovers of an earlier, larger demo would break stem matching
            if _DEMO_NAME.match(name) and name not in keep:
                os.remove(os.path.join(d, name))

    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        rgb, hint, mask = _draw_sample(rng, size)
        # atomic: several ranks may build the same demo, and a reader never sees a half-written file
        for img, folder, (_, ext) in zip((rgb, hint, mask), dirs, DEMO_FOLDERS):
            with atomic_write(os.path.join(folder, f"{i:05d}{ext}"), durable=False) as f:
                img.save(f, format="JPEG", quality=95) if ext == ".jpg" else img.save(f, format="PNG")
    logger.info("demo dataset: wrote %d samples of %dx%d to %s", num_samples, size, size, root)
    return dirs


def _chw(img: Image.Image) -> torch.Tensor:
    """torchvision's ``pil_to_tensor`` (uint8 ``CxHxW``), without importing torchvision: a process that trains the
    demo starts about a second sooner."""
    arr = np.array(img)
    return torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)


def _scaled(t: torch.Tensor) -> torch.Tensor:
    """torchvision's ``to_dtype(t, float32, scale=True)`` for uint8, to the bit: ``t.float() * (1 / 255)``."""
    return t.to(torch.float32).mul_(1.0 / 255)


def to_tensor_rgb(img: Image.Image) -> torch.Tensor:
    """RGB image to float ``3xHxW`` in ``[0, 1]``."""
    return _scaled(_chw(img.convert("RGB")))


def to_tensor_grey(img: Image.Image) -> torch.Tensor:
    """Grey image to float ``1xHxW`` in ``[0, 1]``."""
    return _scaled(_chw(img.convert("L")))


def to_mask(img: Image.Image) -> torch.Tensor:
    """Mask image to float ``1xHxW`` in ``{0, 1}``; thresholding undoes any resampling or compression grey."""
    return (_chw(img.convert("L")) > 127).to(torch.float32)


class DemoDataset(Dataset):
    """The demo files as ``(rgb, hint, mask)`` tensors, optionally with random augmentation.

    Augmentation draws from torch's global RNG on purpose: the training engine seeds it per batch, which makes
    augmented runs reproducible and resumable. Two draws are made per sample whatever their outcome, so the RNG
    stream consumed does not depend on the data.

    Args:
        root: Folder previously filled by :func:`make_demo_dataset`.
        augment: Apply a joint horizontal flip (all three images) and a brightness jitter (rgb only).
    """

    #: Maximum relative brightness change of the rgb image.
    brightness = 0.2

    def __init__(self, root: str | os.PathLike[str], augment: bool = True) -> None:
        self.root = os.fspath(root)
        self.augment = bool(augment)
        self.images = MultiImgsDataset(
            [os.path.join(self.root, sub) for sub, _ in DEMO_FOLDERS], [to_tensor_rgb, to_tensor_grey, to_mask]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rgb, hint, mask = self.images[index]
        if self.augment:
            flip = bool(torch.rand(()) < 0.5)
            factor = 1.0 + self.brightness * (2.0 * float(torch.rand(())) - 1.0)
            if flip:
                rgb, hint, mask = rgb.flip(-1), hint.flip(-1), mask.flip(-1)
            rgb = (rgb * factor).clamp_(0.0, 1.0)
        return rgb, hint, mask


class TinySegNet(nn.Module):
    """A few-thousand-parameter segmentation net whose ``forward`` returns the loss.

    Returning the loss lets a generic engine train it without knowing the task. BatchNorm and Dropout2d are there
    on purpose: they carry buffers and consume RNG, which is what exact-resume checks need to cover.

    Args:
        width: Channels of the hidden convolutions.
        dropout: Channel dropout probability (``nn.Dropout2d``).
    """

    def __init__(self, width: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.decoder = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(width, 1, 1)

    def predict(self, rgb: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits, ``Nx1xHxW``."""
        x = torch.cat([rgb, hint], dim=1)
        return self.head(self.decoder(self.dropout(self.encoder(x))))

    def forward(self, rgb: torch.Tensor, hint: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of the logits against ``mask`` (a scalar)."""
        return F.binary_cross_entropy_with_logits(self.predict(rgb, hint), mask)


def build_demo(
    root: str | os.PathLike[str], num_samples: int = 64, size: int = 32, seed: int = 0, augment: bool = True
) -> tuple[TinySegNet, DemoDataset]:
    """Demo files, a freshly initialised model and the augmented dataset, in one call.

    The model's initial weights depend only on ``seed``; only a forked copy of the CPU generator is seeded, so the
    caller's global RNG state (CPU and accelerators) is unchanged.
    """
    make_demo_dataset(root, num_samples=num_samples, size=size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        # default_generator rather than torch.manual_seed: the latter also reseeds CUDA, which fork_rng(devices=[])
        # would not restore. Parameter init only uses the CPU generator.
        torch.default_generator.manual_seed(seed)
        model = TinySegNet()
    return model, DemoDataset(root, augment=augment)
