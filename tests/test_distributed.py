"""Distributed training through real torchrun processes (gloo, 2 CPU processes).

Few and strong: each test starts real jobs, kills or signals real processes, and compares real tensors.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from conftest import DIST_VARS, TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.checkpoint.order_record import compare_order_records, read_order_record
from pixelz_dist.distributed.preemption import PREEMPTION_EXIT_CODE
from test_failures import image_folders

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")  # installed with torch, beside python
JOB = os.path.join(TESTS, "jobs", "dist_job.py")
SIGTERM_CFG = dict(num_iters=30, iter_size=2, batch_size=2, dropout=0.2, workers=1)  # its run and its reference's

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def job_env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(cfg, nproc=2, extra=(), timeout=180, background=False, env=None, job=JOB):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *extra, job, json.dumps(cfg)]
    env = {**job_env(), **(env or {})}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def python_job(cfg, timeout=120, job=JOB):
    return subprocess.run([sys.executable, job, json.dumps(cfg)], env=job_env(), capture_output=True, text=True,
                          timeout=timeout)


def one_process_run(cfg):
    """tests/jobs/dist_job.py's training of one config in this process: the one-process side of a comparison needs
    no process of its own (python_job: ~5 s of CPU to start torch). Raises what the training raises."""
    sys.path.insert(0, os.path.dirname(JOB))
    try:
        import dist_job
    finally:
        sys.path.remove(os.path.dirname(JOB))
    with warnings.catch_warnings():  # its record's scan of every object (is a DDP wrapper left?) meets this one
        warnings.filterwarnings("ignore", ".*torch.distributed.reduce_op. is deprecated", FutureWarning)
        dist_job.train_one(json.loads(json.dumps(cfg)))  # what the job would get: JSON's types, a copy


def final(prefix):
    return load_snapshot(list_snapshots(prefix)[0][1])


def assert_bitwise_equal(a, b):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["progress"] == b["progress"] and a["scheduler"] == b["scheduler"]
    assert (a["data"]["epoch"], a["data"]["position"]) == (b["data"]["epoch"], b["data"]["position"])
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"])


def records(out, nproc):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]


# -- correctness of one step -------------------------------------------------------------------------------------
def test_two_processes_equal_one_process_with_the_same_global_batch_and_sync_once_per_step(tmp_path):
    """iter_size=4 under DDP: one gradient all-reduce per optimizer step (no_sync around forward and backward)."""
    cfg = dict(num_iters=6, iter_size=4, interval=3, count_allreduce=True)
    two = tmp_path / "two"
    two.mkdir()
    proc = torchrun({**cfg, "prefix": str(two / "s"), "out": str(two), "batch_size": 2, "user_group": True})
    assert proc.returncode == 0, proc.stderr
    one = tmp_path / "one"
    one.mkdir()
    one_process_run({**cfg, "prefix": str(one / "s"), "out": str(one), "batch_size": 4})

    a, b = final(str(two / "s")), final(str(one / "s"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    ranks = records(two, 2)
    assert ranks[0]["allreduces"] == ranks[1]["allreduces"] == [1] * 6  # would be [4] * 6 without no_sync
    assert sorted(ranks[0]["seen"][:24] + ranks[1]["seen"][:24]) == list(range(48))  # epoch 0: shards tile it
    assert compare_order_records(str(two / "s"), str(one / "s")).identical  # same global samples per iteration
    assert [r["class"] for r in ranks] == ["MLP", "MLP"]
    assert [r["group_alive_after"] for r in ranks] == [True, True]  # the user's own group is left alone
    # the DDP wrapper (its reducer holds the group) is freed when train_model returns, not at interpreter exit
    assert [r["ddp_alive_after"] for r in ranks] == [0, 0]
    # rank 0 alone logs and writes the records
    assert proc.stderr.count("snapshot written") == 2
    assert sorted(p.name for p in two.iterdir() if p.suffix in (".pt", ".tsv", ".jsonl")) == [
        "s_iter_3.pt", "s_iter_6.pt", "s_metrics.jsonl", "s_order.tsv"]


def initial_mlp_weights() -> dict:
    """The weights dist_job.py's MLP starts from: the job seeds 1234 and builds it first thing."""
    import importlib.util

    sys.path.insert(0, os.path.join(TESTS, "jobs"))  # dist_job imports snapshot_wait from there
    try:
        spec = importlib.util.spec_from_file_location("dist_job", JOB)
        dist_job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dist_job)
    finally:
        sys.path.remove(os.path.join(TESTS, "jobs"))
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return {k: v.clone() for k, v in dist_job.MLP().state_dict().items()}


