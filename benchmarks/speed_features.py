"""Training-step throughput of ResNet-50 with ``train_model``'s speed features, against a hand-written loop.

Four settings (``--settings``), each measured through ``pixelz_dist.train_model`` *and* through a minimal
hand-written PyTorch loop with the same settings, side by side in one run:

  fp32                        no autocast (on CUDA, cuDNN's default TF32 convolutions apply to both loops)
  bf16                        forward + loss under ``torch.autocast(device_type, torch.bfloat16)``; engine: amp="bf16"
  bf16+channels_last          as bf16, model and 4-D inputs channels_last; engine: amp="bf16", channels_last=True
  bf16+channels_last+compile  as above, the model wrapped in ``torch.compile``; engine: ..., compile=True

Workload: a torchvision ResNet-50 (random init, 1000 classes) wrapped so that ``forward(x, y)`` returns
``F.cross_entropy(net(x), y)``; SGD (lr 0.1, momentum 0.9); batch 64 of 3x224x224; synthetic, normalized float32
images and random labels in an in-memory ``TensorDataset`` of CPU tensors (8 batches, re-shuffled every epoch, whole
batches only). Both loops feed it the same way: a ``DataLoader`` with ``num_workers=0``, ``shuffle=True``,
``pin_memory`` on CUDA, batches moved with ``non_blocking=True``. ``torch.backends.cudnn.benchmark = True`` on CUDA.

  hand:   for x, y in DataLoader(ds, 64, shuffle=True, num_workers=0, pin_memory=cuda, drop_last=True):
              x = x.to(dev, non_blocking=True)[.contiguous(memory_format=torch.channels_last)]; y = y.to(dev, ...)
              with torch.autocast(dev.type, torch.bfloat16, enabled=bf16): loss = fwd(x, y)
              loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
          where fwd is the model, or torch.compile(model) built once for the whole run.
  engine: pixelz_dist.train_model(model, opt, None, ds, 64, shuffle=True, num_iters=W + S, num_workers=0,
              drop_last=True, display_iter=1000, callbacks=[clock], [amp="bf16"], [channels_last=True],
              [compile=True])

**What is timed.** Steady-state steps only. Each round runs ``W + S`` optimizer steps (``--warmup-steps`` W, default
5; ``--steps`` S, default 50). A clock marks the end of step W and the end of step W + S, after a
``torch.cuda.synchronize()`` at each mark (only there: the steps in between run asynchronously as in training); for
the engine the clock is a ``Callback.on_iteration_end``, for the hand loop the same object is called after
``zero_grad``. One round's samples/s = S x batch / (time between the two marks). So cuDNN autotuning, torch.compile
compilation, the engine's set-up (DataLoader, sampler, seeding) and its end-of-run work are all outside the window;
what is inside is what a long run pays per step: data loading, host-to-device copies, the engine's per-step
bookkeeping, forward/backward/step. The whole call's wall time is also reported (``*_call_s``, ``*_first_call_s``:
the latter includes compilation in the compile setting).

**Rounds.** Per setting, both models (hand and engine) are built once from the same seed and kept for all rounds,
so compilation happens in the first (warm-up) round, never once per round: the hand loop reuses its one
``torch.compile`` wrapper, and the engine gets the same model object every round, so the ``torch.compile(model)`` it
does in each call finds dynamo's cached graph. ``hand_graphs_compiled`` / ``engine_graphs_compiled`` count the
graphs dynamo compiled during each round, so a recompilation would show. The two models are instances of one class
with the same settings, and dynamo's cache is keyed on ``Classifier.forward``'s code and guarded on the inputs'
properties (torch inlines built-in modules and passes their parameters as inputs), so in practice the loop that
runs first compiles (its ``*_first_call_s`` holds the compile time, about 40 s for ResNet-50 on an H100) and the
other reuses that graph (0 graphs compiled): both then run the same compiled graph, which is the point. Before every
round the weights are reset to the initial ones (``load_state_dict``, in place) and a fresh optimizer is built, so
every round trains the same steps. Rounds alternate hand, engine, engine, hand, ...; the first ``--warmup-rounds``
(default 1) of each loop are discarded, then ``--rounds`` (default 3) of each are kept. Keys: ``*_samples_per_s``
the median over kept rounds, ``ratio_engine_over_hand`` the ratio of the medians (> 1: the engine is faster),
``ratio_paired`` the median of the ratios of neighbouring rounds, ``*_rounds_samples_per_s`` every kept round.

One JSON line per setting goes to stdout, nothing else (progress and library logs go to stderr)::

    python benchmarks/speed_features.py                          # GPU: 4 settings, ResNet-50, about 3.5 minutes
    python benchmarks/speed_features.py --settings fp32,bf16     # a subset
    python benchmarks/speed_features.py --quick --device cpu     # smoke run: ResNet-18, 64x64, batch 8, < 1 minute

``--quick`` defaults to ``--settings fp32,bf16,bf16+channels_last`` and, on CPU, one torch thread: compiling even
ResNet-18 with inductor on a 2-core CPU takes more than a minute (pass the compile setting explicitly to include it).
On CPUs without native bf16, bf16 autocast can be slower than fp32; the CPU numbers are a fallback and a smoke test,
the GPU ones are the measurement. ``--num-workers N`` gives both loops N (persistent) DataLoader workers instead of
collating and pinning in the training thread. The engine's own defaults apply otherwise (``prefetch=True``: on CUDA it
copies the next batch on a side stream; the hand loop has no such prefetch, that is part of what is compared).
A setting whose engine keywords this checkout's ``train_model`` lacks, or whose engine run raises, is reported with
the hand loop's numbers and ``"error"`` set.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

from engine_overhead import cpu_model  # noqa: E402  (beside this script: one copy of the helper)

import pixelz_dist  # noqa: E402
from pixelz_dist.callbacks.base import Callback  # noqa: E402

SETTINGS = {  # name -> (amp, channels_last, compile)
    "fp32": (None, False, False),
    "bf16": ("bf16", False, False),
    "bf16+channels_last": ("bf16", True, False),
    "bf16+channels_last+compile": ("bf16", True, True),
}
QUICK_SETTINGS = ("fp32", "bf16", "bf16+channels_last")
LOOPS = ("hand", "engine")


def log(msg: str) -> None:
    print(f"[speed_features {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Classifier(nn.Module):
    """A torchvision classifier whose forward returns its cross-entropy loss, as train_model expects."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        import torchvision

        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


