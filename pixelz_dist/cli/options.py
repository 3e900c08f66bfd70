"""Command-line options shared by ``python -m pixelz_dist.train``, ``python -m pixelz_dist.find_lr`` and
``python -m pixelz_dist.evaluate``.

One definition of the model / data / optimizer options, so the finder measures exactly what training will run and
the evaluation builds the model and data training built (``--config RUN_config.toml`` gives it them).
:func:`parse` turns ``argv`` (and the ``--config`` file it names) into the resolved options: the command line
overrides the file, the file overrides the defaults (see :mod:`pixelz_dist.cli.config` for the rules). Every usage
error is one line ``error: ...`` on stderr and exit code 2.

Adding an option that ``train_model`` passes through (e.g. ``clip_grad_norm``) is one line in
:mod:`pixelz_dist.cli.passthrough`; the checks of the resolved values are :mod:`pixelz_dist.cli.checks`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys

from ..distributed.env import read_env
from ..engine.settings import LEGACY_NAMES
from ..errors import ConfigError, PixelzError
from ..log import ensure_handler, logger
from .checks import AUGMENTATION, finish
from .config import OptionSpec, check_table, load_toml, merge
from .imports import parse_assignments
from .passthrough import (  # noqa: F401 (re-exported: the entry points read them here)
    EMA_OPTIONS,
    EVALUATE_STEP_OPTIONS,
    FIND_LR_ARGUMENTS,
    SCHEDULE_OPTIONS,
    STEP_OPTIONS,
    TRAIN_MODEL_ARGUMENTS,
    TRAIN_MODEL_OPTIONS,
    keywords,
    step_options,
)

COMMANDS = {"train": "python -m pixelz_dist.train", "find_lr": "python -m pixelz_dist.find_lr",
            "evaluate": "python -m pixelz_dist.evaluate"}
META = ("config", "print_config")  # options about the configuration itself, never saved in it
TABLES = ("model_arg", "dataset_arg", "param_lr")  # repeatable KEY=VALUE options; tables in a config file
EXCLUSIVE = [("epochs", "iters"), ("demo", "model"), ("demo", "data", "dataset")]
DEPENDENTS = {"model": ("model_arg",), "data": ("modes", "on_bad_file", "cache_dir", *AUGMENTATION, "val_data"),
              "dataset": ("dataset_arg",)}
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULERS = ("none", "step", "multistep", "cosine", "onecycle", "poly")

def error_line(error: BaseException) -> str:
    """The message of ``error`` for one ``error: ...`` line: an error raised in a DataLoader worker reaches the main
    process wrapped in the worker's traceback (``Caught DataError in DataLoader worker process 0 ...``): its own
    message is the last part of it. Under torchrun it starts with the rank (``[rank 1] ...``)."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.rsplit(f"{type(error).__name__}: ", 1)[-1].strip()
    env = read_env()
    if env.is_distributed and not getattr(error, "on_every_rank", False):
        return f"[rank {env.rank}] {text}"  # which rank failed, in a job's merged output
    return text


def report_error(error: PixelzError) -> int:
    """Print ``error`` as the one ``error: ...`` line and return its exit code. An error every rank raised alike (rank
    0 decided and told the others, e.g. that no snapshot loads) is printed by rank 0 alone: 64 ranks must not print
    64 copies; it names the rank that failed when that is another one."""
    if not error.on_every_rank or read_env().is_main:
        print(f"error: {error_line(error)}", file=sys.stderr)
    return error.exit_code


class _Formatter(argparse.HelpFormatter):
    """Shows each option's real default (the parser's own defaults are suppressed, see :func:`_capture_defaults`)."""

    def _get_help_string(self, action):
        default = getattr(action, "pixelz_default", None)
        text = action.help or ""
        if default is not None and default is not False and default != argparse.SUPPRESS and "default" not in text:
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse's own message, with the options that were probably meant (a config key gets them too)
            hint = close_options(self, extras)
            fail(f"unrecognized arguments: {' '.join(extras)}" + (f" ({hint})" if hint else " (see --help)"))
        return namespace


