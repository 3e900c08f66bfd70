"""train_model's arguments: old spellings, validation (all problems at once), and the automatic worker count.

Every test trains (or refuses to train) a real tiny model on real tensors; only CPU / GPU *queries* are patched.
"""

from __future__ import annotations

import os

import psutil
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, get_worker_info

import pixelz_dist
import pixelz_dist as train_pixelz
from pixelz_dist import ConfigError, DataError, train_model
from pixelz_dist.distributed.env import cpus_available, default_num_workers


class LinReg(nn.Module):
    """y ~ w.x + b with a squared loss; counts its forward calls."""

    def __init__(self, d: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.linspace(-0.5, 0.5, d).unsqueeze(0))
            self.lin.bias.fill_(0.1)
        self.forwards = 0

    def forward(self, x, y):
        self.forwards += 1
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean()


def make_data(n: int = 8, d: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randn(n, generator=g))


def setup(n: int = 8):
    model = LinReg()
    return model, torch.optim.SGD(model.parameters(), lr=0.05), make_data(n)


def snapshot_iters(prefix) -> list[int]:
    folder, base = os.path.split(str(prefix))
    found = []
    for name in os.listdir(folder):
        if name.startswith(base + "_iter_") and name.endswith(".pt"):
            found.append(int(name[len(base) + 6:-3]))
    return sorted(found)


# -- old spellings, unknown keywords, the seed's positional call -------------------------------------------------------

def test_old_prefix_spelling_warns_and_writes_snapshots(tmp_path):
    model, opt, data = setup()
    prefix = tmp_path / "old" / "snap"
    with pytest.warns(DeprecationWarning, match="snaphot_prefix") as record:
        train_model(model, opt, None, data, 2, num_iters=3, num_workers=0, snaphot_prefix=str(prefix))
    assert record[0].filename == __file__  # attributed to the caller's line, not to the library
    assert snapshot_iters(prefix) == [3]
    assert os.path.isfile(f"{prefix}_metrics.jsonl") and os.path.isfile(f"{prefix}_order.tsv")


def test_old_interval_spelling_warns_and_sets_the_interval(tmp_path):
    model, opt, data = setup()
    prefix = tmp_path / "snap"
    with pytest.warns(DeprecationWarning, match="snaphost_interval"):
        train_model(model, opt, None, data, 2, snapshot_prefix=str(prefix), num_iters=6, num_workers=0,
                    snaphost_interval=2)
    assert snapshot_iters(prefix) == [2, 4, 6]


def test_both_old_spellings_together_behave_like_the_new_names(tmp_path):
    prefix = tmp_path / "snap"
    model, opt, data = setup()
    with pytest.warns(DeprecationWarning) as record:
        train_model(model, opt, None, data, 2, num_iters=4, num_workers=0, snaphot_prefix=str(prefix),
                    snaphost_interval=3)
    messages = " ".join(str(w.message) for w in record if issubclass(w.category, DeprecationWarning))
    assert "snaphot_prefix" in messages and "snaphost_interval" in messages
    assert snapshot_iters(prefix) == [3, 4]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("new, old, value", [("snapshot_prefix", "snaphot_prefix", "P"),
                                             ("snapshot_interval", "snaphost_interval", 2)])
def test_old_and_new_spelling_together_is_a_config_error(tmp_path, new, old, value):
    model, opt, data = setup()
    kwargs = {"snapshot_prefix": str(tmp_path / "a"), "snapshot_interval": 2}
    kwargs[old] = str(tmp_path / value) if new == "snapshot_prefix" else value
    with pytest.raises(ConfigError) as info:
        train_model(model, opt, None, data, 2, num_iters=2, num_workers=0, **kwargs)
    assert isinstance(info.value, ValueError)
    assert new in str(info.value) and old in str(info.value)
    assert model.forwards == 0
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("typo, suggestion", [("snapshot_intervall", "snapshot_interval"),
                                              ("num_iter", "num_iters"), ("snapshot_prefx", "snapshot_prefix")])
def test_unknown_keyword_is_a_type_error_with_close_match(typo, suggestion):
    model, opt, data = setup()
    with pytest.raises(TypeError) as info:
        train_model(model, opt, None, data, 2, num_epochs=1, num_workers=0, **{typo: 3})
    msg = str(info.value)
    assert typo in msg and repr(suggestion) in msg
    assert model.forwards == 0


