"""The checks of a resolved command line: defaults that depend on other options, and combinations that cannot
work, each refused with a ConfigError that names the option and the fix (printed as one line, exit code 2).

They run on the merged values (defaults, ``--config`` file, command line), so a bad combination is refused
wherever it came from, before anything is written.
"""

from __future__ import annotations

import os
import re
import tempfile

from ..errors import ConfigError

#: The joint augmentation of --data (pixelz_dist.data.augment); the same names in a config file.
AUGMENTATION = ("crop", "hflip", "scale_range", "pad_value")

#: The demo's snapshot interval when none is given: one per epoch (--epochs), or every 10 iterations (--iters), so
#: that a demo killed with ``kill -9`` resumes with ``--resume auto`` near where it was.
DEMO_SNAPSHOT_EVERY = {"epochs": 1, "iters": 10}

#: Counts that divide or bound a loop (a batch of 0 samples would divide the epoch by zero), by command: (key,
#: smallest value). Checked before anything is built or written.
_COUNTS = {
    "all": (("batch_size", 1), ("demo_samples", 1), ("workers", 0)),
    "train": (("iter_size", 1), ("epochs", 1), ("iters", 1), ("display_iter", 1), ("step_size", 1), ("keep_last", 0),
              ("keep_best", 1), ("stop_patience", 1), ("val_interval", 1), ("val_batch_size", 1),
              ("warmup_iters", 0)),
    "find_lr": (("iter_size", 1),),  # its own counts: the finder's check (_check_as_find_lr)
    "evaluate": (),
}
#: Amounts that must be positive when given (seconds, norms, a snapshot interval in epochs or iterations).
_POSITIVE = {"train": ("snapshot_interval", "time_budget", "clip_grad_norm", "clip_grad_value"),
             "find_lr": ("clip_grad_norm", "clip_grad_value"), "evaluate": ()}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def finish(command: str, v: dict) -> None:
    """Fill the defaults that depend on other options and check the combinations; raises ConfigError."""
    if not v["demo"] and not v["model"]:
        raise ConfigError("no model: pass --model package.module:factory (or --demo)")
    if not v["demo"] and not v["data"] and not v["dataset"]:
        raise ConfigError("no data: pass --data DIR [DIR ...] or --dataset package.module:factory (or --demo)")
    for key, needs in (("modes", "data"), ("cache_dir", "data"), ("model_arg", "model"), ("dataset_arg", "dataset")):
        if v[key] and not v[needs]:
            raise ConfigError(f"--{key.replace('_', '-')} needs --{needs}")
    if v["on_bad_file"] != "raise" and not v["data"]:
        raise ConfigError("--on-bad-file applies to --data folders (a --dataset factory chooses its own handling)")
    _check_augmentation(v)
    _check_counts(command, v)
    if v["modes"] and len(v["modes"]) != len(v["data"]):
        raise ConfigError(f"--modes has {len(v['modes'])} entries for {len(v['data'])} --data folders; give one per "
                          "folder")
    for folder in v["data"] or ():
        if not os.path.isdir(folder):
            raise ConfigError(f"--data folder {folder!r} does not exist" if not os.path.exists(folder) else
                              f"--data {folder!r} is not a folder")
    if v["demo"] and not v["demo_dir"]:
        v["demo_dir"] = os.path.join(tempfile.gettempdir(), "pixelz_dist_demo")
    if command == "evaluate":
        _finish_evaluate(v)
        return
    if v["optimizer"] != "sgd" and v["momentum"] is not None:
        raise ConfigError(f"--momentum is for sgd; {v['optimizer']} has betas (leave --momentum out)")
    if v["optimizer"] == "sgd" and v["momentum"] is None:
        v["momentum"] = 0.9
    if v["weight_decay"] is None:
        v["weight_decay"] = 0.01 if v["optimizer"] == "adamw" else 0.0
    if command == "train":
        _finish_train(v)
        _check_as_train_model(v)
    else:
        if v["result_file"] is None:
            v["result_file"] = os.path.join(v["demo_dir"] if v["demo"] else "", "lr_finder", "results.npz")
        if v["resume"] is not None and not os.path.isfile(v["resume"]):
            raise ConfigError(f"--resume {v['resume']!r}: no such snapshot file")
        _check_as_find_lr(v)


def _check_counts(command: str, v: dict) -> None:
    """Every count and amount of ``command`` in its range, all problems in one ConfigError: a zero batch size (or
    iteration size, number of epochs, ...) must be refused here, before the demo writes its images or a scheduler
    divides the run's length by it."""
    problems = [f"{_flag(key)} must be >= {low}, got {v[key]}" for key, low in _COUNTS["all"] + _COUNTS[command]
                if v.get(key) is not None and v[key] < low]
    problems += [f"{_flag(key)} must be positive, got {v[key]:g}" for key in _POSITIVE[command]
                 if v.get(key) is not None and not v[key] > 0]
    if command == "train" and any(m < 0 for m in v["milestones"] or ()):
        problems.append(f"--milestones must be >= 0, got {' '.join(map(str, v['milestones']))}")
    if command == "train" and v["iters"] is not None and v["snapshot_interval"] is not None \
            and v["snapshot_interval"] > 0 and v["snapshot_interval"] != int(v["snapshot_interval"]):
        problems.append(f"--snapshot-interval counts iterations with --iters: a whole number, got "
                        f"{v['snapshot_interval']:g} (fractions of an epoch need --epochs)")
    if problems:
        raise ConfigError("; ".join(problems))


