"""Datasets whose samples are several images taken from parallel folders (inputs, hints, targets).

The folders are scanned once with ``os.scandir`` and no image is opened until it is asked for, so building a
dataset over a hundred thousand files takes a fraction of a second. Under torchrun one process of the job lists them
and the others receive the table (:mod:`~pixelz_dist.distributed.once_per_job`). The table lives in numpy arrays and
bytes buffers (:mod:`~pixelz_dist.data.sample_table`), never lists of ``str``, so DataLoader workers read it without
copying it; the object holds those and module-level callables so it pickles cleanly into workers. Images are decoded
by :func:`~pixelz_dist.images.fast_img_loader` (libjpeg-turbo for JPEG, Pillow's pixels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..distributed.once_per_job import from_rank0, key_name
from ..errors import ConfigError, DataError
from ..random_state import capture
from .folder_listing import IMAGE_EXTENSIONS, list_samples, natural_key, scan_images
from .images import check_mode, fast_img_loader, jpeg_backend
from .jpeg_region import region_decoder_agrees
from .labels import LABEL, to_label_tensor
from .pixel_cache import PixelCache
from .region_sources import open_source
from .sample_table import FileColumn, SampleTable, StringTable

__all__ = ["IMAGE_EXTENSIONS", "MultiImgsDataset", "natural_key", "pil_loader", "scan_images"]

if TYPE_CHECKING:
    from .crop_plan import CropPlanner

logger = logging.getLogger(__name__)

#: Modes :func:`pil_loader` keeps as they are, so grey and high-bit-depth images are not inflated to 8-bit RGB.
_KEEP_MODES = frozenset({"L", "I", "F"})

_MATCH_MODES = ("stem", "sorted")
_ON_ERROR = ("raise", "skip")
_CROP_DECODE = ("exact", "scaled", "off")
_KINDS = ("image", "mask")
def pil_loader(path: str) -> Image.Image:
    """Open an image with Pillow, fully decoded so the file handle is closed on return.

    Grey-level (``L``), 16/32-bit integer (``I;16*``, ``I``) and float (``F``) images keep their mode, since
    masks and depth maps lose meaning as RGB; everything else (palette, RGBA, CMYK, 1-bit, ...) becomes ``RGB``.
    :func:`~pixelz_dist.images.fast_img_loader` with ``mode="auto"`` follows the same policy, faster.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in _KEEP_MODES or img.mode.startswith("I;16"):
            return img
        return img.convert("RGB")


def _per_folder(value: Any, n: int, what: str, dirs: list[str]) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{what} must be a list with one entry per folder, got {value!r}")
    if len(value) != n:
        raise ConfigError(f"got {len(value)} {what} for {n} folders ({dirs}); give one per folder")
    return list(value)


def _to_tensor(img: Any) -> torch.Tensor:
    """What a custom loader returned, as the ``C x H x W`` tensor a tv_tensor wraps."""
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(img)
    if isinstance(img, np.ndarray):
        arr = np.ascontiguousarray(img)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # np.asarray(PIL image) is read-only
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    raise TypeError(f"the loader returned {type(img).__name__}; a joint transform needs a PIL image, array or tensor")


