"""The SLURM scripts in launch/, run by a real SLURM: a one-node cluster on localhost (launch/local_slurm/).

Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages (.ci/run installs them); skipped, with the
reason, where they are missing. Jobs run 2 gloo processes on the CPU (NPROC=2).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import DIST_VARS, TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot

REPO = os.path.dirname(TESTS)
LOCAL_SLURM = os.path.join(REPO, "launch", "local_slurm")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SLOW = ["--model", "pixelz_dist.demo:TinySegNet", "--dataset", "slow_data:make", "--batch-size", "4",
        "--workers", "0", "--seed", "5", "--optimizer", "adamw", "--lr", "0.003", "--scheduler", "cosine",
        "--snapshot-interval", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> str | None:
    tools = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
             if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    if tools:
        return f"not installed: {', '.join(tools)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (it starts munged and slurmd)"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment for sbatch (SLURM_CONF, PYTHON, NPROC=2)."""
    reason = _missing()
    if reason and os.environ.get("PIXELZ_REQUIRE_SLURM") == "1":  # set by .ci/run, which installs the packages
        pytest.fail(f"PIXELZ_REQUIRE_SLURM=1 but {reason}")
    if reason:
        print(f"\nSLURM tests skipped: {reason}")
        pytest.skip(reason)
    folder = str(tmp_path_factory.mktemp("slurm"))
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env.update(SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()), PATH=env["PATH"] + ":/usr/sbin")
    start = subprocess.run([os.path.join(LOCAL_SLURM, "start.sh"), folder], env=env, capture_output=True,
                           text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    env.update(SLURM_CONF=os.path.join(folder, "slurm.conf"), PYTHON=sys.executable, NPROC="2",
               OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(TESTS, "jobs"))
    # A first job waits for the scheduler's first pass; take that wait here, so the tests' jobs start at once.
    warm = subprocess.run(["sbatch", "--parsable", f"--output={folder}/warm.out", "--wrap=true"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert warm.returncode == 0, warm.stderr
    wait_job(env, warm.stdout.strip(), None, timeout=120)
    yield env
    subprocess.run([os.path.join(LOCAL_SLURM, "stop.sh"), folder], env=env, timeout=60)


def sbatch(env, out, script, *args):
    """Submit ``launch/<script>`` from the repository's root; returns the job id (wait_job polls it to its end)."""
    cmd = ["sbatch", "--cpus-per-task=2", f"--output={out}", "--parsable", f"launch/{script}", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(env, job_id) -> tuple[str, int]:
    line = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return parse_job_state(line)


def parse_job_state(line: str) -> tuple[str, int]:
    """``(JobState, exit code)`` from a line of ``scontrol -o show job``."""
    state = re.search(r"JobState=(\S+)", line)
    code = re.search(r"ExitCode=(\d+):", line)
    return (state.group(1) if state else "UNKNOWN"), int(code.group(1)) if code else -1


def wait_job(env, job_id, out, timeout=300) -> int:
    return wait_for_job_end(lambda: job_state(env, job_id), job_id, out, timeout)


def wait_for_job_end(state_of, job_id, out, timeout=300) -> int:
    """The job's exit code once it ended for good (after any requeued runs). Polls every 0.5 s, never a fixed sleep:
    sbatch --wait polls at 2, 8, then every 32 s."""
    deadline = time.time() + timeout
    while True:
        state, code = state_of()
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return code
        assert time.time() < deadline, f"job {job_id} still {state}: " + (out.read_text() if out and out.exists()
                                                                          else "")
        time.sleep(0.5)


def test_the_shipped_script_asks_for_the_warning_requeue_and_appending_output():
    text = open(os.path.join(REPO, "launch", "slurm_train.sbatch")).read()
    for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in text, line
    common = open(os.path.join(REPO, "launch", "slurm_common.sh")).read()
    assert "trap " in common and "USR1" in common and "scontrol requeue" in common
    assert '--signals-to-handle="$PIXELZ_SIGNALS"' in common
    signals = open(os.path.join(REPO, "launch", "torchrun_signals.sh")).read()
    assert "PIXELZ_SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2" in signals
    assert "trap 'pixelz_forward USR1' USR1" in common and "trap 'pixelz_forward USR2' USR2" in common


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_wait_trains_the_demo_with_two_processes(slurm, tmp_path):
    demo = str(tmp_path / "demo")
    out = tmp_path / "job.out"
    # polled (wait_job), not sbatch --wait: that checks at 2 s, 10 s, then every 32 s (30 s lost on a 10 s job)
    job_id = sbatch(slurm, str(out), "slurm_train.sbatch", "--demo", "--demo-dir", demo, "--demo-samples", "32",
                    "--epochs", "2", "--snapshot-interval", "1", "--workers", "0")
    code = wait_job(slurm, job_id, out)
    log = out.read_text() if out.exists() else ""
    assert code == 0, log
    assert "2 processes" in log and "rendezvous at localhost:" in log
    prefix = os.path.join(demo, "snapshots", "demo")
    assert [it for it, _ in list_snapshots(prefix)] == [4, 2]  # 32 samples / (8 x 2 processes) = 2 per epoch
    assert os.path.exists(prefix + "_config.toml")


@pytest.mark.slow
@pytest.mark.slurm
def test_find_lr_job_prints_a_suggestion(slurm, tmp_path):
    out = tmp_path / "job.out"
    job_id = sbatch(slurm, str(out), "slurm_find_lr.sbatch", "--demo", "--demo-dir", str(tmp_path / "demo"),
                    "--demo-samples", "16", "--batch-size", "4", "--num-runs", "4", "--iter-per-run", "3",
                    "--min-lr", "1e-3", "--max-lr", "1", "--workers", "0")
    code = wait_job(slurm, job_id, out)
    log = out.read_text()
    assert code in (0, 1), log  # 1: the finder had no suggestion (a short search)
    assert ("suggested lr: " in log, "no suggestion: " in log) == (code == 0, code == 1), log
    assert (tmp_path / "demo" / "lr_finder" / "results.npz").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_usr1_snapshots_requeues_resumes_and_equals_an_uninterrupted_run(slurm, tmp_path):
    """SLURM's warning (here sent at once with scancel --batch): snapshot, exit 75, requeue, resume, same weights."""
    common = [*SLOW, "--dataset-arg", f"root='{tmp_path / 'data'}'", "--dataset-arg", "delay=0.03", "--epochs", "15"]
    prefix = str(tmp_path / "slurm" / "snap")
    out = tmp_path / "job.out"
    job_id = sbatch(slurm, str(out), "slurm_train.sbatch", *common, "--snapshot-prefix", prefix)
    try:
        deadline = time.time() + 120
        while not list_snapshots(prefix):  # the first epoch's snapshot: training is under way
            assert job_state(slurm, job_id)[0] in ("PENDING", "RUNNING") and time.time() < deadline, (
                out.read_text() if out.exists() else "")
            time.sleep(0.2)
        signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, capture_output=True,
                                   text=True)
        assert signalled.returncode == 0, signalled.stderr
        reference = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pixelz_dist.train",
                                    *common, "--snapshot-prefix", str(tmp_path / "ref" / "snap")],
                                   env=slurm, capture_output=True, text=True, timeout=300)
        assert reference.returncode == 0, reference.stderr
        code = wait_job(slurm, job_id, out)
    finally:
        if job_state(slurm, job_id)[0] in ("PENDING", "RUNNING", "REQUEUED"):
            subprocess.run(["scancel", job_id], env=slurm)
    log = out.read_text()
    assert code == 0, log
    assert "preemption warning (USR1)" in log and "preemption: SIGUSR1 received" in log
    assert f"requeueing job {job_id}" in log and "(restart 1)" in log  # --open-mode=append kept the first run
    assert "resumed from" in log
    stopped_at = int(re.search(r"SIGUSR1 received; snapshot at iteration (\d+)", log).group(1))
    # --keep-last (3 by default) has pruned that snapshot since: the resume names it
    assert 2 <= stopped_at < 30 and f"resumed from {prefix}_iter_{stopped_at}.pt" in log
    assert list_snapshots(prefix)[0][0] == 30  # 15 epochs of 16 samples / (4 x 2 processes)
    a = load_snapshot(list_snapshots(prefix)[0][1])
    b = load_snapshot(list_snapshots(str(tmp_path / "ref" / "snap"))[0][1])
    assert a["progress"] == b["progress"]
    assert (a["data"]["epoch"], a["data"]["position"]) == (b["data"]["epoch"], b["data"]["position"])
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, state in b["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(a["optimizer"]["state"][pid][name], value), (pid, name)