def _train_model_table():
    from .passthrough import EMA_OPTIONS, SCHEDULE_OPTIONS, STEP_OPTIONS, TRAIN_MODEL_ARGUMENTS, TRAIN_MODEL_OPTIONS

    return TRAIN_MODEL_ARGUMENTS + TRAIN_MODEL_OPTIONS + STEP_OPTIONS + SCHEDULE_OPTIONS + EMA_OPTIONS


def train_model_keywords(v: dict) -> dict:
    """The keyword arguments ``python -m pixelz_dist.train`` gives ``train_model`` from the resolved options ``v``
    (all but the model, optimizer, scheduler, dataset and callbacks), from passthrough's tables (which the name map
    of the docs is generated from): one mapping, so that the check at parse time (:func:`_check_as_train_model`)
    checks exactly what the run will get."""
    from .passthrough import dest

    kwargs = {row[1]: v[dest(row[0])] for row in _train_model_table()}
    kwargs["keep_last"] = kwargs["keep_last"] or None  # --keep-last 0: keep every snapshot
    return kwargs


def _as_flags(message: str, names: dict[str, str]) -> str:
    """A library error listing problems (``invalid ... arguments:\n  - batch_size must ...``) as one line that names
    the command-line options (``--batch-size must ...``)."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines()[1:]] or [message]
    text = re.sub(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b", lambda m: names[m.group(1)],
                  "; ".join(lines))
    return re.sub(r"(--[a-z-]+) is None", r"\1 is not given", text)  # an option left out, not a Python None


def _check_as_train_model(v: dict) -> None:
    """Run ``train_model``'s own check of its arguments on what the run will get, so that anything it refuses is
    refused now, before anything is built or written (the demo's images, a scheduler's division by the run's
    length)."""
    import inspect

    from ..engine.settings import check_settings, setting_names
    from ..engine.train_model import train_model

    kwargs = train_model_keywords(v)
    values = {name: p.default for name, p in inspect.signature(train_model).parameters.items()
              if name in setting_names()}
    values.update(kwargs, closure=False)  # the command line's optimizers take no closure
    names = {row[1]: row[0] for row in _train_model_table()}
    try:
        check_settings(values)
    except ConfigError as e:
        raise ConfigError(_as_flags(str(e), names)) from e


def _check_as_find_lr(v: dict) -> None:
    """The finder's own check of its arguments, now (see :func:`_check_as_train_model`)."""
    from ..lr_finder.search import _check_args
    from .passthrough import FIND_LR_ARGUMENTS

    names = {keyword: flag for flag, keyword in FIND_LR_ARGUMENTS}
    try:
        _check_args(v["method"], v["min_lr"], v["max_lr"], v["iter_per_run"], v["num_runs"], v["num_iters"],
                    v["divergence_factor"], None, v["resume"], {})
    except ConfigError as e:
        raise ConfigError(_as_flags(str(e), names)) from e


def _check_augmentation(v: dict) -> None:
    """--crop, --hflip, --scale-range, --pad-value: their values and what they need; raises ConfigError."""
    given = [f"--{k.replace('_', '-')}" for k in AUGMENTATION if v[k] not in (None, False, 0)]
    if given and not v["data"]:
        source = "--dataset factory builds its own transforms" if v["dataset"] else "demo's samples are fixed"
        raise ConfigError(f"{', '.join(given)} augment --data folders, but the {source}; HINT: drop "
                          f"{', '.join(given)}, or use --data (or add the augmentation to your --dataset factory: "
                          "pixelz_dist.data.augment.joint_augmentation)")
    if v["crop"] is not None and (len(v["crop"]) not in (1, 2) or min(v["crop"]) < 1):
        raise ConfigError(f"--crop takes one size (a square) or height and width, each at least 1; got "
                          f"{' '.join(map(str, v['crop']))}")
    if v["scale_range"] is not None:
        if len(v["scale_range"]) != 2 or not 0 < v["scale_range"][0] <= v["scale_range"][1]:
            raise ConfigError(f"--scale-range takes LO HI with 0 < LO <= HI (factors of each image's size, e.g. 0.5 "
                              f"2.0); got {' '.join(f'{x:g}' for x in v['scale_range'])}")
        if v["crop"] is None:
            raise ConfigError("--scale-range without --crop would give every sample another size, which a batch "
                              "cannot hold; HINT: add --crop SIZE (the crop comes after the rescale)")
    if v["pad_value"] and v["crop"] is None:
        raise ConfigError("--pad-value is what --crop pads images with; HINT: add --crop SIZE, or drop --pad-value")
    if not 0 <= v["pad_value"] <= 255:
        raise ConfigError(f"--pad-value {v['pad_value']} is not a pixel value: 0..255 (8-bit images are padded "
                          "before they are scaled to [0, 1])")


