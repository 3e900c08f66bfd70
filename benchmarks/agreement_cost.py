"""What the ranks' per-iteration agreement on stop / snapshot / preemption requests costs (2 processes, gloo).

Under torchrun every iteration starts an asynchronous MAX all-reduce of three flags and reads the previous
iteration's result (``pixelz_dist/engine/requests.py``). Under NCCL it runs on a gloo group of its own, so it never
waits for the GPU; this measures it on such a separate gloo group, as a GPU job runs it, with two kinds of step:

- ``idle``: the step's time passes in ``time.sleep`` — a GPU-bound step, where the host mostly waits for the device
  and the exchange's background thread has the CPU to itself;
- ``busy``: the step keeps the CPU busy (a small matmul loop) — the worst case here, where gloo's thread competes
  with the training thread on a 2-core machine.

Rounds alternate with and without the agreement; one JSON line per step kind, plus the cost of the call alone::

    python benchmarks/agreement_cost.py              # starts torchrun itself; about 40 s
    python benchmarks/agreement_cost.py --steps 300 --step-ms 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import torch
    import torch.distributed as tdist

    from pixelz_dist.distributed.preemption import PreemptionFlag
    from pixelz_dist.engine.requests import Requests

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    group = tdist.new_group(backend="gloo")  # as agreement_group() makes under nccl
    rank = tdist.get_rank()
    a = torch.randn(96, 96)

    def step(kind: str) -> None:
        if kind == "idle":
            time.sleep(args.step_ms / 1000)
        else:
            end = time.perf_counter() + args.step_ms / 1000
            while time.perf_counter() < end:
                a @ a

    results = {}
    for kind in ("idle", "busy"):
        per_round = {"with": [], "without": []}
        for r in range(args.rounds * 2):
            agree = r % 2 == 0
            requests = Requests(PreemptionFlag(), distributed=True, group=group)
            tdist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(kind)
                if agree:
                    requests.settle()
            if agree:
                requests.finish()
            tdist.barrier()
            per_round["with" if agree else "without"].append((time.perf_counter() - t0) / args.steps)
        with_, without = statistics.median(per_round["with"]), statistics.median(per_round["without"])
        results[kind] = {"step_ms": args.step_ms, "with_us": round(with_ * 1e6, 1),
                         "without_us": round(without * 1e6, 1),
                         "agreement_us_per_step": round((with_ - without) * 1e6, 1)}
    # the call alone: settle() back to back (each waits for the previous exchange, so this is its full round trip)
    requests = Requests(PreemptionFlag(), distributed=True, group=group)
    tdist.barrier()
    calls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        requests.settle()
        calls.append(time.perf_counter() - t0)
    requests.finish()
    tdist.barrier()
    if rank == 0:
        meta = {"torch": torch.__version__, "processes": tdist.get_world_size(), "backend": "gloo (a group of its own)",
                "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        for kind, row in results.items():
            print(json.dumps({"measurement": f"step_{kind}", **row, **meta}), flush=True)
        back_to_back = round(statistics.median(calls) * 1e6, 1)
        print(json.dumps({"measurement": "settle_call_back_to_back", "median_us": back_to_back, **meta}), flush=True)
    tdist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="steps per round (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds with and without the agreement, alternating")
    p.add_argument("--step-ms", type=float, default=5.0, help="the step's length in ms (default 5)")
    p.add_argument("--quick", action="store_true", help="40 steps x 2 rounds: a smoke test of a few seconds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 40, 2
    if args.worker:
        worker(args)
        return
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", os.path.abspath(__file__), "--worker",
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--step-ms", str(args.step_ms)]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
