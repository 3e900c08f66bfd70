"""Storage formats for the pixel cache, measured: read time per image (whole, and a 50% row band) and disk bytes per
megapixel, against decoding the PNG, on one core.

Formats: ``raw`` (the decoded array as it is, rows read with ``os.pread``: what ``pixelz_dist.data.pixel_cache``
stores), ``zstd-N`` and ``lz4`` row blocks (blocks of ``--block-rows`` rows, each compressed alone, so a band reads
only its blocks). zstandard and lz4 are measured only if importable (``pip install zstandard lz4``).

The files are synthetic (no scikit-image here): a grey "hint" 1300 x 975 that compresses to ~95 KiB as PNG (a
smooth field; Pillow decodes it in about the 5.45 ms FIELD-NOTES measured on the real hint), a grey mask ~12 KiB
(twelve flat ellipses), and a noisier RGB image of the same size (~1.5 MB as PNG). The cache files sit in the page
cache (read right after writing, several times): this is the read cost, not the cost of a cold disk, where fewer
bytes would win. Pin the core yourself::

    taskset -c 1 python benchmarks/pixel_cache_formats.py            # about a minute
    taskset -c 1 python benchmarks/pixel_cache_formats.py --quick    # smoke run, a few seconds

One JSON object per line: settings and versions first, then one line per (image, format) with median ms, then ms
per seed-like sample (the three images, a joint 512 crop) through MultiImgsDataset with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial

import numpy as np
from PIL import Image, ImageFilter

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from pixelz_dist.data.images import fast_img_loader  # noqa: E402
from pixelz_dist.data.pixel_cache import PixelCache  # noqa: E402


def smooth_field(h: int, w: int, stretch: float) -> np.ndarray:
    """A smooth, photo-like grey field (float, about 0..255); larger ``stretch``: smoother, smaller PNG."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (90 + 60 * np.sin(xx / (97 * stretch) + 1.3) * np.cos(yy / (71 * stretch)) + 50 * xx / w
            + 30 * np.sin((xx + yy) / (211 * stretch)))


