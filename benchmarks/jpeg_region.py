"""Region decoding against a whole decode: what decoding only a crop saves, per box size and at 1/2 scale.

Two photo-like JPEGs: about 1 MP (1200 x 900, quality 92) and 0.19 MP (500 x 375, quality 90), 4:2:0, made from
scikit-image's photographs when it is installed (a 2 x 2 mosaic of four photos for the larger one, one photo resized
for the smaller), else from a synthetic noisy gradient (the JSON says which). Bytes are in memory: decoding only.
Cases per image: simplejpeg's whole decode (the library's fast path), then :func:`decode_jpeg_region` with a centred box
of 100 %, 50 %, 25 % and 10 % of the area, and at scale 1/2 with a box twice the output's side (the 100 % and 50 %
boxes), next to simplejpeg's whole decode at 1/2. CPU time of this process per decode, cases interleaved, median over
``--reps`` repetitions. One JSON object per line: settings first, then one line per case.

    pip install -e ".[bench]"                               # scikit-image, for the photographs
    taskset -c 1 python benchmarks/jpeg_region.py           # one core; about 30 s
    taskset -c 1 python benchmarks/jpeg_region.py --quick   # smoke run, a few seconds, same output
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

import simplejpeg  # noqa: E402

from pixelz_dist.data.jpeg_region import decode_jpeg_region, region_decoder_available  # noqa: E402

IMAGES = {"1MP": ((900, 1200), 92), "0.19MP": ((375, 500), 90)}  # name: ((height, width), quality)
AREAS = (1.0, 0.5, 0.25, 0.1)


def _source(size: tuple[int, int]) -> tuple[Image.Image, str]:
    h, w = size
    try:
        import skimage.data as d
    except ImportError:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx * 255 / w, yy * 255 / h, (np.sin(xx / 9) + np.cos(yy / 13)) * 60 + 128], axis=-1)
        arr = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr), "synthetic noisy gradient (scikit-image not installed)"
    if h * w < 500_000:
        return Image.fromarray(d.coffee()).resize((w, h), Image.Resampling.LANCZOS), "scikit-image coffee, resized"
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    mosaic = Image.new("RGB", (w, h))
    for j, name in enumerate(names):
        tile = Image.fromarray(getattr(d, name)()).resize((w // 2, h // 2), Image.Resampling.LANCZOS)
        mosaic.paste(tile, ((w // 2) * (j % 2), (h // 2) * (j // 2)))
    return mosaic, "scikit-image mosaic: " + ", ".join(names)


def _centred(h: int, w: int, area: float) -> tuple[int, int, int, int]:
    bh, bw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
    return (h - bh) // 2, (w - bw) // 2, bh, bw


def cases(data: bytes, h: int, w: int) -> dict[str, tuple[dict, callable]]:
    out = {"whole simplejpeg": ({"box_area": 1.0, "scale": 1}, lambda: simplejpeg.decode_jpeg(data))}
    for area in AREAS:
        box = _centred(h, w, area)
        out[f"region {area:.0%}"] = ({"box_area": area, "box": box, "scale": 1},
                                     lambda box=box: decode_jpeg_region(data, "RGB", box))
    half = {"min_height": -(-h // 2), "min_width": -(-w // 2)}
    out["whole simplejpeg 1/2"] = ({"box_area": 1.0, "scale": 2}, lambda: simplejpeg.decode_jpeg(data, **half))
    for area in (1.0, 0.5):
        box = _centred(h, w, area)
        out[f"region {area:.0%} 1/2"] = ({"box_area": area, "box": box, "scale": 2},
                                         lambda box=box: decode_jpeg_region(data, "RGB", box, 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions; each case's median is reported")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of decoding per case and repetition")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions of 0.02 s")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.min_time = 2, 0.02
    if not region_decoder_available():
        sys.exit("pixelz_dist.data._jpeg_region is not built: reinstall with gcc and libjpeg62-turbo-dev")
    affinity = sorted(os.sched_getaffinity(0))
    print(json.dumps({"settings": {"reps": args.reps, "min_time_s": args.min_time, "cpu_affinity": affinity,
                                   "one_core": len(affinity) == 1, "clock": "process_time",
                                   "python": platform.python_version(), "simplejpeg": simplejpeg.__version__,
                                   "numpy": np.__version__, "machine": platform.machine()}}), flush=True)
    for name, (size, quality) in IMAGES.items():
        img, source = _source(size)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        data = buf.getvalue()
        h, w = size
        table = cases(data, h, w)
        whole = table["whole simplejpeg"][1]()
        assert np.array_equal(table["region 100%"][1](), whole)  # the same pixels, so the times compare like for like
        calls = {}
        for key, (_, fn) in table.items():  # warm-up, and calls per repetition from the first timing
            t0 = time.perf_counter()
            fn()
            calls[key] = max(1, int(args.min_time / max(time.perf_counter() - t0, 1e-6)))
        times: dict[str, list[float]] = {key: [] for key in table}
        for _ in range(args.reps):
            for key, (_, fn) in table.items():
                t0 = time.process_time()
                for _ in range(calls[key]):
                    fn()
                times[key].append((time.process_time() - t0) / calls[key])
        base = statistics.median(times["whole simplejpeg"])
        for key, (info, _) in table.items():
            ms = statistics.median(times[key]) * 1e3
            print(json.dumps({"image": name, "height": h, "width": w, "quality": quality, "source": source,
                              "bytes": len(data), "case": key, **info, "ms_per_decode_median": round(ms, 3),
                              "ms_all_reps": [round(t * 1e3, 3) for t in times[key]],
                              "speedup_vs_whole": round(base * 1e3 / ms, 2)}), flush=True)


if __name__ == "__main__":
    main()
