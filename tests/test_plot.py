"""Training curves (callbacks/curves.py, callbacks/plot_curves.py, ``python -m pixelz_dist.plot``) and TensorBoard
after a resume: the series drawn (a resumed run's rows replace the killed run's, validation and evaluation values
picked up, torn lines skipped), real PNGs that Pillow opens, the missing-matplotlib path, the end-of-training write,
and event files without duplicated steps."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import DIST_VARS, TESTS
from engine_helpers import make_data, quick
from pixelz_dist.callbacks import PlotCurves, TensorBoardLogger
from pixelz_dist.callbacks.curves import continuous_rows, load_curves
from pixelz_dist.callbacks.plot_curves import draw_curves, plot_curves
from pixelz_dist.errors import DataError
from pixelz_dist.fileio import AppendFile
from pixelz_dist.plot import main as plot_main

HINT = 'pip install "pixelz-dist[plot]"'


def row(it, total, loss, **more):
    return {"iteration": it, "total": total, "epoch": it / 4, "loss": loss, "lr": [0.1 / it, 0.01 / it],
            "samples_per_s": 100.0 + total, "data_wait": 0.25, "elapsed_s": 1.0, "eta_s": 0.0, **more}


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def killed_then_resumed(tmp_path) -> str:
    """A metrics file as a run killed after iteration 6 (snapshot at 4) and its resume to 8 leave it: the killed
    run's last line torn, the resumed run's marker appended to the torn part (a file written before appends began
    on a new line), validation rows beside the training rows; and an eval file."""
    prefix = str(tmp_path / "run")
    killed = [json.dumps(row(i, 6, 1.0 / i, grad_norm=2.0)) for i in range(1, 7)]
    killed.insert(4, json.dumps({"iteration": 4, "val_loss": 0.5, "val_miou": 0.4}))
    killed.append(json.dumps({"iteration": 6, "val_loss": 9.0, "val_miou": 9.0}))
    torn = json.dumps(row(7, 6, 1.0 / 7))[:25]
    resumed = [json.dumps(row(i, 8, 2.0 / i, grad_norm=3.0)) for i in (6, 8)]  # a row every 2 iterations now
    resumed.append(json.dumps({"iteration": 8, "val_loss": 0.3, "val_miou": 0.6}))
    marker = json.dumps({"resumed_at": 4, "snapshot": f"{prefix}_iter_4.pt"})
    write_lines(f"{prefix}_metrics.jsonl", killed + [torn + marker] + resumed)
    evals = [{"iteration": 4, "snapshot": "run_iter_4.pt", "loss": 0.7, "miou": 0.1, "ema": False},
             {"iteration": 4, "snapshot": "run_iter_4.pt", "loss": 0.6, "miou": 0.2, "ema": True},
             {"iteration": 8, "snapshot": "run_iter_8.pt", "loss": 0.5, "miou": 0.3, "ema": False},
             {"iteration": 8, "snapshot": "run_iter_8.pt", "loss": 0.4, "miou": 0.35, "ema": False}]
    write_lines(f"{prefix}_eval.jsonl", [json.dumps(e) for e in evals] + ['{"iteration": 12, "sna'])
    return prefix


def test_series_of_a_resumed_run_are_continuous_with_validation_and_eval(tmp_path):
    data = load_curves(killed_then_resumed(tmp_path))
    # 1..4 from the killed run, 6 and 8 from the resumed one: the killed run's 5 and 6 (after the resume point) gone
    assert data.loss.iterations.tolist() == [1, 2, 3, 4, 6, 8]
    np.testing.assert_allclose(data.loss.values, [1 / i for i in range(1, 5)] + [2 / 6, 2 / 8])
    assert data.samples_per_s.values.tolist() == [106.0] * 4 + [108.0] * 2
    assert len(data.lrs) == 2
    np.testing.assert_allclose(data.lrs[1].values, [0.01 / i for i in (1, 2, 3, 4, 6, 8)])
    assert data.data_wait.values.tolist() == [0.25] * 6
    assert data.resumed_at == [4]
    assert data.unreadable_lines == 2  # the torn metrics line (its marker recovered) and the torn eval line
    # validation: the killed run's iteration 6 is gone
    assert sorted(data.validation) == ["val_loss", "val_miou"]
    assert data.validation["val_loss"].iterations.tolist() == [4, 8]
    assert data.validation["val_loss"].values.tolist() == [0.5, 0.3]
    assert data.extra["grad_norm"].values.tolist() == [2.0] * 4 + [3.0] * 2
    # evaluation: EMA weights a series of their own; the snapshot evaluated twice keeps its last row
    assert sorted(data.evaluation) == ["loss", "loss (ema)", "miou", "miou (ema)"]
    assert data.evaluation["miou"].iterations.tolist() == [4, 8]
    assert data.evaluation["miou"].values.tolist() == [0.1, 0.35]
    assert data.evaluation["loss (ema)"].values.tolist() == [0.6]


def test_a_file_without_resume_markers_restarts_where_the_iteration_steps_back():
    train = [{"iteration": i, "loss": 1.0, "lr": [0.1]} for i in (2, 4, 6)]
    late_val = {"iteration": 4, "val_loss": 0.1}  # validation of snapshot 4, written once it was durable
    again = [{"iteration": i, "loss": 2.0, "lr": [0.1]} for i in (4, 6, 8)]
    kept, resumed = continuous_rows(train + [late_val] + again + [{"note": "no iteration"}])
    assert [(r["iteration"], r.get("loss", "val")) for r in kept] == [(2, 1.0), (4, 2.0), (6, 2.0), (8, 2.0)]
    assert resumed == []
    # a late validation row is no step back
    kept, _ = continuous_rows(train + [late_val] + again[2:])
    assert [(r["iteration"], r.get("loss", "val")) for r in kept] == [(2, 1.0), (4, 1.0), (6, 1.0), (4, "val"),
                                                                       (8, 2.0)]


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = str(tmp_path / "m.jsonl")
    with open(path, "w") as f:
        f.write('{"iteration": 1, "loss": 1.0}\n{"iteration": 2, "lo')
    out = AppendFile(path)
    out.add_json({"resumed_at": 1})
    out.flush()
    out.add_json({"iteration": 2, "loss": 0.5})
    out.flush()
    with open(path) as f:
        assert f.read().splitlines()[1:] == ['{"iteration": 2, "lo', '{"resumed_at":1}', '{"iteration":2,"loss":0.5}']


def test_draw_writes_a_png_with_a_panel_for_each_kind_of_value(tmp_path):
    prefix = killed_then_resumed(tmp_path)
    path = plot_curves(prefix)
    assert path == f"{prefix}_curves.png"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1080, 864)  # 6 panels: 3 rows of 2
    # training values only: 4 panels, 2 rows
    os.remove(f"{prefix}_eval.jsonl")
    data = load_curves(prefix)
    data.validation, data.extra = {}, {}
    assert draw_curves(data, str(tmp_path / "train_only.png"), smoothing=0) == str(tmp_path / "train_only.png")
    with Image.open(tmp_path / "train_only.png") as img:
        assert img.size == (1080, 576)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []  # written atomically
    with pytest.raises(ValueError, match="smoothing"):
        draw_curves(data, str(tmp_path / "x.png"), smoothing=1.0)


def test_no_metrics_is_one_error_line(tmp_path, capsys):
    assert plot_main([str(tmp_path / "nothing")]) == 2
    assert "error: no metrics file" in capsys.readouterr().err
    with open(tmp_path / "empty_metrics.jsonl", "w") as f:
        f.write('{"iteration": 1, "lo')
    with pytest.raises(DataError, match="holds no metrics row"):
        load_curves(str(tmp_path / "empty_metrics.jsonl"))


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as when it is not installed (only those imports)."""
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_the_command_says_how_to_install(tmp_path, capsys, no_matplotlib):
    prefix = killed_then_resumed(tmp_path)
    with pytest.raises(ImportError, match=r'pip install "pixelz-dist\[plot\]"'):
        plot_curves(prefix)
    assert plot_main([prefix]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the training curves need matplotlib") and HINT in err
    assert not os.path.exists(f"{prefix}_curves.png")


def test_without_matplotlib_training_ends_normally_with_a_debug_line(tmp_path, caplog, no_matplotlib):
    caplog.set_level(logging.DEBUG, logger="pixelz_dist")
    prefix = str(tmp_path / "s")
    quick(num_iters=2, display_iter=1, snapshot_prefix=prefix, callbacks=[PlotCurves()])
    (line,) = [r for r in caplog.records if r.name == "pixelz_dist.callbacks.plot_curves"]
    assert line.levelno == logging.DEBUG and HINT in line.getMessage()
    assert not os.path.exists(f"{prefix}_curves.png")


def test_callback_writes_the_curves_when_train_model_ends_and_never_fails_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = str(tmp_path / "s")
    curves = PlotCurves()
    quick(data=make_data(8), num_iters=4, display_iter=1, snapshot_prefix=prefix, log_prefix=str(tmp_path / "log"),
          callbacks=[curves])
    assert curves.path == str(tmp_path / "log_curves.png")  # the run's records are under log_prefix
    with Image.open(curves.path) as img:
        img.verify()
    assert f"training curves written to {curves.path}" in caplog.text
    # a plot that cannot be written is a warning: the run still returns
    (tmp_path / "file").write_text("")
    broken = PlotCurves(out=str(tmp_path / "file" / "x.png"))
    quick(num_iters=2, display_iter=1, snapshot_prefix=str(tmp_path / "b"), callbacks=[broken])
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.endswith("plot_curves")]
    assert len(warned) == 1 and "could not be written" in warned[0].getMessage()


