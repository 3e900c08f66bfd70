"""A resume never starts over a run it could not read: what is saved loads back, "auto" that can load nothing
refuses, and a read that fails for a passing reason is retried, then reported, never taken for "no snapshot".

Real training runs, real snapshot files (truncated, deleted), the command line as users run it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import DIST_VARS
from engine_helpers import LinReg, make_data
from pixelz_dist import Callback, SnapshotError, train_model
from pixelz_dist.checkpoint import file_format
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.checkpoint.loadable import PLAIN, make_loadable
from test_failures import cli

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


class Tracker(Callback):
    """Keeps numpy values in its state, as callbacks commonly do (``best = np.float64(...)``)."""

    def __init__(self, extra=None):
        self.best, self.n, self.extra = np.float64(np.inf), np.int64(0), extra
        self.loaded = None

    def on_iteration_end(self, state):
        self.n += 1
        self.best = min(self.best, np.float64(state.iteration) / 7)

    def state_dict(self):
        state = {"best": self.best, "n": self.n, "flags": {np.int32(1): np.bool_(True)}}
        if self.extra is not None:
            state["history"] = self.extra
        return state

    def load_state_dict(self, state):
        self.loaded = state
        self.best, self.n = state["best"], state["n"]


def run(prefix, n, callbacks=(), **kw):
    model = LinReg()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, make_data(16), 4, num_iters=n,
                snapshot_prefix=str(prefix), num_workers=0, callbacks=list(callbacks), **kw)
    return model


def files_of(folder) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))
            if not n.endswith(".lock")}


def test_the_plain_types_load_back_under_weights_only():
    for value in (None, True, 3, 1.5, 2j, "s", b"b", bytearray(b"x"), torch.ones(2), torch.Size([2]), torch.float16,
                  torch.device("cpu")):
        assert type(value) in PLAIN or isinstance(value, torch.Tensor)
        buf = io.BytesIO()
        torch.save(value, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)


def test_numpy_scalars_in_a_callback_state_are_saved_as_numbers_and_the_run_resumes(tmp_path):
    prefix = tmp_path / "s"
    run(prefix, 4, [Tracker()], snapshot_interval=2)
    snap = load_snapshot(str(prefix) + "_iter_4.pt")  # loads under weights_only
    state = snap["callbacks"]["0:Tracker"]
    assert state == {"best": 1 / 7, "n": 4, "flags": {1: True}}
    assert type(state["best"]) is float and type(state["n"]) is int
    resumed = Tracker()
    model = run(prefix, 6, [resumed], load_snapshot_path="auto")
    assert resumed.loaded["n"] == 4 and model.forwards == 2  # continued at iteration 5, not from scratch


def test_a_value_that_could_not_be_loaded_back_stops_the_run_at_its_first_snapshot(tmp_path):
    prefix = tmp_path / "s"
    with pytest.raises(SnapshotError, match=r"callbacks\.0:Tracker\.history: numpy\.ndarray.*HINT: .*tolist\(\)"):
        run(prefix, 6, [Tracker(extra=np.arange(3))], snapshot_interval=2)
    assert list_snapshots(str(prefix)) == []  # nothing unreadable was written
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_make_loadable_names_every_bad_entry_and_keeps_good_containers():
    good = {"a": [1, 2.0, "x"], "t": torch.zeros(1)}
    assert make_loadable(good) is good  # nothing converted: nothing copied
    with pytest.raises(SnapshotError) as info:
        make_loadable({"a": {"b": np.zeros(2)}, "c": [frozenset([1])], "d": np.datetime64("2026-01-01")})
    text = str(info.value)
    assert "a.b: numpy.ndarray" in text and "c.0: builtins.frozenset" in text and "d: numpy.datetime64" in text


def truncate_all(prefix) -> None:
    for _, path in list_snapshots(str(prefix)):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])  # a full disk during a copy


def test_auto_refuses_when_no_snapshot_loads_and_changes_nothing_then_overwrite_starts_afresh(tmp_path, caplog):
    prefix = tmp_path / "s"
    run(prefix, 6, snapshot_interval=2, keep_last=2)
    truncate_all(prefix)
    before = files_of(tmp_path)
    with pytest.raises(SnapshotError, match=r"holds 2 snapshot\(s\) and none of them can be loaded \(s_iter_6\.pt: "
                                            r".*s_iter_4\.pt: .*Nothing was trained.*--overwrite"):
        run(prefix, 8, load_snapshot_path="auto", keep_last=2)
    assert files_of(tmp_path) == before
    caplog.set_level("WARNING", logger="pixelz_dist")
    model = run(prefix, 3, load_snapshot_path="auto", overwrite=True)
    assert model.forwards == 3 and [it for it, _ in list_snapshots(str(prefix))] == [3]
    assert sorted(n.split(".old-")[0] for n in os.listdir(tmp_path) if ".old-" in n) == [
        "s_iter_4.pt", "s_iter_6.pt", "s_metrics.jsonl", "s_order.tsv"]


def test_a_damaged_newest_snapshot_still_falls_back_to_an_older_good_one(tmp_path):
    prefix = tmp_path / "s"
    run(prefix, 6, snapshot_interval=2)
    path6 = str(prefix) + "_iter_6.pt"
    open(path6, "wb").write(open(path6, "rb").read()[:100])
    model = run(prefix, 6, load_snapshot_path="auto")
    assert model.forwards == 2  # from iteration 4
    assert [n for n in os.listdir(tmp_path) if n.startswith("s_iter_6.pt.abandoned-")]  # kept, set aside


class FlakyFile(io.FileIO):
    """A file whose reads fail with EIO while ``failures[0]`` > 0: a storage fault (NFS, a dying disk)."""

    failures = [0]

    def _maybe_fail(self):
        if FlakyFile.failures[0] > 0:
            FlakyFile.failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")

    def read(self, n=-1):
        self._maybe_fail()
        return super().read(n)

    def readinto(self, b):
        self._maybe_fail()
        return super().readinto(b)


@pytest.fixture
def flaky_storage(monkeypatch):
    monkeypatch.setattr(file_format, "open", lambda path, mode="rb": FlakyFile(path, "r"), raising=False)
    monkeypatch.setattr(file_format, "READ_RETRY_DELAYS", (0.0, 0.0, 0.0))
    return FlakyFile.failures


def test_a_transient_read_error_is_retried(tmp_path, flaky_storage, caplog):
    prefix = tmp_path / "s"
    run(prefix, 4, snapshot_interval=2)
    flaky_storage[0] = 2
    caplog.set_level("WARNING", logger="pixelz_dist")
    model = run(prefix, 6, load_snapshot_path="auto")
    assert model.forwards == 2  # from the newest snapshot, iteration 4
    assert caplog.text.count("Input/output error") == 2 and "trying again" in caplog.text


def test_a_read_error_that_persists_is_reported_never_taken_for_a_damaged_or_missing_snapshot(tmp_path,
                                                                                               flaky_storage):
    prefix = tmp_path / "s"
    run(prefix, 4, snapshot_interval=2)
    before = files_of(tmp_path)
    flaky_storage[0] = 10**6
    with pytest.raises(SnapshotError, match=r"cannot read snapshot .*s_iter_4\.pt.*Input/output error \(errno 5\), "
                                            r"4 tries\. The file may be intact"):
        run(prefix, 6, load_snapshot_path="auto")
    flaky_storage[0] = 0
    assert files_of(tmp_path) == before  # neither iteration 2 taken in its place nor anything set aside


@pytest.mark.slow
def test_the_command_line_refuses_a_prefix_of_truncated_snapshots_with_exit_2(tmp_path):
    prefix = str(tmp_path / "run" / "s")
    common = ["--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--workers", "0",
              "--snapshot-prefix", prefix]
    first = cli(*common, "--iters", "4", "--snapshot-interval", "2")
    assert first.returncode == 0, first.stderr
    truncate_all(prefix)
    before = files_of(tmp_path / "run")
    again = cli(*common, "--iters", "8", "--resume", "auto")
    assert again.returncode == 2, again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "s_iter_4.pt" in errors[0] and "s_iter_2.pt" in errors[0], again.stderr
    assert "none of them can be loaded" in errors[0] and "--overwrite" in errors[0]
    assert "Traceback" not in again.stderr
    assert files_of(tmp_path / "run") == before
    afresh = cli(*common, "--iters", "2", "--resume", "auto", "--overwrite")
    assert afresh.returncode == 0, afresh.stderr
    assert [it for it, _ in list_snapshots(prefix)] == [2]
    assert len([n for n in os.listdir(tmp_path / "run") if ".old-" in n]) >= 2


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_every_rank_refuses_at_once_when_no_snapshot_loads(tmp_path):
    """Rank 0 decides and every rank hears the refusal: none waits for a decision until the collective timeout."""
    prefix = str(tmp_path / "run" / "s")
    common = ["-m", "pixelz_dist.train", "--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8",
              "--workers", "0", "--snapshot-prefix", prefix]
    first = cli(*common[2:], "--iters", "4", "--snapshot-interval", "2")
    assert first.returncode == 0, first.stderr
    truncate_all(prefix)
    before = files_of(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PIXELZ_DIST_TIMEOUT="60")
    started = time.monotonic()
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", *common, "--iters", "8", "--resume",
                           "auto"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert time.monotonic() - started < 50  # well inside the collective timeout: nobody waited for a peer
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of them can be loaded" in errors[0], out  # rank 0 says it, once for the job
    assert files_of(tmp_path / "run") == before