def close_options(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``did you mean --epochs?`` for the unknown options among ``extras`` (``--epoch``, ``--snaphot_interval=2``):
    the parser's long options closest to each, compared in the dashed spelling; empty when none is close."""
    names = sorted(s[2:] for s in parser._option_string_actions if s.startswith("--"))
    hints = []
    for token in extras:
        if not token.startswith("--") or token == "--":
            continue
        name = token.partition("=")[0][2:].replace("_", "-")  # compared without the "--" every option shares
        close = difflib.get_close_matches(name, names, n=3)
        if close:
            hints.append((token.partition("=")[0], " or ".join(f"--{c}" for c in close)))
    if len(hints) == 1:
        return f"did you mean {hints[0][1]}?"
    return "; ".join(f"{token}: did you mean {close}?" for token, close in hints)


def fail(message: str) -> None:
    """A usage error: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def add_ignore_index(group) -> None:
    """``--ignore-index``: the one definition of the label value that means "no class", for every option that needs
    it (the padding of label maps by ``--crop``, metrics that leave those pixels out)."""
    group.add_argument("--ignore-index", type=int, default=255, metavar="INDEX", help="the value of label-map pixels "
                       "without a class: --crop pads label maps with it; give your loss the same (e.g. "
                       "F.cross_entropy(..., ignore_index=255))")


# -- the options -----------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    """The options every command has; ``evaluate`` trains nothing, so it has no optimizer, step or order options."""
    train, evaluate = command == "train", command == "evaluate"
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="TOML", help="read options from this TOML file (keys: the long option names "
                   "with '_' for '-'); options on the command line override it")
    g.add_argument("--print-config", action="store_true", help="print the resolved configuration as TOML and exit")

    g = p.add_argument_group("model")
    g.add_argument("--demo", action="store_true", help="the built-in demo: a tiny segmentation network on a "
                   "synthetic multi-image dataset of real image files (replaces --model and the data)")
    g.add_argument("--demo-dir", help="where the demo images go (default: a folder in the temporary directory)")
    g.add_argument("--demo-samples", type=int, default=64, help="number of demo samples")
    g.add_argument("--model", metavar="MODULE:FACTORY", help="a callable returning an nn.Module whose forward takes "
                   "a batch and returns the loss, e.g. mypkg.models:build_unet")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="keyword argument for the model "
                   "factory, VALUE a Python literal (repeatable)")

    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="DIR", help="one folder per image of a sample (files pair by name): "
                   "a MultiImgsDataset giving float tensors in [0, 1] (label folders: int64 class indices), as "
                   "model(*images)")
    g.add_argument("--modes", nargs="+", metavar="MODE", help="per --data folder: RGB, L, unchanged, auto, or label "
                   "for class-index maps (segmentation targets: int64 H x W, values exactly as stored, never scaled; "
                   "PNG in mode P, L or I;16, colour and JPEG files refused) (default: auto)")
    g.add_argument("--on-bad-file", choices=("raise", "skip"), default="raise",
                   help="--data: a file that cannot be decoded stops training with its name (raise), or is logged "
                        "once and replaced by the next good sample (skip)")
    g.add_argument("--cache-dir", metavar="DIR", help="--data: keep the decoded pixels of lossless images (PNG, TIFF, "
                   "BMP, ...) in DIR, so they are inflated once, not every epoch (fill it ahead with "
                   "python -m pixelz_dist.prepare)")
    g.add_argument("--crop", nargs="+", type=int, metavar="SIZE", help="--data: a random crop of SIZE x SIZE or "
                   "(two numbers) H x W, the same for every folder of a sample; an image smaller than the crop is "
                   "padded (images with --pad-value, label maps with --ignore-index)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=False,
                   help="--data: flip each sample (all its folders) horizontally with probability 0.5")
    g.add_argument("--scale-range", nargs=2, type=float, metavar=("LO", "HI"), help="--data with --crop: before the "
                   "crop, resize each sample by a factor drawn uniformly from [LO, HI] of its own size (images "
                   "bilinear, label maps nearest), e.g. 0.5 2.0 as torchvision's segmentation references")
    g.add_argument("--pad-value", type=int, default=0, metavar="VALUE", help="--crop: the value images are padded "
                   "with, 0..255 in stored pixel units (the padding comes before the scaling to [0, 1])")
    add_ignore_index(g)
    g.add_argument("--dataset", metavar="MODULE:FACTORY", help="a callable returning a map-style dataset, for full "
                   "control over the data")
    g.add_argument("--dataset-arg", action="append", metavar="KEY=VALUE",
                   help="keyword argument for the dataset factory (repeatable)")
    g.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch and process")
    if not evaluate:
        g.add_argument("--iter-size", type=int, default=1, help="micro-batches per optimizer step")
        g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                       help="a new order each epoch")
    g.add_argument("--seed", type=int, default=0, help="torch, numpy and random are seeded with it before the model "
                   "is built (the initial weights: a --model factory's too, and the demo's)" + (
                       "; the snapshot's weights replace them" if evaluate else
                       ", so dropout draws follow it; it also sets the data order and the augmentation"))
    g.add_argument("--workers", type=int, help="DataLoader workers per process (default: automatic)")

    g = p.add_argument_group("device and step")
    g.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N; under "
                   "torchrun each process takes the GPU of its LOCAL_RANK")
    for flag, _, kwargs in STEP_OPTIONS:
        if not evaluate or flag in EVALUATE_STEP_OPTIONS:
            g.add_argument(flag, **kwargs)
    if evaluate:
        return

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="torch.optim.SGD, AdamW or Adam")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate" + ("" if train else
                   "; the finder keeps the --param-lr ratios to it"))
    g.add_argument("--momentum", type=float, help="sgd only (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="default: the optimizer's (adamw 0.01, else 0)")
    g.add_argument("--no-decay-norm-bias", action="store_true",  # not BooleanOptionalAction: it reads "--no-" as off
                   help="no weight decay for biases and normalisation layers' parameters (the rest keep "
                        "--weight-decay; --param-lr rates still apply)")
    g.add_argument("--param-lr", action="append", metavar="NAME=LR", help="learning rate of the parameters whose "
                   "name, glob pattern or module prefix is NAME (repeatable; see make_param_groups)")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("snapshots to evaluate")
    g.add_argument("--snapshot-prefix", metavar="PREFIX", help="the training run's snapshot prefix: every snapshot "
                   "PREFIX_iter_N.pt not yet in PREFIX_eval.jsonl is evaluated and gets a row there (demo default: "
                   "DEMO_DIR/snapshots/demo)")
    g.add_argument("--follow", action="store_true", help="wait for new snapshots, evaluate each once it is "
                   "written, and exit 0 once the run's final snapshot is evaluated")
    g.add_argument("--poll-seconds", type=float, default=5.0, help="--follow: seconds between looks at the folder")
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="--follow: give up (exit code 2) when no new "
                   "snapshot appeared for SECONDS and the final one is not evaluated (default: wait for ever)")
    _add_measures(p.add_argument_group("what is measured (the loss always; a run's saved configuration gives "
                                       "its validation's)"), evaluate=True)


def _add_measures(g, evaluate: bool) -> None:
    """The metric and weight options of the in-loop validation (``train``) and of ``evaluate``: one definition, so
    a run's saved configuration measures beside the run what the run validated."""
    g.add_argument("--val-miou", type=int, metavar="CLASSES", help="also measure the mean IoU (miou) of CLASSES "
                   "classes: the model's forward returns {'loss': ..., 'logits': N x CLASSES x H x W} and the last "
                   "--data folder holds the class-index masks")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate the snapshots' moving average of the weights (a run trained with --ema) instead of "
                        "its trained weights" if evaluate else "validate the moving average of the weights (needs "
                   "--ema)")


