"""Keeping the GPU fed: samples/s of the data path on one core, and end to end against GPU-resident on a device.

Two workloads, generated from scikit-image's photographs (``pip install -e ".[bench]"``):

* ``imagenet``: one JPEG per sample, about 500 x 375, quality 90; ``RandomResizedCrop(224)`` + flip + float.
* ``seed``: an RGB JPEG of about 1 MP (1000-1300 wide, 4:3, quality 92), a grey PNG hint (a smooth, blurred channel)
  and a grey PNG mask (a few flat regions); a joint ``RandomResizedCrop(512, scale=(0.25, 1))`` + flip + float.
* ``large``: the seed RGB JPEG at twice the size (about 4.5 MP, 2000-2600 wide), alone, with the same transform: the
  case DCT-domain scaling is for (a crop at least twice the output). In the two workloads above it never applies.

CPU (the default): samples per second of CPU time on one core (``num_workers=0``, one torch thread; the wall-clock
rate is printed too), every configuration in a fresh process, rounds interleaved so the ratios come from one run:

* ``reference``: plain Pillow + the same v2 transform (``ImageFolder`` for ``imagenet``; a Pillow loader for ``seed``)
* ``today``: ``MultiImgsDataset(..., crop_decode="off")``, no cache: the path before crop-aware loading
* ``exact``: crop-aware decoding (the default) + the pixel cache for the PNGs: bit-identical to ``today``
* ``scaled``: ``crop_decode="scaled"`` + the cache: JPEG DCT-domain downscaling, not bit-identical (PSNR printed)

CUDA (``--cuda``): for ResNet-50 on ``imagenet`` (batch 256) and lraspp_mobilenet_v3_large / fcn_resnet50 on ``seed``
(batch 32, crop 512), bf16 + channels_last: the step rate with the batch already on the GPU, then ``train_model`` end to
end with the default workers, for ``today`` and ``exact``. One JSON object per line.

    python benchmarks/feed_throughput.py                 # CPU, about 10 minutes on 2 cores
    python benchmarks/feed_throughput.py --quick         # smoke run, seconds
    python benchmarks/feed_throughput.py --cuda          # on a GPU machine (also --cuda-device cpu to smoke-test)
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
from PIL import Image, ImageFilter

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

CPU_CONFIGS = ("reference", "today", "exact", "scaled")
WORKLOADS = ("imagenet", "seed", "large")


def _photos() -> list[np.ndarray]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_throughput import photos

    return photos()


def make_files(root: str, n_imagenet: int, n_seed: int) -> dict:
    """``root/imagenet/photos/*.jpg`` (an ImageFolder with one class) and ``root/seed/{rgb,hint,mask}``."""
    src = _photos()
    for d in ("imagenet/photos", "seed/rgb", "seed/hint", "seed/mask", "large/photos"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(max(n_imagenet, n_seed)):
        a = src[i % len(src)]
        if (i // len(src)) % 2:
            a = a[:, ::-1]
        h, w = a.shape[:2]
        k = i // (2 * len(src))
        a = np.ascontiguousarray(a[k % 8 * 4 : h - 32 + k % 8 * 4, k % 5 * 4 : w - 32 + k % 5 * 4])
        img = Image.fromarray(a)
        if i < n_imagenet:
            img.resize((500, 375), Image.Resampling.LANCZOS).save(
                os.path.join(root, "imagenet/photos", f"{i:05d}.jpg"), quality=90)
        if i < n_seed:
            width = int(rng.integers(1000, 1301))
            big = img.resize((width, width * 3 // 4), Image.Resampling.LANCZOS)
            big.save(os.path.join(root, "seed/rgb", f"{i:05d}.jpg"), quality=92)
            grey = big.convert("L")
            grey.filter(ImageFilter.GaussianBlur(6)).save(os.path.join(root, "seed/hint", f"{i:05d}.png"))
            levels = np.asarray(grey.filter(ImageFilter.GaussianBlur(12)))
            mask = (levels > np.median(levels)).astype(np.uint8) * 255
            Image.fromarray(mask).save(os.path.join(root, "seed/mask", f"{i:05d}.png"))
            if i < n_seed // 2:
                img.resize((2 * width, width * 3 // 2), Image.Resampling.LANCZOS).save(
                    os.path.join(root, "large/photos", f"{i:05d}.jpg"), quality=92)

    def kib(folder: str) -> float:
        files = [os.path.join(root, folder, f) for f in os.listdir(os.path.join(root, folder))]
        return round(sum(os.path.getsize(f) for f in files) / len(files) / 1024, 1)

    return {"imagenet_jpeg_kib": kib("imagenet/photos"), "seed_rgb_kib": kib("seed/rgb"),
            "seed_hint_kib": kib("seed/hint"), "seed_mask_kib": kib("seed/mask"), "large_kib": kib("large/photos")}


def pil_mode_loader(path: str, mode: str) -> Image.Image:
    """The reference: what ImageFolder's default loader does, in the folder's mode."""
    with Image.open(path) as img:
        return img.convert(mode)


def transform(workload: str):
    import torch
    from torchvision.transforms import v2

    if workload == "imagenet":
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(),
                           v2.ToDtype(torch.float32, scale=True)])
    head = [v2.ToImage()] if workload == "large" else []  # ImageFolder's PIL images, as for imagenet
    return v2.Compose(head + [v2.RandomResizedCrop(512, scale=(0.25, 1.0)), v2.RandomHorizontalFlip(),
                              v2.ToDtype(torch.float32, scale=True)])


def dataset(workload: str, config: str, root: str, cache: str):
    from torchvision.datasets import ImageFolder

    from pixelz_dist.data import MultiImgsDataset

    t = transform(workload)
    if workload in ("imagenet", "large"):
        if config == "reference":
            return ImageFolder(os.path.join(root, workload), transform=t)
        folders, modes, kinds = [os.path.join(root, workload, "photos")], ["RGB"], ["image"]
    else:
        folders = [os.path.join(root, "seed", d) for d in ("rgb", "hint", "mask")]
        modes, kinds = ["RGB", "L", "L"], ["image", "image", "mask"]
    if config == "reference":
        return MultiImgsDataset(folders, t, pil_mode_loader, modes=modes, kinds=kinds)
    if config == "today":
        return MultiImgsDataset(folders, t, modes=modes, kinds=kinds, crop_decode="off")
    return MultiImgsDataset(folders, t, modes=modes, kinds=kinds, crop_decode=config, cache_dir=cache)


def measure_cpu(spec: dict) -> dict:
    """samples/s of one configuration on one core: DataLoader(num_workers=0), after a warm-up pass (fills the cache)."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    ds = dataset(spec["workload"], spec["config"], spec["root"], spec["cache"])
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    for _ in loader:  # warm-up: imports, page cache, the pixel cache's entries
        pass
    samples, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while samples < spec["min_samples"] or time.perf_counter() - start < spec["min_time"]:
        for batch in loader:
            samples += len(batch[0])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # Samples per second of this process's CPU time: on a shared machine, time spent waiting for a core is not ours.
    return {"samples_s": samples / cpu, "samples_s_wall": samples / wall, "samples": samples}


def psnr_scaled(root: str, cache: str, workloads: tuple, samples: int = 24) -> dict:
    """PSNR of crop_decode="scaled" against the exact samples (the JPEG image only; the PNGs are exact)."""
    import torch

    out = {}
    for workload in workloads:
        exact, scaled = (dataset(workload, c, root, cache) for c in ("exact", "scaled"))
        values = []
        for i in range(min(samples, len(exact))):
            torch.manual_seed(i)
            a = exact[i][0]
            torch.manual_seed(i)
            b = scaled[i][0]
            mse = float(((a - b) ** 2).mean())
            values.append(99.0 if mse == 0 else 10 * np.log10(1.0 / mse))
        out[workload] = {"psnr_db_median": round(statistics.median(values), 2), "psnr_db_min": round(min(values), 2),
                         "identical_fraction": round(sum(v == 99.0 for v in values) / len(values), 3)}
    return out


def run_cpu(args, root: str, settings: dict) -> None:
    results: dict[tuple, list[float]] = {}
    runs = [(w, c) for w in args.workloads for c in CPU_CONFIGS]
    for rep in range(args.reps):
        shift = rep * 3 % len(runs)
        for workload, config in runs[shift:] + runs[:shift]:
            spec = {"workload": workload, "config": config, "root": root, "cache": os.path.join(root, "cache"),
                    "min_time": 0.2 if args.quick else args.seconds, "min_samples": 8 if args.quick else 48}
            if args.quick:
                row = measure_cpu(spec)
            else:
                proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True,
                                      text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.setdefault((workload, config), []).append(row["samples_s"])
            print(json.dumps({"kind": "round", "rep": rep, "workload": workload, "config": config, **row}), flush=True)
    for workload in args.workloads:
        ref = statistics.median(results[(workload, "reference")])
        for config in CPU_CONFIGS:
            med = statistics.median(results[(workload, config)])
            print(json.dumps({"kind": "cpu", "workload": workload, "config": config, "samples_s_median": round(med, 2),
                              "samples_s_best": round(max(results[(workload, config)]), 2),
                              "vs_reference": round(med / ref, 3), "rounds": len(results[(workload, config)]),
                              "one_core": True, **settings}), flush=True)
    psnr = psnr_scaled(root, os.path.join(root, "cache"), args.workloads)
    print(json.dumps({"kind": "scaled_psnr", **psnr}), flush=True)


class Labelled:
    """ImageNet-like samples with a label derived from the index (throughput only)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0], i % 1000


def resident_seconds(model, optimizer, inputs: list, device, warm: int, steps: int) -> float:
    """Seconds for ``steps`` training steps on a batch already on the device (bf16 autocast), after ``warm`` steps."""
    import torch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_cuda(args, root: str, settings: dict) -> None:
    import torch

    from pixelz_dist import train_model
    from pixelz_dist.callbacks.base import Callback

    device = torch.device(args.cuda_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"kind": "cuda", "skipped": "no CUDA device here: GPU figures unmeasured"}), flush=True)
        return
    cases = [("resnet50", "imagenet", 256), ("lraspp_mobilenet_v3_large", "seed", 32), ("fcn_resnet50", "seed", 32)]
    steps, warm = (3, 1) if args.quick else (args.cuda_steps, 5)
    for model_name, workload, batch in cases:
        if args.quick:
            batch = 2
        torch.manual_seed(0)
        model = build_model(model_name).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        ds = dataset(workload, "today", root, "")
        first = (Labelled(ds) if workload == "imagenet" else ds)[0]
        batch_cpu = torch.utils.data.default_collate([first] * batch)
        resident = [x.to(device).contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.to(device)
                    for x in batch_cpu]
        resident_rate = steps * batch / resident_seconds(model, optimizer, resident, device, warm, steps)
        print(json.dumps({"kind": "cuda", "model": model_name, "workload": workload, "batch": batch,
                          "config": "gpu_resident", "samples_s": round(resident_rate, 1), **settings}), flush=True)

        class Clock(Callback):
            def __init__(self):
                self.times = {}

            def on_iteration_end(self, state):
                self.times[state.iteration] = time.perf_counter()

        if workload == "seed":  # fill the pixel cache ahead, as the README recommends: steady state is measured
            folders = [os.path.join(root, "seed", d) for d in ("rgb", "hint", "mask")]
            subprocess.run([sys.executable, "-m", "pixelz_dist.prepare", "--data", *folders, "--modes", "RGB", "L", "L",
                            "--cache-dir", os.path.join(root, "cache"), "--no-progress"], check=True, cwd=_ROOT)
        for config in ("today", "exact"):
            ds = dataset(workload, config, root, os.path.join(root, "cache"))
            data = Labelled(ds) if workload == "imagenet" else ds
            clock = Clock()
            train_model(model, optimizer, None, data, batch, num_iters=warm + steps, amp="bf16", channels_last=True,
                        display_iter=10**9, callbacks=[clock], seed=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = steps * batch / (clock.times[warm + steps] - clock.times[warm])
            print(json.dumps({"kind": "cuda", "model": model_name, "workload": workload, "batch": batch,
                              "config": config, "samples_s": round(rate, 1),
                              "vs_gpu_resident": round(rate / resident_rate, 3), **settings}), flush=True)


def build_model(name: str):
    """The model, with a forward that returns the loss as train_model wants."""
    import torchvision
    from torch import nn

    if name == "resnet50":
        class Classifier(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = torchvision.models.resnet50(num_classes=1000)

            def forward(self, x, label):
                return nn.functional.cross_entropy(self.net(x), label)

        return Classifier()

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                                      num_classes=2)

        def forward(self, rgb, hint, mask):
            return nn.functional.cross_entropy(self.net(rgb)["out"], (mask[:, 0] > 127).long())

    return Segmenter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few files, one round, in this process")
    parser.add_argument("--cuda", action="store_true", help="the GPU comparison instead of the CPU one")
    parser.add_argument("--cuda-device", default="cuda", help="cpu: smoke-test the GPU code path without a GPU")
    parser.add_argument("--cuda-steps", type=int, default=40, help="timed iterations per GPU measurement")
    parser.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 5; --quick 1)")
    parser.add_argument("--seconds", type=float, default=6.0, help="minimum time per CPU measurement")
    parser.add_argument("--files", type=int, default=None, help="files per workload (default: 96 CPU, 3072 GPU)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS, help="CPU: which workloads")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return print(json.dumps(measure_cpu(json.loads(args.measure))))
    import torch
    import torchvision

    from pixelz_dist.data.images import jpeg_backend
    from pixelz_dist.data.jpeg_region import region_decoder_available

    args.reps = args.reps or (1 if args.quick else 5)
    n = args.files or (8 if args.quick else 3072 if args.cuda else 96)
    settings = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "Pillow": Image.__version__, "jpeg_backend": jpeg_backend(),
                "region_decoder": region_decoder_available(), "cpus": len(os.sched_getaffinity(0)),
                "machine": platform.machine()}
    with tempfile.TemporaryDirectory(prefix="pixelz_feed_") as root:
        files = make_files(root, n, n if not args.cuda else max(n // 4, 8))
        print(json.dumps({"kind": "settings", "files": n, **files, **settings}), flush=True)
        short = {k: settings[k] for k in ("torch", "jpeg_backend", "region_decoder")}
        (run_cuda if args.cuda else run_cpu)(args, root, short)


if __name__ == "__main__":
    main()
