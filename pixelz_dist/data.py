"""Datasets whose samples are several images taken from parallel folders (inputs, hints, targets).

The folders are scanned once with ``os.scandir`` and no image is opened until it is asked for, so building a
dataset over a hundred thousand files is quick, and the object holds only strings and module-level callables so it
pickles cleanly into DataLoader workers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .errors import ConfigError, DataError

__all__ = ["IMAGE_EXTENSIONS", "MultiImgsDataset", "natural_key", "pil_loader", "scan_images"]

logger = logging.getLogger("pixelz_dist")

#: Lower-case extensions treated as images; anything else in a folder is ignored.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

#: Modes :func:`pil_loader` keeps as they are, so grey and high-bit-depth images are not inflated to 8-bit RGB.
_KEEP_MODES = frozenset({"L", "I", "F"})

_MATCH_MODES = ("stem", "sorted")
_MAX_LISTED = 5
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key under which ``img2`` comes before ``img10``, as people number files.

    Text parts compare case-insensitively; the raw name breaks ties so the order is total and stable.
    """
    parts = _DIGITS.split(name)
    # re.split with one capture group alternates text, digits, text, ... so ints only ever meet ints.
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def pil_loader(path: str) -> Image.Image:
    """Open an image with Pillow, fully decoded so the file handle is closed on return.

    Grey-level (``L``), 16/32-bit integer (``I;16*``, ``I``) and float (``F``) images keep their mode, since
    masks and depth maps lose meaning as RGB; everything else (palette, RGBA, CMYK, 1-bit, ...) becomes ``RGB``.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in _KEEP_MODES or img.mode.startswith("I;16"):
            return img
        return img.convert("RGB")


def scan_images(folder: str) -> list[str]:
    """Names of the image files directly inside ``folder``, in natural order.

    Hidden files (leading dot) and non-images are skipped, which also ignores editors' and writers' temp files.

    Raises:
        DataError: the folder does not exist, is not a directory, or holds no image.
    """
    try:
        with os.scandir(folder) as it:
            names = [
                e.name
                for e in it
                # rfind rather than os.path.splitext: this runs once per name, 100 000s of times.
                if e.name[0] != "." and e.name[e.name.rfind(".") :].lower() in IMAGE_EXTENSIONS and e.is_file()
            ]
    except FileNotFoundError as exc:
        raise DataError(f"image folder {folder!r} does not exist") from exc
    except NotADirectoryError as exc:
        raise DataError(f"image folder {folder!r} is not a directory") from exc
    if not names:
        raise DataError(f"image folder {folder!r} holds no image files (extensions: {sorted(IMAGE_EXTENSIONS)})")
    names.sort(key=natural_key)
    return names


def _stem(name: str) -> str:
    # Only called on names that passed the extension filter, so a dot is always there and not leading.
    return name[: name.rfind(".")]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


class MultiImgsDataset(Dataset):
    """Samples made of one image from each of several folders, e.g. ``(photo, hint, mask)``.

    Sample ``i`` is the ``i``-th file of every folder after matching. With ``match="stem"`` (default) files pair
    by name without extension, so ``0001.png`` in one folder goes with ``0001.jpg`` in another and a missing file
    is reported rather than silently shifting every later pair. ``match="sorted"`` pairs files by their natural
    sorted position, for legacy data whose folders use different names; only the counts can be checked then.

    Args:
        dirs: One folder per image of a sample, in the order ``__getitem__`` returns them.
        transforms: ``None`` or one callable (or ``None``) per folder, applied to that folder's loaded image.
        loader: ``callable(path) -> image``; defaults to :func:`pil_loader`. Must be picklable for workers.
        match: ``"stem"`` or ``"sorted"``.

    Attributes:
        dirs: The folders, as strings.
        files: Per folder, the full paths of its files in sample order.
        stems: Per sample, the shared stem (with ``match="sorted"``: the stems of the first folder).

    Raises:
        ConfigError: bad ``dirs``, ``match`` or number of transforms.
        DataError: a folder is missing or empty, or the folders do not pair up.
    """

    def __init__(
        self,
        dirs: Sequence[str | os.PathLike[str]],
        transforms: Sequence[Callable[[Any], Any] | None] | None = None,
        loader: Callable[[str], Any] | None = None,
        *,
        match: str = "stem",
    ) -> None:
        if isinstance(dirs, (str, bytes, os.PathLike)):
            raise ConfigError(f"dirs must be a list of folders, not a single path {dirs!r}")
        self.dirs: list[str] = [os.fspath(d) for d in dirs]
        if not self.dirs:
            raise ConfigError("dirs is empty: a MultiImgsDataset needs at least one folder")
        if match not in _MATCH_MODES:
            raise ConfigError(f"match must be one of {_MATCH_MODES}, got {match!r}")
        self.match = match

        if transforms is None:
            self.transforms: list[Callable[[Any], Any] | None] = [None] * len(self.dirs)
        else:
            if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence):
                raise ConfigError(
                    f"transforms must be None or a list with one callable (or None) per folder, got {transforms!r}"
                )
            if len(transforms) != len(self.dirs):
                raise ConfigError(f"got {len(transforms)} transforms for {len(self.dirs)} folders; give one per folder")
            for i, t in enumerate(transforms):
                if t is not None and not callable(t):
                    raise ConfigError(f"transform {i} (for folder {self.dirs[i]!r}) is not callable: {t!r}")
            self.transforms = list(transforms)

        if loader is not None and not callable(loader):
            raise ConfigError(f"loader must be callable, got {loader!r}")
        self.loader: Callable[[str], Any] = loader if loader is not None else pil_loader

        names = [scan_images(d) for d in self.dirs]
        if match == "stem":
            self.stems, per_folder = self._match_by_stem(names)
        else:
            self.stems, per_folder = self._match_sorted(names)
        self.files: list[list[str]] = [
            [os.path.join(d, n) for n in folder_names] for d, folder_names in zip(self.dirs, per_folder)
        ]
        logger.debug("MultiImgsDataset: %d samples from %d folders (match=%s)", len(self.stems), len(self.dirs), match)

    def _match_by_stem(self, names: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        by_stem: list[dict[str, str]] = []
        for d, folder_names in zip(self.dirs, names):
            mapping: dict[str, str] = {}
            dups: list[str] = []
            for n in folder_names:
                s = _stem(n)
                if s in mapping:
                    dups.append(f"{mapping[s]} / {n}")
                else:
                    mapping[s] = n
            if dups:
                raise DataError(
                    f"folder {d!r} holds several images with the same stem, so they cannot be paired: {_listing(dups)}"
                )
            by_stem.append(mapping)

        reference = by_stem[0].keys()
        if any(m.keys() != reference for m in by_stem[1:]):
            every = set().union(*(m.keys() for m in by_stem))
            counts = ", ".join(f"{d!r} has {len(m)} files" for d, m in zip(self.dirs, by_stem))
            missing = "; ".join(
                f"missing from {d!r}: {_listing(sorted(every - m.keys(), key=natural_key))}"
                for d, m in zip(self.dirs, by_stem)
                if len(m) != len(every)
            )
            raise DataError(f"image folders do not hold the same file stems: {counts}; {missing}")

        stems = [_stem(n) for n in names[0]]  # already in natural order
        return stems, [[m[s] for s in stems] for m in by_stem]

    def _match_sorted(self, names: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        counts = [len(n) for n in names]
        if len(set(counts)) != 1:
            listed = ", ".join(f"{d!r} has {c} files" for d, c in zip(self.dirs, counts))
            raise DataError(f"image folders hold different numbers of files (match='sorted'): {listed}")
        return [_stem(n) for n in names[0]], names

    def __len__(self) -> int:
        return len(self.stems)

    def load(self, index: int, folder: int) -> Any:
        """Load one image, untransformed; the single place that turns decoding failures into ``DataError``."""
        path = self.files[folder][index]
        try:
            return self.loader(path)
        except Exception as exc:
            raise DataError(
                f"cannot load image {path!r} (folder {self.dirs[folder]!r}, sample {index}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        n = len(self.stems)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        out = []
        for k, transform in enumerate(self.transforms):
            img = self.load(index, k)
            out.append(img if transform is None else transform(img))
        return tuple(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dirs={self.dirs!r}, samples={len(self)}, match={self.match!r})"
