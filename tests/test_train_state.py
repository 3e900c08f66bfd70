"""What callbacks read: one name, one meaning, whatever feeds the loop; learning rates as floats everywhere."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from engine_helpers import LinReg, make_data
from pixelz_dist import Callback, train_model
from pixelz_dist.callbacks.tensorboard import TensorBoardLogger


class Positions(Callback):
    def __init__(self):
        self.seen = []

    def on_iteration_end(self, state):
        self.seen.append((state.epoch, state.samples_in_epoch, state.batches_in_epoch, state.epoch_fraction))


@pytest.mark.parametrize("source", ["dataset", "loader"])
def test_samples_in_epoch_counts_global_samples_for_a_dataset_and_for_a_dataloader(source):
    """10 samples, batches of 3: 3, 6, 9, 10 samples (1..4 batches) into each epoch, for both kinds of data."""
    probe = Positions()
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if source == "dataset":
        train_model(model, opt, None, make_data(10), 3, num_epochs=2, num_workers=0, callbacks=[probe])
    else:
        train_model(model, opt, None, DataLoader(make_data(10), batch_size=3), None, num_epochs=2, callbacks=[probe])
    # on_iteration_end runs before the epoch's end is counted: the last iteration of an epoch sees all 10 samples
    assert [(e, s, b) for e, s, b, _ in probe.seen] == [(0, 3, 1), (0, 6, 2), (0, 9, 3), (0, 10, 4),
                                                        (1, 3, 1), (1, 6, 2), (1, 9, 3), (1, 10, 4)]
    fractions = [f for *_, f in probe.seen]
    assert fractions[:3] == pytest.approx([0.3, 0.6, 0.9] if source == "dataset" else [0.25, 0.5, 0.75])


def test_a_tensor_learning_rate_is_logged_as_a_float_everywhere(tmp_path, caplog):
    """Capturable / fused optimizers take lr=torch.tensor(...): the log line, the metrics file and TensorBoard get
    floats (a tensor in the metrics row made json.dumps fail)."""
    model = LinReg()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05))
    rates = []

    class Rates(Callback):
        def on_iteration_end(self, state):
            rates.append(state.lrs)

    tb = tmp_path / "tb"
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        train_model(model, opt, None, make_data(10), 2, num_iters=4, display_iter=2, num_workers=0,
                    snapshot_prefix=str(tmp_path / "s"), callbacks=[Rates(), TensorBoardLogger(str(tb), every=2)])
    rows = [json.loads(line) for line in open(tmp_path / "s_metrics.jsonl")]
    assert [r["lr"] for r in rows] == [[pytest.approx(0.05)]] * 2 and type(rows[0]["lr"][0]) is float
    assert all(type(x) is float for r in rates for x in r) and rates[0] == [pytest.approx(0.05)]
    assert "| lr 0.05 |" in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert [round(e.value, 6) for e in events.Scalars("train/lr")] == [0.05, 0.05]