def test_tensorboard_writer_of_a_resumed_run_purges_from_the_next_iteration(tmp_path):
    made = []

    def with_purge(log_dir, purge_step=None):
        made.append(purge_step)
        return _NullWriter()

    def without(log_dir):  # a factory written before purge_step existed keeps working
        made.append("old")
        return _NullWriter()

    prefix = str(tmp_path / "s")
    quick(num_iters=4, snapshot_interval=2, snapshot_prefix=prefix, callbacks=[TensorBoardLogger("tb", 1, with_purge)])
    quick(num_iters=6, load_snapshot_path=f"{prefix}_iter_2.pt", snapshot_prefix=str(tmp_path / "r"),
          callbacks=[TensorBoardLogger("tb", 1, with_purge)])
    quick(num_iters=6, load_snapshot_path=f"{prefix}_iter_2.pt", snapshot_prefix=str(tmp_path / "q"),
          callbacks=[TensorBoardLogger("tb", 1, without)])
    assert made == [None, 3, "old"]


class _NullWriter:
    def add_scalar(self, *args):
        pass

    def close(self):
        pass


# -- end to end: the training command, killed and resumed; the plot command --------------------------------------
def _env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def resumed_demo(tmp_path_factory):
    """The demo trained to iteration 6 (snapshots at 4 and 6, curves off), "killed" before its snapshot at 6 was
    written (the file removed), resumed to 8 (curves on: the default)."""
    root = tmp_path_factory.mktemp("resumed")
    prefix, tb = str(root / "s" / "s"), str(root / "tb")
    args = ["pixelz_dist.train", "--demo", "--demo-dir", str(root / "demo"), "--demo-samples", "16", "--batch-size",
            "4", "--workers", "0", "--display-iter", "1", "--snapshot-interval", "4", "--snapshot-prefix", prefix,
            "--tensorboard", tb]
    first = _run(*args, "--iters", "6", "--no-curves")
    assert first.returncode == 0, first.stderr
    curves_after_first = os.path.exists(f"{prefix}_curves.png")
    between = time.time()
    os.remove(f"{prefix}_iter_6.pt")
    second = _run(*args, "--iters", "8", "--resume", "auto")
    assert second.returncode == 0, second.stderr
    return {"prefix": prefix, "tb": tb, "first": first, "second": second, "curves_after_first": curves_after_first,
            "between": between}


