"""JPEG decode throughput, file to result, single core: each libjpeg-turbo binding, fast_img_loader, and Pillow.

Every measurement runs in a fresh process pinned to one core and counts CPU time. Pillow's cost depends on the
process's memory state, so each case is timed with glibc's defaults ("fresh", the method of the issue) and the RGB
cases also with freed memory kept ("warm", as in a long-running process). Every case is repeated ``--reps`` times
with the cases interleaved, so the ratios come from one run, side by side. The test images are the colour
photographs scikit-image ships (astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble_deep_field,
motorcycle), re-encoded with Pillow at quality 90, 4:2:0: about 0.5 MP (each photo resized) and about 4 MP (2 x 2
mosaics of four photos at 1 MP each), colour and grey. One JSON object per line: settings and versions, every
repetition, then the median of each case and the ratios against the issue's targets.

    pip install -e ".[jpeg,bench]"            # simplejpeg is a dependency; PyTurboJPEG, jpeg4py, scikit-image
    python benchmarks/decode_throughput.py    # about 20 minutes on 2 cores
    python benchmarks/decode_throughput.py --quick    # smoke run, about 15 s, same output format
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

# (output type, case, role, code): role "raw" = a direct libjpeg-turbo call, "loader" = fast_img_loader,
# "baseline" = the Pillow idiom. ``read(p)`` reads the file: every case goes from file name to result.
CASES = [
    ("rgb_tensor", "simplejpeg", "raw", "simplejpeg.decode_jpeg(read(p))"),
    ("rgb_tensor", "turbojpeg", "raw", "tj.decode(read(p), pixel_format=turbojpeg.TJPF_RGB)"),
    ("rgb_tensor", "jpeg4py", "raw", "jpeg4py.JPEG(p).decode()"),
    ("rgb_tensor", "torchvision.io", "raw", "decode_jpeg(read_file(p))"),
    ("rgb_tensor", "fast_img_loader", "loader", "fast_img_loader(p, as_tensor=True)"),
    ("rgb_tensor", "pil_to_tensor(open.convert)", "baseline", "pil_to_tensor(Image.open(p).convert('RGB'))"),
    ("rgb_pil", "simplejpeg+fromarray", "raw", "Image.fromarray(simplejpeg.decode_jpeg(read(p)))"),
    ("rgb_pil", "turbojpeg+fromarray", "raw", "Image.fromarray(tj.decode(read(p), pixel_format=turbojpeg.TJPF_RGB))"),
    ("rgb_pil", "jpeg4py+fromarray", "raw", "Image.fromarray(jpeg4py.JPEG(p).decode())"),
    ("rgb_pil", "fast_img_loader", "loader", "fast_img_loader(p)"),
    ("rgb_pil", "open.convert", "baseline", "Image.open(p).convert('RGB')"),
    ("grey_exact", "simplejpeg+convert", "raw", "Image.fromarray(simplejpeg.decode_jpeg(read(p))).convert('L')"),
    ("grey_exact", "jpeg4py+convert", "raw", "Image.fromarray(jpeg4py.JPEG(p).decode()).convert('L')"),
    ("grey_exact", "fast_img_loader", "loader", "fast_img_loader(p, 'L')"),
    ("grey_exact", "open.convert", "baseline", "Image.open(p).convert('L')"),
    (
        "grey_exact_tensor",
        "simplejpeg+convert+from_numpy",
        "raw",
        "torch.from_numpy(np.array(Image.fromarray(simplejpeg.decode_jpeg(read(p))).convert('L')))",
    ),
    ("grey_exact_tensor", "fast_img_loader", "loader", "fast_img_loader(p, 'L', as_tensor=True)"),
    ("grey_exact_tensor", "pil_to_tensor(open.convert)", "baseline", "pil_to_tensor(Image.open(p).convert('L'))"),
    ("grey_fast", "simplejpeg", "raw", "simplejpeg.decode_jpeg(read(p), colorspace='GRAY')"),
    ("grey_fast", "turbojpeg", "raw", "tj.decode(read(p), pixel_format=turbojpeg.TJPF_GRAY)"),
    ("grey_fast", "jpeg4py", "raw", "jpeg4py.JPEG(p).decode(pixfmt=jpeg4py.TJPF_GRAY)"),
    ("grey_fast", "torchvision.io", "raw", "decode_jpeg(read_file(p), mode=ImageReadMode.GRAY)"),
    ("grey_fast", "fast_img_loader", "loader", "fast_img_loader(p, 'L', fast_grey=True, as_tensor=True)"),
    ("grey_fast", "open.draft.convert", "baseline", "draft_grey(p)"),
    ("grey_file", "simplejpeg", "raw", "simplejpeg.decode_jpeg(read(p), colorspace='GRAY')"),
    ("grey_file", "jpeg4py", "raw", "jpeg4py.JPEG(p).decode(pixfmt=jpeg4py.TJPF_GRAY)"),
    ("grey_file", "torchvision.io", "raw", "decode_jpeg(read_file(p), mode=ImageReadMode.GRAY)"),
    ("grey_file", "fast_img_loader", "loader", "fast_img_loader(p, 'L', as_tensor=True)"),
    ("grey_file", "open.convert", "baseline", "Image.open(p).convert('L')"),
]
QUICK_OUTPUTS = ("rgb_tensor", "rgb_pil")
# Allocator states every case of STATE_OUTPUTS is timed in. "fresh": glibc's defaults in a new process, the issue's
# method. "warm": freed memory is kept (no page faults on each new image buffer), as in a long-running process; there
# Pillow's own decoding is about twice as fast, so the PIL-output ratios depend on the state (see DECODE.md).
STATES = {
    "fresh": {},
    "warm": {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)},
}
STATE_OUTPUTS = {"fresh": None, "warm": QUICK_OUTPUTS}
SIZES = {"0.5MP": 0.5, "4MP": 4.0}
# (output type, loader case, reference, target at 0.5 MP, target at 4 MP); reference "raw" = fastest raw case
TARGETS = [
    ("rgb_tensor", "fast_img_loader", "raw", 0.95, 0.95),
    ("rgb_pil", "fast_img_loader", "raw", 0.95, 0.95),
    ("grey_exact", "fast_img_loader", "raw", 0.95, 0.95),
    ("grey_exact_tensor", "fast_img_loader", "raw", 0.95, 0.95),
    ("grey_fast", "fast_img_loader", "raw", 0.95, 0.95),
    ("grey_file", "fast_img_loader", "raw", 0.95, 0.95),
    ("rgb_pil", "fast_img_loader", "open.convert", 1.2, 2.2),
    ("rgb_tensor", "fast_img_loader", "pil_to_tensor(open.convert)", 1.6, 3.5),
]

WORKER_SETUP = """
import os, warnings
warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice on every decode
from PIL import Image
def read(p):
    with open(p, "rb") as f:
        return f.read()
