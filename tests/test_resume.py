"""The resume contract: N iterations straight == k iterations, SIGKILL, resume from "auto", on to N (bitwise).

Real processes train the demo network (dropout, BatchNorm) on real image files with random augmentation, shuffled,
and one of them is killed with SIGKILL between two snapshots.
"""

import json
import signal

import pytest
import torch

from conftest import run_job
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.checkpoint.order_record import compare_order_records


def final_snapshot(prefix):
    (iteration, path), *_ = list_snapshots(prefix)
    return iteration, load_snapshot(path)


def assert_same_training_state(a: dict, b: dict):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for name, value in sa[pid].items():
            other = sb[pid][name]
            if torch.is_tensor(value):
                assert torch.equal(value, other), f"optimizer state {pid}.{name} differs"
            else:
                assert value == other
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert a["progress"] == b["progress"]
    assert (a["data"]["epoch"], a["data"]["position"]) == (b["data"]["epoch"], b["data"]["position"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


# 40 samples, batch 4: 10 batches per epoch. iter_size 3 -> windows 3,3,3,1 (4 iterations per epoch).
CASES = [
    # workers, iter_size, optimizer, num_iters, snapshot interval, kill after iteration
    pytest.param(0, 1, "sgd", 14, 6, 9, id="workers0-iter1-sgd"),
    pytest.param(2, 3, "adamw", 11, 5, 7, id="workers2-iter3-adamw"),
    pytest.param(0, 3, "adamw", 11, 5, 7, id="workers0-iter3-adamw"),
    pytest.param(2, 1, "sgd", 14, 6, 9, id="workers2-iter1-sgd"),
]


@pytest.fixture(scope="module")
def straight_run(demo_root, tmp_path_factory):
    """The uninterrupted run of a setting, made once: ``straight_run(**settings)`` is its snapshot prefix.

    The cases that differ only in their DataLoader workers share it: 0, 1 or 2 workers give identical weights (the
    promise of docs/explanation/exact-resume.md), so the first case of a setting is compared with its own run and
    the other with a run of another number of workers (0 -> 2 for SGD, 2 -> 0 for AdamW), which a difference between
    them also fails.
    """
    made = {}

    def get(workers, **settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in made:
            prefix = str(tmp_path_factory.mktemp("straight") / "snap")
            straight = run_job("resume_job.py", json.dumps({**settings, "data": demo_root, "workers": workers,
                                                            "prefix": prefix}))
            assert straight.returncode == 0, straight.stderr
            made[key] = prefix
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("workers,iter_size,optimizer,num_iters,interval,kill_at", CASES)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, demo_root, straight_run, workers, iter_size, optimizer,
                                                  num_iters, interval, kill_at):
    settings = dict(optimizer=optimizer, iter_size=iter_size, num_iters=num_iters, interval=interval,
                    schedule_on_iter=optimizer == "sgd")
    base = dict(settings, data=demo_root, workers=workers)
    reference = straight_run(workers, **settings)

    prefix = str(tmp_path / "resumed" / "snap")
    killed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "kill_at": kill_at}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    snapshot_iter = kill_at - kill_at % interval
    assert [it for it, _ in list_snapshots(prefix)] == [snapshot_iter]
    mid_epoch = load_snapshot(list_snapshots(prefix)[0][1])["data"]["position"]
    assert 0 < mid_epoch < 40, "the snapshot must fall in the middle of an epoch"

    resumed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {prefix}_iter_{snapshot_iter}.pt: iteration {snapshot_iter}," in resumed.stderr

    it_a, snap_a = final_snapshot(reference)
    it_b, snap_b = final_snapshot(prefix)
    assert it_a == it_b == num_iters
    assert_same_training_state(snap_a, snap_b)
    comparison = compare_order_records(reference, prefix)
    assert comparison.identical, comparison.summary()
    assert comparison.common == num_iters


@pytest.mark.slow
def test_resume_by_epochs_with_fractional_interval(tmp_path, demo_root):
    """num_epochs with snapshot_interval=0.5 (snapshots mid-epoch), killed in epoch 2, resumed: same result."""
    base = dict(data=demo_root, optimizer="adamw", iter_size=2, workers=0, num_epochs=3, interval=0.5)
    straight = run_job("resume_job.py", json.dumps({**base, "prefix": str(tmp_path / "a" / "snap")}))
    assert straight.returncode == 0, straight.stderr
    prefix = str(tmp_path / "b" / "snap")
    # 10 batches / iter_size 2 = 5 iterations per epoch; half an epoch is crossed at iterations 3, 5, 8, 10, 13, 15
    killed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "kill_at": 9}))
    assert killed.returncode == -signal.SIGKILL
    assert [it for it, _ in list_snapshots(prefix)] == [8, 5, 3]
    resumed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr
    _, snap_a = final_snapshot(str(tmp_path / "a" / "snap"))
    _, snap_b = final_snapshot(prefix)
    assert (snap_a["progress"]["iteration"], snap_a["data"]["epoch"], snap_a["data"]["position"]) == (15, 3, 0)
    assert_same_training_state(snap_a, snap_b)


@pytest.mark.slow
def test_killed_run_differs_without_exact_data_restore(tmp_path, demo_root, straight_run):
    """The contract test can fail: resuming with restore_dataloader semantics broken (a new seed) is detected."""
    settings = dict(optimizer="sgd", iter_size=1, num_iters=14, interval=6, schedule_on_iter=True)  # a case's
    reference = straight_run(0, **settings)
    base = dict(settings, data=demo_root, workers=0)
    prefix = str(tmp_path / "b" / "snap")
    killed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "kill_at": 9}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Tamper with the saved data position: the resumed run now starts at the beginning of the epoch.
    _, path = list_snapshots(prefix)[0]
    snap = torch.load(path, weights_only=True)
    assert 0 < snap["data"]["position"] < 40
    snap["data"]["position"] = 0
    torch.save(snap, path)
    resumed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr  # it ran to the end: the difference is in what it trained on
    _, snap_a = final_snapshot(reference)
    _, snap_b = final_snapshot(prefix)
    assert snap_a["progress"] == snap_b["progress"]
    with pytest.raises(AssertionError):
        assert_same_training_state(snap_a, snap_b)
    assert not compare_order_records(reference, prefix).identical


class CountingDataset(torch.utils.data.Dataset):
    """Counts the samples actually loaded, to show that skipping ahead loads nothing."""

    def __init__(self, n=100):
        self.n = n
        self.loaded = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return torch.full((2,), float(i)), torch.ones(1)


class TwoToOne(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.fc(x), y)


def test_resuming_late_in_an_epoch_loads_only_the_remaining_samples(tmp_path):
    from pixelz_dist import train_model

    prefix = str(tmp_path / "s")
    model = TwoToOne()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_model(model, opt, None, CountingDataset(), 10, shuffle=True, snapshot_prefix=prefix, num_iters=9,
                num_workers=0)
    resumed, model = CountingDataset(), TwoToOne()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.01), None, resumed, 10, shuffle=True,
                snapshot_prefix=prefix, num_iters=10, num_workers=0, load_snapshot_path="auto")
    assert len(resumed.loaded) == 10  # the last tenth of the epoch, not 90 skipped + 10
    order = load_snapshot(list_snapshots(prefix)[0][1])
    assert (order["progress"]["iteration"], order["data"]["epoch"], order["data"]["position"]) == (10, 1, 0)
