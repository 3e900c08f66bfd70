"""Time from a node loss to the surviving node's exit, on a 2-node cluster on this machine (launch/local_cluster).

Each repeat trains the demo on node1 and node2 (launch/torchrun_multi_node.sh, 1 process each, the collective timeout
at 300 s so that it cannot be what ends the run), waits for the first snapshot, SIGKILLs every process of node2 at
once and measures until node1's torchrun has exited. One JSON line per measurement. Needs root (see start.sh)::

    taskset -c 1 python benchmarks/node_loss.py --repeats 5          # about 13 s a measurement
    python benchmarks/node_loss.py --quick                           # one measurement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "launch", "local_cluster")
TRAIN = ["--model", "pixelz_dist.demo:TinySegNet", "--dataset", "slow_data:make", "--dataset-arg", "delay=0.03",
         "--batch-size", "4", "--epochs", "15", "--snapshot-interval", "1"]


def snapshots(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith("s_iter_")] if os.path.isdir(folder) else []


def one_loss(cluster: str, prefix: str, subnet: str, work: str, workers: int, job: str) -> dict:
    env = {**os.environ, "NNODES": "2", "HEAD_ADDR": "node1", "JOB_ID": job, "NPROC": "1", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "PIXELZ_DIST_TIMEOUT": "300", "PYTHONPATH": os.path.join(REPO, "tests", "jobs")}
    args = [*TRAIN, "--dataset-arg", f"root='{work}/data'", "--workers", str(workers), "--snapshot-prefix",
            f"{work}/s"]
    logs = [open(f"{work}/{job}_node{n}.log", "w+") for n in (1, 2)]
    procs = [subprocess.Popen([f"{TOOL}/on.sh", cluster, f"node{n}", "launch/torchrun_multi_node.sh", *args],
                              cwd=REPO, env=env, stdout=logs[n - 1], stderr=subprocess.STDOUT)
             for n in (1, 2)]
    while not snapshots(work):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a node ended before its first snapshot: see {work}")
        time.sleep(0.05)
    time.sleep(0.3)
    pids = subprocess.run(["ip", "netns", "pids", f"{prefix}-node2"], capture_output=True, text=True).stdout.split()
    start = time.monotonic()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    code = procs[0].wait(timeout=900)
    seconds = time.monotonic() - start
    procs[1].wait(timeout=60)
    logs[0].seek(0)
    text = logs[0].read()
    return {"bench": "node_loss", "workers": workers, "seconds": round(seconds, 2), "exit_code": code,
            "peer_named": f"{subnet}.2]" in text, "explained": "another process of the job is gone" in text,
            "killed": len(pids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers per trainer")
    parser.add_argument("--quick", action="store_true", help="one repeat without DataLoader workers (smoke run)")
    opts = parser.parse_args()
    if opts.quick:
        opts.repeats, opts.workers = 1, [0]
    with tempfile.TemporaryDirectory() as tmp:
        cluster = f"{tmp}/cluster"
        subprocess.run([f"{TOOL}/start.sh", "2", cluster], env={**os.environ, "SLURM": "0"}, check=True,
                       stdout=subprocess.DEVNULL)
        try:
            settings = dict(line.split("=", 1) for line in open(f"{cluster}/cluster.env").read().splitlines())
            prefix, subnet = settings["NS_PREFIX"], settings["SUBNET"]
            info = {"torch": torch.__version__, "python": platform.python_version(),
                    "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine()}
            for repeat in range(opts.repeats):
                for workers in opts.workers:  # interleaved, so that load on the machine hits both alike
                    work = f"{tmp}/w{workers}_r{repeat}"
                    os.makedirs(work)
                    row = one_loss(cluster, prefix, subnet, work, workers, f"w{workers}r{repeat}")
                    print(json.dumps({**row, "repeat": repeat, **info}), flush=True)
        finally:
            subprocess.run([f"{TOOL}/stop.sh", cluster], check=False)


if __name__ == "__main__":
    main()
