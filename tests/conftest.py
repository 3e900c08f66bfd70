"""Shared fixtures: demo image folders made once per session, a clean environment for every test."""

import os
import subprocess
import sys

import pytest
import torch

from pixelz_dist.cli.demo import make_demo_dataset

# One intra-op thread in the test processes (the processes they start set OMP_NUM_THREADS=1 themselves). Two test
# files run at a time on 2 cores: a second thread per process only waits for a core at each parallel region, and spins
# meanwhile (measured: the in-process unit tests take 40% less CPU and half the wall time with one thread). Not
# OMP_NUM_THREADS in os.environ: GNU nproc honours it, and the local SLURM cluster sizes its node with nproc (a node
# of 1 CPU never starts test_slurm's jobs of --cpus-per-task=2).
torch.set_num_threads(1)

TESTS = os.path.dirname(os.path.abspath(__file__))
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RESTART_COUNT", "SLURM_CPUS_PER_TASK")


@pytest.fixture(autouse=True)
def _no_distributed_env(monkeypatch):
    """Tests run as a single process unless they start torchrun themselves."""
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """40 demo samples (real JPEG/PNG files) in a session-wide folder; tests only read it."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_samples=40, size=24, seed=3)
    return str(root)


def run_job(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run tests/jobs/<script> in a fresh Python process (one CPU thread, no inherited torchrun variables)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, os.path.join(TESTS, "jobs", script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# Files that take longest (about 1-4 minutes each on 2 cores), started first so that with pytest-xdist (one whole file
# per worker) no long file begins while the other worker is already idle at the end. Every other file keeps its place.
# pyproject's addopts pass --no-loadscope-reorder: without it pytest-xdist 3.8 hands out the files with the most tests
# first and ignores this order. test_multinode.py and test_slurm.py may then run side by side: their clusters share one
# munged (launch/shared_munge.sh).
LONGEST_FIRST = ("test_distributed.py", "test_failures.py", "test_multinode.py", "test_slurm.py", "test_resume.py",
                 "test_user_loader.py", "test_listing_once.py", "test_launch.py", "test_async_snapshots.py",
                 "test_resume_refusals.py", "test_uneven.py", "test_train_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: order in a file kept


# Opt-in CPU profile of the suite: `PIXELZ_TEST_CPU_PROFILE=/tmp/prof.jsonl pytest ...` appends one JSON line per test
# (setup, call and teardown together, so a module fixture's run is charged to the first test that uses it): wall time,
# the pytest process's own CPU, the CPU of the child processes it reaped (a torchrun job's workers included, since
# torchrun reaps them; SLURM jobs run under slurmd and are not counted) and how many processes it started. CPU is the
# figure to compare between runs: it moves far less than wall time when the machine is shared (about 10% here: tests
# whose background trainer runs until the test kills it, and gloo's polling, take more CPU under load).
# Summary: python -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(sum(x['cpu'] for x in r))"
CPU_PROFILE = os.environ.get("PIXELZ_TEST_CPU_PROFILE")
_started = [0]

if CPU_PROFILE:
    import json
    import resource
    import time

    _popen_init = subprocess.Popen.__init__

    def _counting_popen_init(self, *args, **kwargs):
        _started[0] += 1
        _popen_init(self, *args, **kwargs)

    subprocess.Popen.__init__ = _counting_popen_init

    def _cpu() -> tuple[float, float]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        start, wall, (own, children), started = time.time(), time.monotonic(), _cpu(), _started[0]
        yield
        own2, children2 = _cpu()
        row = {"test": item.nodeid, "file": os.path.basename(str(item.fspath)),
               "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "start": round(start, 3),
               "wall": round(time.monotonic() - wall, 3), "own": round(own2 - own, 3),
               "children": round(children2 - children, 3), "cpu": round(own2 - own + children2 - children, 3),
               "processes": _started[0] - started}
        with open(CPU_PROFILE, "a") as f:
            f.write(json.dumps(row) + "\n")
