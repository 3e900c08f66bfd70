"""The failure table: ordinary mistakes and faults end in seconds, with one line that says what is wrong, and lose
nothing. Real processes, real image files, real signals where the row is about a process (an exit code, a signal, a
torchrun job); in-process ``train_model`` calls where the row is about the exception. Some rows are tested in the
module that owns the behaviour. Where each row of the "When things go wrong" table (docs/explanation/failure-modes.md)
is tested (P: a real process -- the CLI, a job script or torchrun; I: in-process; T: under torchrun):

- an image cannot be read or decoded (corrupt, empty, deleted mid-run, in workers): here,
  test_a_corrupt_jpeg_read_by_a_worker_exits_2_in_seconds_with_one_line (P),
  test_a_file_deleted_mid_epoch_is_named_and_the_process_ends (P),
  test_an_empty_file_says_it_is_empty_and_on_bad_file_skip_goes_on (P)
- the samples of a batch have different sizes; any other error while workers run: here,
  test_an_error_with_workers_running_ends_the_process (P)
- a DataLoader worker is killed or exits: here,
  test_a_worker_killed_by_the_kernel_exits_71_with_one_line_and_the_resume_is_exact (P),
  test_a_dead_worker_is_a_worker_died_error_naming_it_for_every_batch_source (P); test_worker_death.py (I)
- one rank fails under torchrun: here, test_one_rank_failing_with_workers_fails_the_whole_job_in_seconds (T)
- the processes' DataLoaders yield different numbers of batches:
  test_uneven.py::test_the_epoch_ends_on_every_rank_when_the_first_runs_out (T)
- an IterableDataset yields fewer batches than its __len__; a DataLoader yields no batch:
  test_user_loader.py::test_an_iterable_dataset_that_yields_less_than_its_length_is_named (I),
  test_a_loader_that_yields_nothing_is_an_error_not_an_endless_loop_of_empty_epochs (I)
- a mid-epoch snapshot of a user DataLoader resumed with another number of processes:
  test_user_loader.py::test_a_mid_epoch_snapshot_of_two_ranks_is_refused_by_one_process (T, then P)
- rank 0 cannot list or pair the --data folders:
  test_listing_once.py::test_rank_0s_listing_error_reaches_every_rank_at_once_and_is_printed_once (T)
- rank 0 did not hand over the listing:
  test_sample_table.py::test_a_rank_whose_rank_0_hands_nothing_over_fails_after_the_timeout_with_a_hint (I, a real
  TCPStore)
- a rank logs a warning or an error: test_distributed.py::test_a_warning_of_every_rank_is_shown_once_naming_the_ranks
  (T), test_a_bad_file_in_rank_1s_shard_is_reported_once_with_its_rank (T); test_log_relay.py (I)
- a peer hangs: test_distributed.py::test_a_hung_peer_fails_the_job_after_the_collective_timeout (T)
- a run is killed while writing a snapshot:
  test_snapshot.py::test_a_process_killed_mid_write_leaves_the_previous_snapshots_intact (P, SIGKILL); here,
  test_temporary_files_of_killed_writes_are_removed_at_the_next_start (P, SIGKILL; the next start I);
  test_async_snapshots.py (background writes)
- a fresh run into a prefix with snapshots: here,
  test_a_fresh_run_into_a_prefix_with_snapshots_is_refused_or_sets_them_aside (I, and the CLI's refusal P),
  test_a_new_demo_run_sets_the_last_ones_snapshots_aside (P); --overwrite from the CLI:
  test_resume_refusals.py::test_the_command_line_refuses_a_prefix_of_truncated_snapshots_with_exit_2 (P)
- two runs on one prefix: here, test_a_second_run_into_the_same_prefix_is_refused_and_a_killed_one_leaves_no_stuck_lock
  (P)
- the prefix cannot be written: here, test_an_unwritable_prefix_is_refused_before_the_first_iteration (I and P),
  test_a_read_only_prefix_is_refused_before_the_first_iteration (I; a read-only tmpfs: root)
- the disk fills while a snapshot is written: here, test_a_full_disk_keeps_the_last_good_snapshot_and_says_which (I; a
  real 1.2 MB tmpfs: root)
- another optimizer, or other param groups: here,
  test_resuming_with_another_optimizer_is_refused_before_anything_is_loaded (I),
  test_resuming_with_other_param_groups_is_refused_before_anything_is_loaded (I)
- a model of other sizes: here, test_a_shape_mismatch_hint_does_not_suggest_strict_load_and_no_strict_load_works (P);
  test_snapshot.py::test_model_mismatch_lists_every_key (I)
- an invalid invocation: here, test_an_invalid_invocation_leaves_the_saved_configuration_alone (P)
- the optimizer was built for another model: here, test_an_optimizer_of_another_model_is_refused (I)
- Ctrl-C: here, test_ctrl_c_finishes_the_step_writes_a_snapshot_and_exits_130 (P, SIGINT),
  test_a_second_ctrl_c_stops_at_once (P); from Python:
  test_resume_changes.py::test_ctrl_c_is_an_interrupted_exception_after_a_snapshot_and_the_run_resumes (I, a real
  SIGINT)
- SIGTERM / SIGUSR1 / SIGUSR2: test_distributed.py::test_sigterm_to_torchrun_snapshots_exits_75_and_resumes_identically
  (T), test_sigusr1_to_one_worker_stops_every_rank_at_the_same_step (T);
  test_launch.py::test_torchrun_script_forwards_sigusr2_to_the_trainers (P);
  test_slurm.py::test_usr1_snapshots_requeues_resumes_and_equals_an_uninterrupted_run (a real SLURM)
- resuming from an older snapshot while newer ones exist:
  test_checkpointer.py::test_rewinding_to_an_older_snapshot_sets_the_newer_ones_aside_and_keep_last_keeps_the_new_branch
  (I)
- --resume auto finds snapshots but none loads:
  test_resume_refusals.py::test_auto_refuses_when_no_snapshot_loads_and_changes_nothing_then_overwrite_starts_afresh
  (I), test_the_command_line_refuses_a_prefix_of_truncated_snapshots_with_exit_2 (P),
  test_under_torchrun_every_rank_refuses_at_once_when_no_snapshot_loads (T)
- a snapshot cannot be read (EIO, ...): test_resume_refusals.py::test_a_transient_read_error_is_retried,
  test_a_read_error_that_persists_is_reported_never_taken_for_a_damaged_or_missing_snapshot (I; the read errors are
  simulated by a stand-in file object)
- a callback's state_dict that weights_only cannot load:
  test_resume_refusals.py::test_a_value_that_could_not_be_loaded_back_stops_the_run_at_its_first_snapshot,
  test_numpy_scalars_in_a_callback_state_are_saved_as_numbers_and_the_run_resumes (I)
- the --data folders changed before a mid-epoch resume:
  test_changed_data.py::test_the_command_line_refuses_a_changed_data_folder_mid_epoch_with_exit_2 (P),
  test_a_renamed_file_mid_epoch_is_refused_naming_it_and_allow_changed_data_goes_on (I); a grown or shrunk dataset:
  test_resume_changes.py (I)
- the ranks see different data: test_changed_data.py::test_ranks_that_see_different_data_refuse_to_train (T)
- the model arrives in eval mode:
  test_train_mode.py::test_a_model_that_arrives_in_eval_mode_trains_in_train_mode_and_goes_back_in_eval (I)
- a label folder holds a colour image or a JPEG:
  test_labels.py::test_colour_and_lossy_files_in_a_label_folder_are_refused_on_every_path (I)
- a cached image rewritten with its time put back:
  test_fill_cache.py::test_a_same_size_rewrite_with_its_time_put_back_is_stored_again_and_trained_on,
  test_pixel_cache.py::test_a_same_size_rewrite_with_its_times_put_back_is_seen (I)
- --deterministic and an op without a deterministic kernel:
  test_determinism.py::test_an_op_without_a_deterministic_implementation_is_named_and_settings_still_come_back (I, CPU);
  the CUDA kernel: test_gpu.py (a GPU only)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from test_resume import assert_same_training_state

from conftest import DIST_VARS, TESTS, run_job
from engine_helpers import LinReg, make_data
from pixelz_dist import WORKER_DIED_EXIT_CODE, ConfigError, SnapshotError, train_model
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot

pytestmark = pytest.mark.slow


def cli(*args, timeout=120, **popen):
    """``python -m pixelz_dist.train`` without the end-of-training curves (matplotlib: ~0.7 s of CPU per run)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "pixelz_dist.train", "--no-curves", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def image_folders(root, n=24, bad=None, empty=None):
    """``root/rgb/*.jpg`` and ``root/mask/*.png`` (real files); sample ``bad`` gets a corrupt JPEG (its head kept, the
    rest garbage), sample ``empty`` a zero-byte mask."""
    rgb, mask = root / "rgb", root / "mask"
    rgb.mkdir(parents=True)
    mask.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(rgb / f"{i:03d}.jpg", quality=90)
        Image.fromarray(rng.integers(0, 2, (16, 16), dtype=np.uint8) * 255).save(mask / f"{i:03d}.png")
    if bad is not None:
        data = (rgb / f"{bad:03d}.jpg").read_bytes()
        (rgb / f"{bad:03d}.jpg").write_bytes(data[:200] + b"\x00garbage" * 50)
    if empty is not None:
        (mask / f"{empty:03d}.png").write_bytes(b"")
    return [str(rgb), str(mask)]


