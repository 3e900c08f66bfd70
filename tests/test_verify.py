"""The order record and `python -m pixelz_dist.verify`: a user can prove two runs saw the same samples."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pixelz_dist import compare_order_records, train_model
from pixelz_dist.checkpoint.order_record import read_order_record
from pixelz_dist.errors import DataError


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.fc(x), y)


def run(prefix, seed=0, num_iters=9, resume=None, batch_size=4):
    torch.manual_seed(0)
    model = Linear()
    ds = TensorDataset(torch.randn(22, 3), torch.randn(22, 1))
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ds, batch_size, shuffle=True,
                snapshot_prefix=prefix, num_iters=num_iters, snapshot_interval=3, seed=seed, num_workers=0,
                load_snapshot_path=resume, display_iter=4)


def test_identical_runs_compare_equal_and_a_different_seed_does_not(tmp_path):
    run(str(tmp_path / "a" / "s"))
    run(str(tmp_path / "b" / "s"))
    run(str(tmp_path / "c" / "s"), seed=1)
    same = compare_order_records(str(tmp_path / "a" / "s"), str(tmp_path / "b" / "s_order.tsv"))
    assert same.identical and same.common == 9
    diff = compare_order_records(str(tmp_path / "a" / "s"), str(tmp_path / "c" / "s"))
    assert not diff.identical and diff.mismatches[0] == 1
    assert "DIFFERENT" in diff.summary() and "first at iteration 1" in diff.summary()


def test_records_are_global_positions_and_the_resumed_records_supersede(tmp_path):
    prefix = str(tmp_path / "s")
    run(prefix, num_iters=6)
    run(prefix, num_iters=9, resume=str(tmp_path / "s_iter_3.pt"))  # redo 4..6, go on to 9
    records = read_order_record(prefix)
    assert sorted(records) == list(range(1, 10))
    epochs_and_spans = [records[i][:3] for i in range(1, 8)]
    assert epochs_and_spans == [(0, 0, 4), (0, 4, 8), (0, 8, 12), (0, 12, 16), (0, 16, 20), (0, 20, 22), (1, 0, 4)]
    text = open(f"{prefix}_order.tsv").read()
    assert "# resumed from" in text
    run(str(tmp_path / "straight" / "s"), num_iters=9)
    assert compare_order_records(prefix, str(tmp_path / "straight" / "s")).identical


def test_missing_iterations_are_reported(tmp_path):
    run(str(tmp_path / "a" / "s"), num_iters=9)
    run(str(tmp_path / "b" / "s"), num_iters=6)
    result = compare_order_records(str(tmp_path / "a" / "s"), str(tmp_path / "b" / "s"))
    assert result.only_in_a == [7, 8, 9] and not result.identical
    with pytest.raises(DataError, match="no order record"):
        compare_order_records(str(tmp_path / "nothing"), str(tmp_path / "b" / "s"))


@pytest.mark.slow
def test_command_line_exit_codes(tmp_path):
    run(str(tmp_path / "a" / "s"))
    run(str(tmp_path / "b" / "s"))
    run(str(tmp_path / "c" / "s"), seed=3)

    def verify(*args):
        return subprocess.run([sys.executable, "-m", "pixelz_dist.verify", *args], capture_output=True, text=True)

    ok = verify(str(tmp_path / "a" / "s"), str(tmp_path / "b" / "s"))
    assert ok.returncode == 0 and "identical: 9 iterations" in ok.stdout
    bad = verify(str(tmp_path / "a" / "s"), str(tmp_path / "c" / "s"))
    assert bad.returncode == 1 and "DIFFERENT" in bad.stdout
    missing = verify(str(tmp_path / "x"), str(tmp_path / "c" / "s"))
    assert missing.returncode == 2 and "no order record" in missing.stderr
