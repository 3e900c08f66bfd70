"""The engine's per-iteration overhead against a hand-written minimal PyTorch loop, measured side by side.

Both loops train the same tiny MLP (its forward returns its MSE loss) with SGD + momentum on the same in-memory
``TensorDataset``, both iterating a ``DataLoader`` (``num_workers=0``, shuffled), on one CPU thread. Rounds are
interleaved (baseline, engine, engine, baseline, ...), each on a fresh model and optimizer built identically; the
first ``--warmup-rounds`` rounds of each are discarded. A round's time is the wall time of the whole call (DataLoader
and engine set-up included) divided by its optimizer steps. Rounds are short (100 steps, a fraction of a second) so
that neighbouring rounds see the same machine: on a shared virtual machine the speed of both loops drifts by up to 2x
within minutes, and ``ratio_paired`` (neighbours compared) is then the figure to read. For the engine's work without
any timing noise, see ``engine_instructions.py``. One JSON line per measurement goes to stdout::

    python benchmarks/engine_overhead.py                # full run (about 1.5 minutes here)
    python benchmarks/engine_overhead.py --quick        # smoke run (about 10 s), same output format
    python benchmarks/engine_overhead.py --model null   # the engine's Python overhead in us, with less noise

Variants (``--variants``):
  plain     train_model(..., display_iter=50), no snapshot_prefix, the library's logger at WARNING (NullHandler)
  log       as plain, with the INFO progress line formatted and written to os.devnull every display_iter
  snapshot  as plain, with snapshot_prefix in a temporary folder: order records every iteration, metrics and order
            files flushed at each display, one snapshot at the end (its cost is reported apart, with a ratio
            without it)
  iter4     iter_size=4 with micro-batches of batch_size/4, against a hand loop accumulating 4 micro-batches
            with loss / 4

Keys: ``ratio`` is the engine's median per-step time over the baseline's (the issue's target: <= 1.02);
``ratio_min`` the same with the fastest round of each; ``ratio_paired`` the median of the per-round ratios of
neighbouring rounds; ``ratio_cpu`` the median ratio of process CPU time (less sensitive to other processes);
``overhead_us_per_step`` the difference of the medians.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

import pixelz_dist  # noqa: E402
from pixelz_dist.engine import loop as _engine  # noqa: E402

TARGET = 1.02
VARIANTS = ("plain", "log", "snapshot", "iter4")
LOGGER = logging.getLogger("pixelz_dist")


class TinyMLP(nn.Module):
    """Three Linear layers; forward returns the MSE loss, as train_model expects."""

    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, d_out))

    def forward(self, x, y):
        return F.mse_loss(self.net(x), y)


class NullModel(nn.Module):
    """One parameter and a handful of tiny ops: the step costs almost nothing, so the difference between the two
    loops is the engine's Python overhead in microseconds (``--model null``)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, y):
        return ((x[:, 0] * self.w - y[:, 0]) ** 2).mean()


def build(args):
    """A fresh model and optimizer, identical in every round."""
    torch.manual_seed(args.seed)
    model = TinyMLP(args.d_in, args.width, args.d_out) if args.model == "mlp" else NullModel()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return model, opt


def make_dataset(args) -> TensorDataset:
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.samples, args.d_in, generator=g)
    w = torch.randn(args.d_in, args.d_out, generator=g) / args.d_in ** 0.5
    y = x @ w + 0.1 * torch.randn(args.samples, args.d_out, generator=g)
    return TensorDataset(x, y)


# -- the two loops ---------------------------------------------------------------------------------------------------
def baseline_loop(model, opt, ds, batch_size: int, steps: int) -> None:
    """The minimal hand-written loop."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    step = 0
    while True:
        for x, y in loader:
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                return


def baseline_accum_loop(model, opt, ds, batch_size: int, steps: int, iter_size: int) -> None:
    """The minimal hand-written loop with gradient accumulation over ``iter_size`` micro-batches."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    step = k = 0
    while True:
        for x, y in loader:
            loss = model(x, y)
            (loss / iter_size).backward()
            k += 1
            if k == iter_size:
                k = 0
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if step == steps:
                    return


def engine_loop(model, opt, ds, batch_size: int, steps: int, iter_size: int, display_iter: int,
                snapshot_prefix: str | None) -> None:
    pixelz_dist.train_model(model, opt, None, ds, batch_size=batch_size, shuffle=True, num_iters=steps,
                            iter_size=iter_size, num_workers=0, display_iter=display_iter,
                            snapshot_prefix=snapshot_prefix)


