"""The main job: `python -m pixelz_dist.train --demo` and the same under torchrun, with snapshots and resume."""

import os
import subprocess
import sys

from conftest import DIST_VARS
from pixelz_dist.snapshot import list_snapshots, load_snapshot


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(cmd, timeout=180):
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def test_demo_trains_writes_snapshots_and_resumes(tmp_path):
    demo = str(tmp_path / "demo")
    prefix = str(tmp_path / "snaps" / "demo")
    args = [sys.executable, "-m", "pixelz_dist.train", "--demo", "--demo-dir", demo, "--snapshot-prefix", prefix,
            "--batch-size", "8", "--iter-size", "2", "--workers", "0", "--display-iter", "5"]
    first = run(args + ["--epochs", "2", "--snapshot-interval", "1"])
    assert first.returncode == 0, first.stderr
    assert "iter 5/8" in first.stderr and "samples/s" in first.stderr
    assert [it for it, _ in list_snapshots(prefix)] == [8, 4]
    assert sorted(os.listdir(demo)) == ["hint", "mask", "rgb"]
    second = run(args + ["--epochs", "3", "--resume", "auto"])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "iteration 8" in second.stderr
    assert load_snapshot(list_snapshots(prefix)[0][1])["progress"]["epoch"] == 3


def test_demo_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = run([sys.executable, "-m", "pixelz_dist.train", "--demo", "--demo-dir", str(tmp_path / "d"),
               "--iters", "3", "--resume", str(tmp_path / "nothing.pt")])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: snapshot")
    assert "Traceback" not in bad.stderr
    usage = run([sys.executable, "-m", "pixelz_dist.train"])
    assert usage.returncode == 2 and "--demo" in usage.stderr


def test_demo_under_torchrun_one_process(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")  # installed with torch, beside python
    prefix = str(tmp_path / "snaps" / "demo")
    proc = run([torchrun, "--nproc_per_node=1", "--master_port=0", "-m", "pixelz_dist.train", "--demo",
                "--demo-dir", str(tmp_path / "demo"), "--iters", "6", "--snapshot-prefix", prefix])
    assert proc.returncode == 0, proc.stderr
    assert "iter 5/6" in proc.stderr
    assert [it for it, _ in list_snapshots(prefix)] == [6]
