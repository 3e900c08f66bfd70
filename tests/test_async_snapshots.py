"""Periodic snapshots written in the background: the durability rules, with real kills during a real write.

The job (tests/jobs/async_job.py) holds one snapshot's write inside the library's own atomic write (half the bytes
in the temporary file, or all of them before fsync and rename) for as long as the test wants, so a SIGKILL lands in
the middle of a background write every time, not by luck.
"""

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pixelz_dist.checkpoint.checkpointer as checkpointer
from conftest import DIST_VARS, TESTS
from engine_helpers import LinReg, make_data
from pixelz_dist import Callback, SnapshotError, train_model
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.checkpoint.staging import HostStaging

JOB = os.path.join(TESTS, "jobs", "async_job.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def job_env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def start(cfg, nproc=None):
    cmd = ([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", JOB] if nproc else [sys.executable, JOB])
    return subprocess.Popen([*cmd, json.dumps(cfg)], env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(predicate, proc, timeout=90.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def progress(out, rank=0) -> int:
    try:
        return int(open(os.path.join(out, f"progress{rank}")).read())
    except (FileNotFoundError, ValueError):
        return 0


def final_model(prefix) -> dict:
    return list_snapshots(prefix) and load_snapshot(list_snapshots(prefix)[0][1])["model"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The same job, never killed: what a killed and resumed run must end identical to. It runs beside the first
    test's jobs; ``straight_run()`` waits for it and returns its final weights."""
    root = tmp_path_factory.mktemp("straight")
    cfg = {"prefix": str(root / "s"), "out": str(root), "num_iters": 12, "interval": 4}
    proc = start(cfg)

    def result():
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, output
        return final_model(cfg["prefix"])

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["write", "fsync"])
def test_a_kill_during_a_background_write_keeps_the_previous_snapshot_and_auto_resumes_from_it(tmp_path, gate,
                                                                                               straight_run):
    """keep_last=1, snapshots every 4 iterations; the write of iteration 8 is held (half written, or written and not
    yet flushed nor renamed) while training goes on, and the process is SIGKILLed then."""
    prefix = str(tmp_path / "s")
    cfg = {"prefix": prefix, "out": str(tmp_path), "num_iters": 12, "interval": 4, "keep_last": 1,
           "gate": gate, "gate_at": 8}
    proc = start(cfg)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "held8"), proc, what="the write of iteration 8")
        wait_for(lambda: progress(tmp_path) >= 10, proc, what="training to go on during the write")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [it for it, _ in list_snapshots(prefix)] == [4]  # keep_last did not remove it before 8 was durable
    assert load_snapshot(prefix + "_iter_4.pt")["progress"]["iteration"] == 4
    assert glob.glob(str(tmp_path / ".s_iter_8.pt.*.tmp"))  # the killed write's temporary file, never a snapshot

    resumed = start({**cfg, "gate": None, "resume": "auto"})
    output = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "s_iter_4.pt: iteration 4" in output
    assert not glob.glob(str(tmp_path / ".s_iter_*.tmp"))  # the claim removed the killed write's leftover
    assert [it for it, _ in list_snapshots(prefix)] == [12]
    ours, straight = final_model(prefix), straight_run()
    assert ours.keys() == straight.keys()
    assert all(torch.equal(ours[k], straight[k]) for k in ours)  # bit-exact, as if never killed


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_wait_for_a_slow_write_outside_every_collective_and_all_see_it_durable(tmp_path):
    """dist_timeout is 3 s; rank 0's writes of iteration 4 (in the background: iterations 5-8 run meanwhile, then the
    final snapshot waits for it) and 8 (the final one, waited for) take 5 s each. A rank that waited for them inside
    a collective would time out; none does: the job ends with exit 0, its final snapshot on disk, and on_snapshot
    ran on both ranks, once per snapshot, with the file there."""
    prefix = str(tmp_path / "s")
    proc = start({"prefix": prefix, "out": str(tmp_path), "num_iters": 8, "interval": 4, "dist_timeout": 3,
                  "gate": "fsync", "hold": 5, "gate_at": [4, 8]}, nproc=2)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output
    assert os.path.exists(tmp_path / "held4") and os.path.exists(tmp_path / "held8")  # both writes were held
    assert [it for it, _ in list_snapshots(prefix)] == [8, 4]
    for rank in (0, 1):
        hooks = [json.loads(line) for line in open(tmp_path / f"snapshots{rank}")]
        assert [os.path.basename(path) for _, path, _ in hooks] == ["s_iter_4.pt", "s_iter_8.pt"], (rank, hooks)
        assert all(existed for _, _, existed in hooks)


class FailAt:
    """save_snapshot that fails as a full disk does for one iteration's file."""

    def __init__(self, iteration, real):
        self.iteration, self.real = iteration, real

    def __call__(self, snapshot, path):
        if path.endswith(f"_iter_{self.iteration}.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(snapshot, path)


class Iterations(Callback):
    def __init__(self):
        self.seen = []

    def on_iteration_end(self, state):
        self.seen.append(state.iteration)
        time.sleep(0.005)


def test_a_background_write_error_stops_the_run_at_the_next_iteration_with_the_synchronous_error(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.setattr(checkpointer, "save_snapshot", FailAt(4, checkpointer.save_snapshot))
    messages = {}
    for snapshot_async in (False, True):
        prefix = tmp_path / str(snapshot_async) / "s"
        seen = Iterations()
        model = LinReg()
        with pytest.raises(SnapshotError) as info:
            train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, make_data(16), 2, num_iters=200,
                        snapshot_prefix=str(prefix), snapshot_interval=2, num_workers=0, callbacks=[seen],
                        snapshot_async=snapshot_async)
        messages[snapshot_async] = str(info.value).replace(str(prefix), "PREFIX")
        assert seen.seen[-1] <= 4 + 3, seen.seen[-1]  # at the next iteration or so, not at the end of the run
        assert [it for it, _ in list_snapshots(str(prefix))] == [2]  # the one before stays, nothing torn
        assert not glob.glob(str(prefix.parent / ".*.tmp"))
    assert messages[True] == messages[False]
    assert messages[True].startswith("cannot write snapshot PREFIX_iter_4.pt (No space left on device); the last "
                                     "good snapshot is PREFIX_iter_2.pt (iteration 2)")


def test_the_snapshot_is_the_state_at_its_iteration_not_after_the_steps_that_ran_during_the_write(tmp_path,
                                                                                                  monkeypatch):
    """Each write is slowed to last several steps; every snapshot must still hold its own iteration's weights."""
    real = checkpointer.save_snapshot

    def slow_save(snapshot, path):
        time.sleep(0.2)
        real(snapshot, path)

    monkeypatch.setattr(checkpointer, "save_snapshot", slow_save)

    class Weights(Callback):
        def __init__(self):
            self.at = {}

        def on_iteration_end(self, state):
            self.at[state.iteration] = {k: v.clone() for k, v in state.model.state_dict().items()}
            time.sleep(0.02)

    weights, model = Weights(), LinReg()
    train_model(model, torch.optim.Adam(model.parameters(), lr=0.05), None, make_data(32), 2, num_iters=30,
                snapshot_prefix=str(tmp_path / "s"), snapshot_interval=5, num_workers=0, callbacks=[weights])
    found = list_snapshots(str(tmp_path / "s"))
    assert [it for it, _ in found] == [30, 25, 20, 15, 10, 5]
    for iteration, path in found:
        saved = load_snapshot(path)["model"]
        assert all(torch.equal(saved[k], weights.at[iteration][k]) for k in saved), iteration
        assert not all(torch.equal(saved[k], weights.at[min(iteration + 1, 30)][k]) for k in saved) or iteration == 30


def test_staging_copies_into_buffers_kept_between_snapshots():
    staging = HostStaging()
    w = torch.randn(4, 3)
    tied = torch.arange(6.0)
    history = [1.0, 2.0]
    state = {"model": {"w": w, "a": tied, "b": tied}, "callbacks": {"h": history}, "n": 3}
    first = staging.stage(state)
    first.wait()
    assert torch.equal(first.state["model"]["w"], w) and first.state["model"]["w"] is not w
    assert first.state["model"]["a"] is first.state["model"]["b"]  # shared stays shared (written once)
    w.add_(1)  # the next optimizer step changes the live tensor in place ...
    history.append(3.0)  # ... and a callback its list
    assert not torch.equal(first.state["model"]["w"], w)  # the staged copy is the state at the snapshot
    assert first.state["callbacks"]["h"] == [1.0, 2.0] and first.state["n"] == 3
    pointer = first.state["model"]["w"].data_ptr()
    second = staging.stage(state)
    assert second.state["model"]["w"].data_ptr() == pointer  # the same memory: no new pages to fault in
    assert torch.equal(second.state["model"]["w"], w)
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    staged = staging.stage({"x": channels_last}).state["x"]
    assert staged.stride() == channels_last.stride() and torch.equal(staged, channels_last)
    assert "model.w" not in staging._buffers  # a tensor no longer in the state: its buffer is freed


def test_a_snapshot_is_loaded_memory_mapped(tmp_path):
    """Resuming maps the file (its pages are the page cache's, shared by the ranks of a node) instead of reading a
    private copy into each rank's memory."""
    model = LinReg()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, make_data(16), 2, num_iters=2,
                snapshot_prefix=str(tmp_path / "s"), num_workers=0)
    path = str(tmp_path / "s_iter_2.pt")
    snap = load_snapshot(path)
    with open("/proc/self/maps") as f:
        assert os.path.realpath(path) in f.read()
    assert torch.equal(snap["model"]["lin.weight"], model.state_dict()["lin.weight"])


def test_a_resumed_run_keeps_no_mapping_of_the_snapshot_file(tmp_path):
    """The optimizer's CPU state loaded from a memory-mapped snapshot is its own memory after the resume: nothing
    reads the file again (keep_last, or another node, may delete it; a mapped page read after that is a SIGBUS)."""
    import gc

    model = LinReg()
    train_model(model, torch.optim.Adam(model.parameters(), lr=0.01), None, make_data(16), 2, num_iters=2,
                snapshot_prefix=str(tmp_path / "s"), num_workers=0)
    path = os.path.realpath(tmp_path / "s_iter_2.pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_model(model, optimizer, None, make_data(16), 2, num_iters=3, snapshot_prefix=str(tmp_path / "s"),
                num_workers=0, load_snapshot_path=path, keep_last=1)
    gc.collect()
    with open("/proc/self/maps") as f:
        assert path not in f.read()
    assert all(torch.isfinite(t).all() for s in optimizer.state.values() for t in s.values())


def test_no_memory_for_the_copy_is_one_error_that_says_what_to_do(tmp_path, monkeypatch):
    def no_memory(self, state):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(HostStaging, "stage", no_memory)
    model = LinReg()
    with pytest.raises(SnapshotError, match=r"cannot write snapshot .*s_iter_2\.pt: copying its state to host memory "
                                            r"failed .*can't allocate memory.*--no-async-snapshots"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, make_data(16), 2, num_iters=4,
                    snapshot_prefix=str(tmp_path / "s"), snapshot_interval=2, num_workers=0)
    assert list_snapshots(str(tmp_path / "s")) == []