# The runs' updates (final - initial weights) must agree element-wise within the first number, and the largest weight
# must have moved by at least the second. Measured (6 clipped steps, lr 0.05, momentum 0.9): the largest move is
# 4.4e-3 in both precisions; the updates of the two runs differ by 1.5e-8 (fp32) and 3.7e-7 (fp16) at most. The
# former comparison of the absolute weights (fp16: atol 5e-3) also accepted a two-process run that never moved.
UPDATE_TOLERANCE = {None: (1e-6, 2e-3), "fp16": (1e-5, 2e-3)}


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_gradient_clipping_under_ddp_clips_the_all_reduced_gradient(tmp_path, amp):
    """Clipping per rank before the all-reduce (or before unscaling) would give other weights and norms."""
    # small targets: small gradients, so fp16's GradScaler (2**16) never overflows and never skips a step
    cfg = dict(num_iters=6, iter_size=2, interval=6, y_scale=0.01, train_kwargs={"clip_grad_norm": 0.01, "amp": amp})
    runs = {}
    for name, nproc, batch in (("two", 2, 2), ("one", 1, 4)):
        out = tmp_path / name
        out.mkdir()
        proc = (torchrun if nproc == 2 else lambda c: python_job(c))({**cfg, "prefix": str(out / "s"),
                                                                      "batch_size": batch})
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in open(out / "s_metrics.jsonl")]
        runs[name] = (final(str(out / "s")), [r["grad_norm"] for r in rows])
    (a, norms_a), (b, norms_b) = runs["two"], runs["one"]
    init = initial_mlp_weights()
    assert init.keys() == a["model"].keys() == b["model"].keys()
    update_a = torch.cat([(a["model"][k] - init[k]).flatten() for k in init])
    update_b = torch.cat([(b["model"][k] - init[k]).flatten() for k in init])
    update_tol, moved = UPDATE_TOLERANCE[amp]
    assert update_b.abs().max() >= moved, "the weights barely moved: the comparison below would prove nothing"
    torch.testing.assert_close(update_a, update_b, rtol=0, atol=update_tol)
    norm_tol = dict(rtol=1e-5, atol=1e-6) if amp is None else dict(rtol=1e-3, atol=0)  # measured: 5e-5 apart
    torch.testing.assert_close(torch.tensor(norms_a), torch.tensor(norms_b), **norm_tol)
    assert 0.01 < min(norms_a) and max(norms_a) < 10  # every step clipped; measured after unscaling (not x 2**16)


def test_train_model_called_three_times_in_one_torchrun_job(tmp_path):
    """Each call makes and ends its own process group; a reused key space would make the second one fail."""
    proc = torchrun({"prefix": str(tmp_path / "s"), "num_iters": 3, "repeat": 3})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("training MLP on cpu, 2 processes") == 3


def test_ranks_agree_on_requests_without_a_blocking_collective_per_step(shared_runs):
    """The stop / snapshot / preemption flags travel in one asynchronous all-reduce per step, read one step later:
    in steady state (no log line, no snapshot due) no rank waits on a collective. Before, each step made a
    blocking all_reduce + tolist(), a device sync per step with nccl."""
    folder, _ = shared_runs["collectives"]
    for rank in records(folder / "out", 2):
        # iteration i's counts cover its own step and the requests settled after iteration i - 1
        assert rank["collectives"][0] == [0, 0]
        assert rank["collectives"][1:] == [[0, 1]] * 11, rank["collectives"]


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """Runs of 2 processes that tests only read, one after the other in ONE torchrun job (``runs``: a fresh model,
    process group and prefix each; torch's start-up, ~10 s of CPU a job, paid once): ``{name: (folder, the job's
    output)}``, each folder with ``s`` (the prefix) and ``out`` (the per-rank records). ``stop_False`` and
    ``stop_True``: a stop asked at iteration 5 on rank 1 alone / on every rank; ``sigterm_reference`` and
    ``multigpu_reference``: the uninterrupted runs of those tests; ``collectives`` (last: its counting wrapper of
    all_reduce stays in place) counts the collectives per iteration."""
    root = tmp_path_factory.mktemp("shared")
    configs = {
        **{f"stop_{on_every_rank}": {"num_iters": 40, "stop_at": 5, "stop_rank": "all" if on_every_rank else 1,
                                     "stop_on_every_rank": on_every_rank} for on_every_rank in (False, True)},
        "sigterm_reference": SIGTERM_CFG,
        "multigpu_reference": {"num_iters": 6, "iter_size": 2, "batch_size": 2},
        "collectives": {"num_iters": 12, "display_iter": 100, "count_collectives": True},
    }
    runs = []
    for name, cfg in configs.items():
        (root / name / "out").mkdir(parents=True)
        runs.append({**cfg, "out": str(root / name / "out"), "prefix": str(root / name / "s")})
    proc = torchrun({"runs": runs})
    assert proc.returncode == 0, proc.stderr
    return {name: (root / name, proc.stderr) for name in configs}


