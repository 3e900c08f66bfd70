"""End-to-end samples/s of MultiImgsDataset + DataLoader against torchvision's ImageFolder on the same files.

Two workloads, each with 0, 1 and 2 DataLoader workers, every configuration in a fresh process, repeated ``--reps``
times in an interleaved order so the ratios come from one run:

* ``single``: one JPEG photograph per sample (about 0.5 MP, scikit-image's photographs re-encoded at quality 90),
  the same v2 transform (RandomResizedCrop 224, flip, float) for ``ImageFolder`` (Pillow's loader) and for
  ``MultiImgsDataset`` (fast_img_loader, PIL images; and as a joint transform on tensors, no PIL at all).
* ``seg``: photo (JPEG) + grey hint (JPEG) + mask (PNG) per sample, a joint RandomResizedCrop + flip, through
  ``MultiImgsDataset``, against the same dataset reading with Pillow (``Image.open(p).convert(mode)``).

One JSON object per line. The table shows the best of the repetitions (on a shared machine other processes only
slow a run down; both sides get the same treatment), the JSON lines the medians too. CPU ms per sample (main process
and workers) is the least noisy figure.

    python benchmarks/dataset_throughput.py            # about 10 minutes on 2 cores
    python benchmarks/dataset_throughput.py --quick    # smoke run, about 20 s, same output format
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
import psutil
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

CONFIGS = {
    "single/ImageFolder": "ImageFolder(root_single, transform=single_t)",
    "single/MultiImgsDataset": "MultiImgsDataset([rgb], [single_t], modes=['RGB'])",
    "single/MultiImgsDataset joint": "MultiImgsDataset([rgb], single_t, modes=['RGB'])",
    "seg/MultiImgsDataset pil_loader": "MultiImgsDataset(seg_dirs, seg_t, pil_mode_loader, modes=MODES, kinds=KINDS)",
    "seg/MultiImgsDataset": "MultiImgsDataset(seg_dirs, seg_t, modes=MODES, kinds=KINDS)",
}
BASELINES = {
    "single/MultiImgsDataset": "single/ImageFolder",
    "single/MultiImgsDataset joint": "single/ImageFolder",
    "seg/MultiImgsDataset": "seg/MultiImgsDataset pil_loader",
}


def make_files(root: str, n: int) -> None:
    """``root/single/photos/*.jpg`` (an ImageFolder with one class) and ``root/seg/{rgb,hint,mask}``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_throughput import _resize_to, photos

    src = [np.asarray(_resize_to(a, 0.78)) for a in photos()]
    for d in ("single/photos", "seg/rgb", "seg/hint", "seg/mask"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(n):
        a = src[i % len(src)]
        if (i // len(src)) % 2:
            a = a[:, ::-1]
        k = i // (2 * len(src))
        h, w = a.shape[:2]
        crop = Image.fromarray(np.ascontiguousarray(a[k % 8 * 4 : h - 32 + k % 8 * 4, k % 5 * 4 : w - 32 + k % 5 * 4]))
        crop = crop.resize((crop.width * 5 // 6, crop.height * 5 // 6), Image.Resampling.LANCZOS)  # ~0.5 MP
        grey = crop.convert("L")
        crop.save(os.path.join(root, "single/photos", f"{i:05d}.jpg"), quality=90)
        crop.save(os.path.join(root, "seg/rgb", f"{i:05d}.jpg"), quality=90)
        grey.save(os.path.join(root, "seg/hint", f"{i:05d}.jpg"), quality=90)
        mask = (np.asarray(grey) > np.asarray(grey).mean()).astype(np.uint8) * 255
        Image.fromarray(mask).save(os.path.join(root, "seg/mask", f"{i:05d}.png"))


def pil_mode_loader(path: str, mode: str) -> Image.Image:
    """What ImageFolder's default loader does, with the folder's mode."""
    with Image.open(path) as img:
        return img.convert(mode)


def measure(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from pixelz_dist.data import MultiImgsDataset

    torch.set_num_threads(1)
    root = spec["root"]
    namespace = {
        "ImageFolder": ImageFolder,
        "MultiImgsDataset": MultiImgsDataset,
        "pil_mode_loader": pil_mode_loader,
        "root_single": os.path.join(root, "single"),
        "rgb": os.path.join(root, "single", "photos"),
        "seg_dirs": [os.path.join(root, "seg", d) for d in ("rgb", "hint", "mask")],
        "MODES": ["RGB", "L", "L"],
        "KINDS": ["image", "image", "mask"],
        "single_t": v2.Compose(
            [v2.ToImage(), v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
        ),
        "seg_t": v2.Compose(
            [v2.RandomResizedCrop(256), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
        ),
    }
    dataset = eval(spec["code"], namespace)
    workers = spec["workers"]
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    torch.manual_seed(0)
    for _ in loader:  # warm-up epoch: worker start, imports, page cache
        pass
    me = psutil.Process()

    def cpu_seconds() -> float:  # this process and its live DataLoader workers
        return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])

    samples, start, cpu0 = 0, time.perf_counter(), cpu_seconds()
    while samples < spec["min_samples"] or time.perf_counter() - start < spec["min_time"]:
        for batch in loader:
            samples += len(batch[0])
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return {"samples_s": samples / wall, "cpu_ms_per_sample": 1000 * cpu / samples, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (seconds): 32 files, 1 repetition, in process")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--markdown", help="also write the summary table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return print(json.dumps(measure(json.loads(args.worker))))
    import torch
    import torchvision

    reps = args.reps or (1 if args.quick else 5)
    n = 32 if args.quick else 96
    settings = {
        "reps": reps,
        "files": n,
        "batch_size": 16,
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "Pillow": Image.__version__,
    }
    from pixelz_dist.data.images import jpeg_backend

    settings["jpeg_backend"] = jpeg_backend()
    print(json.dumps({"kind": "settings", **settings}), flush=True)
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pixelz_dataset_") as root:
        make_files(root, n)
        runs = [(name, code, w) for w in (0, 1, 2) for name, code in CONFIGS.items()]
        for rep in range(reps):
            shift = rep * 5 % len(runs)
            for name, code, workers in runs[shift:] + runs[:shift]:
                spec = {
                    "root": root,
                    "code": code,
                    "workers": workers,
                    "min_time": 0.2 if args.quick else 4.0,
                    "min_samples": n,
                }
                if args.quick:  # a smoke run: in this process, so it takes seconds
                    row = measure(spec)
                else:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(spec)],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=dict(os.environ, OMP_NUM_THREADS="1"),
                    )
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault((name, workers), []).append(row)
                print(json.dumps({"kind": "rep", "rep": rep, "config": name, "workers": workers, **row}), flush=True)
    summary(results, args.markdown)


def summary(results: dict, markdown: str | None) -> None:
    """Best of the repetitions in the table (other processes only ever slow a run down), medians in the JSON."""
    best = {
        key: {"samples_s": max(r["samples_s"] for r in rows), "cpu_ms": min(r["cpu_ms_per_sample"] for r in rows)}
        for key, rows in results.items()
    }
    lines = [
        "| workload / dataset | samples/s, 0 workers | 1 worker | 2 workers | CPU ms per sample, 0 workers |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        base = BASELINES.get(name)
        cells = []
        for w in (0, 1, 2):
            rows = results[(name, w)]
            value = best[(name, w)]["samples_s"]
            speedup = value / best[(base, w)]["samples_s"] if base else None
            row = {
                "kind": "summary",
                "config": name,
                "workers": w,
                "samples_s_best": round(value, 1),
                "samples_s_median": round(statistics.median(r["samples_s"] for r in rows), 1),
                "cpu_ms_per_sample_best": round(best[(name, w)]["cpu_ms"], 3),
                "cpu_ms_per_sample_median": round(statistics.median(r["cpu_ms_per_sample"] for r in rows), 3),
                "speedup_best": speedup and round(speedup, 3),
                "vs": base,
            }
            print(json.dumps(row))
            cells.append(f"{value:.0f}" + (f" ({speedup:.2f}x)" if speedup else ""))
        cpu0 = best[(name, 0)]["cpu_ms"]
        cpu_cell = f"{cpu0:.2f}" + (f" ({best[(base, 0)]['cpu_ms'] / cpu0:.2f}x)" if base else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cpu_cell} |")
    if markdown:
        with open(markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
