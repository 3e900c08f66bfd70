"""One place captures and restores the global RNGs (torch, numpy, Python); every user of it gets all three right."""

import io
import random

import numpy as np
import torch

from pixelz_dist.random_state import RandomState, capture, preserved


def draws():
    return torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random(), random.random()]


def test_capture_restore_and_the_snapshot_form_give_the_same_draws():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture()
    first = draws()
    state.restore()
    assert draws() == first
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    RandomState.from_dict(torch.load(buf, weights_only=True)).restore()  # what a snapshot holds
    assert draws() == first


def test_preserved_puts_every_generator_back_even_on_error():
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = draws()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    try:
        with preserved():
            draws()
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert draws() == expected


def test_only_the_generators_asked_for_are_touched():
    np.random.seed(7)
    state = capture(numpy=False, python=False)
    assert state.numpy is None and state.python is None
    np.random.rand()
    after = np.random.get_state()[2]
    state.restore()
    assert np.random.get_state()[2] == after  # numpy left alone
