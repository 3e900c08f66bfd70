"""The engine's per-iteration overhead in *instructions executed*, against the same hand-written loop: a count that
does not move with the machine's load.

``engine_overhead.py`` measures time, which is what the target is about, but on a shared virtual machine the step
time of both loops can drift by 2x within minutes and a 2 % target drowns in it. Instructions executed (counted by
valgrind's callgrind) are exact and repeatable; they do not see cache or memory effects, so read them as the engine's
*work*, next to the timed ratio. Both loops are the ones in ``engine_overhead.py`` (same model, data and settings).

Each variant runs in one child process under ``valgrind --tool=callgrind --instr-atstart=no``: both loops warm up
uninstrumented, then each runs ``--short`` and ``--long`` optimizer steps with counting switched on around the call
(``callgrind_control -i on/off`` and a dump after each). The per-iteration cost is the slope,
``(count(long) - count(short)) / (long - short)``, which leaves out the per-call set-up (reported apart, as
``engine_setup_instructions``) and the cost of switching counting on and off. One JSON line per variant::

    python benchmarks/engine_instructions.py                    # plain and iter4, about 5 minutes on 2 cores
    python benchmarks/engine_instructions.py --variants plain   # one variant

Needs ``valgrind`` (Debian: ``apt-get install valgrind``). Counts depend on the CPU features valgrind reports (no
AVX-512) and on the torch, numpy and Python builds; compare counts from one machine and one environment only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("plain", "iter4")


def _toggle(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def child(variant: str, short: int, long: int) -> None:
    """Runs inside valgrind: the measured sections, one dump each, in a fixed order."""
    sys.path.insert(0, HERE)
    import engine_overhead as eo
    import torch

    torch.set_num_threads(1)
    args = eo.parse_args([])
    ds = eo.make_dataset(args)
    eo.configure_logging(with_line=False)
    iter_size = 4 if variant == "iter4" else 1
    batch = args.batch_size // iter_size

    def run(which: str, steps: int) -> None:
        model, opt = eo.build(args)
        if which == "baseline":
            if iter_size == 1:
                eo.baseline_loop(model, opt, ds, batch, steps)
            else:
                eo.baseline_accum_loop(model, opt, ds, batch, steps, iter_size)
        else:
            eo.engine_loop(model, opt, ds, batch, steps, iter_size, args.display_iter, None)

    for which in ("baseline", "engine"):  # lazy imports and first-call work stay out of the counts
        run(which, 3)
    for which in ("baseline", "engine"):
        for steps in (short, long):
            _toggle("-i", "on")
            run(which, steps)
            _toggle("-i", "off")
            _toggle(f"--dump={which}-{steps}")


def dump_totals(folder: str) -> dict[str, int]:
    """``{"engine-20": instructions, ...}`` from callgrind's dump files."""
    out = {}
    for path in glob.glob(os.path.join(folder, "callgrind.out*")):
        desc = total = None
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("desc: Trigger: dump "):  # written by callgrind_control --dump=<desc>
                    desc = line.split("dump ", 1)[1].strip()
                elif line.startswith("totals:"):
                    total = int(line.split()[1])
        if desc and total is not None:
            out[desc] = total
    return out


def measure(variant: str, short: int, long: int) -> dict:
    folder = tempfile.mkdtemp(prefix=f"pixelz_cg_{variant}_")
    try:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={os.path.join(folder, 'callgrind.out')}",
               sys.executable, os.path.abspath(__file__), "--child", variant,
               "--short", str(short), "--long", str(long)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the callgrind child for {variant} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        totals = dump_totals(folder)
        missing = [f"{w}-{s}" for w in ("baseline", "engine") for s in (short, long) if f"{w}-{s}" not in totals]
        if missing:
            raise RuntimeError(f"callgrind wrote no dump for {missing} in {folder}; found {sorted(totals)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    slope = {w: (totals[f"{w}-{long}"] - totals[f"{w}-{short}"]) / (long - short) for w in ("baseline", "engine")}
    setup = {w: totals[f"{w}-{short}"] - short * slope[w] for w in ("baseline", "engine")}
    return {
        "benchmark": "engine_instructions",
        "variant": variant,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "iter_size": 4 if variant == "iter4" else 1,
        "steps": [short, long],
        "baseline_instructions_per_step": round(slope["baseline"]),
        "engine_instructions_per_step": round(slope["engine"]),
        "overhead_instructions_per_step": round(slope["engine"] - slope["baseline"]),
        "ratio": round(slope["engine"] / slope["baseline"], 5),
        "engine_setup_instructions": round(setup["engine"] - setup["baseline"]),
        "raw_counts": totals,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 and 8 steps (valgrind's start-up, ~2 min)")
    p.add_argument("--short", type=int, default=None, help="steps of the short run (default 20; quick 3)")
    p.add_argument("--long", type=int, default=None, help="steps of the long run (default 80; quick 8)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.short = args.short or (3 if args.quick else 20)
    args.long = args.long or (8 if args.quick else 80)
    if args.child:
        child(args.child, args.short, args.long)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if not 0 < args.short < args.long:
        p.error("--short must be >= 1 and below --long")
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("engine_instructions.py needs valgrind and callgrind_control on PATH (Debian: apt-get install valgrind)",
              file=sys.stderr)
        return 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(variants), os.cpu_count() or 1)) as pool:
        for row in pool.map(lambda v: measure(v, args.short, args.long), variants):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
