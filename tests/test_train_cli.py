"""`python -m pixelz_dist.train` end to end, in fresh processes: the demo, snapshots and resume, a configuration
saved beside the snapshots that repeats the run, TensorBoard, and one-line errors with exit code 2."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DIST_VARS, TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot

pytestmark = pytest.mark.slow  # every test starts `python -m pixelz_dist.train` processes


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(TESTS, "jobs"))
    return env


def run(cmd, timeout=180):
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def train(*args, timeout=180):
    return run([sys.executable, "-m", "pixelz_dist.train", *args], timeout=timeout)


def test_the_demo_snapshots_by_itself_and_resumes_after_kill_9(tmp_path):
    """The docs' promise (docs/how-to/resume.md): kill -9 the demo, start it again with --resume auto, and it
    continues where the last snapshot was taken. With no snapshot option at all: the demo's own prefix and interval
    (every epoch), and the 3 newest kept (--keep-last's default)."""
    demo = str(tmp_path / "demo")
    prefix = os.path.join(demo, "snapshots", "demo")  # the demo's default prefix
    args = ["--demo", "--demo-dir", demo, "--demo-samples", "16", "--batch-size", "2", "--iter-size", "2",
            "--workers", "0", "--display-iter", "5"]  # 16 samples / (2 x 2) = 4 iterations per epoch
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "pixelz_dist.train", *args, "--epochs", "100000"],
                                 env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (list_snapshots(prefix) and "iter 5/" in log.read_text()):
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        first.kill()  # SIGKILL: no snapshot on the way out
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    text = log.read_text()
    assert "iter 5/400000" in text and "samples/s" in text
    assert "\r" not in text and "it/s" not in text  # not a terminal: log lines, no progress bar
    kept = list_snapshots(prefix)
    (last, path), iterations = kept[0], [it for it, _ in kept]
    assert 1 <= len(kept) <= 3 and all(it % 4 == 0 for it in iterations), iterations  # one per epoch, 3 newest
    epochs = last // 4 + 1  # one epoch more than the last snapshot holds
    second = train(*args, "--epochs", str(epochs), "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert f"resumed from {path}" in second.stderr and f"iteration {last}" in second.stderr, second.stderr
    newest = load_snapshot(list_snapshots(prefix)[0][1])
    assert newest["progress"]["iteration"] == last + 4 and newest["data"]["epoch"] == epochs
    assert sorted(os.listdir(demo)) == ["hint", "mask", "rgb", "snapshots"]


def test_step_options_from_the_command_line_train_and_log(tmp_path):
    prefix = str(tmp_path / "s")
    proc = train("--demo", "--demo-dir", str(tmp_path / "demo"), "--iters", "4", "--batch-size", "4", "--workers",
                 "0", "--display-iter", "2", "--snapshot-prefix", prefix, "--amp", "bf16", "--clip-grad-norm", "0.1",
                 "--on-nonfinite", "raise", "--stop-loss-below", "1e-9", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "amp bf16" in proc.stderr and "grad_norm" in proc.stderr
    saved = open(f"{prefix}_config.toml").read()
    assert 'amp = "bf16"' in saved and "clip_grad_norm = 0.1" in saved


def test_the_saved_configuration_repeats_the_run_bit_for_bit(tmp_path):
    first = str(tmp_path / "a" / "snap")
    tb = tmp_path / "tb"
    proc = train("--model", "pixelz_dist.demo:TinySegNet", "--model-arg", "width=4", "--dataset", "slow_data:make",
                 "--dataset-arg", f"root={str(tmp_path / 'data')!r}", "--dataset-arg", "delay=0", "--iters", "6",
                 "--batch-size", "4", "--optimizer", "adamw", "--param-lr", "head=0.02", "--scheduler", "onecycle",
                 "--workers", "0", "--seed", "7", "--snapshot-prefix", first, "--display-iter", "2",
                 "--tensorboard", str(tb))
    assert proc.returncode == 0, proc.stderr
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    config = first + "_config.toml"
    text = open(config).read()
    assert 'scheduler = "onecycle"' in text and "schedule_on_iter = true" in text and '"head" = 0.02' in text
    again = train("--config", config, "--snapshot-prefix", str(tmp_path / "b" / "snap"), "--tensorboard",
                  str(tmp_path / "tb2"))
    assert again.returncode == 0, again.stderr
    a = load_snapshot(list_snapshots(first)[0][1])
    b = load_snapshot(list_snapshots(str(tmp_path / "b" / "snap"))[0][1])
    assert a["progress"] == b["progress"] and a["scheduler"] == b["scheduler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    for args, expected in [
        (["--demo", "--demo-dir", str(tmp_path / "d"), "--iters", "3", "--resume", str(tmp_path / "nothing.pt")],
         "error: --resume"),
        (["--model", "no_such_pkg.nets:unet", "--dataset", "slow_data:make", "--iters", "1"],
         "error: --model 'no_such_pkg.nets:unet': cannot import module 'no_such_pkg.nets'"),
        (["--model", "pixelz_dist.demo:TinySegNet", "--dataset", "slow_data:make", "--iters", "1"],
         "error: --dataset 'slow_data:make' cannot be called with {}"),
        ([], "error: no model: pass --model package.module:factory (or --demo)"),
    ]:
        bad = train(*args)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith(expected), bad.stderr
        assert "Traceback" not in bad.stderr
