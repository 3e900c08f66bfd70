"""What a resume takes from the snapshot and what from the call: optimizer hyper-parameters changed since the run
that wrote the snapshot are applied, and said so.

A snapshot restores the optimizer's *state* (momentum buffers, moment estimates, step counts), the scheduler's
position and the learning rate as the schedule left it. The optimizer's *hyper-parameters* are the call's whenever
they differ from those the snapshot's run was started with (recorded in the snapshot's ``meta``): ``lr`` (the schedule
goes on from where it was, scaled by new / old), ``momentum``, ``weight_decay``, ``betas``, ``eps``... Unchanged ones
come from the snapshot, so resuming with the same arguments stays bit-exact.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch

logger = logging.getLogger(__name__)

#: Keys a scheduler owns or that name a group; compared through ``lr`` or not at all.
_RATE_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_IGNORED = ("params", "name", *_RATE_KEYS)


def _plain(value):
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def requested(groups) -> list[dict]:
    """The hyper-parameters of ``groups`` (an optimizer's ``param_groups``), per group, as plain values; taken from
    the call before a snapshot is loaded, they are recorded in every snapshot.

    ``base_lr`` is the rate the run was started with: ``initial_lr`` when a scheduler set it, else ``lr``.
    """
    out = []
    for group in groups:
        entry = {k: _plain(v) for k, v in group.items() if k not in _IGNORED}
        entry["base_lr"] = float(_plain(group.get("initial_lr", group["lr"])))
        out.append(entry)
    return out


def _same(a, b) -> bool:
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real) and not isinstance(a, bool):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _scale(group: dict, key: str, factor: float) -> None:
    if key in group:
        if torch.is_tensor(group[key]):
            group[key].mul_(factor)  # a tensor lr (capturable / fused optimizers) must stay the same tensor
        else:
            group[key] = group[key] * factor


def apply_changes(optimizer, scheduler, now: list[dict], then: list[dict] | None) -> list[str]:
    """After the snapshot was loaded: give the optimizer the call's hyper-parameters where they differ from those
    of the run that wrote the snapshot (``then``; None for a format-1 snapshot, which did not record them).

    Returns:
        One description per change, e.g. ``"lr 0.01 -> 0.5"`` (prefixed with the group when there are several).
    """
    groups = optimizer.param_groups
    if then is None:
        then = _inferred(groups, scheduler)
        if then is None:
            logger.info("the snapshot does not record the hyper-parameters its run was started with (format 1, "
                        "with a scheduler): the snapshot's are used")
            return []
    changes = []
    for i, (group, wanted, had) in enumerate(zip(groups, now, then)):
        where = f"group {group.get('name', i)}: " if len(groups) > 1 else ""
        old, new = had.get("base_lr"), wanted["base_lr"]
        if old is not None and not _same(old, new):
            factor = new / old if old else 0.0
            for key in _RATE_KEYS:
                _scale(group, key, factor)
            if old == 0:  # a schedule scaled from 0 stays 0: start the group at the new rate
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] = new
            base_lrs = getattr(scheduler, "base_lrs", None)
            if base_lrs is not None and i < len(base_lrs):
                base_lrs[i] = new
            changes.append(f"{where}lr {old:g} -> {new:g}")
        for key, value in wanted.items():
            if key != "base_lr" and key in had and key in group and not _same(had[key], value):
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
                changes.append(f"{where}{key} {had[key]} -> {value}")
    return changes


def _inferred(groups, scheduler) -> list[dict] | None:
    """For a format-1 snapshot: the loaded groups stand for its run's start when no scheduler moved them."""
    if scheduler is not None and not all("initial_lr" in g for g in groups):
        return None
    if scheduler is not None:  # a schedule moves lr (and may cycle momentum): only the base rate can be compared
        return [{"base_lr": float(_plain(g["initial_lr"]))} for g in groups]
    return requested(groups)

