"""Snapshots written by older versions still resume bit-exactly.

``fixtures/format1/`` holds snapshots written by the flat-layout code (format version 1, commit 5e1ae3a): one of a
shuffled dataset with gradient accumulation, a plateau scheduler and a stateful callback, one of a user DataLoader,
each taken mid-epoch, and the final snapshot of the same uninterrupted run. Resuming the mid-run snapshot with this
version must end on exactly the final one's weights, optimizer state, scheduler and random state. All arithmetic in
those runs is exact in float64 (see ``fixtures/make_format1_snapshots.py``), so this holds on any CPU.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from pixelz_dist import train_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)
import make_format1_snapshots as made  # noqa: E402


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_end(resumed: dict, expected: dict):
    for k, v in expected["model"].items():
        assert torch.equal(resumed["model"][k], v), f"model tensor {k} differs"
    for pid, state in expected["optimizer"]["state"].items():
        for name, v in state.items():
            other = resumed["optimizer"]["state"][pid][name]
            assert torch.equal(other, v) if torch.is_tensor(v) else other == v, (pid, name)
    assert resumed["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    assert resumed["scheduler"] == expected["scheduler"]
    assert torch.equal(resumed_rng(resumed)["torch"], resumed_rng(expected)["torch"])


def resumed_rng(snap: dict) -> dict:
    """Rank 0's RNG state in either format (format 1: 'rng' is rank 0's; later: a list per rank)."""
    rng = snap["rng"]
    return rng[0] if isinstance(rng, list) else rng


def newest(prefix: str) -> str:
    folder, base = os.path.split(prefix)
    found = [n for n in os.listdir(folder) if n.startswith(base + "_iter_") and n.endswith(".pt")]
    return os.path.join(folder, max(found, key=lambda n: int(n[len(base) + 6:-3])))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_format1_dataset_snapshot_resumes_bit_exactly(tmp_path, workers):
    old = shutil.copy(os.path.join(FIXTURES, "format1", "dataset_iter_4.pt"), tmp_path / "old_iter_4.pt")
    torch.manual_seed(123)  # the snapshot's RNG state must replace whatever the process holds
    model, optimizer, scheduler, data = made.build_dataset_run()
    kwargs = {**made.dataset_run_kwargs(), "num_workers": workers}
    train_model(model, optimizer, scheduler, data, snapshot_prefix=str(tmp_path / "new"), load_snapshot_path=old,
                **kwargs)
    resumed = load(newest(str(tmp_path / "new")))
    assert_same_end(resumed, load(os.path.join(FIXTURES, "format1", "dataset_iter_8.pt")))
    assert resumed["callbacks"] == load(os.path.join(FIXTURES, "format1", "dataset_iter_8.pt"))["callbacks"]


def test_a_format1_user_loader_snapshot_resumes_bit_exactly(tmp_path):
    old = shutil.copy(os.path.join(FIXTURES, "format1", "loader_iter_3.pt"), tmp_path / "old_iter_3.pt")
    torch.manual_seed(123)
    model, optimizer, loader = made.build_loader_run()
    train_model(model, optimizer, None, loader, snapshot_prefix=str(tmp_path / "new"), load_snapshot_path=old,
                **made.loader_run_kwargs())
    assert_same_end(load(newest(str(tmp_path / "new"))), load(os.path.join(FIXTURES, "format1", "loader_iter_8.pt")))
