"""train_model with a DataLoader the user built: sampling is theirs, the resumed position must still be exact."""

import json
import os
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from conftest import TESTS
from pixelz_dist import train_model
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.data.batch_source import stop_workers
from pixelz_dist.data.sampler import ResumableBatchSampler
from pixelz_dist.data.user_loader import UserLoaderSource
from pixelz_dist.distributed.env import DistEnv
from pixelz_dist.errors import ConfigError, DataError, SnapshotError
from test_distributed import python_job, torchrun

LOADER_JOB = os.path.join(TESTS, "jobs", "loader_job.py")
FORMAT2 = os.path.join(TESTS, "fixtures", "format2")


class Indexed(Dataset):
    def __init__(self, n=30, augment=False):
        g = torch.Generator().manual_seed(4)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)
        self.augment = augment

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + (0.1 * torch.randn(5) if self.augment else 0)  # global RNG: exact with num_workers=0
        return x, self.y[i], torch.tensor(i)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.seen = []

    def forward(self, x, y, i):
        self.seen.extend(i.tolist())
        return nn.functional.mse_loss(self.net(x), y)


class StatefulShuffle(Sampler):
    """A sampler with its own state: a permutation per epoch from a counter it keeps."""

    def __init__(self, n):
        self.n, self.epochs = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.epochs += 1
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + self.epochs))
        return iter(order.tolist())

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = state["epochs"]


class Unstateful(Sampler):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n))


def train(loader_factory, prefix, n_iters, iter_size=1, **kw):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.7)
    train_model(model, opt, sched, loader_factory(), None, num_iters=n_iters, iter_size=iter_size,
                snapshot_prefix=prefix, **kw)
    return model


def assert_split_run_equals_straight(tmp_path, loader_factory, stop_at=4, total=13, iter_size=1):
    """Stop mid-epoch (30 samples / batch 4 = 8 batches per epoch), resume in a fresh model + loader, compare."""
    straight = train(loader_factory, str(tmp_path / "a"), total, iter_size)
    first = train(loader_factory, str(tmp_path / "b"), stop_at, iter_size)
    resumed = train(loader_factory, str(tmp_path / "b"), total, iter_size, load_snapshot_path="auto")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert first.seen + resumed.seen == straight.seen  # every sample exactly once, in the same order


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_dataloader_resumes_mid_epoch_exactly(tmp_path, workers):
    """DataLoader(shuffle=True) without a generator draws its order from the global RNG at the epoch's start."""
    assert_split_run_equals_straight(
        tmp_path, lambda: DataLoader(Indexed(augment=workers == 0), batch_size=4, shuffle=True, num_workers=workers))


def test_a_stateful_sampler_resumes_mid_epoch_exactly(tmp_path):
    assert_split_run_equals_straight(tmp_path, lambda: DataLoader(Indexed(), batch_size=4,
                                                                  sampler=StatefulShuffle(30)), iter_size=3)