def test_unknown_keyword_without_close_match_still_type_error():
    model, opt, data = setup()
    with pytest.raises(TypeError, match="zzz_qqq"):
        train_model(model, opt, None, data, 2, num_epochs=1, num_workers=0, zzz_qqq=1)


def test_seed_positional_call_through_train_pixelz_alias(tmp_path):
    model, opt, data = setup(8)
    prefix = str(tmp_path / "snap")
    before = model.lin.weight.detach().clone()
    # the seed's order: model, optimizer, scheduler, dataset, batch_size, shuffle, snaphot_prefix, num_iters,
    # num_epochs, iter_size, display_iter, snaphost_interval
    out = train_pixelz.train_model(model, opt, None, data, 2, False, prefix, 4, None, 2, 1, 2)
    assert out is model
    assert model.forwards == 8  # 4 iterations x iter_size 2
    assert snapshot_iters(prefix) == [2, 4]
    assert not torch.equal(before, model.lin.weight)
    assert train_pixelz.ConfigError is ConfigError and train_pixelz.DataError is DataError


# -- validation: ConfigError (a ValueError) listing every problem ------------------------------------------------------

BAD_SETTINGS = [
    (dict(num_iters=2, num_epochs=1), "num_iters"),
    (dict(), "num_iters"),
    (dict(num_epochs=1, batch_size=0), "batch_size"),
    (dict(num_epochs=1, iter_size=0), "iter_size"),
    (dict(num_epochs=1, display_iter=0), "display_iter"),
    (dict(num_epochs=1, snapshot_interval=0, snapshot_prefix="P"), "snapshot_interval"),
    (dict(num_epochs=1, snapshot_interval=-0.5, snapshot_prefix="P"), "snapshot_interval"),
    (dict(num_iters=4, snapshot_interval=1.5, snapshot_prefix="P"), "whole number"),
    (dict(num_epochs=1, snapshot_interval=1), "snapshot_prefix"),
    (dict(num_epochs=1, load_snapshot_path="auto"), "snapshot_prefix"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(num_iters=-3), "num_iters"),
]


@pytest.mark.parametrize("kwargs, word", BAD_SETTINGS)
def test_invalid_settings_raise_config_error(tmp_path, kwargs, word):
    model, opt, data = setup()
    kwargs = dict(kwargs)
    batch_size = kwargs.pop("batch_size", 2)
    if kwargs.get("snapshot_prefix") == "P":
        kwargs["snapshot_prefix"] = str(tmp_path / "snap")
    before = model.lin.weight.detach().clone()
    with pytest.raises(ConfigError) as info:
        train_model(model, opt, None, data, batch_size, num_workers=0, **kwargs)
    assert isinstance(info.value, ValueError)
    assert word in str(info.value)
    assert model.forwards == 0 and torch.equal(before, model.lin.weight)
    assert not os.listdir(tmp_path)  # nothing written before the arguments were checked


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "poly"])
@pytest.mark.parametrize("count", [dict(batch_size=0), dict(iter_size=0), dict(num_epochs=0), dict(batch_size=-1)])
def test_a_zero_count_is_refused_before_anything_whatever_the_scheduler(tmp_path, scheduler, count):
    """Schedulers over the run's length (total_steps, T_max) must not turn a zero count into a ZeroDivisionError:
    train_model refuses it first, with a ConfigError, before any step or file."""
    model, opt, data = setup()
    sched = {"onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8),
             "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
             "poly": lambda: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=8)}[scheduler]()
    kwargs = {"batch_size": 2, "num_epochs": 2, **count}
    with pytest.raises(ConfigError, match=f"{next(iter(count))} must be an integer >= 1"):
        train_model(model, opt, sched, data, snapshot_prefix=str(tmp_path / "s"), num_workers=0, **kwargs)
    assert model.forwards == 0 and not os.listdir(tmp_path)


def test_whole_float_interval_with_num_iters_is_accepted(tmp_path):
    model, opt, data = setup()
    prefix = tmp_path / "snap"
    train_model(model, opt, None, data, 2, snapshot_prefix=str(prefix), num_iters=4, snapshot_interval=2.0,
                num_workers=0)
    assert snapshot_iters(prefix) == [2, 4]