@pytest.mark.slow
def test_the_training_command_writes_curves_at_the_end_unless_told_not_to(resumed_demo):
    prefix = resumed_demo["prefix"]
    assert not resumed_demo["curves_after_first"]  # --no-curves
    assert "training curves written to" not in resumed_demo["first"].stderr
    assert f"training curves written to {prefix}_curves.png" in resumed_demo["second"].stderr
    with Image.open(f"{prefix}_curves.png") as img:
        img.verify()


@pytest.mark.slow
def test_plot_command_on_a_real_resumed_run(resumed_demo, tmp_path, capsys):
    prefix = resumed_demo["prefix"]
    out = str(tmp_path / "c.png")
    assert plot_main([prefix, "--out", out]) == 0  # what python -m pixelz_dist.plot and pixelz-plot run
    assert capsys.readouterr().out.strip() == out
    with Image.open(out) as img:
        img.verify()
    rows = [json.loads(line) for line in open(f"{prefix}_metrics.jsonl")]
    assert {"resumed_at": 4, "snapshot": f"{prefix}_iter_4.pt"} in rows
    assert [r["iteration"] for r in rows if "iteration" in r] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    data = load_curves(prefix)
    assert data.loss.iterations.tolist() == list(range(1, 9)) and data.resumed_at == [4]
    resumed = {r["iteration"]: r for r in rows if r.get("total") == 8}  # the resumed run's rows: 5..8
    killed = {r["iteration"]: r for r in rows if r.get("total") == 6}
    assert data.samples_per_s.values.tolist() == [killed[i]["samples_per_s"] for i in range(1, 5)] + [
        resumed[i]["samples_per_s"] for i in range(5, 9)]


@pytest.mark.slow
def test_tensorboard_after_a_resume_shows_each_step_once(resumed_demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = resumed_demo["tb"]
    assert len([n for n in os.listdir(tb) if n.startswith("events.out.tfevents")]) == 2  # one file per run
    events = EventAccumulator(tb)
    events.Reload()
    for tag in ("train/loss", "train/lr", "train/epoch"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(1, 9)), tag
        # 1..4 are the first run's, 5..8 the resumed run's (the first run's 5 and 6 are hidden)
        assert [s.wall_time < resumed_demo["between"] for s in scalars] == [True] * 4 + [False] * 4, tag
