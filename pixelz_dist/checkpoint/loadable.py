"""What is saved can be loaded back: a snapshot's state is checked before it is written.

Snapshots load with ``torch.load(weights_only=True)``, which accepts tensors, plain Python values and containers,
and refuses everything else (numpy scalars and arrays, enums, dataclasses, ...). ``torch.save`` accepts them all, so
without a check a run can write snapshot after snapshot that no resume will read: the failure would show only when
the job is requeued, days later. Here the state is walked once per snapshot, before the write:

- numpy scalars (``np.float64(0.3)`` kept as "best loss" by a callback: the usual case) are stored as the Python
  number they equal (``float``, ``int``, ``bool``, ``complex``, ``str``): the same value, in a loadable form;
- anything else ``weights_only`` would refuse stops the run at that snapshot with one error that names every
  offending entry by its place in the snapshot (``callbacks.0:Tracker.history: numpy.ndarray``).
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import torch

from ..errors import SnapshotError

#: Leaf types ``weights_only`` loads, checked once on this torch (tests/test_loadable.py keeps the list honest).
PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Tensor, torch.Size, torch.dtype,
         torch.device)
_MAX_LISTED = 8


def make_loadable(state):
    """``state`` with numpy scalars turned into Python numbers (a new container only where one changed).

    Raises:
        SnapshotError: some entries could not be loaded back by ``torch.load(weights_only=True)``; the message
            names each (up to eight) and its type.
    """
    bad: list[str] = []
    out = _walk(state, "", bad)
    if bad:
        listed = "; ".join(bad[:_MAX_LISTED]) + (f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED
                                                 else "")
        raise SnapshotError(
            f"the snapshot's state holds values that torch.load(weights_only=True) cannot load back, so no resume "
            f"could read it: {listed}. HINT: return plain Python numbers, strings, lists, dicts and tensors from "
            "state_dict() (e.g. float(x), x.tolist(), torch.from_numpy(array)); the run stopped at its first "
            "snapshot so that no unreadable one is written.")
    return out


def _name(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _walk(value, path: str, bad: list[str]):
    kind = type(value)
    if kind in PLAIN or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return _numpy_scalar(value, path, bad)
    if kind in (dict, OrderedDict):
        changed = False
        items = []
        for k, v in value.items():
            k2 = _walk(k, _name(path, f"<key {k!r}>"), bad) if type(k) not in PLAIN else k
            v2 = _walk(v, _name(path, k), bad)
            changed = changed or k2 is not k or v2 is not v
            items.append((k2, v2))
        return kind(items) if changed else value
    if kind in (list, tuple, set):
        new = [_walk(v, _name(path, i), bad) for i, v in enumerate(value)]
        return kind(new) if any(a is not b for a, b in zip(new, value)) else value
    if not _round_trips(value):
        bad.append(f"{path or '<top>'}: {kind.__module__}.{kind.__qualname__}")
    return value


def _numpy_scalar(value: np.generic, path: str, bad: list[str]):
    if isinstance(value, (np.bool_, np.integer, np.floating, np.complexfloating, np.str_, np.bytes_)):
        return value.item()  # the same value as a Python bool / int / float / complex / str / bytes
    bad.append(f"{path or '<top>'}: {type(value).__module__}.{type(value).__qualname__}")
    return value


def _round_trips(value) -> bool:
    """Whether ``weights_only`` loads ``value`` (a type this module does not know: try it)."""
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception:
        return False
    return True