@pytest.mark.slow
def test_torchdata_stateful_dataloader_resumes_mid_epoch_exactly(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    loaders = []

    def factory():
        loaders.append(StatefulDataLoader(Indexed(), batch_size=4, shuffle=True, num_workers=2))
        return loaders[-1]

    try:
        assert_split_run_equals_straight(tmp_path, factory, stop_at=5)
    finally:
        # Each loader keeps its last iterator, and its 2 workers, for its state_dict: stop them here. Left to the
        # garbage collector (pytest's last collection, at exit), torchdata's shutdown waits 5 s for each worker.
        for loader in loaders:
            stop_workers(loader._iterator)


def test_our_sampler_as_a_batch_sampler(tmp_path):
    assert_split_run_equals_straight(tmp_path, lambda: DataLoader(
        Indexed(), batch_sampler=ResumableBatchSampler(30, 4, shuffle=True, seed=3, with_seeds=False)))


def test_an_unrestorable_sampler_is_refused_mid_epoch_and_restore_dataloader_false_goes_on(tmp_path):
    def factory():
        return DataLoader(Indexed(), batch_size=4, sampler=Unstateful(30))

    train(factory, str(tmp_path / "s"), 3)
    with pytest.raises(SnapshotError, match=r"3 batches into an epoch.*Unstateful has no state_dict"):
        train(factory, str(tmp_path / "s"), 6, load_snapshot_path="auto")
    model = train(factory, str(tmp_path / "s"), 6, load_snapshot_path="auto", restore_dataloader=False)
    assert model.seen[:4] == [0, 1, 2, 3]  # the next epoch from its start


def test_an_iterable_dataset_loader_without_length_gets_short_tail_windows(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(5)
            for i in range(10):
                yield torch.randn(5, generator=g), torch.randn(1, generator=g), torch.tensor(i)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = []

    from pixelz_dist import Callback

    class Count(Callback):
        def on_after_backward(self, state):
            steps.append(len(state.model.seen))

    train_model(model, opt, None, DataLoader(Stream(), batch_size=1), None, num_epochs=2, iter_size=4,
                callbacks=[Count()])
    assert steps == [4, 8, 10, 14, 18, 20]  # windows of 4, 4 and 2 batches per epoch


def test_dataloader_arguments_that_clash_are_named():
    loader = DataLoader(Indexed(), batch_size=4)
    model = Net()
    with pytest.raises(ConfigError, match=r"shuffle=True, batch_size=8 \(the DataLoader.s is 4\)"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, loader, 8, shuffle=True,
                    num_iters=1)


def test_distributed_needs_a_distributed_sampler():
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)
    ds = Indexed()
    with pytest.raises(ConfigError, match="DistributedSampler"):
        UserLoaderSource(DataLoader(ds, batch_size=4, shuffle=True), env)
    ok = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    assert UserLoaderSource(ok, env).length == 4


def test_an_iterable_dataset_that_yields_less_than_its_length_is_named():
    """Its __len__ is a promise nothing enforces: the loop would stop on a bare StopIteration (under torchrun, leaving
    the other ranks waiting in a collective)."""

    class Claims(IterableDataset):
        def __len__(self):
            return 10

        def __iter__(self):
            for i in range(6):
                yield torch.randn(5), torch.randn(1), torch.tensor(i)

    model = Net()
    with pytest.raises(DataError, match=r"ended after 6 batches of epoch 0, but its length says 10: its "
                                        r"IterableDataset \(Claims\) has a __len__ of 10"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, DataLoader(Claims(), batch_size=1),
                    None, num_epochs=1)


@pytest.mark.timeout(60)
def test_a_loader_that_yields_nothing_is_an_error_not_an_endless_loop_of_empty_epochs():
    """Before, num_iters was never reached: every epoch ended at once, forever (deaf to SIGTERM: no step came)."""

    class Empty(IterableDataset):
        def __iter__(self):
            return iter(())

    model = Net()
    with pytest.raises(DataError, match=r"the DataLoader yielded no batch in epoch 0: there is nothing to train on"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, DataLoader(Empty(), batch_size=1),
                    None, num_iters=3)


# -- under torchrun: each rank's loader is at its own place in its own shard ---------------------------------------
def loader_job(cfg, nproc=2):
    """tests/jobs/loader_job.py under torchrun, or as one plain process."""
    if nproc == 1:
        return python_job(cfg, job=LOADER_JOB)
    return torchrun(cfg, nproc, job=LOADER_JOB)


def records(out, rank, name="") -> list:
    with open(os.path.join(out, f"rank{rank}{name}.json")) as f:
        found = json.load(f)
    return found["seen"] if isinstance(found, dict) else found


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """12 iterations of 2 ranks (8 batches of 1 record per rank and epoch): straight, and killed at iteration 6 (its
    last snapshot: 4, mid-epoch) then resumed with 'auto'. ``stream``: torchdata's StatefulDataLoader over an
    IterableDataset whose state is an offset into this rank's file; ``map``: torch's DataLoader, a DistributedSampler
    and a batch sampler whose generator is seeded per rank (the replay path). Both kinds' straight runs share one
    torchrun job, and their resumed runs another (``runs``: one after the other in the same processes): 4 jobs, not
    6. ``{data: (data, {"straight" | "killed" | "resumed": folder}, prefix)}``."""
    root = tmp_path_factory.mktemp("split")
    found = {}
    for data in ("stream", "map"):
        runs = {name: root / data / name for name in ("straight", "killed", "resumed")}
        for folder in runs.values():
            folder.mkdir(parents=True)
        found[data] = (data, runs, str(root / data / "s"))
    cfg = {"num_iters": 12, "interval": 4}
    # the same processes then train DataLoader(sampler=DistributedSampler): see sampler_runs
    straight = loader_job({**cfg, "runs": [*({"data": data, "prefix": str(runs["straight"] / "s"),
                                              "out": str(runs["straight"])} for data, runs, _ in found.values()),
                                           *sampler_runs(root / "map" / "sampler")]})
    assert straight.returncode == 0, straight.stderr
    for data, runs, prefix in found.values():  # SIGKILLed: a job each
        killed = loader_job({**cfg, "data": data, "prefix": prefix, "out": str(runs["killed"]), "kill_at": 6})
        assert killed.returncode != 0 and [it for it, _ in list_snapshots(prefix)] == [4], killed.stderr
    resumed = loader_job({**cfg, "runs": [{"data": data, "prefix": prefix, "out": str(runs["resumed"]),
                                           "resume": "auto"} for data, runs, prefix in found.values()]})
    assert resumed.returncode == 0, resumed.stderr
    return found


@pytest.fixture(scope="module", params=["stream", "map"])
def split_run(request, split_runs):
    """One kind's runs (see split_runs)."""
    return split_runs[request.param]


def sampler_runs(folder) -> list[dict]:
    """Runs of loader_job's "sampler" data (8 records per rank and epoch, batch 1): 12 iterations straight; 6 (a final
    snapshot mid-epoch); resumed from it to 12. Carried by split_runs' straight job: no torchrun start of their own (a
    resume in the same processes starts from the same state as in new ones: the job seeds each run alike)."""
    folder.mkdir()
    base = {"data": "sampler", "out": str(folder), "interval": None}
    return [{**base, "prefix": str(folder / "a"), "tag": "_straight"},
            {**base, "prefix": str(folder / "b"), "tag": "_first", "num_iters": 6},
            {**base, "prefix": str(folder / "b"), "tag": "_resumed", "resume": "auto"}]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("split_run", ["map"], indirect=True)
def test_a_distributed_sampler_loader_resumed_mid_epoch_trains_what_the_uninterrupted_run_did(split_run):
    """DataLoader(sampler=DistributedSampler(shuffle=True)) under torchrun: each rank's records after a mid-epoch resume
    are those of the uninterrupted run, and epoch 1 is shuffled anew (train_model calls the sampler's set_epoch)."""
    _, _, prefix = split_run
    folder = os.path.join(os.path.dirname(prefix), "sampler")
    assert [d["position"] for d in load_snapshot(os.path.join(folder, "b_iter_6.pt"))["data"]] == [6, 6]
    straight = [records(folder, rank, "_straight") for rank in (0, 1)]
    assert sorted(straight[0][:8] + straight[1][:8]) == list(range(16))  # epoch 0: the ranks' shards tile the data
    for rank in (0, 1):
        assert records(folder, rank, "_first") + records(folder, rank, "_resumed") == straight[rank], rank
        assert straight[rank][8:] != straight[rank][:4], "epoch 1 began in the order of epoch 0"
    assert [it for it, _ in list_snapshots(os.path.join(folder, "b"))] == [12, 6]


@pytest.mark.slow
@pytest.mark.distributed
def test_each_rank_resumes_its_own_place_in_its_own_shard(split_run):
    """Before, rank 0's loader state went to every rank: rank 1 replayed rank 0's records (or order) after the
    resume, with no word."""
    data, runs, prefix = split_run
    straight = [records(runs["straight"], rank) for rank in (0, 1)]
    assert not set(straight[0][:8]) & set(straight[1][:8])  # in an epoch the ranks read different records
    for rank in (0, 1):
        assert records(runs["killed"], rank, "_at4") + records(runs["resumed"], rank) == straight[rank], rank
    snap = load_snapshot(f"{prefix}_iter_4.pt")
    assert snap["per_rank"] == ["data", "rng"] and [d["position"] for d in snap["data"]] == [4, 4]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("split_run", ["stream"], indirect=True)
def test_a_mid_epoch_snapshot_of_two_ranks_is_refused_by_one_process(split_run, tmp_path):
    _, _, prefix = split_run
    shutil.copy(f"{prefix}_iter_4.pt", tmp_path / "s_iter_4.pt")
    cfg = {"data": "stream", "num_iters": 12, "prefix": str(tmp_path / "s"), "out": str(tmp_path), "resume": "auto"}
    refused = loader_job(cfg, nproc=1)
    assert refused.returncode == 1
    assert ("SnapshotError: cannot resume from " in refused.stderr
            and "taken 4 batches into epoch 0 by 2 process(es), and this run has 1" in refused.stderr
            and "HINT: resume with 2 process(es)" in refused.stderr
            and "or with restore_dataloader=False to start at the beginning of epoch 1" in refused.stderr), \
        refused.stderr
    assert [it for it, _ in list_snapshots(str(tmp_path / "s"))] == [4]  # nothing trained, nothing written

    # the way out: the next epoch from its start (one process, one shard: records 0..7)
    ahead = loader_job({**cfg, "train_kwargs": {"restore_dataloader": False}}, nproc=1)
    assert ahead.returncode == 0, ahead.stderr
    assert records(tmp_path, 0) == list(range(8))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("split_run", ["map"], indirect=True)
def test_an_epoch_boundary_snapshot_of_two_ranks_resumes_with_one_process(split_run, tmp_path):
    """At an epoch's start no rank has a place of its own in the data: any world size may go on from there. (A
    loader without a length learns that its epoch is over only when a read finds nothing, so a snapshot after its
    last batch is still mid-epoch.)"""
    _, _, prefix = split_run
    shutil.copy(f"{prefix}_iter_8.pt", tmp_path / "s_iter_8.pt")
    proc = loader_job({"data": "map", "num_iters": 12, "prefix": str(tmp_path / "s"), "out": str(tmp_path),
                       "resume": "auto"}, nproc=1)
    assert proc.returncode == 0, proc.stderr
    assert "iteration 8, epoch 1, position 0 of 16 batches" in proc.stderr
    seen = records(tmp_path, 0)
    assert len(set(seen)) == 4 and set(seen) <= set(range(16))  # epoch 1's first 4 batches of the whole dataset


@pytest.mark.slow
@pytest.mark.distributed
def test_a_format2_snapshot_that_kept_rank_0s_loader_state_alone_is_refused_on_every_rank(tmp_path):
    """Format 2 (before per-rank loader states) holds rank 0's place in its shard only: rank 1 cannot be put back,
    and both ranks refuse together (rank 0 alone would go on and wait for rank 1 in its first collective)."""
    shutil.copy(os.path.join(FORMAT2, "loader_2ranks_iter_4.pt"), tmp_path / "s_iter_4.pt")
    proc = loader_job({"data": "stream", "num_iters": 8, "prefix": str(tmp_path / "s"), "resume": "auto"})
    assert proc.returncode == 1
    refusals = [line for line in proc.stderr.splitlines() if "on rank 1: cannot resume from" in line]
    assert len(refusals) == 2, proc.stderr  # the same refusal on both ranks
    assert all("it holds no DataLoader state of this process (key 'data.loader')" in line for line in refusals)
    assert "kept rank 0's alone (snapshot format 2). HINT: resume with restore_dataloader=False" in proc.stderr
    assert "another process of the job is gone" not in proc.stderr
