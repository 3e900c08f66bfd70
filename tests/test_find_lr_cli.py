"""`python -m pixelz_dist.find_lr --demo`: the finder from the command line, on the demo's real image files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DIST_VARS


def run(args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "pixelz_dist.find_lr", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_prints_the_suggestion_writes_files_and_logs_each_run(tmp_path):
    result_file = tmp_path / "out" / "lr.npz"
    proc = run(["--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "16", "--batch-size", "4",
                "--num-runs", "5", "--iter-per-run", "4", "--min-lr", "1e-4", "--max-lr", "10", "--workers", "0",
                "--result-file", str(result_file), "--plot", str(tmp_path / "lr.png")])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    printed = proc.stdout.strip().splitlines()[-1]
    assert printed.startswith("suggested lr: ")
    summary = json.loads((tmp_path / "out" / "lr.json").read_text())
    assert 'method = "runs"' in (tmp_path / "out" / "lr_config.toml").read_text()  # the search, repeatable
    assert float(printed.split(": ")[1]) == pytest.approx(summary["suggestion"], rel=1e-2)
    with np.load(result_file, allow_pickle=False) as z:
        assert str(z["method"]) == "runs" and z["losses"].shape == (5, 4)
    runs = [line for line in proc.stderr.splitlines() if "lr finder run " in line]
    assert len(runs) == int(np.sum(summary["ran"])) and "lr finder run 1/5: lr 0.0001" in runs[0]
    assert "training TinySegNet" not in proc.stderr  # the inner runs' own lines are not repeated 5 times
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_in_process_and_plot_without_matplotlib(tmp_path, monkeypatch, capsys, caplog):
    import pixelz_dist.find_lr as cli

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        rc = cli.main(["--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "16", "--batch-size", "4",
                       "--method", "sweep", "--num-iters", "30", "--min-lr", "1e-4", "--max-lr", "10",
                       "--workers", "0", "--result-file", str(tmp_path / "sweep.npz"),
                       "--plot", str(tmp_path / "sweep.png")])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("suggested lr: ")
    messages = [r.getMessage() for r in caplog.records]
    assert any('pip install "pixelz-dist[plot]"' in m for m in messages)
    assert not (tmp_path / "sweep.png").exists()
    progress = [m for m in messages if m.startswith("lr finder sweep ")]  # a line every tenth of the sweep
    assert progress[0].startswith("lr finder sweep 3/30: lr ") and len(progress) >= 9
    with np.load(tmp_path / "sweep.npz", allow_pickle=False) as z:
        assert str(z["method"]) == "sweep" and z["lrs"].shape == (30,)


@pytest.mark.slow
def test_errors_are_one_message_with_exit_code_2(tmp_path):
    bad = run(["--demo", "--demo-dir", str(tmp_path / "d"), "--demo-samples", "8", "--min-lr", "1", "--max-lr",
               "0.1", "--num-runs", "1"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    # one line naming the options, checked before anything is written (the demo's images included)
    assert bad.stderr.strip().splitlines() == ["error: need 0 < --min-lr < --max-lr, got --min-lr=1.0, --max-lr=0.1; "
                                               "--num-runs must be an integer >= 2 (the rates span --min-lr to "
                                               "--max-lr), got 1"], bad.stderr
    assert not (tmp_path / "d").exists()


def test_without_demo_the_usage_says_what_to_pass(capsys):
    import pixelz_dist.find_lr as cli

    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "--demo" in capsys.readouterr().err


def test_the_function_stays_callable_after_the_command_line_module_is_imported():
    import pixelz_dist.find_lr as module
    from pixelz_dist.lr_finder import find_lr

    assert callable(module) and callable(find_lr)
    with pytest.raises(Exception, match="invalid find_lr arguments"):
        module(None, None, [], 1, method="nope", result_file=None)
