"""The callback API (callbacks/base.py, engine/requests.py, engine/state.py): events in loop order, duck-typed
callbacks, request_stop and request_snapshot, callback state in snapshots, misspelt events refused, and TrainState
read-only. The built-in callbacks are in test_builtin_callbacks.py.

Everything runs for real on tiny CPU models and tensors.
"""

from __future__ import annotations

import logging
import os

import pytest

from engine_helpers import LinReg, load_snap, make_data, quick, snapshot_iters
from pixelz_dist import Callback, TrainState


class Trace(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, state):
        self.events.append(("train_start", state.iteration))

    def on_epoch_start(self, state):
        self.events.append(("epoch_start", state.epoch))

    def on_after_backward(self, state):
        self.events.append(("after_backward", state.iteration))

    def on_iteration_end(self, state):
        self.events.append(("iteration_end", state.iteration))

    def on_epoch_end(self, state):
        self.events.append(("epoch_end", state.epoch))

    def on_snapshot(self, state, path):
        self.events.append(("snapshot", os.path.basename(path), os.path.isfile(path)))

    def on_train_end(self, state):
        self.events.append(("train_end", state.iteration))


def test_events_fire_in_loop_order(tmp_path):
    trace = Trace()
    quick(data=make_data(4), num_epochs=1, snapshot_prefix=str(tmp_path / "snap"), callbacks=[trace])
    assert trace.events == [("train_start", 0), ("epoch_start", 0), ("after_backward", 0), ("iteration_end", 1),
                            ("after_backward", 1), ("iteration_end", 2), ("epoch_end", 1),
                            ("snapshot", "snap_iter_2.pt", True), ("train_end", 2)]


def test_duck_typed_callback_without_base_class(tmp_path):
    seen = []

    class Plain:
        def on_iteration_end(self, state):
            seen.append(state.iteration)

    quick(data=make_data(4), num_epochs=2, callbacks=[Plain()])
    assert seen == [1, 2, 3, 4]


def test_request_stop_stops_after_that_iteration_with_a_final_snapshot(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelz_dist")
    prefix = tmp_path / "snap"
    trace = Trace()

    class StopAt3(Callback):
        def on_iteration_end(self, state):
            if state.iteration == 3:
                state.request_stop("enough")

    model, opt = quick(num_epochs=5, snapshot_prefix=str(prefix), callbacks=[StopAt3(), trace])
    assert opt.steps == 3 and model.forwards == 3
    assert snapshot_iters(prefix) == [3]
    assert load_snap(prefix, 3)["progress"]["iteration"] == 3
    assert trace.events[-2:] == [("snapshot", "snap_iter_3.pt", True), ("train_end", 3)]
    assert any("stopped at iteration 3" in r.getMessage() and "enough" in r.getMessage() for r in caplog.records)


def test_request_stop_at_an_epoch_end(tmp_path):
    prefix = tmp_path / "snap"

    class StopAfterEpoch(Callback):
        def on_epoch_end(self, state):
            state.request_stop()

    model, opt = quick(num_epochs=5, snapshot_prefix=str(prefix), callbacks=[StopAfterEpoch()])
    assert opt.steps == 5
    assert snapshot_iters(prefix) == [5]


def test_request_snapshot_writes_one(tmp_path):
    prefix = tmp_path / "snap"
    written = []

    class SnapAt2(Callback):
        def on_iteration_end(self, state):
            if state.iteration == 2:
                state.request_snapshot()

        def on_snapshot(self, state, path):  # once the file is durable: in the background, a few iterations on
            written.append((state.last_snapshot_iteration, path, state.last_snapshot_path, os.path.exists(path)))

    for snapshot_async in (True, False):
        written.clear()
        quick(num_epochs=1, snapshot_prefix=str(prefix / str(snapshot_async)), callbacks=[SnapAt2()],
              snapshot_async=snapshot_async)
        assert snapshot_iters(prefix / str(snapshot_async)) == [2, 5]
        assert load_snap(prefix / str(snapshot_async), 2)["progress"]["iteration"] == 2
        assert [(w[0], os.path.basename(w[1])) for w in written] == [(2, f"{snapshot_async}_iter_2.pt"),
                                                                     (5, f"{snapshot_async}_iter_5.pt")]
        assert all(w[1] == w[2] and w[3] for w in written)


class Counter(Callback):
    def __init__(self):
        self.count = 0
        self.loaded = None

    def on_iteration_end(self, state):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.count = state["count"]


def test_callback_state_is_saved_and_restored(tmp_path):
    prefix = tmp_path / "snap"
    first = Counter()
    quick(num_iters=3, snapshot_prefix=str(prefix), callbacks=[first])
    snap = load_snap(prefix, 3)
    assert {"count": 3} in snap["callbacks"].values()
    again = Counter()
    quick(num_iters=5, snapshot_prefix=str(prefix), load_snapshot_path=f"{prefix}_iter_3.pt", callbacks=[again])
    assert again.loaded == {"count": 3}
    assert again.count == 5
    assert {"count": 5} in load_snap(prefix, 5)["callbacks"].values()


def test_misspelled_event_is_a_type_error():
    class Typo(Callback):
        def on_iter_end(self, state):
            pass

    model = LinReg()
    with pytest.raises(TypeError, match="on_iter_end"):
        quick(model=model, num_epochs=1, callbacks=[Typo()])
    assert model.forwards == 0


def test_train_state_is_read_only():
    errors = {}

    class Poke(Callback):
        def on_iteration_end(self, state):
            assert isinstance(state, TrainState)
            for name, value in (("iteration", 3), ("epoch", 1), ("samples_in_epoch", 0), ("model", None),
                                ("optimizer", None), ("loss", None), ("lrs", [1.0])):
                try:
                    setattr(state, name, value)
                except AttributeError as e:
                    errors[name] = e
                else:
                    errors[name] = None

    model, opt = quick(num_iters=2, callbacks=[Poke()])
    assert set(errors) == {"iteration", "epoch", "samples_in_epoch", "model", "optimizer", "loss", "lrs"}
    assert all(isinstance(e, AttributeError) for e in errors.values()), errors
    assert opt.steps == 2  # the run went on unchanged