# -- logging set-up per variant ------------------------------------------------------------------------------------
def configure_logging(with_line: bool) -> None:
    """Off: the library's logger at WARNING with a NullHandler (so ``ensure_handler`` adds no console handler).
    On: INFO lines formatted as the default console handler does, but written to os.devnull."""
    for h in list(LOGGER.handlers):
        LOGGER.removeHandler(h)
        if isinstance(h, logging.StreamHandler) and h.stream not in (sys.stderr, sys.stdout):
            h.stream.close()
    LOGGER.propagate = False
    if with_line:
        handler = logging.StreamHandler(open(os.devnull, "w", encoding="utf-8"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
    else:
        LOGGER.addHandler(logging.NullHandler())
        LOGGER.setLevel(logging.WARNING)


class SnapshotTimer:
    """Times ``Engine.write_snapshot`` (called once per run here) so the loop can be reported without it."""

    def __init__(self):
        self.seconds = 0.0
        self._cls = getattr(_engine, "Engine", None)
        self._orig = getattr(self._cls, "write_snapshot", None)
        self._own = self._cls is not None and "write_snapshot" in vars(self._cls)  # else inherited (a mixin)

    def __enter__(self):
        timer, orig = self, self._orig
        if orig is None:  # the engine was refactored: the snapshot variant is reported with its snapshot included
            return self

        def timed(engine, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(engine, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - t0

        self._cls.write_snapshot = timed
        return self

    def __exit__(self, *exc):
        if self._orig is None:
            return
        if self._own:
            self._cls.write_snapshot = self._orig
        else:
            del self._cls.write_snapshot


# -- measurement ---------------------------------------------------------------------------------------------------
def run_variant(variant: str, args, ds) -> dict:
    iter_size = 4 if variant == "iter4" else 1
    batch_size = args.batch_size // iter_size
    configure_logging(with_line=variant == "log")
    wall = {"baseline": [], "engine": []}
    cpu = {"baseline": [], "engine": []}
    eng_us_no_snap, snap_ms = [], []
    total_rounds = args.warmup_rounds + args.rounds
    for r in range(total_rounds):
        order = ("baseline", "engine") if r % 2 == 0 else ("engine", "baseline")
        for which in order:
            model, opt = build(args)
            tmp = tempfile.mkdtemp(prefix="pixelz_bench_") if variant == "snapshot" and which == "engine" else None
            gc.collect()
            timer = SnapshotTimer()
            with timer:
                c0, t0 = time.process_time(), time.perf_counter()
                if which == "baseline":
                    if iter_size == 1:
                        baseline_loop(model, opt, ds, batch_size, args.steps)
                    else:
                        baseline_accum_loop(model, opt, ds, batch_size, args.steps, iter_size)
                else:
                    engine_loop(model, opt, ds, batch_size, args.steps, iter_size, args.display_iter,
                                os.path.join(tmp, "snapshot") if tmp else None)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            if r < args.warmup_rounds:
                continue
            wall[which].append(dt / args.steps * 1e6)
            cpu[which].append(dc / args.steps * 1e6)
            if which == "engine":
                eng_us_no_snap.append((dt - timer.seconds) / args.steps * 1e6)
                if variant == "snapshot":
                    snap_ms.append(timer.seconds * 1e3)
    base_us, eng_us = wall["baseline"], wall["engine"]
    b_med, e_med = statistics.median(base_us), statistics.median(eng_us)
    row = {
        "benchmark": "engine_overhead",
        "variant": variant,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pixelz_dist": pixelz_dist.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": f"MLP {args.d_in}-{args.width}-{args.width}-{args.d_out}" if args.model == "mlp" else "null",
        "samples": len(ds),
        "batch_size": batch_size,
        "iter_size": iter_size,
        "samples_per_step": batch_size * iter_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "display_iter": args.display_iter,
        "log_line": variant == "log",
        "snapshot_prefix": variant == "snapshot",
        "baseline_median_step_us": round(b_med, 1),
        "engine_median_step_us": round(e_med, 1),
        "overhead_us_per_step": round(e_med - b_med, 1),
        "ratio": round(e_med / b_med, 4),
        "ratio_min": round(min(eng_us) / min(base_us), 4),
        "ratio_paired": round(statistics.median(e / b for e, b in zip(eng_us, base_us)), 4),
        "ratio_cpu": round(statistics.median(cpu["engine"]) / statistics.median(cpu["baseline"]), 4),
        "target": TARGET if args.model == "mlp" else None,
        "within_target": e_med / b_med <= TARGET if args.model == "mlp" else None,
        "baseline_rounds_us": [round(v, 1) for v in base_us],
        "engine_rounds_us": [round(v, 1) for v in eng_us],
    }
    if variant == "snapshot":
        e_med_ns = statistics.median(eng_us_no_snap)
        row.update({
            "final_snapshot_ms": round(statistics.median(snap_ms), 2),
            "engine_median_step_us_without_final_snapshot": round(e_med_ns, 1),
            "ratio_without_final_snapshot": round(e_med_ns / b_med, 4),
        })
    row["loadavg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return row


class AlternatingBaseline(pixelz_dist.Callback):
    """``--alternate``: after every engine iteration, one step of the hand loop (its own model, optimizer and
    DataLoader), both timed. Neighbouring steps of the two loops are a millisecond apart, so a machine whose speed
    drifts within seconds slows both alike; each loop then starts its step with the caches the other left."""

    def __init__(self, args, ds, batch_size: int, iter_size: int):
        self.model, self.opt = build(args)
        self.loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
        self.batches = iter(self.loader)
        self.iter_size = iter_size
        self.engine_us: list[float] = []
        self.baseline_us: list[float] = []
        self.t_end = 0.0

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch, as the hand loop's `for` would start it
            self.batches = iter(self.loader)
            return next(self.batches)

    def on_train_start(self, state):
        self.t_end = time.perf_counter()

    def on_iteration_end(self, state):
        t0 = time.perf_counter()
        self.engine_us.append((t0 - self.t_end) * 1e6)
        for _ in range(self.iter_size):  # the hand loop's step, as in baseline_loop / baseline_accum_loop
            x, y = self.next_batch()
            loss = self.model(x, y)
            (loss / self.iter_size if self.iter_size > 1 else loss).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        self.baseline_us.append((t1 - t0) * 1e6)
        self.t_end = time.perf_counter()


def run_alternating(variant: str, args, ds) -> dict:
    """One long engine run with the hand loop's steps in between (``--alternate``)."""
    iter_size = 4 if variant == "iter4" else 1
    batch_size = args.batch_size // iter_size
    configure_logging(with_line=variant == "log")
    alt = AlternatingBaseline(args, ds, batch_size, iter_size)
    model, opt = build(args)
    steps = args.rounds * args.steps
    gc.collect()
    tmp = tempfile.mkdtemp(prefix="pixelz_bench_") if variant == "snapshot" else None
    try:
        pixelz_dist.train_model(model, opt, None, ds, batch_size=batch_size, shuffle=True, num_iters=steps,
                                iter_size=iter_size, num_workers=0, display_iter=args.display_iter,
                                snapshot_prefix=os.path.join(tmp, "snapshot") if tmp else None, callbacks=[alt])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    skip = args.steps if args.rounds > 1 else 0  # the first round's worth of steps is warm-up
    eng, base = alt.engine_us[skip:], alt.baseline_us[skip:]
    e_med, b_med = statistics.median(eng), statistics.median(base)
    e_mean, b_mean = statistics.fmean(eng), statistics.fmean(base)
    return {
        "benchmark": "engine_overhead",
        "method": "alternating steps",
        "variant": variant,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "pixelz_dist": pixelz_dist.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": f"MLP {args.d_in}-{args.width}-{args.width}-{args.d_out}" if args.model == "mlp" else "null",
        "batch_size": batch_size,
        "iter_size": iter_size,
        "steps_measured": len(eng),
        "display_iter": args.display_iter,
        "baseline_median_step_us": round(b_med, 1),
        "engine_median_step_us": round(e_med, 1),
        "ratio": round(e_med / b_med, 4),
        "ratio_mean": round(e_mean / b_mean, 4),
        "ratio_paired": round(statistics.median(e / b for e, b in zip(eng, base)), 4),
        "overhead_us_per_step": round(e_med - b_med, 1),
        "target": TARGET if args.model == "mlp" else None,
        "within_target": e_med / b_med <= TARGET if args.model == "mlp" else None,
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 60 steps, same output format")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: one core)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds of each loop (default 40; quick 2)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="rounds of each loop discarded first (default 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default 100; quick 60)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per optimizer step (default 64)")
    p.add_argument("--samples", type=int, default=64 * 200, help="dataset size (default 12800)")
    p.add_argument("--model", choices=("mlp", "null"), default="mlp",
                   help="mlp: the tiny MLP (the target's setting); null: a one-parameter model, so "
                        "overhead_us_per_step is the engine's Python overhead with little noise (no target)")
    p.add_argument("--width", type=int, default=416, help="hidden width (default 416: ~1 ms per step here)")
    p.add_argument("--d-in", type=int, default=32)
    p.add_argument("--d-out", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--display-iter", type=int, default=50, help="engine's display_iter (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--alternate", action="store_true",
                   help="one engine run of rounds x steps iterations with a hand-loop step after each, both timed "
                        "per step (robust to a machine whose speed drifts); ratio = median engine step / median "
                        "hand step, ratio_mean with every step (displays included)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 40
    if args.steps is None:
        args.steps = 60 if args.quick else 100
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "iter4" in args.variants and args.batch_size % 4:
        p.error("--batch-size must be a multiple of 4 for the iter4 variant")
    if min(args.rounds, args.steps, args.threads) < 1 or args.warmup_rounds < 0:
        p.error("--rounds, --steps and --threads must be >= 1, --warmup-rounds >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # one process, whatever launched us
        os.environ.pop(name, None)
    ds = make_dataset(args)
    for variant in args.variants:
        run = run_alternating if args.alternate else run_variant
        print(json.dumps(run(variant, args, ds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