def _add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("length")
    g.add_argument("--epochs", type=int, help="train for this many epochs (demo default: 5)")
    g.add_argument("--iters", type=int, help="train for this many iterations (optimizer steps)")

    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="none", help="step: x gamma every --step-size; "
                   "multistep: x gamma at each of --milestones; cosine: down to --eta-min over the run; poly: "
                   "x (1 - t/T)^--poly-power, to 0 at the run's end; onecycle: "
                   "up to --lr and down, stepped every iteration")
    g.add_argument("--step-size", type=int, help="step: epochs (iterations with --schedule-on-iter) between decays")
    g.add_argument("--milestones", nargs="+", type=int, help="multistep: epochs (or iterations) of the decays")
    g.add_argument("--gamma", type=float, default=0.1, help="step / multistep: the decay factor")
    g.add_argument("--eta-min", type=float, default=0.0, help="cosine: the final learning rate")
    g.add_argument("--poly-power", type=float, default=0.9, help="poly: the exponent")
    g.add_argument("--schedule-on-iter", action=argparse.BooleanOptionalAction, default=False,
                   help="step the scheduler every iteration instead of every epoch (onecycle always does)")
    for flag, _, kwargs in SCHEDULE_OPTIONS:
        g.add_argument(flag, **kwargs)

    g = p.add_argument_group("moving average of the weights")
    for flag, _, kwargs in EMA_OPTIONS:
        g.add_argument(flag, **kwargs)

    g = p.add_argument_group("snapshots and logging")
    g.add_argument("--resume", metavar="auto|PATH", help="continue from a snapshot file, or 'auto': the newest valid "
                   "snapshot of --snapshot-prefix (none yet: start fresh)")
    for flag, _, kwargs in TRAIN_MODEL_OPTIONS:
        g.add_argument(flag, **kwargs)
    g.add_argument("--tensorboard", metavar="DIR", help="also log loss and learning rates to TensorBoard in DIR "
                   "(needs the [tensorboard] extra)")
    # not --plot: find_lr's --plot PNG shares the config files (a bool "plot" key would break find_lr --config)
    g.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the training curves to SNAPSHOT_PREFIX_curves.png when training ends (rank 0, when "
                        "matplotlib is installed: the [plot] extra); later: python -m pixelz_dist.plot PREFIX")

    g = p.add_argument_group("validation")
    g.add_argument("--val-data", nargs="+", metavar="DIR", help="validation folders, one per --data folder in the "
                   "same order and roles, decoded with the same --modes; every rank evaluates its share, each sample "
                   "once, and val_loss (and val_miou) go to the log, the metrics file and TensorBoard")
    g.add_argument("--val-interval", type=int, default=1, metavar="N", help="validate every N epochs, or every N "
                   "iterations when training by --iters")
    g.add_argument("--val-batch-size", type=int, metavar="N", help="validation samples per batch and process "
                   "(default: --batch-size)")
    _add_measures(g, evaluate=False)