def make_files(folder: str) -> dict[str, str]:
    """hint ~95 KiB and mask ~12 KiB PNG at 1300 x 975 (1.27 MP), and a noisier RGB PNG (photo-like texture)."""
    h, w = 975, 1300
    hint = np.clip(smooth_field(h, w, 1.6), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(1)
    for k in range(12):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(40, 200)
        mask[(yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 < r * r] = 20 * (k + 1)
    blur = ImageFilter.GaussianBlur(3)
    noise = [np.asarray(Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).filter(blur), np.float32) - 128
             for _ in range(3)]
    rgb = np.stack([np.clip(smooth_field(h, w, s) + n * 2, 0, 255) for s, n in zip((1.0, 1.3, 1.6), noise)], -1)
    files = {"hint_L": os.path.join(folder, "hint.png"), "mask_L": os.path.join(folder, "mask.png"),
             "photo_RGB": os.path.join(folder, "photo.png")}
    Image.fromarray(hint).save(files["hint_L"])
    Image.fromarray(mask).save(files["mask_L"])
    Image.fromarray(rgb.astype(np.uint8)).save(files["photo_RGB"])
    return files


class RowBlocks:
    """Blocks of rows compressed one by one; ``read(top, bottom)`` decompresses only the blocks it needs."""

    def __init__(self, path: str, arr: np.ndarray, block_rows: int, compress, decompress) -> None:
        self.path, self.shape, self.dtype, self.block_rows, self.decompress = path, arr.shape, arr.dtype, block_rows, \
            decompress
        blobs = [compress(arr[r : r + block_rows].tobytes()) for r in range(0, arr.shape[0], block_rows)]
        self.offsets = np.cumsum([0] + [len(b) for b in blobs])
        with open(path, "wb") as f:
            for b in blobs:
                f.write(b)

    def read(self, top: int, bottom: int) -> torch.Tensor:
        first, last = top // self.block_rows, (bottom - 1) // self.block_rows
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, int(self.offsets[last + 1] - self.offsets[first]), int(self.offsets[first]))
        finally:
            os.close(fd)
        out = bytearray()
        for b in range(first, last + 1):
            lo, hi = self.offsets[b] - self.offsets[first], self.offsets[b + 1] - self.offsets[first]
            out += self.decompress(data[lo:hi])
        arr = np.frombuffer(out, self.dtype).reshape(-1, *self.shape[1:])
        skip = top - first * self.block_rows
        return torch.from_numpy(arr[skip : skip + bottom - top]).permute(2, 0, 1)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--block-rows", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    reps = 3 if args.quick else args.reps
    torch.set_num_threads(1)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "Pillow": Image.__version__}
    codecs = {}
    try:
        import zstandard

        versions["zstandard"] = zstandard.__version__
        for level in (1, 3, 9):
            codecs[f"zstd-{level}"] = (zstandard.ZstdCompressor(level=level).compress,
                                       zstandard.ZstdDecompressor().decompress)
    except ImportError:
        pass
    try:
        import lz4 as lz4_module
        import lz4.block

        versions["lz4"] = lz4_module.__version__
        codecs["lz4"] = (lz4.block.compress, lz4.block.decompress)
    except ImportError:
        pass
    print(json.dumps({"settings": {"reps": reps, "block_rows": args.block_rows, "cpu_affinity": sorted(
        os.sched_getaffinity(0)), "data": "synthetic (no scikit-image)"}, "versions": versions}))
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(tmp)
        cache = PixelCache(os.path.join(tmp, "cache"))
        for name, path in files.items():
            mode = name.split("_")[1]
            ref = fast_img_loader(path, mode, as_tensor=True)
            arr = np.ascontiguousarray(ref.permute(1, 2, 0).numpy())
            h = arr.shape[0]
            band = (h // 4, h // 4 + h // 2)
            mp = arr.shape[0] * arr.shape[1] / 1e6
            cache.load(path, mode, as_tensor=True)  # fill the entry
            entry = cache.entry_path(path, mode)
            assert torch.equal(cache.load(path, mode, as_tensor=True), ref)
            rows = {"png": (partial(fast_img_loader, path, mode, as_tensor=True), None, os.path.getsize(path)),
                    "raw": (partial(cache.load, path, mode, as_tensor=True),
                            partial(cache.load, path, mode, as_tensor=True, rows=band), os.path.getsize(entry))}
            for codec, (comp, decomp) in codecs.items():
                rb = RowBlocks(os.path.join(tmp, f"{name}.{codec}"), arr, args.block_rows, comp, decomp)
                assert torch.equal(rb.read(0, h), ref) and torch.equal(rb.read(*band), ref[:, band[0] : band[1]])
                rows[codec] = (partial(rb.read, 0, h), partial(rb.read, *band), int(rb.offsets[-1]))
            for fmt, (whole, part, nbytes) in rows.items():
                out = {"image": name, "format": fmt, "height": arr.shape[0], "width": arr.shape[1],
                       "whole_ms": round(median_ms(whole, reps), 3),
                       "band50_ms": round(median_ms(part, reps), 3) if part else None,
                       "bytes": nbytes, "bytes_per_mp": round(nbytes / mp)}
                print(json.dumps(out), flush=True)
        sample_rate(files, tmp, reps)


def sample_rate(files: dict[str, str], tmp: str, reps: int) -> None:
    """ms per seed-like sample (RGB JPEG + hint + mask, joint RandomResizedCrop(512) + flip + float) through
    MultiImgsDataset, without and with the cache, whole decodes (crop_decode="off") and crop-aware ("exact")."""
    from torchvision.transforms import v2

    from pixelz_dist.data import MultiImgsDataset

    dirs = [os.path.join(tmp, "seed", d) for d in ("rgb", "hint", "mask")]
    for d in dirs:
        os.makedirs(d)
    with Image.open(files["photo_RGB"]) as img:
        img.save(os.path.join(dirs[0], "0.jpg"), quality=92)
    os.link(files["hint_L"], os.path.join(dirs[1], "0.png"))
    os.link(files["mask_L"], os.path.join(dirs[2], "0.png"))
    t = v2.Compose([v2.RandomResizedCrop(512, scale=(0.25, 1.0)), v2.RandomHorizontalFlip(),
                    v2.ToDtype(torch.float32, scale=True)])
    kw = dict(modes=["RGB", "L", "L"], kinds=["image", "image", "mask"])
    for crop_decode in ("off", "exact"):
        for cache in (None, os.path.join(tmp, "seed_cache")):
            ds = MultiImgsDataset(dirs, t, crop_decode=crop_decode, cache_dir=cache, **kw)
            torch.manual_seed(0)
            out = {"sample": "seed-like", "crop_decode": crop_decode, "cache": cache is not None,
                   "ms_per_sample": round(median_ms(lambda ds=ds: ds[0], reps * 3), 3)}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
