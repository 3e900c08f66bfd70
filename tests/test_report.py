"""What the loop reports (engine/report.py): the log line and the metrics rows every display_iter, the final partial
window, the GPU memory fields, and the WindowMeter that sums the display window's losses.

Everything runs for real on tiny CPU models and tensors; only GPU memory queries are patched.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import pixelz_dist.engine.report as pixelz_log
from engine_helpers import make_data, quick
from pixelz_dist import Callback


def read_metrics(prefix) -> list[dict]:
    path = f"{prefix}_metrics.jsonl"
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_log_lines_and_metrics_rows_every_display_iter(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    metric_files = tmp_path / "snap_metrics.jsonl", tmp_path / "snap_order.tsv"
    on_disk = []

    class Watch(Callback):
        def on_iteration_end(self, state):
            on_disk.append((len(read_metrics(prefix)), os.path.exists(metric_files[1])))

    model, _ = quick(data=make_data(10), batch_size=1, num_iters=10, display_iter=5, snapshot_prefix=str(prefix),
                     lr=0.01, callbacks=[Watch()])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert len(lines) == 2
    assert "iter 5/10" in lines[0] and "iter 10/10" in lines[1]
    for line in lines:
        for word in ("epoch", "loss", "lr", "samples/s", "data", "eta"):
            assert word in line, (word, line)
    rows = read_metrics(prefix)
    assert len(rows) == 2
    assert [r["iteration"] for r in rows] == [5, 10]
    for row, (a, b) in zip(rows, [(0, 5), (5, 10)]):
        for key in ("iteration", "loss", "lr", "samples_per_s", "data_wait", "eta_s"):
            assert key in row
        assert row["loss"] == pytest.approx(sum(model.losses[a:b]) / 5, rel=1e-5)
        assert row["lr"] == [pytest.approx(0.01)]
        assert row["samples_per_s"] > 0 and 0 <= row["data_wait"]
    assert rows[1]["eta_s"] == pytest.approx(0, abs=1e-6)
    # nothing is written per iteration: the files only grow at display (after iteration_end of iterations 5, 10)
    assert on_disk == [(0, False)] * 5 + [(1, True)] * 5


def test_final_partial_window_is_displayed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    quick(num_iters=7, display_iter=5, snapshot_prefix=str(prefix))
    assert [r["iteration"] for r in read_metrics(prefix)] == [5, 7]
    assert sum(r.getMessage().startswith("iter ") for r in caplog.records) == 2


def test_display_gpu_on_cpu_warns_once_per_run_and_adds_no_fields(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    quick(num_iters=4, display_iter=1, display_gpu=True, snapshot_prefix=str(prefix))
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and "display_gpu" in warnings_[0].getMessage()
    quick(num_iters=2, display_iter=1, display_gpu=True)  # a second run in the same process warns again
    assert len([r for r in caplog.records if r.levelno == logging.WARNING and "display_gpu" in r.getMessage()]) == 2
    rows = read_metrics(prefix)
    assert len(rows) == 4 and not any(k.startswith("gpu") for row in rows for k in row)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert len(lines) == 6 and not any("gpu" in line for line in lines)


def test_gpu_memory_fields_in_mib(monkeypatch):
    mib = 1024 * 1024
    asked = []

    def fake(value):
        def query(device=None):
            asked.append(device)
            return value
        return query

    monkeypatch.setattr(torch.cuda, "memory_allocated", fake(3 * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", fake(8 * mib + mib // 2))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake(5 * mib))
    device = torch.device("cuda", 0)
    fields = pixelz_log.gpu_memory_fields(device)
    assert fields == {"gpu_allocated_mib": 3.0, "gpu_reserved_mib": 8.5, "gpu_peak_mib": 5.0}
    assert asked == [device] * 3


def test_window_meter_sums_every_loss_and_keeps_none_of_them():
    """The display window's loss: every loss counted (across buffer folds and within one step's list), summed in
    float64, and no loss tensor or its graph kept alive once its step is recorded."""
    import weakref

    meter = pixelz_log.WindowMeter()
    w = torch.ones((), requires_grad=True)
    expected, refs = 0.0, []
    for step in range(50):  # 3 losses per step (iter_size=3): 150 losses, folds fall inside a step's list
        losses = [(w * (3 * step + k + 0.25)).mean() for k in range(3)]
        for loss in losses:
            (loss / 3).backward()
        meter.add_losses(losses)
        expected += sum(3 * step + k + 0.25 for k in range(3))
        refs += [weakref.ref(loss) for loss in losses]
        del losses, loss
    assert all(r() is None for r in refs)
    assert meter.loss_count == 150
    total = meter.total_loss()
    assert total.dtype == torch.float64 and total.item() == expected
    assert meter.total_loss().item() == expected  # reading it twice adds nothing
    meter.reset(0.0)
    assert meter.total_loss() is None and meter.loss_count == 0
    meter.add_losses([torch.tensor(1.5), torch.tensor(2.0, dtype=torch.bfloat16)])
    assert meter.total_loss().item() == 3.5