def _add_find_lr(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning-rate finder")
    g.add_argument("--method", choices=("runs", "sweep"), default="runs",
                   help="runs: one short run per rate, each from the same start; sweep: one run with the rate "
                        "rising every iteration (about --num-runs times cheaper)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="the smallest rate tried")
    g.add_argument("--max-lr", type=float, default=10.0, help="the largest rate tried")
    g.add_argument("--num-runs", type=int, default=15, help="runs: rates tried, spaced exponentially")
    g.add_argument("--iter-per-run", type=int, default=20, help="runs: iterations per rate")
    g.add_argument("--num-iters", type=int, default=100, help="sweep: its length in iterations")
    g.add_argument("--divergence-factor", type=float, default=4.0,
                   help="a loss above this times the reference counts as diverged")
    g.add_argument("--stop-on-divergence", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the larger rates once a run diverged")
    g.add_argument("--resume", metavar="PATH", help="start every run from this snapshot (weights, optimizer and data "
                   "position)")
    g.add_argument("--restore-dataloader", action=argparse.BooleanOptionalAction, default=True,
                   help="with --resume: start at the snapshot's sample or (--no-restore-dataloader) the next epoch")
    g.add_argument("--result-file", help="the .npz written, with a .json and the configuration beside it (default: "
                   "DEMO_DIR/lr_finder/results.npz with --demo, else lr_finder/results.npz)")
    g.add_argument("--plot", metavar="PNG", help="also draw the curve to this file (needs matplotlib)")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``command`` (``"train"``, ``"find_lr"`` or ``"evaluate"``) with its real defaults in
    ``parser.pixelz_defaults`` and every argparse default suppressed, so that parsing returns only what the command
    line set."""
    description = {"train": "Train a model with pixelz_dist.",
                   "find_lr": "Find a learning rate for training with pixelz_dist.",
                   "evaluate": "Evaluate the snapshots of a training run (one-shot, or following the run with "
                               "--follow), appending one row per snapshot to PREFIX_eval.jsonl."}[command]
    epilog = {"train": "Exit codes: 0 done, 1 a bug (with its traceback), 2 usage error or bad input, 71 a DataLoader "
                       "worker died (out of memory?), 75 preempted (resume with --resume auto), 130 Ctrl-C",
              "find_lr": "Exit codes: 0 a suggestion, 1 no suggestion, 2 usage error or bad input, 71 a DataLoader "
                         "worker died, 130 Ctrl-C",
              "evaluate": "Exit codes: 0 done (with --follow: the run's final snapshot is evaluated), 2 usage error, "
                          "a snapshot that cannot be evaluated, or --timeout reached; 130 Ctrl-C"}[command]
    p = _Parser(prog=COMMANDS[command], description=description, formatter_class=_Formatter, allow_abbrev=False,
                epilog=epilog)
    _add_common(p, command)
    {"train": _add_train, "find_lr": _add_find_lr, "evaluate": _add_evaluate}[command](p)
    p.pixelz_defaults = {}
    for action in p._actions:
        if action.dest != "help":
            p.pixelz_defaults[action.dest] = {} if action.dest in TABLES else action.default
            action.pixelz_default = action.default
            action.default = argparse.SUPPRESS
    return p


def option_specs(p: argparse.ArgumentParser) -> dict[str, OptionSpec]:
    """What a config file may set for this parser, and as which type."""
    specs = {}
    for a in p._actions:
        if a.dest in ("help", *META):
            continue
        if a.dest in TABLES:
            kind = "table"
        elif isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            kind = "flag"
        else:
            kind = "list" if a.nargs in ("+", "*") or (isinstance(a.nargs, int) and a.nargs > 1) else "scalar"
        specs[a.dest] = OptionSpec(a.dest, a.option_strings[0], kind, a.type or str,
                                   tuple(a.choices) if a.choices else None)
    return specs


def _canonical_argv(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Accept ``--batch_size`` for ``--batch-size`` (and the old tool's misspellings); refuse one option given in two
    different spellings (``--snapshot-prefix a --snapshot_prefix b``, ``--shuffle --no-shuffle``). The same
    spelling twice is fine: the last wins, so a script's ``--resume auto`` can be overridden by its caller."""
    known = p._option_string_actions
    seen: dict[str, str] = {}
    out = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        name, eq, value = token.partition("=")
        if not name.startswith("--"):
            out.append(token)
            continue
        canonical = name if name in known else "--" + name[2:].replace("_", "-")
        canonical = "--" + LEGACY_NAMES.get(canonical[2:].replace("-", "_"), canonical[2:]).replace("_", "-")
        if canonical not in known:
            out.append(token)
            continue
        dest = known[canonical].dest
        if dest in seen and seen[dest] != name:
            fail(f"{seen[dest]} and {name} both given: they set the same option; give it once")
        seen[dest] = name
        out.append(canonical + eq + value)
    return out


def parse(command: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The resolved options of ``command`` from ``argv`` and its ``--config`` file; exits 2 on a usage error and
    prints the configuration and exits 0 with ``--print-config``."""
    p = build_parser(command)
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(p.parse_args(_canonical_argv(p, argv)))
    try:
        for key in TABLES:
            if key in given:
                given[key] = parse_assignments(given[key], p._option_string_actions[
                    "--" + key.replace("_", "-")].option_strings[0])
        config_path = given.pop("config", None)
        print_config = given.pop("print_config", False)
        from_file = {}
        specs = option_specs(p)
        if config_path:  # a file saved by another command (a run's PREFIX_config.toml) sets what this one has
            others = {key for c in COMMANDS if c != command for key in build_parser(c).pixelz_defaults}
            from_file = check_table(load_toml(config_path), specs, f"--config {config_path!r}",
                                    ignored=frozenset(others) - frozenset(specs))
        defaults = {k: v for k, v in p.pixelz_defaults.items() if k not in META}
        values, notes = merge(defaults, from_file, given, EXCLUSIVE, {k: s.flag for k, s in specs.items()},
                              DEPENDENTS)
        finish(command, values)
    except ConfigError as e:
        fail(str(e))
    opts = argparse.Namespace(**values)
    opts.notes = notes
    if print_config:
        from .config import dump_toml

        sys.stdout.write(dump_toml(values, f"{COMMANDS[command]} (resolved configuration)"))
        sys.exit(0)
    return opts


def config_values(opts: argparse.Namespace) -> dict:
    """The resolved options as saved beside a run (loadable with ``--config``). ``resume`` is left out: it says how
    one invocation starts, not what the run is (repeat the run with ``--config FILE``, continue it with
    ``--config FILE --resume auto``)."""
    return {k: v for k, v in vars(opts).items() if k not in ("notes", "resume")}


def setup_logging() -> None:
    """INFO lines on stderr when nothing else configured logging; ranks other than 0 only warn, unless
    PIXELZ_LOG_ALL_RANKS=1 asks for every rank's lines (INFO too)."""
    ensure_handler()
    if not read_env().is_main and os.environ.get("PIXELZ_LOG_ALL_RANKS") != "1":
        logger.setLevel(logging.WARNING)
