"""train_model's arguments, checked once: every problem reported together, old spellings still accepted."""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError

# The seed shipped these misspellings; users' scripts still pass them.
LEGACY_NAMES = {"snaphot_prefix": "snapshot_prefix", "snaphost_interval": "snapshot_interval"}


@dataclass(frozen=True)
class RunSettings:
    batch_size: int
    shuffle: bool
    snapshot_prefix: str | None
    num_iters: int | None
    num_epochs: int | None
    iter_size: int
    display_iter: int
    snapshot_interval: float | None
    load_snapshot_path: str | None
    restore_dataloader: bool
    display_gpu: bool
    schedule_on_iter: bool
    seed: int
    num_workers: int | None
    keep_last: int | None
    strict_load: bool
    drop_last: bool
    seed_data: bool | None
    log_prefix: str | None
    collate_fn: Any
    sync_bn: bool = True
    keep_best: int | None = None
    monitor: str = "val_loss"
    monitor_mode: str | None = None
    backend: str | None = None
    dist_timeout: float | None = None
    ddp_kwargs: dict | None = None
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    stop_loss_below: float | None = None
    stop_patience: int | None = None
    stop_min_delta: float = 0.0
    time_budget: float | None = None
    on_nonfinite: str | None = None
    amp: str | None = None
    channels_last: bool = False
    compile: Any = False
    closure: bool = False
    prefetch: bool = True
    overwrite: bool = False
    allow_changed_data: bool = False
    deterministic: bool = False
    snapshot_async: bool = True
    ema: float | None = None
    ema_buffers: str = "average"
    warmup_iters: int | None = None
    warmup_factor: float = 0.001


def setting_names() -> frozenset[str]:
    """The keyword arguments of ``train_model`` that become settings (all but the objects trained)."""
    return frozenset(f.name for f in fields(RunSettings))


def apply_legacy_names(func_name: str, given: dict, legacy: dict, accepted: list[str]) -> dict:
    """Map ``snaphot_prefix`` / ``snaphost_interval`` to their right names with a DeprecationWarning.

    Raises:
        TypeError: an unknown keyword (as Python would), with the closest valid names.
        ConfigError: both spellings of one argument were given.
    """
    given = dict(given)
    for old, value in legacy.items():
        new = LEGACY_NAMES.get(old)
        if new is None:
            close = difflib.get_close_matches(old, accepted + list(LEGACY_NAMES), n=3)
            raise TypeError(f"{func_name}() got an unexpected keyword argument {old!r}"
                            + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ""))
        warnings.warn(f"{func_name}(): {old!r} is the old misspelling of {new!r}; please pass {new}= instead.",
                      DeprecationWarning, stacklevel=3)
        if given.get(new) is not None:
            raise ConfigError(f"{func_name}() got both {new}={given[new]!r} and its old spelling {old}={value!r}. "
                              f"HINT: keep only {new}=.")
        given[new] = value
    return given


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_keep_best(v: dict) -> list[str]:
    """keep_best / monitor / monitor_mode; fills monitor_mode ("min" for a loss) in ``v``."""
    problems = []
    k, monitor, mode = v.get("keep_best"), v.get("monitor", "val_loss"), v.get("monitor_mode")
    if not isinstance(monitor, str) or not monitor:
        problems.append(f"monitor must be the name of a validation value such as 'val_loss', got {monitor!r}")
    if mode not in (None, "min", "max"):
        problems.append(f"monitor_mode must be 'min', 'max' or None (min for a loss), got {mode!r}")
    if k is None:
        return problems
    if not _is_int(k) or k < 1:
        problems.append(f"keep_best must be an integer >= 1 (snapshots) or None, got {k!r}")
    if v.get("snapshot_prefix") is None:
        problems.append("keep_best keeps the best snapshots, but snapshot_prefix is None, so none is written; set "
                        "snapshot_prefix")
    if mode is None and isinstance(monitor, str):
        if "loss" in monitor:
            v["monitor_mode"] = "min"
        else:
            problems.append(f"monitor={monitor!r} is not a loss: say whether larger is better, monitor_mode='max' "
                            "(an IoU, an accuracy) or 'min' (an error)")
    return problems