def _finish_evaluate(v: dict) -> None:
    if v["demo"] and not v["snapshot_prefix"]:
        v["snapshot_prefix"] = os.path.join(v["demo_dir"], "snapshots", "demo")
    if not v["snapshot_prefix"]:
        raise ConfigError("which run to evaluate: pass --snapshot-prefix PREFIX (the training run's), or --config "
                          "PREFIX_config.toml (saved beside its snapshots)")
    if v["poll_seconds"] <= 0:
        raise ConfigError(f"--poll-seconds must be positive, got {v['poll_seconds']:g}")
    if v["timeout"] is not None and not v["follow"]:
        raise ConfigError("--timeout is how long --follow waits for a new snapshot: pass --follow, or leave it out")
    if v["timeout"] is not None and v["timeout"] <= 0:
        raise ConfigError(f"--timeout must be positive, got {v['timeout']:g}")
    if v["val_miou"] is not None and v["val_miou"] < 1:
        raise ConfigError(f"--val-miou must be >= 1, got {v['val_miou']}")


def _finish_train(v: dict) -> None:
    if v["epochs"] is None and v["iters"] is None:
        if not v["demo"]:
            raise ConfigError("how long to train: pass --epochs N or --iters N")
        v["epochs"] = 5
    if v["demo"] and v["snapshot_interval"] is None:  # periodic snapshots: kill -9, then --resume auto goes on
        v["snapshot_interval"] = float(DEMO_SNAPSHOT_EVERY["iters" if v["iters"] is not None else "epochs"])
    if v["demo"] and not v["snapshot_prefix"]:
        v["snapshot_prefix"] = os.path.join(v["demo_dir"], "snapshots", "demo")
        if v["resume"] is None:  # the demo's own folder: a new demo run sets the last one's snapshots aside
            v["overwrite"] = True
    if v["resume"] == "auto" and not v["snapshot_prefix"]:
        raise ConfigError("--resume auto looks for the newest snapshot of --snapshot-prefix: pass --snapshot-prefix")
    if v["resume"] not in (None, "auto") and not os.path.isfile(v["resume"]):
        raise ConfigError(f"--resume {v['resume']!r}: no such snapshot file (or 'auto' for the newest of "
                          "--snapshot-prefix)")
    sched = v["scheduler"]
    if sched == "step" and not v["step_size"]:
        raise ConfigError("--scheduler step needs --step-size N")
    if sched == "multistep" and not v["milestones"]:
        raise ConfigError("--scheduler multistep needs --milestones N [N ...]")
    if sched == "onecycle":
        v["schedule_on_iter"] = True
    if sched == "poly" and not v["poly_power"] > 0:
        raise ConfigError(f"--poly-power must be > 0, got {v['poly_power']}")
    if v["ema"] is not None and not 0 < v["ema"] < 1:
        raise ConfigError(f"--ema is a decay between 0 and 1 (exclusive, e.g. 0.999), got {v['ema']}")
    if v["warmup_iters"] is not None and v["warmup_iters"] < 0:
        raise ConfigError(f"--warmup-iters must be >= 0, got {v['warmup_iters']}")
    if not 0 < v["warmup_factor"] <= 1:
        raise ConfigError(f"--warmup-factor must be in (0, 1], got {v['warmup_factor']}")
    _finish_validation(v)
    if v["tensorboard"]:
        from ..callbacks.tensorboard import check_tensorboard

        check_tensorboard()


def _finish_validation(v: dict) -> None:
    if not v["val_data"]:
        for key in ("val_batch_size", "val_miou", "keep_best"):
            if v[key] is not None:
                raise ConfigError(f"--{key.replace('_', '-')} needs --val-data (the validation folders)")
        if v["use_ema"]:
            raise ConfigError("--use-ema needs --val-data (the validation folders)")
        return
    if not v["data"]:
        raise ConfigError("--val-data pairs with --data (the same roles and --modes); a --dataset factory's run "
                          "validates through train_model(callbacks=[Validation(...)]) in Python")
    if len(v["val_data"]) != len(v["data"]):
        raise ConfigError(f"--val-data has {len(v['val_data'])} folders for {len(v['data'])} --data folders; give one "
                          "per --data folder, in the same order")
    for folder in v["val_data"]:
        if not os.path.isdir(folder):
            raise ConfigError(f"--val-data folder {folder!r} does not exist" if not os.path.exists(folder) else
                              f"--val-data {folder!r} is not a folder")
    for key in ("val_interval", "val_batch_size", "val_miou"):
        if v[key] is not None and v[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {v[key]}")
    if v["use_ema"] and v.get("ema") is None:
        raise ConfigError("--use-ema validates the moving average of the weights: pass --ema DECAY (e.g. 0.999)")