@pytest.mark.parametrize("on_every_rank,expected", [(False, 6), (True, 5)])
def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_iteration(shared_runs, on_every_rank,
                                                                             expected):
    """Asked on rank 1 alone at iteration 5: both ranks stop after iteration 6 (agreed one step late). Asked on
    every rank alike (on_every_rank=True): after iteration 5, with no agreement."""
    folder, stderr = shared_runs[f"stop_{on_every_rank}"]
    assert [r["stopped_at"] for r in records(folder / "out", 2)] == [expected, expected]
    assert [it for it, _ in list_snapshots(str(folder / "s"))] == [expected]
    assert f"stopped at iteration {expected}: " in stderr


# -- resume: same world size, elastic restart ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_demo_run(tmp_path_factory, demo_root):
    """The uninterrupted reference: 2 processes, demo images, dropout + BatchNorm, 2 workers each."""
    out = tmp_path_factory.mktemp("straight")
    cfg = dict(model="demo", data=demo_root, num_iters=12, iter_size=2, batch_size=2, interval=4, workers=1)
    proc = torchrun({**cfg, "prefix": str(out / "s")})
    assert proc.returncode == 0, proc.stderr
    return cfg, str(out / "s")


def test_sigkill_of_one_worker_then_resume_is_bitwise_identical(tmp_path, straight_demo_run):
    cfg, reference = straight_demo_run
    prefix = str(tmp_path / "s")
    killed = torchrun({**cfg, "prefix": prefix, "kill_rank": 1, "kill_at": 6})
    assert killed.returncode != 0
    assert [it for it, _ in list_snapshots(prefix)] == [4]
    assert 0 < load_snapshot(list_snapshots(prefix)[0][1])["data"]["position"] < 40
    resumed = torchrun({**cfg, "prefix": prefix, "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(final(reference), final(prefix))
    assert compare_order_records(reference, prefix).identical


def test_elastic_restart_continues_from_the_newest_snapshot(tmp_path, straight_demo_run):
    """torchrun --max-restarts=1: a worker SIGKILLed mid-epoch; the restarted group resumes and ends identical."""
    cfg, reference = straight_demo_run
    prefix = str(tmp_path / "s")
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun({**cfg, "prefix": prefix, "resume": "auto", "kill_rank": 1, "kill_at": 6, "out": str(out)},
                    extra=["--max-restarts=1"])
    assert proc.returncode == 0, proc.stderr
    assert [r["attempt"] for r in records(out, 2)] == [1, 1]  # the second attempt finished the job
    assert "resumed from" in proc.stderr
    assert_bitwise_equal(final(reference), final(prefix))


# -- resume with another world size -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_size_changes(tmp_path_factory):
    """48 samples, global batch 8: 3 iterations (24 samples), then resumed to 6 with another world size, both ways
    (2 -> 1 and 1 -> 2). The two runs of 2 processes go in one torchrun job (one start-up less), those of one
    process run in this one:
    ``{(first, second): (prefix, samples seen by the first run, by the second)}``."""
    root = tmp_path_factory.mktemp("world_size")

    def cfg(first, second, n):
        nproc, iters, resume = [(first, 3, None), (second, 6, "auto")][n]
        out = root / f"{first}-{second}" / f"run{n}"
        out.mkdir(parents=True)
        return {"prefix": str(root / f"{first}-{second}" / "s"), "num_iters": iters, "batch_size": 8 // nproc,
                "out": str(out), "resume": resume}

    one_process_run(cfg(1, 2, 0))
    two = torchrun({"runs": [cfg(2, 1, 0), cfg(1, 2, 1)]})
    assert two.returncode == 0, two.stderr
    one_process_run(cfg(2, 1, 1))
    found = {}
    for first, second in ((2, 1), (1, 2)):
        folder = root / f"{first}-{second}"
        found[first, second] = (str(folder / "s"), *[[i for r in records(folder / f"run{n}", nproc) for i in r["seen"]]
                                                    for n, nproc in enumerate((first, second))])
    return found


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_world_size_change_continues_the_epoch_without_repeating_or_skipping(world_size_changes, first, second):
    """48 samples, global batch 8: stop after 3 iterations (24 samples), resume with another world size."""
    prefix, *runs = world_size_changes[first, second]
    assert len(runs[0]) == 24 and len(runs[1]) == 24
    assert sorted(runs[0] + runs[1]) == list(range(48))  # the epoch, each sample exactly once
    assert sorted(read_order_record(prefix)) == list(range(1, 7))


# -- preemption -----------------------------------------------------------------------------------------------------
def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_sigterm_to_torchrun_snapshots_exits_75_and_resumes_identically(tmp_path, shared_runs):
    cfg = SIGTERM_CFG
    reference, _ = shared_runs["sigterm_reference"]  # the uninterrupted run
    prefix = str(tmp_path / "s")
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun({**cfg, "prefix": prefix, "out": str(out), "slow": 0.2, "ready_at": 3, "workers": 1},
                    background=True)
    wait_for(out / "ready", proc)
    # As a scheduler does: SIGTERM to every process of the job, torchrun's agent, the trainers and their DataLoader
    # workers (which must not die first); the agent also forwards its copy to the trainers.
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "preemption: SIGTERM received" in output
    assert [open(out / f"exit{r}").read() for r in range(2)] == [str(PREEMPTION_EXIT_CODE)] * 2
    (stopped_at, _), = list_snapshots(prefix)
    assert 3 <= stopped_at < 30
    resumed = torchrun({**cfg, "prefix": prefix, "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(final(str(reference / "s")), final(prefix))  # dropout included


def test_sigusr1_to_one_worker_stops_every_rank_at_the_same_step(tmp_path):
    """The flag is combined across ranks: rank 1 alone gets the signal, both ranks stop and exit with 75."""
    prefix = str(tmp_path / "s")
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun({"prefix": prefix, "num_iters": 200, "out": str(out), "slow": 0.05, "ready_at": 2,
                     "pid_file": True}, background=True)
    wait_for(out / "ready", proc)
    pid = int(open(out / "pid1").read())
    os.kill(pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert [open(out / f"exit{r}").read() for r in range(2)] == [str(PREEMPTION_EXIT_CODE)] * 2, output
    assert "[rank 1] preemption: SIGUSR1 received" in output  # every rank's warnings reach the output, named
    assert "[rank 0] preemption: a signal received on another rank" in output  # rank 0 learnt it from rank 1
    (stopped_at, path), = list_snapshots(prefix)
    assert stopped_at < 200
    assert len(load_snapshot(path)["rng"]) == 2


# -- failure ----------------------------------------------------------------------------------------------------------
def test_a_rank_that_raises_fails_the_job_fast_with_its_traceback(tmp_path):
    start = time.time()
    proc = torchrun({"num_iters": 20, "raise_rank": 1, "raise_at": 7})
    assert proc.returncode != 0
    assert time.time() - start < 60  # not the collective timeout
    assert "bad sample 7 on rank 1" in proc.stderr


def test_a_hung_peer_fails_the_job_after_the_collective_timeout(tmp_path):
    """Rank 1 hangs; rank 0's next collective gives up after dist_timeout (5 s here) and fails with its traceback.

    (torchrun's agent then takes another 30 s to SIGKILL the hung rank; the test does not wait for that.)
    """
    start = time.time()
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun({"num_iters": 20, "hang_rank": 1, "hang_at": 3, "timeout": 5, "out": str(out), "pid_file": True},
                    background=True)
    try:
        for line in proc.stdout:
            # gloo's words: "Timed out ..." in a collective, "Application timeout caused pair closure" in DDP's
            if line.startswith("[rank0]") and ("Timed out" in line or "timeout caused" in line):
                break
            assert time.time() - start < 90, "rank 0 still waiting: the collective timeout was not applied"
        else:
            pytest.fail("the job ended without rank 0 timing out")
        assert time.time() - start < 60  # 5 s of timeout plus start-up, not torch's 30 minutes
    finally:
        for r in range(2):  # the workers run in sessions of their own: end the hung one too
            if (out / f"pid{r}").exists():
                try:
                    os.kill(int((out / f"pid{r}").read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- warnings and errors of every rank ------------------------------------------------------------------------------
def torchrun_cli(args, cwd, timeout=180):
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pixelz_dist.train", *args],
                          env=job_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("on_bad_file,workers", [("skip", 0), ("skip", 2), ("raise", 2)])
def test_a_bad_file_in_rank_1s_shard_is_reported_once_with_its_rank(tmp_path, on_bad_file, workers):
    """Sample 5 is corrupt; without shuffling, global batch 8 = rank 0 takes 0-3, rank 1 takes 4-7: only rank 1 (or
    one of its DataLoader workers) reads it. Today's rank-0-only logging never showed rank 1's warning."""
    folders = image_folders(tmp_path, n=16, bad=5)
    proc = torchrun_cli(["--model", "slow_data:TwoFolderNet", "--data", *folders, "--on-bad-file", on_bad_file,
                         "--workers", str(workers), "--iters", "2", "--batch-size", "4", "--no-shuffle"],
                        cwd=os.path.join(TESTS, "jobs"))
    output = (proc.stdout + proc.stderr).splitlines()  # the job's merged output, as a log file gets it
    if on_bad_file == "skip":
        assert proc.returncode == 0, proc.stderr[-3000:]
        skipped = [line for line in output if "skipping sample 5" in line]
        assert len(skipped) == 1, skipped
        assert "WARNING [rank 1] skipping sample 5 (on_error='skip'): cannot decode image" in skipped[0]
        assert sum("training TwoFolderNet" in line for line in output) == 1  # INFO: rank 0 alone, as before
    else:
        assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's code for a failed worker
        errors = [line for line in output if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: [rank 1] cannot decode image"), errors
        assert "005.jpg" in errors[0]


def test_a_warning_of_every_rank_is_shown_once_naming_the_ranks(tmp_path, straight_demo_run):
    """The module's reference run's snapshot at iteration 4 (iter_size 2), resumed with iter_size 1 (no new job to
    write a snapshot first)."""
    cfg, reference = straight_demo_run
    shutil.copy(f"{reference}_iter_4.pt", tmp_path / "s_iter_4.pt")
    resumed = torchrun({**cfg, "num_iters": 6, "iter_size": 1, "workers": 0, "prefix": str(tmp_path / "s"),
                        "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "resuming with iter_size 2 -> 1" in line]
    assert len(said) == 1, said  # logged by both ranks, shown once
    assert "WARNING [ranks 0,1] resuming with iter_size 2 -> 1: the data position is kept" in said[0]


# -- the seed's calling convention ----------------------------------------------------------------------------------
def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_model_multigpu_from_plain_python_equals_torchrun(tmp_path, shared_runs):
    """RANK = node rank, WORLD_SIZE = nodes: it starts 2 gloo workers itself and returns the trained model."""
    launched = subprocess.run(
        [sys.executable, os.path.join(TESTS, "jobs", "multigpu_job.py"),
         json.dumps({"port": free_port(), "prefix": str(tmp_path / "m" / "s"), "out": str(tmp_path / "weights.pt")})],
        env={**job_env(), "PYTHONPATH": os.path.join(TESTS, "jobs")}, capture_output=True, text=True, timeout=180)
    assert launched.returncode == 0, launched.stderr
    reference, _ = shared_runs["multigpu_reference"]  # torchrun: 2 processes, 6 iterations, iter_size 2, batch 2
    returned = torch.load(tmp_path / "weights.pt", weights_only=True)
    for k, v in final(str(reference / "s"))["model"].items():
        assert torch.equal(returned[k], v), k


# -- the learning-rate finder across processes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def find_lr_results(tmp_path_factory):
    """Both methods, ``runs`` then ``sweep``, each from a fresh model in the same job: in one process (batch 8),
    under torchrun (2 x 4) and, ``runs`` only, through find_lr_multigpu (2 x 4); ``{(mode, method): result}``."""
    import numpy as np

    out = tmp_path_factory.mktemp("find_lr")
    results = {}
    for mode, batch_size, methods in (("single", 8, ("runs", "sweep")), ("torchrun", 4, ("runs", "sweep")),
                                      ("multigpu", 4, ("runs",))):
        files = {method: str(out / f"{mode}_{method}.npz") for method in methods}
        cfg = {"mode": mode, "results": files, "batch_size": batch_size, "port": free_port()}
        script = os.path.join(TESTS, "jobs", "find_lr_job.py")
        env = {**job_env(), "PYTHONPATH": os.path.join(TESTS, "jobs")}
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", script, json.dumps(cfg)] if mode == "torchrun" \
            else [sys.executable, script, json.dumps(cfg)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        results.update({(mode, method): np.load(path) for method, path in files.items()})
    return results


@pytest.mark.parametrize("method", ["runs", "sweep"])
def test_find_lr_losses_under_torchrun_and_find_lr_multigpu_equal_one_process(find_lr_results, method):
    """Every rank trains its shard, losses are averaged over ranks before they are recorded, rank 0 writes."""
    import numpy as np

    single = find_lr_results["single", method]
    modes = ("torchrun", "multigpu") if method == "runs" else ("torchrun",)
    for mode in modes:
        result = find_lr_results[mode, method]
        np.testing.assert_allclose(result["losses"], single["losses"], rtol=1e-5, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(result["lrs"], single["lrs"])
