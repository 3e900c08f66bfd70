"""Shared fixtures: demo image folders made once per session, a clean environment for every test."""

import os
import subprocess
import sys

import pytest

from pixelz_dist.cli.demo import make_demo_dataset

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
LONGEST_FIRST = ("test_distributed.py", "test_failures.py", "test_multinode.py", "test_slurm.py", "test_resume.py",
                 "test_user_loader.py", "test_listing_once.py", "test_launch.py", "test_async_snapshots.py",
                 "test_resume_refusals.py", "test_uneven.py", "test_train_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: order in a file kept
