"""launch/: every script passes shellcheck; the torchrun scripts train the demo with 2 CPU processes (gloo).

The SLURM scripts run on a real SLURM in test_slurm.py.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import DIST_VARS, TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots

LAUNCH = os.path.join(os.path.dirname(TESTS), "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch"))
                 + glob.glob(os.path.join(LAUNCH, "local_slurm", "*.sh"))
                 + glob.glob(os.path.join(LAUNCH, "local_cluster", "*.sh")))

pytestmark = pytest.mark.slow  # every test starts a process: shellcheck, a launch script, torchrun


def test_every_script_is_shellcheck_clean_and_documented():
    assert len(SCRIPTS) >= 7
    for script in SCRIPTS:
        text = open(script).read()
        assert text.startswith("#!/usr/bin/env bash\n#"), script  # a header comment says how to use it
        sourced = ("slurm_common.sh", "torchrun_signals.sh", "shared_munge.sh")  # the sourcer sets the options
        if not script.endswith(sourced):
            assert "set -euo pipefail" in text, script
    if shutil.which("shellcheck") is None:
        if os.environ.get("PIXELZ_REQUIRE_SHELLCHECK") == "1":  # set by .ci/run in CI, which installs it
            pytest.fail("PIXELZ_REQUIRE_SHELLCHECK=1 but shellcheck is not installed")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=os.path.dirname(LAUNCH))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def run_script(name, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    environ.update(PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1", **env)
    prefix = str(tmp_path / "snap")
    proc = subprocess.run([os.path.join(LAUNCH, name), "--demo", "--demo-dir", str(tmp_path / "demo"),
                           "--demo-samples", "32", "--iters", "4", "--workers", "0", "--snapshot-prefix", prefix,
                           "--no-curves"],
                          env=environ, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "2 processes" in proc.stderr
    assert [it for it, _ in list_snapshots(prefix)] == [4]


@pytest.mark.distributed
def test_torchrun_single_node_runs_nproc_processes(tmp_path):
    run_script("torchrun_single_node.sh", tmp_path)


@pytest.mark.distributed
def test_torchrun_multi_node_with_one_node_on_localhost(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_script("torchrun_multi_node.sh", tmp_path, NNODES="1", HEAD_ADDR="localhost", PORT=str(port),
               JOB_ID="test-job")


@pytest.mark.parametrize("name", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_scripts_refuse_a_torch_whose_torchrun_cannot_forward_preemption_signals(tmp_path, name):
    """torchrun learnt --signals-to-handle in torch 2.10.0; an older one dies on SIGUSR1 and orphans the trainers, so
    the scripts stop before starting it, naming the version and the fix (a torch 2.9.1 install is simulated by its
    package metadata ahead on the path)."""
    fake = tmp_path / "site" / "torch-2.9.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.1\n")
    environ = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    environ.update(PYTHON=sys.executable, NPROC="2", NNODES="1", HEAD_ADDR="localhost", JOB_ID="j",
                   PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([os.path.join(LAUNCH, name), "--demo"], env=environ, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "torch 2.9.1" in proc.stderr and "older than 2.10" in proc.stderr
    assert "pip install 'torch>=2.10'" in proc.stderr
    assert "training" not in proc.stderr  # nothing was started


@pytest.mark.distributed
def test_torchrun_script_forwards_sigusr2_to_the_trainers(tmp_path):
    """A cluster whose preemption notice is SIGUSR2: torchrun (started with the script's --signals-to-handle) passes
    it on; the trainers snapshot and exit with 75 instead of being orphaned by a dying torchrun."""
    environ = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    environ.update(PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1")
    prefix = str(tmp_path / "snap")
    log = tmp_path / "log.txt"
    with open(log, "w") as out:  # a file, not a pipe: orphaned trainers (the bug) would hold a pipe open
        proc = subprocess.Popen([os.path.join(LAUNCH, "torchrun_single_node.sh"), "--demo", "--demo-dir",
                                 str(tmp_path / "demo"), "--demo-samples", "32", "--iters", "100000", "--workers",
                                 "0", "--batch-size", "2", "--display-iter", "5", "--snapshot-prefix", prefix,
                                 "--no-curves"],
                                env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "iter 10/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR2)  # the script exec'd torchrun: same process
        proc.wait(timeout=120)
    finally:  # torchrun starts each trainer in a session of its own: find what is left of this job by its folder
        for p in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(p.info["cmdline"] or []):
                p.kill()
    text = log.read_text()
    assert "preemption: SIGUSR2 received" in text, text[-3000:]
    stopped_at = int(re.search(r"SIGUSR2 received; snapshot at iteration (\d+)", text).group(1))
    assert 10 <= stopped_at < 100000
    assert list_snapshots(prefix)[0][0] == stopped_at  # the newest (the demo also snapshots every 10 iterations)