def test_several_problems_are_reported_in_one_error():
    model, opt, data = setup()
    with pytest.raises(ConfigError) as info:
        train_model(model, opt, None, data, 0, num_iters=3, num_epochs=2, iter_size=0, display_iter=0,
                    snapshot_interval=2, num_workers=0)
    msg = str(info.value)
    for text in ("batch_size must be an integer >= 1", "iter_size must be an integer >= 1",
                 "display_iter must be an integer >= 1", "exactly one of num_iters and num_epochs",
                 "snapshot_prefix"):
        assert text in msg, (text, msg)


def test_two_problems_in_one_message():
    model, opt, data = setup()
    with pytest.raises(ValueError) as info:
        train_model(model, opt, None, data, 0, num_epochs=1, load_snapshot_path="auto", num_workers=0)
    msg = str(info.value)
    assert "batch_size" in msg and "load_snapshot_path='auto'" in msg


class Empty(Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


@pytest.mark.parametrize("dataset", [TensorDataset(torch.zeros(0, 3), torch.zeros(0)), Empty()],
                         ids=["tensor", "custom"])
def test_empty_dataset_is_a_data_error(dataset):
    model, opt, _ = setup()
    with pytest.raises(DataError) as info:
        train_model(model, opt, None, dataset, 2, num_epochs=1, num_workers=0)
    assert isinstance(info.value, ValueError)
    assert "empty" in str(info.value)
    assert model.forwards == 0


# -- num_workers=None: min(max(cpus // gpus_per_node, 1), 6) -----------------------------------------------------------

@pytest.fixture
def cpus(monkeypatch):
    """Set the process's CPU affinity (as psutil reports it) and the number of visible GPUs."""

    def set_(n_cpus: int, n_gpus: int = 0):
        monkeypatch.setattr(psutil.Process, "cpu_affinity", lambda self, *a: list(range(n_cpus)))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)

    return set_


@pytest.mark.parametrize("n_cpus, n_gpus, expected", [
    (16, 0, 6), (16, 1, 6), (16, 2, 6), (16, 8, 2), (3, 8, 1), (1, 0, 1), (5, 0, 5), (6, 0, 6), (7, 0, 6),
    (13, 2, 6), (11, 2, 5), (64, 8, 6), (7, 8, 1), (24, 4, 6), (8, 4, 2),
])
def test_default_num_workers_policy(cpus, n_cpus, n_gpus, expected):
    cpus(n_cpus, n_gpus)
    assert cpus_available() == n_cpus
    assert default_num_workers() == expected


@pytest.mark.parametrize("n_cpus, slurm, n_gpus, expected", [
    (4, "2", 0, 2), (16, "4", 2, 2), (16, "32", 8, 2), (16, "3", 0, 3), (2, "8", 0, 2),
    (16, "", 0, 6), (16, "abc", 0, 6), (16, "0", 0, 6),
])
def test_slurm_cpus_per_task_caps_the_cpus(cpus, monkeypatch, n_cpus, slurm, n_gpus, expected):
    cpus(n_cpus, n_gpus)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
    assert default_num_workers() == expected


def test_no_affinity_falls_back_to_cpu_count(monkeypatch):
    def no_affinity(self, *a):
        raise AttributeError("cpu_affinity")

    monkeypatch.setattr(psutil.Process, "cpu_affinity", no_affinity)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cpus_available() == 3
    assert default_num_workers() == 3


class WorkerProbe(Dataset):
    """Each sample says whether it was loaded in a DataLoader worker process."""

    def __init__(self, n=6):
        self.data = make_data(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x, y, torch.tensor(float(get_worker_info() is not None))


class ProbeModel(LinReg):
    def __init__(self):
        super().__init__()
        self.in_worker = []

    def forward(self, x, y, in_worker):
        self.in_worker.extend(in_worker.tolist())
        return super().forward(x, y)


@pytest.mark.parametrize("n_cpus, workers", [(1, 1), (16, 0)])
def test_train_model_uses_the_automatic_worker_count(cpus, caplog, n_cpus, workers):
    import logging

    caplog.set_level(logging.INFO, logger="pixelz_dist")
    cpus(n_cpus, 0)
    model = ProbeModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs = {"num_workers": 0} if workers == 0 else {}  # explicit 0 overrides the automatic choice
    train_model(model, opt, None, WorkerProbe(6), 2, num_epochs=1, **kwargs)
    assert model.in_worker == [float(workers > 0)] * 6
    assert any(f"{workers} DataLoader workers" in r.getMessage() for r in caplog.records)


def test_version_and_exports():
    assert pixelz_dist.train_model is train_model
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