def no_process_mentions(marker: str) -> bool:
    return not any(marker in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


MODEL = "pixelz_dist.cli.demo:TinySegNet"


# -- errors while DataLoader workers run end the process in seconds, with one line -----------------------------------
def test_a_corrupt_jpeg_read_by_a_worker_exits_2_in_seconds_with_one_line(tmp_path):
    folders = image_folders(tmp_path, bad=7)
    start = time.time()
    proc = cli("--model", "slow_data:TwoFolderNet", "--data", *folders, "--iters", "50", "--workers", "2",
               "--batch-size", "4", cwd=os.path.join(TESTS, "jobs"))
    elapsed = time.time() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot decode image" in errors[0] and "007.jpg" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, elapsed  # it hung forever before: the workers ignored SIGTERM at exit


@pytest.mark.parametrize("mode", ["model_raises", "ragged_caught"])
def test_an_error_with_workers_running_ends_the_process(tmp_path, mode):
    start = time.time()
    proc = run_job("failure_job.py", json.dumps({"mode": mode, "workers": 2}), timeout=60)
    elapsed = time.time() - start
    if mode == "model_raises":
        assert proc.returncode == 1 and "the model failed at call 3" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        expected = "caught: DataError: cannot make a batch: sample 13[0] has shape (5,), sample 12[0] has (4,)"
        assert expected in proc.stdout
    assert elapsed < 30, elapsed


def test_a_file_deleted_mid_epoch_is_named_and_the_process_ends(tmp_path):
    folders = image_folders(tmp_path, n=12)
    proc = run_job("failure_job.py", json.dumps({"mode": "file_deleted", "folders": folders, "workers": 2}),
                   timeout=60)
    assert proc.returncode == 1
    assert "cannot read image" in proc.stderr and "011.jpg" in proc.stderr and "No such file" in proc.stderr


def test_an_empty_file_says_it_is_empty_and_on_bad_file_skip_goes_on(tmp_path):
    folders = image_folders(tmp_path, empty=3)
    proc = cli("--model", "slow_data:TwoFolderNet", "--data", *folders, "--iters", "4", "--workers", "0",
               "--batch-size", "4", cwd=os.path.join(TESTS, "jobs"))
    assert proc.returncode == 2
    assert "003.png" in proc.stderr and "the file is empty (0 bytes)" in proc.stderr
    skipped = cli("--model", "slow_data:TwoFolderNet", "--data", *folders, "--iters", "4", "--workers", "0",
                  "--batch-size", "4", "--on-bad-file", "skip", cwd=os.path.join(TESTS, "jobs"))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipping sample 3 (on_error='skip')" in skipped.stderr


# -- a DataLoader worker killed by the kernel (the OOM killer's SIGKILL) or exiting by itself ------------------------
def worker_cli(tmp_path, name, *extra, delay=0.05):
    """The demo network on slow demo files with 2 workers, 40 iterations, a snapshot every 2, in the background."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "pixelz_dist.train", "--no-curves", "--model", MODEL, "--dataset",
                             "slow_data:make", "--dataset-arg", f"root={str(tmp_path / 'd')!r}", "--dataset-arg",
                             f"delay={delay}", "--iters", "40", "--workers", "2", "--batch-size", "2",
                             "--display-iter", "2", "--snapshot-interval", "2", "--snapshot-prefix",
                             str(tmp_path / name / "s"), *extra],
                            cwd=os.path.join(TESTS, "jobs"), env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout=120):
    try:
        rest = proc.stderr.read()
        return proc.wait(timeout=timeout), rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_worker_killed_by_the_kernel_exits_71_with_one_line_and_the_resume_is_exact(tmp_path):
    proc = worker_cli(tmp_path, "killed")
    try:
        wait_for_line(proc, "iter 4/")
        workers = [p for p in psutil.Process(proc.pid).children() if p.name() == "pt_data_worker"]
        assert len(workers) == 2
        victim = workers[0].pid
        os.kill(victim, signal.SIGKILL)  # what the OOM killer sends
    finally:
        code, rest = finish(proc)
    assert code == WORKER_DIED_EXIT_CODE == 71, rest[-3000:]
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, rest[-3000:]
    assert re.match(rf"error: DataLoader worker [01] \(pid {victim}\) was killed by signal 9 \(SIGKILL\): often out "
                    "of memory", errors[0]), errors[0]
    assert "--workers" in errors[0] and "--resume auto" in errors[0] and "memory" in errors[0]
    assert "Traceback" not in rest
    killed_at = list_snapshots(str(tmp_path / "killed" / "s"))[0][0]
    assert 4 <= killed_at < 40

    code, rest = finish(worker_cli(tmp_path, "killed", "--resume", "auto", delay=0))
    assert code == 0, rest[-3000:]
    assert f"resumed from {tmp_path / 'killed' / 's'}_iter_{killed_at}.pt" in rest
    code, rest = finish(worker_cli(tmp_path, "straight", delay=0))
    assert code == 0, rest[-3000:]
    (it_a, path_a), *_ = list_snapshots(str(tmp_path / "straight" / "s"))
    (it_b, path_b), *_ = list_snapshots(str(tmp_path / "killed" / "s"))
    assert it_a == it_b == 40
    assert_same_training_state(load_snapshot(path_a), load_snapshot(path_b))


@pytest.mark.parametrize("source", ["dataset", "user_loader", "find_lr"])
@pytest.mark.parametrize("mode", ["worker_killed", "worker_exits"])
def test_a_dead_worker_is_a_worker_died_error_naming_it_for_every_batch_source(mode, source):
    proc = run_job("failure_job.py", json.dumps({"mode": mode, "source": source, "workers": 2}), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    caught = json.loads(proc.stdout.strip().splitlines()[-1])
    assert caught["runtime_error"] and caught["exit_code"] == 71  # still a RuntimeError, as torch's error was
    assert caught["worker"] in (0, 1) and f"DataLoader worker {caught['worker']} (pid {caught['pid']})" in \
        caught["message"]
    if mode == "worker_killed":
        assert caught["pid"] == caught["victim"] and caught["signal"] == signal.SIGKILL
        assert "was killed by signal 9 (SIGKILL): often out of memory" in caught["message"]
    else:
        assert caught["exit_code_of_worker"] == 3 and caught["signal"] is None
        assert "exited with code 3" in caught["message"] and "--workers 0" in caught["message"]
    assert "Traceback" not in proc.stderr


# -- one rank's dataset raises under torchrun ------------------------------------------------------------------------
@pytest.mark.distributed
def test_one_rank_failing_with_workers_fails_the_whole_job_in_seconds(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(TESTS, "jobs", "dist_job.py"),
                           json.dumps({"num_iters": 40, "raise_rank": 1, "raise_at": 9, "workers": 1})],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's code when a worker failed
    assert "bad sample 9 on rank 1" in proc.stderr
    assert elapsed < 45, elapsed  # start-up + the failing rank's exit: never the job's 60 s dist_timeout, nor a hang


# -- the snapshot prefix belongs to one run --------------------------------------------------------------------------
def quick(prefix, n=4, **kw):
    model = LinReg()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, make_data(16), 4, num_iters=n,
                snapshot_prefix=str(prefix), num_workers=0, **kw)
    return model


def test_temporary_files_of_killed_writes_are_removed_at_the_next_start(tmp_path, caplog):
    prefix = tmp_path / "s"
    quick(prefix, snapshot_interval=2)
    script = f"""
import os, signal, torch
import pixelz_dist.checkpoint.file_format as ff
from pixelz_dist.checkpoint.file_format import save_snapshot, snapshot_path
real = torch.save
def save_then_die(obj, f, *a, **k):
    real(obj, f, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)   # killed before the rename: the temporary file stays
torch.save = save_then_die
save_snapshot({{"format_version": 2}}, snapshot_path({str(prefix)!r}, 6))
"""
    for _ in range(3):
        assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) == 3 and all(n.startswith(".s_iter_6.pt.") for n in leftovers)
    caplog.set_level("INFO", logger="pixelz_dist")
    quick(prefix, n=6, load_snapshot_path="auto")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert "removed 3 unfinished snapshot file(s)" in caplog.text


def test_a_fresh_run_into_a_prefix_with_snapshots_is_refused_or_sets_them_aside(tmp_path, caplog):
    prefix = tmp_path / "s"
    quick(prefix, snapshot_interval=2)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.endswith(".pt")}
    with pytest.raises(ConfigError, match=r"already holds 2 snapshot\(s\).*--resume auto.*another "
                                          r"snapshot_prefix.*overwrite=True \(--overwrite\)"):
        quick(prefix, n=2, keep_last=2)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.endswith(".pt")} == before
    caplog.set_level("WARNING", logger="pixelz_dist")
    quick(prefix, n=3, overwrite=True)
    assert [it for it, _ in list_snapshots(str(prefix))] == [3]
    aside = sorted(n.split(".old-")[0] for n in os.listdir(tmp_path) if ".old-" in n)
    assert aside == ["s_iter_2.pt", "s_iter_4.pt", "s_metrics.jsonl", "s_order.tsv"]
    assert "set aside 4 file(s)" in caplog.text
    cli_run = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--iters", "1",
                  "--workers", "0", "--snapshot-prefix", str(prefix))
    assert cli_run.returncode == 2 and cli_run.stderr.count("error:") == 1 and "--overwrite" in cli_run.stderr


def test_a_new_demo_run_sets_the_last_ones_snapshots_aside(tmp_path):
    """The demo's prefix is its own (--demo-dir/snapshots/demo): a new --demo run sets the last one's files aside
    (NAME.old-<time>) instead of refusing. --overwrite, the same switch, from the command line:
    test_resume_refusals.py::test_the_command_line_refuses_a_prefix_of_truncated_snapshots_with_exit_2."""
    demo = tmp_path / "demo"
    folder = demo / "snapshots"
    for iters in (1, 2):
        proc = cli("--demo", "--demo-dir", str(demo), "--demo-samples", "8", "--workers", "0", "--no-curves",
                   "--iters", str(iters))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [it for it, _ in list_snapshots(str(folder / "demo"))] == [iters]
    assert "overwrite=True: set aside 3 file(s) of an earlier run as NAME.old-" in proc.stderr, proc.stderr
    aside = sorted(n.split(".old-")[0] for n in os.listdir(folder) if ".old-" in n)
    assert aside == ["demo_iter_1.pt", "demo_metrics.jsonl", "demo_order.tsv"], os.listdir(folder)


def test_a_second_run_into_the_same_prefix_is_refused_and_a_killed_one_leaves_no_stuck_lock(tmp_path):
    prefix = str(tmp_path / "s")
    first = subprocess.Popen([sys.executable, "-m", "pixelz_dist.train", "--no-curves", "--model", MODEL,
                              "--dataset", "slow_data:make", "--dataset-arg", f"root={str(tmp_path / 'd')!r}",
                              "--dataset-arg", "delay=0.05", "--iters", "100000", "--workers", "0",
                              "--snapshot-prefix", prefix], cwd=os.path.join(TESTS, "jobs"),
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:
            if "training " in line:
                break
        second = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--iters", "1",
                     "--workers", "0", "--snapshot-prefix", prefix, "--resume", "auto")
        assert second.returncode == 2
        assert f"another run is writing snapshots to this prefix (pid {first.pid} on" in second.stderr
        first.kill()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    third = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--iters", "1",
                "--workers", "0", "--snapshot-prefix", prefix, "--resume", "auto")
    assert third.returncode == 0, third.stderr[-2000:]  # the kernel released the killed run's lock


def test_an_unwritable_prefix_is_refused_before_the_first_iteration(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    model = LinReg()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"cannot write snapshots to .*file.*HINT"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, make_data(16), 4, num_iters=50,
                    snapshot_prefix=str(tmp_path / "file" / "run" / "s"), num_workers=0)
    assert model.forwards == 0 and all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    proc = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--iters", "2", "--snapshot-prefix",
               str(tmp_path / "file" / "s"))
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr


# -- what a resume takes from the call -------------------------------------------------------------------------------
def test_a_changed_learning_rate_on_resume_is_applied_and_said(tmp_path, caplog):
    prefix = tmp_path / "s"
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_model(model, opt, sched, make_data(16), 4, num_iters=4, snapshot_prefix=str(prefix), num_workers=0,
                schedule_on_iter=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)  # two decays
    caplog.set_level("WARNING", logger="pixelz_dist")
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_model(model, opt, sched, make_data(16), 4, num_iters=5, snapshot_prefix=str(prefix), num_workers=0,
                schedule_on_iter=True, load_snapshot_path="auto")
    assert "lr 0.05 -> 0.5" in caplog.text and "momentum 0.9 -> 0.5" in caplog.text
    group = opt.param_groups[0]
    # the schedule went on from the snapshot's point (two decays, then a fifth step), scaled to the new rate
    assert group["lr"] == pytest.approx(0.125) and group["momentum"] == 0.5 and sched.base_lrs == [0.5]
    assert load_snapshot(f"{prefix}_iter_5.pt")["meta"]["hyperparameters"][0]["base_lr"] == 0.5


@pytest.mark.parametrize("first,second", [("adamw", "sgd"), ("sgd", "adamw")])
def test_resuming_with_another_optimizer_is_refused_before_anything_is_loaded(tmp_path, caplog, first, second):
    def make(name, model):
        return (torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "adamw"
                else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))

    prefix = tmp_path / "s"
    model = LinReg()
    train_model(model, make(first, model), None, make_data(16), 4, num_iters=2, snapshot_prefix=str(prefix),
                num_workers=0)
    model = LinReg()
    caplog.set_level("INFO", logger="pixelz_dist")
    names = {"adamw": "AdamW", "sgd": "SGD"}
    with pytest.raises(SnapshotError, match=rf"its optimizer is {names[first]}, this run's is {names[second]}"):
        train_model(model, make(second, model), None, make_data(16), 4, num_iters=4, snapshot_prefix=str(prefix),
                    num_workers=0, load_snapshot_path="auto")
    assert "resumed from" not in caplog.text and model.forwards == 0


def test_resuming_with_other_param_groups_is_refused_before_anything_is_loaded(tmp_path):
    """The same kind of optimizer, its parameters split into other groups: torch would load the state into the wrong
    parameters or fail half-way; the snapshot's groups and sizes are named instead."""
    prefix = tmp_path / "s"
    model = LinReg()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, make_data(16), 4, num_iters=2,
                snapshot_prefix=str(prefix), num_workers=0)
    model = LinReg()
    split = torch.optim.SGD([{"params": [model.lin.weight]}, {"params": [model.lin.bias], "lr": 0.01}], lr=0.05)
    with pytest.raises(SnapshotError, match=r"its optimizer has 1 parameter group\(s\) of \[2\] parameters, this "
                                            r"one 2 of \[1, 1\]\. HINT: build the optimizer with the same parameter "
                                            r"groups"):
        train_model(model, split, None, make_data(16), 4, num_iters=4, snapshot_prefix=str(prefix), num_workers=0,
                    load_snapshot_path="auto")
    assert model.forwards == 0 and [it for it, _ in list_snapshots(str(prefix))] == [2]