def draft_grey(p):
    img = Image.open(p)
    img.draft("L", img.size)
    return img.convert("L")
"""
IMPORTS = {
    "simplejpeg": "import simplejpeg",
    "tj.": "import turbojpeg; tj = turbojpeg.TurboJPEG()",
    "jpeg4py": "import jpeg4py",
    "decode_jpeg(read_file": "from torchvision.io import decode_jpeg, read_file, ImageReadMode",
    "pil_to_tensor": "from torchvision.transforms.v2.functional import pil_to_tensor",
    "fast_img_loader": "from pixelz_dist.data.images import fast_img_loader, jpeg_backend; jpeg_backend()",
    "torch.from_numpy": "import torch, numpy as np",
}


def photos() -> list[np.ndarray]:
    import skimage.data as d

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]
    return [getattr(d, n)() for n in names] + [d.stereo_motorcycle()[0]]


def _resize_to(arr: np.ndarray, megapixels: float) -> Image.Image:
    h, w = arr.shape[:2]
    scale = (megapixels * 1e6 / (h * w)) ** 0.5
    return Image.fromarray(arr).resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def _square(arr: np.ndarray, side: int) -> Image.Image:
    h, w = arr.shape[:2]
    s = min(h, w)
    crop = arr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return Image.fromarray(crop).resize((side, side), Image.Resampling.LANCZOS)


def _pixels(path: str) -> int:
    with Image.open(path) as img:
        return img.size[0] * img.size[1]


def make_images(root: str, quick: bool) -> dict[str, dict]:
    """Write colour and grey JPEGs per size; returns {size: {"colour": [...], "grey": [...], "mp": .., "bpp": ..}}."""
    src = photos()
    out = {}
    for size, mp in SIZES.items():
        if mp < 1:
            imgs = [_resize_to(a, mp) for a in src]
        else:  # 2 x 2 mosaics of four different photos, each 1024 x 1024
            imgs = []
            for k in range(1 if quick else 4):
                tiles = [_square(src[(k + j) % len(src)], 1024) for j in range(4)]
                mosaic = Image.new("RGB", (2048, 2048))
                for j, tile in enumerate(tiles):
                    mosaic.paste(tile, (1024 * (j % 2), 1024 * (j // 2)))
                imgs.append(mosaic)
        if quick:
            imgs = imgs[:1]
        entry = {"colour": [], "grey": []}
        for i, img in enumerate(imgs):
            for kind, im in (("colour", img), ("grey", img.convert("L"))):
                path = os.path.join(root, f"{size}_{kind}_{i}.jpg")
                im.save(path, "JPEG", quality=90)
                entry[kind].append(path)
        pixels = sum(_pixels(p) for p in entry["colour"])
        entry["mp"] = round(pixels / len(entry["colour"]) / 1e6, 3)
        entry["bits_per_pixel"] = round(8 * sum(os.path.getsize(p) for p in entry["colour"]) / pixels, 2)
        out[size] = entry
    return out


def measure(spec: dict) -> dict:
    """Time one case over the files on one core (in a fresh process, except with --quick)."""
    os.sched_setaffinity(0, {spec["cpu"]})
    code = spec["code"]
    namespace: dict = {}
    exec(WORKER_SETUP, namespace)
    for key, stmt in IMPORTS.items():
        if key in code:
            exec(stmt, namespace)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    fn = eval("lambda p: " + code, namespace)
    files, sizes = spec["files"], spec["sizes"]
    for p in files:  # warm-up: imports, page cache, allocator
        fn(p)
    # CPU time of this process (page faults included), per call, median per file: another process taking the core
    # for a while (the machine is shared) spoils a few calls, not the result.
    clock = time.process_time
    times: list[list[float]] = [[] for _ in files]
    start = time.perf_counter()
    while len(times[0]) < 5 or time.perf_counter() - start < spec["min_time"]:
        for i, p in enumerate(files):
            t0 = clock()
            fn(p)
            times[i].append(clock() - t0)
    megapixels = sum(sizes) / 1e6
    row = {
        "mp_s": megapixels / sum(statistics.median(t) for t in times),
        "mp_s_best": megapixels / sum(min(t) for t in times),
        "calls": sum(len(t) for t in times),
    }
    if "jpeg_backend" in namespace:
        row["backend"] = namespace["jpeg_backend"]()
    return row


def versions() -> dict:
    import importlib.metadata as md

    import PIL.features

    out = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        out["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    for dist in ("torch", "torchvision", "Pillow", "numpy", "simplejpeg", "PyTurboJPEG", "jpeg4py", "scikit-image"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["pillow_libjpeg_turbo"] = PIL.features.version("libjpeg_turbo")
    try:
        out["system_libturbojpeg"] = (
            subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", "libturbojpeg0"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        out["system_libturbojpeg"] = None
    return out


def available(code: str) -> bool:
    for key, stmt in IMPORTS.items():
        if key in code:
            try:
                exec(stmt, {})
            except Exception:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (seconds): RGB cases, one image per size, in this process"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions of every case (default 3, quick 1)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds timed per case and repetition")
    parser.add_argument("--outputs", help="comma-separated output types to time (default: all)")
    parser.add_argument("--markdown", help="also write the summary table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return print(json.dumps(measure(json.loads(args.worker))))
    reps = args.reps or (1 if args.quick else 3)
    min_time = args.min_time or (0.05 if args.quick else 1.0)
    cpu = max(os.sched_getaffinity(0))
    settings = {
        "reps": reps,
        "min_time_s": min_time,
        "quick": args.quick,
        "cpu": cpu,
        "quality": 90,
        "clock": "process_time",
        "states": STATES,
    }
    print(json.dumps({"kind": "settings", **settings, "versions": versions()}), flush=True)

    with tempfile.TemporaryDirectory(prefix="pixelz_decode_") as root:
        sets = make_images(root, args.quick)
        for size, entry in sets.items():
            print(
                json.dumps(
                    {
                        "kind": "images",
                        "size": size,
                        **{k: entry[k] for k in ("mp", "bits_per_pixel")},
                        "files": len(entry["colour"]),
                    }
                ),
                flush=True,
            )
        cases = [c for c in CASES if not args.quick or c[0] in QUICK_OUTPUTS]
        if args.outputs:
            cases = [c for c in cases if c[0] in args.outputs.split(",")]
        for case in [c for c in cases if not available(c[3])]:
            print(json.dumps({"kind": "missing", "output": case[0], "case": case[1]}), flush=True)
            cases.remove(case)
        runs = [
            (state, size, case)
            for state, outputs in STATE_OUTPUTS.items()
            if state == "fresh" or not args.quick
            for size in sets
            for case in cases
            if outputs is None or case[0] in outputs
        ]
        results: dict[tuple, list[float]] = {}
        for rep in range(reps):
            shift = rep * 7 % len(runs)  # a different order each repetition: drift does not favour one case
            for state, size, (output, name, role, code) in runs[shift:] + runs[:shift]:
                files = sets[size]["grey" if output == "grey_file" else "colour"]
                sizes = [_pixels(p) for p in files]
                spec = {"code": code, "files": files, "sizes": sizes, "min_time": min_time, "cpu": cpu}
                if args.quick:  # a smoke run: in this process, so it takes seconds
                    row = measure(spec)
                else:
                    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **STATES[state])
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(spec)],
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    if proc.returncode != 0:  # report it and go on: one broken case must not lose a 15-minute run
                        error = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                        print(json.dumps({"kind": "error", "case": name, "size": size, "error": error[0]}), flush=True)
                        continue
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault((state, size, output, name, role), []).append(row["mp_s"])
                print(
                    json.dumps(
                        {
                            "kind": "rep",
                            "rep": rep,
                            "state": state,
                            "size": size,
                            "output": output,
                            "case": name,
                            "role": role,
                            "code": code,
                            **row,
                        }
                    ),
                    flush=True,
                )
    summary(results, settings, args.markdown)


def _ratio_rows(med: dict, state: str) -> tuple[list[str], list[dict]]:
    lines, rows = [], []
    for output, case, ref, *goals in TARGETS:
        cells = []
        for size, goal in zip(SIZES, goals):
            mine = med.get((state, size, output, case, "loader"))
            if ref == "raw":
                raws = {k[3]: v for k, v in med.items() if k[:3] == (state, size, output) and k[4] == "raw"}
                ref_name, ref_val = max(raws.items(), key=lambda kv: kv[1]) if raws else (None, None)
            else:
                ref_name, ref_val = ref, med.get((state, size, output, ref, "baseline"))
            if mine is None or ref_val is None:
                cells.append("n/a")
                continue
            ratio = mine / ref_val
            rows.append(
                {
                    "kind": "ratio",
                    "state": state,
                    "size": size,
                    "output": output,
                    "case": case,
                    "reference": ref_name,
                    "ratio": round(ratio, 3),
                    "target": goal,
                    "met": ratio >= goal,
                }
            )
            cells.append(f"{ratio:.2f}x vs {ref_name} (target {goal}x: {'met' if ratio >= goal else 'NOT met'})")
        if any(c != "n/a" for c in cells):
            lines.append(f"| {state} | {output}: fast_img_loader / {ref} | " + " | ".join(cells) + " |")
    return lines, rows


def summary(results: dict, settings: dict, markdown: str | None) -> None:
    med = {key: statistics.median(v) for key, v in results.items()}
    head = " | ".join(f"{s} MP/s" for s in SIZES)
    lines = [f"| output | case | role | {head} | warm: {head} |", "|---|---|---|" + "---:|" * 2 * len(SIZES)]
    for output, name, role in dict.fromkeys(k[2:] for k in med):
        row = {"kind": "median", "output": output, "case": name, "role": role}
        cells = []
        for state in STATES:
            for size in SIZES:
                value = med.get((state, size, output, name, role))
                row[f"mp_s_{state}_{size}"] = None if value is None else round(value, 1)
                cells.append("" if value is None else f"{value:.0f}")
        print(json.dumps(row))
        lines.append(f"| {output} | {name} | {role} | " + " | ".join(cells) + " |")
    lines += ["", "| state | ratio | " + " | ".join(SIZES) + " |", "|---|---|" + "---|" * len(SIZES)]
    for state in STATES:
        ratio_lines, rows = _ratio_rows(med, state)
        lines += ratio_lines
        for row in rows:
            print(json.dumps(row))
    if markdown:
        with open(markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
