"""The ``train_model`` keywords that the command line passes through unchanged, one line each:
``(flag, keyword, argparse keywords)``. The commands add each one to their parser (its group in ``--help``) and hand
its value to ``train_model`` under ``keyword``, so a new pass-through option is one line here.
"""

from __future__ import annotations

import argparse

# train_model keywords that the command line passes through unchanged: (flag, keyword, argparse keywords).
# One line per option; the training command adds each one and hands its value to train_model.
TRAIN_MODEL_OPTIONS = (
    ("--snapshot-prefix", "snapshot_prefix", dict(metavar="PREFIX", help="write snapshots to PREFIX_iter_N.pt and "
                                                  "the resolved configuration to PREFIX_config.toml (default: no "
                                                  "snapshots, not even a final one, and no resume, with a warning; "
                                                  "demo default: DEMO_DIR/snapshots/demo)")),
    ("--snapshot-interval", "snapshot_interval", dict(type=float, help="in epochs when training by --epochs (0.5 = "
                                                      "twice per epoch), in iterations with --iters (default: no "
                                                      "periodic snapshot, only the final one and those of a "
                                                      "preemption or Ctrl-C; demo default: every epoch, or every 10 "
                                                      "iterations with --iters)")),
    ("--keep-last", "keep_last", dict(type=int, default=3, metavar="K", help="keep only the K newest snapshots (an "
                                      "older one goes once a newer one is on disk, so --resume auto always finds "
                                      "one; the final snapshot is the newest; --keep-best's are kept besides); 0 "
                                      "keeps every snapshot")),
    ("--keep-best", "keep_best", dict(type=int, metavar="K", help="also keep the K best snapshots by --monitor-key "
                                      "(never removed by --keep-last) and PREFIX_best.pt, the best so far; needs "
                                      "--val-data")),
    # not --monitor: torchrun's parser reads it as an abbreviation of its own --monitor-interval, and stops
    ("--monitor-key", "monitor", dict(default="val_loss", metavar="KEY", help="the validation value --keep-best "
                                      "ranks by: val_loss, or val_<metric> (val_miou with --val-miou)")),
    ("--monitor-mode", "monitor_mode", dict(choices=("min", "max"), help="whether smaller (min) or larger (max) "
                                            "--monitor-key values are better (default: min for a loss, else "
                                            "required)")),
    ("--async-snapshots", "snapshot_async", dict(
        action=argparse.BooleanOptionalAction, default=True,
        help="write periodic snapshots in the background while training goes on (default); --no-async-snapshots: "
             "each holds up training until it is on disk")),
    ("--overwrite", "overwrite", dict(action=argparse.BooleanOptionalAction, default=False,
                                      help="a run without --resume into a prefix that holds another run's snapshots "
                                           "sets them aside (renamed NAME.old-<time>) instead of refusing; with "
                                           "--resume auto, so do snapshots of which none can be loaded")),
    ("--allow-changed-data", "allow_changed_data", dict(
        action=argparse.BooleanOptionalAction, default=False,
        help="with --resume: continue in the middle of an epoch although the data changed since the snapshot (files "
             "added, removed or renamed; refused otherwise): the epoch goes on at the same position of the new list")),
    ("--strict-load", "strict_load", dict(action=argparse.BooleanOptionalAction, default=True,
                                          help="--no-strict-load: resume a snapshot whose model has other keys, "
                                               "loading the keys both have (shapes must still match)")),
    ("--display-iter", "display_iter", dict(type=int, default=20, help="iterations between log lines")),
    ("--display-gpu", "display_gpu", dict(action=argparse.BooleanOptionalAction, default=False,
                                          help="add GPU memory to the log lines")),
    ("--stop-loss-below", "stop_loss_below", dict(type=float, metavar="LOSS",
                                                  help="stop once the smoothed training loss is below LOSS")),
    ("--stop-patience", "stop_patience", dict(type=int, metavar="N", help="stop after N iterations without a new "
                                              "best smoothed training loss")),
    ("--stop-min-delta", "stop_min_delta", dict(type=float, default=0.0,
                                                help="the improvement that counts for --stop-patience")),
    ("--time-budget", "time_budget", dict(type=float, metavar="SECONDS", help="stop with a final snapshot before "
                                          "SECONDS are spent (e.g. a little under the SLURM time limit)")),
    ("--deterministic", "deterministic", dict(
        action=argparse.BooleanOptionalAction, default=False,
        help="deterministic algorithms (cuDNN without benchmark, CUBLAS_WORKSPACE_CONFIG): a GPU run and its resume "
             "bit-identical; an op without a deterministic implementation is an error naming it")),
    ("--on-nonfinite", "on_nonfinite", dict(choices=("raise", "skip"), help="on a NaN / inf loss: stop with an "
                                            "error naming the iteration, or skip the step (default: no check)")),
)