def test_an_optimizer_of_another_model_is_refused():
    model, other = LinReg(), LinReg()
    with pytest.raises(ConfigError, match=r"optimizer holds none of the model's parameters"):
        train_model(model, torch.optim.SGD(other.parameters(), lr=0.1), None, make_data(8), 4, num_iters=2,
                    num_workers=0)


# -- nothing is written before everything is checked -----------------------------------------------------------------
def test_an_invalid_invocation_leaves_the_saved_configuration_alone(tmp_path):
    prefix = str(tmp_path / "s")
    ok = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--iters", "2", "--workers", "0",
             "--snapshot-prefix", prefix)
    assert ok.returncode == 0, ok.stderr[-2000:]
    config = f"{prefix}_config.toml"
    saved = open(config).read()
    bad = cli("--config", config, "--resume", "auto", "--batch-size", "0", "--iters", "4")
    assert (bad.returncode, bad.stderr) == (2, "error: --batch-size must be >= 1, got 0\n")  # one line, when parsed
    assert open(config).read() == saved
    again = cli("--config", config, "--resume", "auto", "--iters", "4")
    assert again.returncode == 0, again.stderr[-2000:]


# -- a full disk -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(mount, options: str):
    """A tmpfs mounted at ``mount`` (root only: skipped elsewhere, failed where CI says this machine can mount)."""
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        if os.environ.get("PIXELZ_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(f"cannot mount a tmpfs: {made.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root ({made.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """1.2 MB of disk."""
    with tmpfs(tmp_path / "disk", "size=1200k") as mount:
        yield mount


class Wide(torch.nn.Module):
    """About 260 KB of weights (and as much of momentum): two snapshots fill the small disk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(256, 256)

    def forward(self, x, y):
        return ((self.lin(x) - y) ** 2).mean()


def test_a_full_disk_keeps_the_last_good_snapshot_and_says_which(small_disk):
    data = torch.utils.data.TensorDataset(torch.randn(32, 256), torch.randn(32, 256))
    model = Wide()
    prefix = str(small_disk / "s")
    with pytest.raises(SnapshotError, match=r"cannot write snapshot .*s_iter_6\.pt \(No space left on device\); the "
                                            r"last good snapshot is .*s_iter_4\.pt \(iteration 4\)"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), None, data, 4,
                    num_iters=10, snapshot_prefix=prefix, snapshot_interval=2, num_workers=0)
    assert [it for it, _ in list_snapshots(prefix)] == [4, 2]
    load_snapshot(f"{prefix}_iter_4.pt")  # intact
    assert not [n for n in os.listdir(small_disk) if n.endswith(".tmp")]


# -- Ctrl-C ----------------------------------------------------------------------------------------------------------
def slow_cli(tmp_path, delay, workers=2):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "pixelz_dist.train", "--no-curves", "--model", MODEL, "--dataset",
                             "slow_data:make", "--dataset-arg", f"root={str(tmp_path / 'd')!r}", "--dataset-arg",
                             f"delay={delay}", "--iters", "100000", "--workers", str(workers), "--batch-size", "2",
                             "--display-iter", "2", "--snapshot-prefix", str(tmp_path / "s")],
                            cwd=os.path.join(TESTS, "jobs"), env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_line(proc, text, timeout=90):
    deadline = time.time() + timeout
    for line in proc.stderr:
        if text in line:
            return
        assert time.time() < deadline, f"no {text!r} line"
    pytest.fail(f"the process ended without a {text!r} line")


@pytest.mark.parametrize("whole_group", [True, False], ids=["terminal", "main-process-only"])
def test_ctrl_c_finishes_the_step_writes_a_snapshot_and_exits_130(tmp_path, whole_group):
    proc = slow_cli(tmp_path, delay=0.01)
    try:
        wait_for_line(proc, "iter 4/")
        start = time.time()
        if whole_group:
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the trainer and its workers alike
        else:
            os.kill(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130, rest[-3000:]
    assert time.time() - start < 20
    assert "interrupted (Ctrl-C): snapshot at iteration" in rest
    assert [line for line in rest.splitlines() if line.startswith("stopped:")] == [
        next(line for line in rest.splitlines() if line.startswith("stopped:"))]
    assert "Traceback" not in rest and "DataLoader worker" not in rest  # the workers did not die first
    (stopped_at, path), = list_snapshots(str(tmp_path / "s"))
    assert stopped_at >= 4 and f"snapshot {path}" in rest
    assert no_process_mentions(str(tmp_path / "d"))


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    proc = slow_cli(tmp_path, delay=1.0, workers=0)  # each sample takes a second: the step is long
    try:
        wait_for_line(proc, "training ")
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        start = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130, rest[-3000:]
    assert time.time() - start < 5  # not the rest of the step (two seconds) and a snapshot
    assert "stopped at once (Ctrl-C twice)" in rest and "Traceback" not in rest
    assert list_snapshots(str(tmp_path / "s")) == []


# -- smaller ones ----------------------------------------------------------------------------------------------------
def test_snapshots_get_the_umask_mode_like_any_file(tmp_path):
    old = os.umask(0o022)
    try:
        quick(tmp_path / "s", n=2)
    finally:
        os.umask(old)
    assert oct(os.stat(f"{tmp_path}/s_iter_2.pt").st_mode & 0o777) == oct(0o644)


def test_a_shape_mismatch_hint_does_not_suggest_strict_load_and_no_strict_load_works(tmp_path):
    prefix = tmp_path / "s"
    ok = cli("--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-samples", "8", "--iters", "2", "--workers", "0",
             "--snapshot-prefix", str(prefix))
    assert ok.returncode == 0, ok.stderr[-2000:]
    wider = cli("--model", MODEL, "--model-arg", "width=4", "--dataset", "slow_data:make", "--dataset-arg",
                f"root={str(tmp_path / 'demo')!r}", "--iters", "3", "--workers", "0", "--snapshot-prefix",
                str(prefix), "--resume", "auto", cwd=os.path.join(TESTS, "jobs"))
    assert wider.returncode == 2
    assert "shape mismatches" in wider.stderr and "strict_load" not in wider.stderr
    assert "same sizes" in wider.stderr
    plus = ("--model", "slow_data:TinySegNetPlus", "--dataset", "slow_data:make", "--dataset-arg",
            f"root={str(tmp_path / 'demo')!r}", "--iters", "3", "--workers", "0", "--snapshot-prefix", str(prefix),
            "--resume", "auto")
    strict = cli(*plus, cwd=os.path.join(TESTS, "jobs"))
    assert strict.returncode == 2 and "missing from the snapshot: ['calibration']" in strict.stderr
    assert "--no-strict-load" in strict.stderr
    relaxed = cli(*plus, "--no-strict-load", cwd=os.path.join(TESTS, "jobs"))
    assert relaxed.returncode == 0, relaxed.stderr[-2000:]
    assert list_snapshots(str(prefix))[0][0] == 3


@pytest.fixture
def read_only_folder(tmp_path):
    """Read-only: root cannot write there either (plain permissions do not stop root)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        yield mount


def test_a_read_only_prefix_is_refused_before_the_first_iteration(read_only_folder):
    model = LinReg()
    with pytest.raises(ConfigError, match=r"cannot write snapshots to .*ro.*Read-only file system"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.05), None, make_data(16), 4, num_iters=50,
                    snapshot_prefix=str(read_only_folder / "s"), num_workers=0)
    assert model.forwards == 0