class StepClock(Callback):
    """Marks the end of step ``start`` and of step ``stop`` (1-based optimizer steps), synchronizing the GPU first."""

    def __init__(self, device: torch.device, start: int, stop: int):
        self.device, self.start, self.stop = device, start, stop
        self.t0 = self.t1 = None

    def mark(self, step: int) -> None:
        if step == self.start or step == self.stop:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if step == self.start:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()

    def on_iteration_end(self, state):  # the engine's hook: state.iteration = optimizer steps done in this call
        self.mark(state.iteration)

    def window_s(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the clock missed a mark (t0={self.t0}, t1={self.t1}): the run stopped early?")
        return self.t1 - self.t0


def graphs_compiled() -> int | None:
    """Graphs dynamo has compiled so far in this process (None if this torch does not count them)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a private counter: absent or renamed in some torch versions
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the two loops ---------------------------------------------------------------------------------------------------
def hand_round(fwd, model, init_state, ds, args, device, amp, channels_last, total: int, clock: StepClock) -> None:
    """The minimal hand-written loop: ``fwd`` is ``model`` or its ``torch.compile`` wrapper (built once)."""
    model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    cuda = device.type == "cuda"
    workers = args.num_workers  # persistent like the engine's, so workers are not restarted at every epoch
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers, pin_memory=cuda,
                        drop_last=True, persistent_workers=workers > 0)
    dtype = torch.bfloat16 if amp == "bf16" else None
    step = 0
    while step < total:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = fwd(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            clock.mark(step)
            if step == total:
                break


def engine_round(model, init_state, ds, args, amp, channels_last, compile_, total: int, clock: StepClock,
                 prefetch: bool | None = None) -> None:
    """``train_model`` on the same model object every round (its compile cache is reused, see the docstring)."""
    model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    features = {}
    if amp is not None:
        features["amp"] = amp
    if channels_last:
        features["channels_last"] = True
    if compile_:
        features["compile"] = True
    pixelz_dist.train_model(model, opt, None, ds, args.batch_size, shuffle=True, num_iters=total,
                            display_iter=args.display_iter, num_workers=args.num_workers, drop_last=True,
                            seed=args.seed, callbacks=[clock],
                            prefetch=args.prefetch if prefetch is None else prefetch, **features)


def missing_engine_keywords(amp, channels_last, compile_) -> list[str]:
    params = inspect.signature(pixelz_dist.train_model).parameters
    wanted = [name for name, on in (("amp", amp is not None), ("channels_last", channels_last),
                                    ("compile", compile_)) if on]
    return [name for name in wanted if name not in params]


# -- measurement ---------------------------------------------------------------------------------------------------
def build_model(args, device, channels_last: bool):
    torch.manual_seed(args.seed)
    model = Classifier(args.model, args.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_setting(name: str, args, ds, device) -> dict:
    amp, channels_last, compile_ = SETTINGS[name]
    total = args.warmup_steps + args.steps
    loops = list(LOOPS)
    missing = missing_engine_keywords(amp, channels_last, compile_)
    error = None
    if missing:
        error = f"train_model() of this checkout has no keyword(s) {missing}: engine not measured"
        log(f"{name}: {error}")
        loops.remove("engine")

    # built once per (setting, loop) and reused by every round: the compiled wrapper too
    hand_model = build_model(args, device, channels_last and args.baseline == "hand")
    hand_fwd = torch.compile(hand_model) if compile_ else hand_model
    init_state = {k: v.detach().clone() for k, v in hand_model.state_dict().items()}
    engine_model = build_model(args, device, False) if "engine" in loops else None  # the engine converts it itself

    sps = {loop: [] for loop in LOOPS}
    call_s = {loop: [] for loop in LOOPS}
    first_call_s = dict.fromkeys(LOOPS)
    compiled = {loop: [] for loop in LOOPS}
    for r in range(args.warmup_rounds + args.rounds):
        order = loops if r % 2 == 0 else loops[::-1]
        for loop in order:
            clock = StepClock(device, args.warmup_steps, total)
            gc.collect()
            g0 = graphs_compiled()
            sync(device)
            t0 = time.perf_counter()
            try:
                if loop == "hand" and args.baseline == "engine-no-prefetch":  # the engine against itself
                    engine_round(hand_model, init_state, ds, args, amp, channels_last, compile_, total, clock,
                                 prefetch=False)
                elif loop == "hand":
                    hand_round(hand_fwd, hand_model, init_state, ds, args, device, amp, channels_last, total, clock)
                else:
                    engine_round(engine_model, init_state, ds, args, amp, channels_last, compile_, total, clock)
                sync(device)
            except Exception as exc:  # noqa: BLE001 - report it in the JSON line and go on with the other loop
                if loop == "hand":
                    raise
                error = f"engine round {r} raised {type(exc).__name__}: {exc}"
                log(f"{name}: {error}")
                loops.remove("engine")
                sps["engine"], call_s["engine"] = [], []
                break
            dt = time.perf_counter() - t0
            g1 = graphs_compiled()
            compiled[loop].append(None if g0 is None or g1 is None else g1 - g0)
            if first_call_s[loop] is None:
                first_call_s[loop] = round(dt, 3)
            rate = args.steps * args.batch_size / clock.window_s()
            log(f"{name} round {r} {loop}: {rate:.1f} samples/s (call {dt:.2f} s"
                f"{', warm-up round, discarded' if r < args.warmup_rounds else ''})")
            if r >= args.warmup_rounds:
                sps[loop].append(rate)
                call_s[loop].append(dt)
    del hand_model, hand_fwd, engine_model, init_state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def med(values):
        return round(statistics.median(values), 2) if values else None

    h, e = sps["hand"], sps["engine"]
    row = {
        "bench": "speed_features",
        "setting": name,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile_,
        "engine_prefetch": args.prefetch,
        "baseline": args.baseline,
        "hand_samples_per_s": med(h),
        "engine_samples_per_s": med(e),
        "ratio_engine_over_hand": round(statistics.median(e) / statistics.median(h), 4) if e and h else None,
        "ratio_paired": round(statistics.median(a / b for a, b in zip(e, h)), 4) if e and h else None,
        "hand_rounds_samples_per_s": [round(v, 2) for v in h],
        "engine_rounds_samples_per_s": [round(v, 2) for v in e],
        "hand_call_s": med(call_s["hand"]),
        "engine_call_s": med(call_s["engine"]),
        "hand_first_call_s": first_call_s["hand"],
        "engine_first_call_s": first_call_s["engine"],
        "hand_graphs_compiled": compiled["hand"],
        "engine_graphs_compiled": compiled["engine"],
        "error": error,
    }
    row.update(context(args, device, len(ds)))
    return row


def context(args, device, samples: int) -> dict:
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pixelz_dist": getattr(pixelz_dist, "__version__", None),
        "python": platform.python_version(),
        "model": args.model,
        "num_classes": args.num_classes,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "dataset_samples": samples,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "display_iter": args.display_iter,
        "num_workers": args.num_workers,
        "lr": args.lr,
        "quick": args.quick,
    }


def make_dataset(args) -> TensorDataset:
    g = torch.Generator().manual_seed(args.seed)
    n = args.dataset_batches * args.batch_size
    x = torch.randn(n, 3, args.image_size, args.image_size, generator=g)  # already "normalized": mean 0, std 1
    y = torch.randint(0, args.num_classes, (n,), generator=g)
    return TensorDataset(x, y)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resnet18, 64x64, batch 8, 2 rounds of 2+5 steps, no compile setting by default")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--model", choices=("resnet50", "resnet18"), default=None, help="default resnet50 (quick: 18)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (quick: 8)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dataset-batches", type=int, default=None, help="dataset size in batches (default 8; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per round (default 50; quick 5)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps at the start of every round (default 5; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="kept rounds of each loop (default 3; quick 2)")
    p.add_argument("--warmup-rounds", type=int, default=None,
                   help="discarded rounds of each loop first (default 1; quick 0)")
    p.add_argument("--settings", default=None,
                   help=f"comma-separated subset of {','.join(SETTINGS)} (default all; quick: "
                        f"{','.join(QUICK_SETTINGS)})")
    p.add_argument("--display-iter", type=int, default=1000,
                   help="engine's display_iter (default 1000: no log line, hence no host sync, in the timed window)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader workers of both loops (default 0: batches are collated and pinned in the "
                        "training thread, see the README)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine's prefetch= (side-stream copy of the next batch on CUDA); --no-prefetch measures "
                        "what it is worth")
    p.add_argument("--baseline", choices=("hand", "engine-no-prefetch"), default="hand",
                   help="what the engine is compared with: the hand loop, or the engine itself with prefetch=False "
                        "(then the 'hand' fields hold that run)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own; quick on CPU: 1, less hurt by a busy machine)")
    p.add_argument("--verbose", action="store_true", help="the library's INFO log lines (to stderr)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(model=("resnet18", "resnet50"), batch_size=(8, 64), image_size=(64, 224), dataset_batches=(4, 8),
                    steps=(5, 50), warmup_steps=(2, 5), rounds=(2, 3), warmup_rounds=(0, 1),
                    settings=(",".join(QUICK_SETTINGS), ",".join(SETTINGS)))
    for key, (quick_value, full_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick_value if q else full_value)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None and q and args.device == "cpu":
        args.threads = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if min(args.batch_size, args.image_size, args.steps, args.rounds, args.dataset_batches, args.warmup_steps) < 1:
        p.error("--batch-size, --image-size, --steps, --rounds, --dataset-batches, --warmup-steps must be >= 1")
    if args.warmup_rounds < 0 or args.num_workers < 0:
        p.error("--warmup-rounds and --num-workers must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # one process, whatever launched us
        os.environ.pop(name, None)
    lib_logger = logging.getLogger("pixelz_dist")  # to stderr, so that stdout holds only the JSON lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    lib_logger.addHandler(handler)
    lib_logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    lib_logger.propagate = False
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both loops
    ds = make_dataset(args)
    log(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {len(ds)} samples on "
        f"{device}; settings {args.settings}; {args.warmup_rounds}+{args.rounds} rounds of "
        f"{args.warmup_steps}+{args.steps} steps per loop")
    for name in args.settings:
        t0 = time.perf_counter()
        row = run_setting(name, args, ds, device)
        print(json.dumps(row), flush=True)
        log(f"{name}: hand {row['hand_samples_per_s']} samples/s, engine {row['engine_samples_per_s']}, ratio "
            f"{row['ratio_engine_over_hand']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