class MultiImgsDataset(Dataset):
    """Samples made of one image from each of several folders, e.g. ``(photo, hint, mask)``.

    Sample ``i`` is the ``i``-th file of every folder after matching. With ``match="stem"`` (default) files pair
    by name without extension, so ``0001.png`` in one folder goes with ``0001.jpg`` in another and a missing file
    is reported rather than silently shifting every later pair. ``match="sorted"`` pairs files by their natural
    sorted position, for legacy data whose folders use different names; only the counts can be checked then.

    Transforms come in two forms. A list gives one callable (or ``None``) per folder, applied to that folder's
    image alone (torchvision v1 or v2, PIL or tensor based: the default loader gives PIL images). A single
    torchvision ``transforms.v2`` transform is *joint*: it is called once per sample as ``transform(*images)`` on
    ``tv_tensors.Image`` / ``tv_tensors.Mask`` tensors (see ``kinds``), so a random crop, flip or rotation is the
    same on the inputs and their masks, and masks are never interpolated or colour-jittered. tv_tensor outputs come
    back as plain tensors. Random transforms draw from torch's global RNG, which the training engine seeds per
    batch: augmented runs are reproducible and resumable.

    Class-index maps (segmentation targets) take ``mode="label"`` (:mod:`~pixelz_dist.data.labels`): the stored
    integers exactly (a palette PNG's indices, not its colours), a mask for a joint transform, and always returned
    as an **int64** ``H x W`` tensor (a batch: ``B x H x W``), ready for ``F.cross_entropy(logits, target)``. A
    colour or lossy (JPEG) file in a label folder is a ``DataError`` naming it; a transform that turns a label map
    into floats is a ``ConfigError``.

    Example::

        ds = MultiImgsDataset(["data/rgb", "data/hint", "data/mask"],
                              v2.Compose([v2.RandomResizedCrop(256), v2.RandomHorizontalFlip(),
                                          v2.ToDtype(torch.float32, scale=True)]),
                              modes=["RGB", "L", "label"])
        rgb, hint, target = ds[0]  # float 3xHxW, float 1xHxW, int64 HxW; model(*batch) takes a batch of them

    Args:
        dirs: One folder per image of a sample, in the order ``__getitem__`` returns them.
        transforms: ``None``, a list with one callable (or ``None``) per folder, or one joint v2 transform.
        loader: ``callable(path) -> image``, or ``callable(path, mode)`` when ``modes`` is given; defaults to
            :func:`~pixelz_dist.images.fast_img_loader` (PIL images, or ``C x H x W`` uint8 tensors for a joint
            transform). Must be picklable for workers: a module-level function or a ``functools.partial`` of one.
        modes: Per folder, the mode to decode to: ``"RGB"``, ``"L"``, ``"unchanged"``, ``"auto"``, ``"label"``
            (class indices: int64 ``H x W``, see above) or a Pillow mode. Default: ``"auto"`` for every folder (grey
            and 16-bit images kept, everything else RGB). A per-folder transform of a label folder receives the int64
            ``H x W`` tensor and must return integers.
        kinds: Per folder, ``"image"`` or ``"mask"``, for a joint transform. Default: ``"mask"`` for label folders,
            ``"image"`` for the others; a label folder cannot be an ``"image"``. A ``"mask"`` in another mode keeps
            its decoded dtype and ``1 x H x W`` shape.
        match: ``"stem"`` or ``"sorted"``.
        on_error: ``"raise"`` (default): a file that cannot be decoded raises a ``DataError`` naming the file and the
            folder. ``"skip"``: log it once and return the next sample (wrapping around) whose files all decode, so
            the substitute is deterministic; ``DataError`` only if no sample decodes.
        cache_dir: A folder for the pixel cache (:mod:`~pixelz_dist.data.pixel_cache`): lossless images (PNG, TIFF,
            BMP, ...) are decoded once and read back by rows, bit-identical; fill it ahead with
            ``python -m pixelz_dist.prepare``. Default loader only.
        crop_decode: With a joint transform that starts with a crop or resize (after flips / per-pixel steps, see
            :mod:`~pixelz_dist.data.crop_plan`): ``"exact"`` (default) draws the crop from the file header's size
            and decodes only the crop's JPEG rows and columns, bit-identical to decoding the whole image;
            ``"scaled"`` also decodes a JPEG at 1/2, 1/4 or 1/8 in libjpeg's DCT domain when the crop is at least
            that many times the output (faster, not bit-identical); ``"off"`` decodes whole images.
        shared_listing: Under torchrun (``True``, default), rank 0 lists the folders and pairs the files, and the other
            ranks receive the table through the job's store: one listing per job instead of one per rank, and every
            rank trains on the same list. Every rank must then build this dataset, in the same order as its other
            datasets over the same folders. Without torchrun's store (a plain ``python`` process, ``srun`` with
            ``env://`` before the process group exists), each process lists the folders itself, as it does with
            ``False``; after a process group of your own exists, rank 0's table is broadcast.

    Attributes:
        dirs: The folders, as strings.
        files: Per folder, the full paths of its files in sample order: a read-only sequence of ``str`` per folder
            (:class:`~pixelz_dist.data.sample_table.FileColumn`) that indexes, iterates and compares equal to a list
            of the same paths; a slice is a list. (Formerly lists of ``str``, which every DataLoader worker ended up
            copying; ``list(dataset.files[k])`` gives one.)
        stems: Per sample, the shared stem (with ``match="sorted"``: the stems of the first folder), as a read-only
            sequence of ``str`` (:class:`~pixelz_dist.data.sample_table.StringTable`), likewise.

    Raises:
        ConfigError: bad ``dirs``, ``transforms``, ``modes``, ``kinds`` (a label folder of kind image), ``match`` or
            ``on_error``.
        DataError: a folder is missing or empty, or the folders do not pair up (both are ``ValueError``); under
            torchrun, on every rank when rank 0 found it.
    """

    def __init__(
        self,
        dirs: Sequence[str | os.PathLike[str]],
        transforms: Sequence[Callable[[Any], Any] | None] | Callable[..., Any] | None = None,
        loader: Callable[..., Any] | None = None,
        *,
        modes: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        match: str = "stem",
        on_error: str = "raise",
        cache_dir: str | os.PathLike[str] | None = None,
        crop_decode: str = "exact",
        shared_listing: bool = True,
    ) -> None:
        if isinstance(dirs, (str, bytes, os.PathLike)):
            raise ConfigError(f"dirs must be a list of folders, not a single path {dirs!r}")
        self.dirs: list[str] = [os.fspath(d) for d in dirs]
        if not self.dirs:
            raise ConfigError("dirs is empty: a MultiImgsDataset needs at least one folder")
        n = len(self.dirs)
        if match not in _MATCH_MODES:
            raise ConfigError(f"match must be one of {_MATCH_MODES}, got {match!r}")
        if on_error not in _ON_ERROR:
            raise ConfigError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        if crop_decode not in _CROP_DECODE:
            raise ConfigError(f"crop_decode must be one of {_CROP_DECODE}, got {crop_decode!r}")
        self.match, self.on_error, self.crop_decode = match, on_error, crop_decode
        self._set_transforms(transforms)

        if loader is not None and not callable(loader):
            raise ConfigError(f"loader must be callable, got {loader!r}")
        self.loader: Callable[..., Any] = loader if loader is not None else fast_img_loader
        self._pass_mode = loader is None or modes is not None
        self.modes: list[str] = ["auto"] * n if modes is None else _per_folder(modes, n, "modes", self.dirs)
        self._label_folders = frozenset(k for k, m in enumerate(self.modes) if m == LABEL)
        self.kinds: list[str] = ([("mask" if k in self._label_folders else "image") for k in range(n)] if kinds is None
                                 else _per_folder(kinds, n, "kinds", self.dirs))
        bad = [k for k in self.kinds if k not in _KINDS]
        if bad:
            raise ConfigError(f"kinds must each be one of {_KINDS}, got {bad}")
        images_of_labels = [self.dirs[k] for k in sorted(self._label_folders) if self.kinds[k] == "image"]
        if images_of_labels:
            raise ConfigError(f"folder(s) {images_of_labels} have mode 'label' (class indices) but kind 'image', which "
                              "a joint transform would interpolate and colour-jitter; HINT: give them kind 'mask' "
                              "(or leave kinds out: label folders are masks)")
        if loader is None:
            for mode in self.modes:
                check_mode(mode)
            jpeg_backend()  # choose and log the decoder once, here, rather than in every worker
        elif cache_dir is not None:
            raise ConfigError("cache_dir works with the default loader only (the cache stores what fast_img_loader "
                              "decodes); HINT: drop loader=, or cache in your loader")
        self.cache = PixelCache(cache_dir) if cache_dir is not None else None
        self._planner: CropPlanner | None = None
        if self.joint_transform is not None and loader is None and crop_decode != "off":
            from .crop_plan import CropPlanner  # torchvision: imported only by who transforms (a second at start-up)

            planner = CropPlanner(self.joint_transform, scaling=crop_decode == "scaled")
            self._planner = planner if planner.supported else None
        self._regions = self._planner is not None and region_decoder_agrees()

        table = self._list(shared_listing)
        self.stems: StringTable = table.stems
        # os.path.join(d, "") appends the separator exactly as os.path.join(d, name) would; concatenation is faster.
        self.files: list[FileColumn] = table.columns([os.path.join(d, "") for d in self.dirs])
        self._bad: set[int] = set()
        self._first_error: DataError | None = None
        logger.debug("MultiImgsDataset: %d samples from %d folders (match=%s)", len(self.stems), n, match)

    def _list(self, shared: bool) -> SampleTable:
        dirs, match = self.dirs, self.match
        if not shared:
            return list_samples(dirs, match)
        return from_rank0(f"listing_{key_name(dirs, match)}", lambda: list_samples(dirs, match), SampleTable.encode,
                          SampleTable.decode, f"the listing of {dirs}", "every rank must build the same datasets in "
                          "the same order; for a dataset built on some ranks only, pass shared_listing=False")

    def _set_transforms(self, transforms: Any) -> None:
        n = len(self.dirs)
        self.joint_transform: Callable[..., Any] | None = None
        self.transforms: list[Callable[[Any], Any] | None] = [None] * n
        if transforms is None:
            return
        if callable(transforms) and not isinstance(transforms, Sequence):
            module = type(transforms).__module__
            if module.startswith("torchvision.transforms") and not module.startswith("torchvision.transforms.v2"):
                raise ConfigError(
                    f"{type(transforms).__name__} is a torchvision v1 transform, which cannot transform several "
                    "images jointly; HINT: use torchvision.transforms.v2, or pass a list with one transform per folder"
                )
            self.joint_transform = transforms
            return
        self.transforms = _per_folder(transforms, n, "transforms", self.dirs)
        for i, t in enumerate(self.transforms):
            if t is not None and not callable(t):
                raise ConfigError(f"transform {i} (for folder {self.dirs[i]!r}) is not callable: {t!r}")

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def crop_aware(self) -> bool:
        """Whether samples are built by crop-aware decoding: the joint transform's crop is drawn from the images'
        sizes and only the crop is read (see :mod:`~pixelz_dist.data.crop_plan`); False: whole images are decoded."""
        return self._planner is not None

    @property
    def region_decoding(self) -> bool:
        """Whether crop-aware decoding decodes only the crop of a JPEG (the region decoder is built and agrees)."""
        return self._regions

    def sample_names(self) -> Sequence[str]:
        """One name per sample, by which a snapshot recognises the list it was taken on (see
        :mod:`~pixelz_dist.data.sample_list`): the stem, or with ``match="sorted"`` every folder's file name."""
        if self.match == "stem":
            return self.stems
        return StringTable.of(["\t".join(folder.name(i) for folder in self.files) for i in range(len(self.stems))])

    def load(self, index: int, folder: int) -> Any:
        """Load one image, untransformed."""
        path = self.files[folder][index]
        with self._naming(index, folder):
            if self.loader is fast_img_loader:
                as_tensor = self.joint_transform is not None
                if self.cache is not None:
                    return self.cache.load(path, self.modes[folder], as_tensor=as_tensor)
                return fast_img_loader(path, self.modes[folder], as_tensor=as_tensor)
            if self._pass_mode:
                return self.loader(path, self.modes[folder])
            return self.loader(path)

    @contextmanager
    def _naming(self, index: int, folder: int) -> Iterator[None]:
        """The single place that turns loading failures into a ``DataError`` naming the file, folder and sample."""
        where = f"folder {self.dirs[folder]!r}, sample {index}"
        try:
            yield
        except DataError as exc:  # fast_img_loader's message already names the file
            raise DataError(f"{exc} ({where})") from exc
        except Exception as exc:
            path = self.files[folder][index]
            raise DataError(f"cannot load image {path!r} ({where}): {type(exc).__name__}: {exc}") from exc

    def _first_loadable(self, index: int, attempt: Callable[[int], Any]) -> Any:
        """``attempt(index)``; with ``on_error="skip"``, the next sample (wrapping around) that loads instead.

        The global RNGs are rewound before a substitute, so it draws exactly as if the bad sample had not been tried.
        """
        n = len(self.stems)
        for i in (index + k if index + k < n else index + k - n for k in range(n)):
            if i in self._bad:
                continue
            rng = capture() if self.on_error == "skip" else None  # torch's, numpy's and Python's: a transform's draws
            try:
                return attempt(i)
            except DataError as exc:
                if self.on_error == "raise":
                    raise
                rng.restore()
                self._bad.add(i)
                self._first_error = self._first_error or exc
                logger.warning("skipping sample %d (on_error='skip'): %s", i, exc)
        raise DataError(
            f"no sample of {self!r} can be loaded (on_error='skip'); first error: {self._first_error}"
        ) from self._first_error

    def _load_sample(self, index: int) -> list[Any]:
        return self._first_loadable(index, lambda i: [self.load(i, k) for k in range(len(self.dirs))])

    def _wrap(self, images: Sequence[Any]) -> list[Any]:
        from torchvision import tv_tensors

        return [
            tv_tensors.Mask(_to_tensor(img)) if kind == "mask" else tv_tensors.Image(_to_tensor(img))
            for img, kind in zip(images, self.kinds)
        ]

    def _unwrap(self, out: Any, n: int) -> tuple[Any, ...]:
        from torchvision import tv_tensors

        if n == 1 and not isinstance(out, (tuple, list)):
            out = (out,)
        # Plain tensors: collation and model(*batch) need nothing from the tv_tensor subclasses.
        return tuple(x.as_subclass(torch.Tensor) if isinstance(x, tv_tensors.TVTensor) else x for x in out)

    def _apply_joint(self, images: list[Any]) -> tuple[Any, ...]:
        return self._unwrap(self.joint_transform(*self._wrap(images)), len(images))

    def _cropped_sample(self, i: int) -> tuple[Any, ...]:
        """Sample ``i`` with the crop drawn from the images' sizes first and only the crop decoded (see crop_plan)."""
        from .crop_plan import Box

        sources = []
        for k in range(len(self.dirs)):
            with self._naming(i, k):
                sources.append(open_source(self.files[k][i], self.modes[k], cache=self.cache, regions=self._regions))
        sizes = {s.size for s in sources}
        plan = self._planner.plan(*sizes.pop()) if len(sizes) == 1 else None
        boxes, scaled = [], []
        for k, source in enumerate(sources):
            with self._naming(i, k):
                if plan is None:  # sizes differ: whole images, and the transform itself says which differ
                    pixels, was_scaled = source.read(Box(0, 0, *source.size))
                else:
                    pixels, was_scaled = source.read(plan.box, plan.scale if self.kinds[k] == "image" else 1)
            boxes.append(pixels)
            scaled.append(was_scaled)
        if plan is None:
            return self._apply_joint(boxes)
        return self._unwrap(self._planner.finish(plan, self._wrap(boxes), scaled), len(boxes))

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        n = len(self.stems)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        if self._planner is not None:
            return self._finish_labels(self._first_loadable(index, self._cropped_sample))
        images = self._load_sample(index)
        if self.joint_transform is not None:
            return self._finish_labels(self._apply_joint(images))
        if self._label_folders:  # what a label folder's own transform receives: the int64 H x W map
            images = [self._label(img, k) if k in self._label_folders else img for k, img in enumerate(images)]
        return self._finish_labels(tuple(img if t is None else t(img) for img, t in zip(images, self.transforms)))

    def _label(self, x: Any, folder: int) -> torch.Tensor:
        return to_label_tensor(x, f"label folder {self.dirs[folder]!r}")

    def _finish_labels(self, out: tuple[Any, ...]) -> tuple[Any, ...]:
        """Label folders' outputs as int64 ``H x W``; a float one (rescaled or interpolated) is a ConfigError."""
        if not self._label_folders or not isinstance(out, tuple) or len(out) != len(self.dirs):
            return out  # a joint callable that returns something else owns its outputs
        return tuple(self._label(x, k) if k in self._label_folders else x for k, x in enumerate(out))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dirs={self.dirs!r}, samples={len(self)}, match={self.match!r})"