def check_settings(values: dict) -> RunSettings:
    """Validate every argument, collecting all problems into one :class:`ConfigError`."""
    v = values
    problems = []

    def positive_int(name):
        if not _is_int(v[name]) or v[name] < 1:
            problems.append(f"{name} must be an integer >= 1, got {v[name]!r}")

    positive_int("batch_size")
    positive_int("iter_size")
    positive_int("display_iter")
    if (v["num_iters"] is None) == (v["num_epochs"] is None):
        problems.append(f"give exactly one of num_iters and num_epochs (got num_iters={v['num_iters']!r}, "
                        f"num_epochs={v['num_epochs']!r})")
    else:
        name = "num_iters" if v["num_iters"] is not None else "num_epochs"
        positive_int(name)
    interval = v["snapshot_interval"]
    if interval is not None:
        if not isinstance(interval, numbers.Real) or isinstance(interval, bool) or not math.isfinite(interval) \
                or interval <= 0:
            problems.append(f"snapshot_interval must be a positive number, got {interval!r}")
        elif v["num_iters"] is not None and float(interval) != int(interval):
            problems.append(f"snapshot_interval counts iterations when training by num_iters, so it must be a "
                            f"whole number, got {interval!r} (fractions of an epoch need num_epochs)")
        if v["snapshot_prefix"] is None:
            problems.append("snapshot_interval is set but snapshot_prefix is None, so no snapshot would be written; "
                            "set snapshot_prefix (e.g. 'runs/exp1/snapshot')")
    if v["keep_last"] is not None and (not _is_int(v["keep_last"]) or v["keep_last"] < 1):
        problems.append(f"keep_last must be an integer >= 1 or None, got {v['keep_last']!r}")
    problems += _check_keep_best(v)
    if v["load_snapshot_path"] == "auto" and v["snapshot_prefix"] is None:
        problems.append("load_snapshot_path='auto' looks for the newest snapshot of snapshot_prefix, which is None; "
                        "set snapshot_prefix")
    if v["num_workers"] is not None and (not _is_int(v["num_workers"]) or v["num_workers"] < 0):
        problems.append(f"num_workers must be an integer >= 0 or None (automatic), got {v['num_workers']!r}")
    if v.get("backend") not in (None, "nccl", "gloo", "mpi", "ucc"):
        problems.append(f"backend must be None (automatic), 'nccl' or 'gloo', got {v['backend']!r}")
    if v.get("dist_timeout") is not None and not (isinstance(v["dist_timeout"], numbers.Real)
                                                  and v["dist_timeout"] > 0):
        problems.append(f"dist_timeout must be a positive number of seconds, got {v['dist_timeout']!r}")
    if not _is_int(v["seed"]):
        problems.append(f"seed must be an integer, got {v['seed']!r}")
    for name in ("clip_grad_norm", "clip_grad_value", "time_budget"):
        x = v.get(name)
        if x is not None and not (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
                                  and x > 0):
            problems.append(f"{name} must be a positive number or None, got {x!r}")
    x = v.get("stop_loss_below")
    if x is not None and not (isinstance(x, numbers.Real) and not isinstance(x, bool)):
        problems.append(f"stop_loss_below must be a number or None, got {x!r}")
    if v.get("stop_patience") is not None and (not _is_int(v["stop_patience"]) or v["stop_patience"] < 1):
        problems.append(f"stop_patience must be an integer >= 1 (iterations) or None, got {v['stop_patience']!r}")
    for name in ("overwrite", "strict_load", "restore_dataloader", "allow_changed_data",
                 "deterministic", "snapshot_async"):
        if not isinstance(v.get(name), bool):
            problems.append(f"{name} must be True or False, got {v.get(name)!r}")
    if v.get("on_nonfinite") not in (None, "raise", "skip"):
        problems.append(f"on_nonfinite must be None, 'raise' or 'skip', got {v['on_nonfinite']!r}")
    if v.get("amp") not in (None, "bf16", "fp16"):
        problems.append(f"amp must be None, 'bf16' or 'fp16', got {v['amp']!r}")
    if not isinstance(v.get("compile", False), (bool, dict)):
        problems.append(f"compile must be True/False or a dict of torch.compile arguments, got {v['compile']!r}")
    if v.get("closure"):
        if v["iter_size"] != 1:
            problems.append(f"the optimizer needs a closure (LBFGS), which re-evaluates the loss on one batch: "
                            f"gradient accumulation is not possible with it, but iter_size={v['iter_size']!r}; "
                            "set iter_size=1 (and a larger batch_size)")
        if v.get("amp") == "fp16":
            problems.append("amp='fp16' needs a GradScaler, which does not support closure optimizers (LBFGS); "
                            "use amp='bf16' or None")
    problems += _check_ema_and_warmup(v)
    if problems:
        raise ConfigError("invalid training arguments:\n  - " + "\n  - ".join(problems))
    if v["num_iters"] is not None and interval is not None:
        interval = int(interval)
    return RunSettings(**{**v, "snapshot_interval": interval})


def _check_ema_and_warmup(v: dict) -> list[str]:
    problems = []
    decay = v.get("ema")
    if decay is not None and not (isinstance(decay, numbers.Real) and not isinstance(decay, bool)
                                  and 0 < decay < 1):
        problems.append(f"ema must be a decay between 0 and 1 (exclusive, e.g. 0.999) or None, got {decay!r}")
    if v.get("ema_buffers", "average") not in ("average", "copy"):
        problems.append(f"ema_buffers must be 'average' (BatchNorm statistics averaged like the weights) or 'copy' "
                        f"(the live model's), got {v['ema_buffers']!r}")
    iters = v.get("warmup_iters")
    if iters is not None and (not _is_int(iters) or iters < 0):
        problems.append(f"warmup_iters must be an integer >= 0 or None, got {iters!r}")
    factor = v.get("warmup_factor", 0.001)
    if not (isinstance(factor, numbers.Real) and not isinstance(factor, bool) and 0 < factor <= 1):
        problems.append(f"warmup_factor must be a number in (0, 1] (the first iteration's fraction of the rate), "
                        f"got {factor!r}")
    return problems
