"""Multi-node training on a real 2-node cluster on this machine (launch/local_cluster/): every node a network namespace
with its own address, hostname, hosts file and slurmd.

Needs root, iproute2, util-linux and Debian's slurmctld, slurmd, slurm-client and munge packages; skipped with the
reason elsewhere, and failed instead when PIXELZ_REQUIRE_MULTINODE=1 (set by .ci/run in CI as root, and elsewhere where
`ip netns add` works).
One cluster serves the whole module. Every run is compared with ``torch.equal`` against an uninterrupted run on one
node with the same global batch (2 gloo processes on the CPU).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from conftest import DIST_VARS, TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from test_slurm import parse_job_state, wait_for_job_end

REPO = os.path.dirname(TESTS)
CLUSTER_TOOL = os.path.join(REPO, "launch", "local_cluster")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
NODES = ("node1", "node2")
# The demo network on the demo's files, each sample `delay` s slower (tests/jobs/slow_data.py), so that a run lasts
# long enough to be killed, cut off or signalled mid-epoch: 16 samples, global batch 8, 2 iterations per epoch.
SLOW = ["--model", "pixelz_dist.demo:TinySegNet", "--dataset", "slow_data:make", "--batch-size", "4", "--seed", "5",
        "--optimizer", "adamw", "--lr", "0.003", "--scheduler", "cosine", "--snapshot-interval", "1",
        "--no-curves"]  # no matplotlib at the end of each run: ~0.7 s of CPU that proves nothing here

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.multinode]


def _missing() -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    tools = [t for t in ("ip", "nsenter", "unshare", "mountpoint", "munged", "slurmctld", "slurmd", "sbatch")
             if not shutil.which(t, path=path)]
    if tools:
        return (f"not installed: {', '.join(tools)} (apt-get install iproute2 util-linux slurmctld slurmd "
                "slurm-client munge)")
    if os.geteuid() != 0:
        return "the local cluster needs root (network namespaces, mounts, munged and slurmd)"
    mounted = _netns_mounted()
    probe = subprocess.run(["ip", "netns", "add", f"pxc-probe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", f"pxc-probe-{os.getpid()}"], check=True)
    if not mounted and _netns_mounted() and not os.listdir("/run/netns"):
        subprocess.run(["umount", "/run/netns"], check=True)  # ip mounted it on itself for the probe: undo
    return None


def _netns_mounted() -> bool:
    """Whether /run/netns is a mount point (ip mounts it on itself: os.path.ismount cannot tell)."""
    return any(line.split()[4] == "/run/netns" for line in open("/proc/self/mountinfo"))


def _skip_or_fail():
    reason = _missing()
    if reason and os.environ.get("PIXELZ_REQUIRE_MULTINODE") == "1":  # .ci/run: in CI as root, or namespaces work
        pytest.fail(f"PIXELZ_REQUIRE_MULTINODE=1 but {reason}")
    if reason:
        pytest.skip(reason)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith(("SLURM_", "PIXELZ_"))}
    env.update(PATH=env["PATH"] + ":/usr/sbin:/sbin", OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(TESTS, "jobs"),
               PYTHON=sys.executable, **extra)
    return env


def netns_of(folder) -> dict:
    text = open(os.path.join(folder, "cluster.env")).read()
    return dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', text, re.M))


class Cluster:
    """The running cluster: run commands on its nodes, kill a node's processes, cut a node's link."""

    def __init__(self, folder: str):
        self.folder = folder
        self.prefix = netns_of(folder)["NS_PREFIX"]
        self.subnet = netns_of(folder)["SUBNET"]
        self.env = clean_env(SLURM_CONF=os.path.join(folder, "slurm.conf"))

    def popen(self, node, *cmd, log, **env) -> subprocess.Popen:
        return subprocess.Popen([os.path.join(CLUSTER_TOOL, "on.sh"), self.folder, node, *cmd], cwd=REPO,
                                env={**self.env, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def run(self, node, *cmd, timeout=60, **env) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(CLUSTER_TOOL, "on.sh"), self.folder, node, *cmd], cwd=REPO,
                              env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)

    def job_state(self, job_id) -> tuple[str, int]:
        return parse_job_state(self.run("node1", "scontrol", "-o", "show", "job", job_id).stdout)

    def wait_job(self, job_id, out, timeout=300) -> int:
        """The job's exit code once it ended for good (after any requeued runs)."""
        return wait_for_job_end(lambda: self.job_state(job_id), job_id, out, timeout)

    def pids(self, node) -> set[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{self.prefix}-{node}"], capture_output=True, text=True,
                             check=True).stdout
        return {int(p) for p in out.split()}

    def daemons(self) -> set[int]:
        """slurmctld, the slurmds and their helpers (slurmscriptd)."""
        pids = set()
        for name in os.listdir(self.folder):
            if name.endswith(".pid"):
                pid = int(open(os.path.join(self.folder, name)).read())
                pids |= {pid, *(child.pid for child in psutil.Process(pid).children())}
        return pids

    def kill_node(self, node) -> int:
        """A node loss: SIGKILL every process in the node's network at once (its slurmd aside, which the later
        tests still need); returns how many were killed."""
        victims = self.pids(node) - self.daemons()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def link(self, node, state):
        subprocess.run(["ip", "-n", f"{self.prefix}-{node}", "link", "set", "eth0", state], check=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running 2-node cluster (network and SLURM) for the whole module; stopped at the end."""
    _skip_or_fail()
    folder = str(tmp_path_factory.mktemp("cluster"))
    host = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    subnet = next(s for s in ("10.213.7", "10.213.17", "172.31.213", "192.168.213") if f"{s}." not in host)
    start = subprocess.run([os.path.join(CLUSTER_TOOL, "start.sh"), "2", folder], env=clean_env(SUBNET=subnet),
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        c = Cluster(folder)
        # A first job waits for the scheduler's first pass; take that wait here, so the tests' jobs start at once.
        warm = c.run("node1", "srun", "-N2", "hostname", timeout=120)
        assert warm.returncode == 0 and sorted(warm.stdout.split()) == ["node1", "node2"], warm.stdout + warm.stderr
        yield c
    finally:
        subprocess.run([os.path.join(CLUSTER_TOOL, "stop.sh"), folder], env=clean_env(), timeout=120)


def final(prefix):
    return load_snapshot(list_snapshots(prefix)[0][1])


def assert_equal_runs(a, b):
    """Weights, optimizer state, counters and data position, bitwise."""
    assert a["progress"] == b["progress"]
    assert (a["data"]["epoch"], a["data"]["position"]) == (b["data"]["epoch"], b["data"]["position"])
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, state in b["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(a["optimizer"]["state"][pid][name], value), (pid, name)


def one_node(*args, module="pixelz_dist.train", timeout=300) -> subprocess.CompletedProcess:
    """The reference: one node (the host), 2 processes."""
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", module, *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def two_nodes(cluster, tmp_path, name, *args, **env) -> list[subprocess.Popen]:
    """launch/torchrun_multi_node.sh on both nodes, 1 process each, rendezvous at node1; logs in tmp_path."""
    env = {"NNODES": "2", "HEAD_ADDR": "node1", "JOB_ID": name, "NPROC": "1", **env}
    return [cluster.popen(node, "launch/torchrun_multi_node.sh", *args, log=tmp_path / f"{name}_{node}.log", **env)
            for node in NODES]


def wait_all(procs, timeout=300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def logs(tmp_path, name) -> str:
    return "\n".join(f"--- {name} {node}:\n" + (tmp_path / f"{name}_{node}.log").read_text() for node in NODES)


def wait_for_snapshot(prefix, procs, timeout=120):
    deadline = time.time() + timeout
    while not list_snapshots(prefix):
        assert all(p.poll() is None for p in procs), "a node ended before its first snapshot"
        assert time.time() < deadline, "no snapshot yet"
        time.sleep(0.1)


# -- the cluster tool ---------------------------------------------------------------------------------------------
def test_start_and_stop_a_three_node_cluster_leave_nothing_behind(tmp_path):
    _skip_or_fail()
    folder = str(tmp_path / "c3")

    def leftovers():
        mounts = [line for line in open("/proc/self/mountinfo") if "netns" in line or "pxc-t3" in line]
        netns = [n for n in os.listdir("/run/netns") if n.startswith("pxc-t3")] if os.path.isdir("/run/netns") else []
        procs = subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True).stdout.split()
        return mounts, netns, procs

    before = leftovers()
    env = clean_env(SUBNET="10.213.9", NS_PREFIX="pxc-t3", SLURMCTLD_PORT="6917", SLURMD_PORT="6918")
    start = subprocess.run([os.path.join(CLUSTER_TOOL, "start.sh"), "3", folder], env=env, capture_output=True,
                           text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert "node3=10.213.9.3" in start.stdout
        c = Cluster(folder)
        assert c.run("node2", "hostname").stdout.strip() == "node2"
        # node3 reaches node1 by name over the bridge (bash's /dev/tcp: slurmctld listens on node1:6917)
        reach = c.run("node3", "bash", "-c", "getent hosts node1 && exec 3<>/dev/tcp/node1/6917 && echo open")
        assert reach.returncode == 0 and "10.213.9.1" in reach.stdout and "open" in reach.stdout, reach.stderr
        assert not os.path.exists("/etc/hosts") or "node1" not in open("/etc/hosts").read()  # the host's untouched
        hosts = c.run("node1", "srun", "-N3", "hostname", timeout=120)
        assert sorted(hosts.stdout.split()) == ["node1", "node2", "node3"], hosts.stdout + hosts.stderr
        again = subprocess.run([os.path.join(CLUSTER_TOOL, "start.sh"), "3", folder], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode != 0 and "stop.sh" in again.stderr  # refuses to start twice in one folder
        assert c.pids("node3")  # node3's slurmd
    finally:
        stop = subprocess.run([os.path.join(CLUSTER_TOOL, "stop.sh"), folder], env=env, capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert leftovers() == before
    assert os.path.exists(os.path.join(folder, "log", "slurmd_node3.log"))  # the logs stay
    assert subprocess.run([os.path.join(CLUSTER_TOOL, "stop.sh"), folder], env=env).returncode == 0  # twice: fine


def test_start_refuses_a_subnet_the_host_already_uses(tmp_path):
    _skip_or_fail()
    host = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    subnet = re.search(r"inet (\d+\.\d+\.\d+)\.\d+", host).group(1)  # 127.0.0 at least
    try:
        proc = subprocess.run([os.path.join(CLUSTER_TOOL, "start.sh"), "2", str(tmp_path / "c")],
                              env=clean_env(SUBNET=subnet, SLURM="0"), capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run([os.path.join(CLUSTER_TOOL, "stop.sh"), str(tmp_path / "c")], timeout=60)
    assert proc.returncode != 0 and "HINT: choose another SUBNET" in proc.stderr
    assert not os.path.exists(tmp_path / "c" / "cluster.env")


def test_a_failed_start_stops_what_it_started(tmp_path):
    _skip_or_fail()
    env = clean_env(NS_PREFIX="pxc-tf", SUBNET="10.213.10", SLURMD_PORT="notaport")  # slurmctld refuses the config
    proc = subprocess.run([os.path.join(CLUSTER_TOOL, "start.sh"), "2", str(tmp_path / "c")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SlurmdPort" in proc.stderr
    assert not [n for n in os.listdir("/run/netns") if n.startswith("pxc-tf")] if os.path.isdir("/run/netns") else True
    assert not os.path.exists(tmp_path / "c" / "cluster.env")
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "c")], capture_output=True).stdout


# -- torchrun across nodes ----------------------------------------------------------------------------------------
def test_two_nodes_train_exactly_like_one_node_with_the_same_global_batch(cluster, tmp_path, reference):
    """The module's reference run (one node, 2 processes) against the same run on 2 nodes x 1 process, with a
    DataLoader worker each."""
    prefix = str(tmp_path / "s")
    run = slow_run(tmp_path, "--dataset-arg", "delay=0", "--workers", "1", "--snapshot-prefix", prefix)
    # the interface named, as on nodes with several (docker0, InfiniBand): gloo binds to it, the scripts pass it on
    procs = two_nodes(cluster, tmp_path, "two", *run, GLOO_SOCKET_IFNAME="eth0")
    assert wait_all(procs) == [0, 0], logs(tmp_path, "two")
    assert "2 processes" in logs(tmp_path, "two")
    assert [it for it, _ in list_snapshots(prefix)][:2] == [30, 28]  # a snapshot after each epoch of 2 iterations
    assert_equal_runs(final(prefix), reference)


def test_find_lr_on_two_nodes_records_the_losses_of_one_node(cluster, tmp_path):
    common = ["--demo", "--demo-samples", "16", "--batch-size", "4", "--num-runs", "3", "--iter-per-run", "2",
              "--min-lr", "1e-3", "--max-lr", "1", "--workers", "0", "--seed", "3"]
    procs = two_nodes(cluster, tmp_path, "lr", *common, "--demo-dir", str(tmp_path / "two"),
                      MODULE="pixelz_dist.find_lr")
    assert wait_all(procs) in ([0, 0], [1, 1]), logs(tmp_path, "lr")  # 1: no suggestion from so short a search
    one_node(*common, "--demo-dir", str(tmp_path / "one"), module="pixelz_dist.find_lr")
    two = np.load(tmp_path / "two" / "lr_finder" / "results.npz")
    one = np.load(tmp_path / "one" / "lr_finder" / "results.npz")
    np.testing.assert_array_equal(two["lrs"], one["lrs"])
    np.testing.assert_array_equal(two["losses"], one["losses"])


# -- node loss ----------------------------------------------------------------------------------------------------
def slow_run(tmp_path, *extra) -> list[str]:
    """15 epochs of 2 iterations, a snapshot after each; the samples load slowly (delay 0.03 s) unless told."""
    return [*SLOW, "--dataset-arg", f"root='{tmp_path / 'data'}'", "--epochs", "15", *extra]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run on one node (2 processes, no DataLoader workers: the result does not depend on them)."""
    folder = tmp_path_factory.mktemp("reference")
    one_node(*slow_run(folder, "--dataset-arg", "delay=0", "--workers", "0", "--snapshot-prefix", str(folder / "s")))
    ref = final(str(folder / "s"))
    assert ref["progress"]["iteration"] == 30
    return ref


def node_loss(cluster, procs, prefix) -> float:
    """Wait for the first snapshot, then SIGKILL every process of node2; seconds until node1's torchrun ended."""
    wait_for_snapshot(prefix, procs)
    time.sleep(0.3)  # into the next iteration: mid-epoch
    start = time.monotonic()
    assert cluster.kill_node("node2") > 0
    procs[0].wait(timeout=300)
    elapsed = time.monotonic() - start
    procs[1].wait(timeout=30)
    return elapsed


def test_node_loss_ends_the_other_node_in_seconds_and_a_rerun_resumes_exactly(cluster, tmp_path, reference):
    """With DataLoader workers running: node1's trainer names the lost peer and exits at once (no hang in its
    workers' join, no waiting for the 300 s collective timeout), and nothing of the job is left on node1."""
    prefix = str(tmp_path / "s")
    run = slow_run(tmp_path, "--dataset-arg", "delay=0.03", "--workers", "2", "--snapshot-prefix", prefix)
    procs = two_nodes(cluster, tmp_path, "loss", *run, PIXELZ_DIST_TIMEOUT="300")
    elapsed = node_loss(cluster, procs, prefix)
    log = logs(tmp_path, "loss")
    assert procs[0].returncode != 0, log
    assert elapsed < 30, f"node1 took {elapsed:.1f} s to end after node2 was lost\n{log}"
    assert "Connection reset by peer" in log or "Connection closed by peer" in log, log
    assert f"{cluster.subnet}.2]" in log  # gloo names the lost peer's address
    assert "another process of the job is gone" in log and "--resume auto" in log  # and what to do
    assert cluster.pids("node1") <= cluster.daemons()  # no trainer, DataLoader worker or agent left behind
    stopped = list_snapshots(prefix)[0][0]
    assert 1 <= stopped < 30

    rerun = two_nodes(cluster, tmp_path, "rerun", *run, "--resume", "auto", JOB_ID="rerun")
    assert wait_all(rerun) == [0, 0], logs(tmp_path, "rerun")
    assert f"resumed from {prefix}_iter_{stopped}.pt" in logs(tmp_path, "rerun")
    assert_equal_runs(final(prefix), reference)


def test_elastic_restart_of_the_lost_node_resumes_exactly(cluster, tmp_path, reference):
    """torchrun --max-restarts=1 on both nodes: node2 is lost, its agent started again (as a scheduler would on a
    replacement node); node1's agent restarts its worker, both join the next rendezvous round and resume."""
    prefix = str(tmp_path / "s")
    run = slow_run(tmp_path, "--dataset-arg", "delay=0.03", "--workers", "1", "--snapshot-prefix", prefix,
                   "--resume", "auto")
    procs = two_nodes(cluster, tmp_path, "elastic", *run, MAX_RESTARTS="1")
    wait_for_snapshot(prefix, procs)
    time.sleep(0.3)
    assert cluster.kill_node("node2") > 0
    procs[1].wait(timeout=30)
    again = cluster.popen("node2", "launch/torchrun_multi_node.sh", *run, log=tmp_path / "elastic_again.log",
                          NNODES="2", HEAD_ADDR="node1", JOB_ID="elastic", NPROC="1", MAX_RESTARTS="1")
    codes = [procs[0].wait(timeout=300), again.wait(timeout=300)]
    log = logs(tmp_path, "elastic") + (tmp_path / "elastic_again.log").read_text()
    assert codes == [0, 0], log
    assert log.count("resumed from") == 1  # node1's rank 0, in the restarted group
    assert_equal_runs(final(prefix), reference)


# -- SLURM across 2 nodes -----------------------------------------------------------------------------------------
def test_sbatch_on_two_nodes_preempted_with_usr1_requeues_resumes_and_equals_one_node(cluster, tmp_path, reference):
    """SLURM's warning as SLURM sends it (to the batch shell: scancel --signal=USR1 --batch) reaches the trainers on
    both nodes through srun and torchrun; one snapshot; exit 75; the job requeues itself and resumes exactly."""
    prefix = str(tmp_path / "s")
    out = tmp_path / "job.out"
    run = slow_run(tmp_path, "--dataset-arg", "delay=0.03", "--workers", "1", "--snapshot-prefix", prefix)
    sub = cluster.run("node1", "sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={out}",
                      "launch/slurm_train.sbatch", *run, NPROC="1")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 120
        while not list_snapshots(prefix):  # the first epoch's snapshot: training is under way on both nodes
            assert cluster.job_state(job_id)[0] in ("PENDING", "RUNNING") and time.time() < deadline, (
                out.read_text() if out.exists() else "")
            time.sleep(0.2)
        signalled = cluster.run("node1", "scancel", "--signal=USR1", "--batch", job_id)
        assert signalled.returncode == 0, signalled.stderr
        code = cluster.wait_job(job_id, out)
    finally:
        if cluster.job_state(job_id)[0] in ("PENDING", "RUNNING", "REQUEUED"):
            cluster.run("node1", "scancel", job_id)
    log = out.read_text()
    assert code == 0, log
    assert "on 2 node(s) x 1 process(es), rendezvous at node1:" in log and "2 processes" in log
    assert "preemption warning (USR1)" in log and f"requeueing job {job_id}" in log and "(restart 1)" in log
    assert log.count("closing signal SIGUSR1") == 2  # torchrun's agent on each node passed it to its trainer
    assert log.count("SIGUSR1 received; snapshot at iteration") == 1  # one snapshot, written once for both ranks
    stopped_at = int(re.search(r"SIGUSR1 received; snapshot at iteration (\d+)", log).group(1))
    assert 1 <= stopped_at < 30 and f"resumed from {prefix}_iter_{stopped_at}.pt" in log
    assert_equal_runs(final(prefix), reference)


# -- network partition (last: it cuts node2 off the cluster for a while) -------------------------------------------
def test_a_partition_fails_within_the_collective_timeout_and_resumes_exactly_afterwards(cluster, tmp_path, reference):
    """node2's link goes down, no process dies: node1's collective gives up after PIXELZ_DIST_TIMEOUT (5 s) and names
    it. node2's trainer fails the same way, but its torchrun agent waits for the rendezvous store on node1 until the
    link is back (then it exits). A rerun with --resume auto then ends exactly like the uninterrupted run."""
    prefix = str(tmp_path / "s")
    run = slow_run(tmp_path, "--dataset-arg", "delay=0.03", "--workers", "1", "--snapshot-prefix", prefix)
    procs = two_nodes(cluster, tmp_path, "cut", *run, PIXELZ_DIST_TIMEOUT="5")
    wait_for_snapshot(prefix, procs)
    time.sleep(0.3)
    start = time.monotonic()
    cluster.link("node2", "down")
    try:
        procs[0].wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        cluster.link("node2", "up")
    procs[1].wait(timeout=120)  # node2's agent reaches node1 again: the store is gone, it exits
    log = logs(tmp_path, "cut")
    assert procs[0].returncode != 0 and procs[1].returncode != 0, log
    assert 4 < elapsed < 30, f"node1 ended {elapsed:.1f} s after the link went down\n{log}"
    assert "stopped answering for the collective timeout (5 s, PIXELZ_DIST_TIMEOUT)" in log, log
    stopped = list_snapshots(prefix)[0][0]

    rerun = two_nodes(cluster, tmp_path, "after", *run, "--resume", "auto", JOB_ID="after")
    assert wait_all(rerun) == [0, 0], logs(tmp_path, "after")
    assert f"resumed from {prefix}_iter_{stopped}.pt" in logs(tmp_path, "after")
    assert_equal_runs(final(prefix), reference)
