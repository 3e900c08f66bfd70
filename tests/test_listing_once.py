"""One listing of the data folders per job: rank 0 lists and pairs them, the other ranks receive the table.

Who lists is seen by a ``sitecustomize.py`` (tests/jobs/listing_spy) that every Python process of the job imports at
start-up: it logs ``pid RANK path`` for each ``os.scandir`` / ``os.listdir`` of a folder under the test's folder.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from conftest import TESTS
from test_distributed import TORCHRUN, assert_bitwise_equal, final, free_port, job_env
from test_failures import image_folders

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

JOBS = os.path.join(TESTS, "jobs")
SPY = os.path.join(JOBS, "listing_spy")


def spied_env(root, log):
    env = job_env()
    env["PYTHONPATH"] = os.pathsep.join([SPY, JOBS] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(LISTING_SPY_ROOT=str(root), LISTING_SPY_LOG=str(log))
    return env


def listings(log, folders):
    """``{folder: [(pid, rank), ...]}``: who listed each of ``folders``, in order."""
    seen = defaultdict(list)
    for line in log.read_text().splitlines() if log.exists() else []:
        pid, rank, path = line.split(" ", 2)
        if path in folders:
            seen[path].append((int(pid), rank))
    return dict(seen)


def cli(args, env, timeout=180):
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pixelz_dist.train", *args],
                          env=env, cwd=JOBS, capture_output=True, text=True, timeout=timeout)


def test_the_command_line_lists_the_data_folders_in_rank_0_only(tmp_path):
    folders = image_folders(tmp_path / "data", n=16)
    log = tmp_path / "listings.log"
    proc = cli(["--model", "slow_data:TwoFolderNet", "--data", *folders, "--iters", "2", "--batch-size", "4",
                "--workers", "1", "--snapshot-prefix", str(tmp_path / "s")], spied_env(tmp_path / "data", log))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = listings(log, folders)
    assert sorted(seen) == sorted(folders), log.read_text()
    assert all(who == [seen[folders[0]][0]] for who in seen.values()), seen  # once each, by one process
    assert seen[folders[0]][0][1] == "0", seen


def test_rank_0s_listing_error_reaches_every_rank_at_once_and_is_printed_once(tmp_path):
    """The folders do not pair: rank 1 raises rank 0's error from the store instead of waiting out the collective
    timeout (600 s here: the test's 120 s limit would expire first)."""
    folders = image_folders(tmp_path / "data", n=6)
    os.remove(os.path.join(folders[1], "004.png"))
    log = tmp_path / "listings.log"
    proc = cli(["--model", "slow_data:TwoFolderNet", "--data", *folders, "--iters", "2"],
               {**spied_env(tmp_path / "data", log), "PIXELZ_DIST_TIMEOUT": "600"}, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's code for failed workers
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: image folders do not hold the same file stems: {folders[0]!r} has 6 files, "
                      f"{folders[1]!r} has 5 files; missing from {folders[1]!r}: '004'"], errors
    assert "exitcode  : 2" in proc.stderr  # rank 0's own exit code in torchrun's summary
    seen = listings(log, folders)
    assert {who for w in seen.values() for who in w} == {seen[folders[0]][0]} and seen[folders[0]][0][1] == "0", seen


@pytest.fixture(scope="module")
def api_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, image_folders(root / "data", n=24)


def api_run(api_folders, shared):
    """The Python API under torchrun: the dataset built before train_model makes the group, with a DataLoader
    worker per rank; ``(out folder, who listed what)``."""
    root, folders = api_folders
    out = root / f"shared_{shared}"
    out.mkdir()
    log = out / "listings.log"
    cfg = {"dirs": folders, "out": str(out), "prefix": str(out / "s"), "shared": shared, "workers": 1}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", os.path.join(JOBS, "listing_job.py"),
                           json.dumps(cfg)], env=spied_env(root / "data", log), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, listings(log, folders)


@pytest.fixture(scope="module")
def shared_run(api_folders):
    return api_run(api_folders, True)


@pytest.fixture(scope="module")
def own_listing_run(api_folders):
    return api_run(api_folders, False)


def test_the_python_api_under_torchrun_lists_once_and_both_ranks_hold_the_same_table(api_folders, shared_run):
    _, folders = api_folders
    out, seen = shared_run
    assert sorted(seen) == sorted(folders) and {who for w in seen.values() for who in w} == {seen[folders[0]][0]}
    assert seen[folders[0]][0][1] == "0"
    tables = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1]
    assert tables[0]["types"] == ["StringTable", "FileColumn", "FileColumn"]
    assert tables[0]["stems"] == [f"{i:03d}" for i in range(24)]
    assert tables[0]["files"][1] == [os.path.join(folders[1], f"{i:03d}.png") for i in range(24)]


def test_training_on_the_handed_over_table_equals_training_on_each_ranks_own_listing(shared_run, own_listing_run):
    assert {rank for w in own_listing_run[1].values() for _, rank in w} == {"0", "1"}  # the spy sees both ranks
    assert_bitwise_equal(final(str(shared_run[0] / "s")), final(str(own_listing_run[0] / "s")))


def test_with_a_process_group_of_the_users_and_no_torchrun_store_rank_0s_table_is_broadcast(tmp_path):
    """Two plain processes (env://, as srun starts them) that make their group before building the dataset."""
    folders = image_folders(tmp_path / "data", n=16)
    log = tmp_path / "listings.log"
    cfg = {"dirs": folders, "out": str(tmp_path), "prefix": str(tmp_path / "s"), "user_group": True}
    env = {**spied_env(tmp_path / "data", log), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, os.path.join(JOBS, "listing_job.py"), json.dumps(cfg)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    seen = listings(log, folders)
    assert {who for w in seen.values() for who in w} == {(procs[0].pid, "0")}, seen
    tables = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1] and len(tables[0]["stems"]) == 16