# train_model keywords of the schedule and of the weights' moving average, passed through as TRAIN_MODEL_OPTIONS are
# (their own groups in --help).
SCHEDULE_OPTIONS = (
    ("--warmup-iters", "warmup_iters", dict(type=int, metavar="N", help="the first N iterations at a rate rising "
                                            "linearly from --warmup-factor x the rate to the rate, on top of any "
                                            "--scheduler (counted in iterations even when it steps per epoch)")),
    ("--warmup-factor", "warmup_factor", dict(type=float, default=0.001, help="--warmup-iters: the first "
                                              "iteration's fraction of the rate")),
)
EMA_OPTIONS = (
    ("--ema", "ema", dict(type=float, metavar="DECAY", help="keep an exponential moving average of the weights "
                          "(e.g. 0.999), updated after every applied step and saved in snapshots (key 'ema')")),
    ("--ema-buffers", "ema_buffers", dict(choices=("average", "copy"), default="average",
                                          help="--ema: average floating-point buffers (BatchNorm statistics) like "
                                               "the weights, or copy the live model's")),
)

# train_model keywords that both commands pass through (find_lr through its train_kwargs): the finder must measure
# the step that training will run.
STEP_OPTIONS = (
    ("--amp", "amp", dict(choices=("bf16", "fp16"), help="mixed precision: autocast around forward (fp16 with a "
                          "GradScaler)")),
    ("--channels-last", "channels_last", dict(action=argparse.BooleanOptionalAction, default=False,
                                              help="model and 4-D inputs in channels_last (conv nets on GPUs)")),
    ("--compile", "compile", dict(action=argparse.BooleanOptionalAction, default=False, help="torch.compile")),
    ("--clip-grad-norm", "clip_grad_norm", dict(type=float, metavar="MAX", help="clip the gradients' total norm")),
    ("--clip-grad-value", "clip_grad_value", dict(type=float, metavar="MAX", help="clamp each gradient element")),
)


# the step options that also apply to a forward pass alone (``python -m pixelz_dist.evaluate``)
EVALUATE_STEP_OPTIONS = ("--amp",)

# Keywords that the commands set from options defined with their groups in options.py, often under another name
# (``--iters`` is ``num_iters``): (flag, keyword). With the tables above they are the whole map from options to
# keywords, which the commands call with and the docs' name map (pixelz_dist.cli.reference) is generated from.
TRAIN_MODEL_ARGUMENTS = (
    ("--batch-size", "batch_size"), ("--shuffle", "shuffle"), ("--iters", "num_iters"), ("--epochs", "num_epochs"),
    ("--iter-size", "iter_size"), ("--resume", "load_snapshot_path"), ("--schedule-on-iter", "schedule_on_iter"),
    ("--seed", "seed"), ("--workers", "num_workers"),
)
FIND_LR_ARGUMENTS = (
    ("--batch-size", "batch_size"), ("--shuffle", "shuffle"), ("--iter-size", "iter_size"),
    ("--resume", "load_snapshot_path"), ("--restore-dataloader", "restore_dataloader"), ("--min-lr", "min_lr"),
    ("--max-lr", "max_lr"), ("--iter-per-run", "iter_per_run"), ("--num-runs", "num_runs"),
    ("--result-file", "result_file"), ("--method", "method"), ("--num-iters", "num_iters"),
    ("--divergence-factor", "divergence_factor"), ("--stop-on-divergence", "stop_on_divergence"), ("--seed", "seed"),
    ("--workers", "num_workers"),
)


def dest(flag: str) -> str:
    """The option's name in the parsed options and in config files: ``--batch-size`` -> ``batch_size``."""
    return flag[2:].replace("-", "_")


def keywords(opts: argparse.Namespace, table) -> dict:
    """The options of ``table`` (``(flag, keyword, ...)`` rows) as keyword arguments."""
    return {row[1]: getattr(opts, dest(row[0])) for row in table}


def step_options(opts: argparse.Namespace) -> dict:
    """The :data:`STEP_OPTIONS` as train_model keywords."""
    return keywords(opts, STEP_OPTIONS)
