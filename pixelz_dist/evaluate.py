"""``python -m pixelz_dist.evaluate`` (also ``pixelz-evaluate``): evaluate a training run's snapshots, beside it or
after it. Thin on purpose: the work is :mod:`pixelz_dist.evaluation.follow`'s.

Examples::

    # every snapshot of the run not yet evaluated, one row each in runs/a/snap_eval.jsonl; again: adds nothing
    python -m pixelz_dist.evaluate --config runs/a/snap_config.toml --data val/rgb val/mask --val-miou 21
    # on another machine of the same file system, while the run trains: exits 0 once its final snapshot is done
    python -m pixelz_dist.evaluate --config runs/a/snap_config.toml --data val/rgb val/mask --follow --use-ema
    python -m pixelz_dist.train --demo & python -m pixelz_dist.evaluate --demo --follow   # the demo, followed

The model and data options are ``train``'s (``--config`` reads a run's saved ``PREFIX_config.toml``; the command line
overrides it, e.g. with the validation folders). One process: the follower refuses ``torchrun`` (``WORLD_SIZE`` > 1),
which would only evaluate each snapshot several times over. Exit codes: 0 done (``--follow``: the run's final
snapshot is evaluated), 2 a usage error, a snapshot that cannot be evaluated (another model, no EMA weights for
``--use-ema``) or ``--timeout`` passed without a new snapshot (one line ``error: ...``), 130 Ctrl-C (the rows
written stay; run again to go on).
"""

from __future__ import annotations

import gc
import logging
import sys

from .cli import options as cli
from .distributed.preemption import INTERRUPT_EXIT_CODE
from .errors import ConfigError, PixelzError, on_every_rank

logger = logging.getLogger("pixelz_dist.evaluate")  # not __name__: that is "__main__" under python -m


def main(argv=None) -> int:
    opts = cli.parse("evaluate", argv)
    cli.setup_logging()
    from .cli.build import build_dataset_and_model, build_metrics, place_model
    from .distributed.env import read_env
    from .evaluation.follow import ModelEvaluation, SnapshotFollower, eval_file

    for note in opts.notes:
        logger.info("config: %s", note)
    try:
        if read_env().world_size > 1:
            raise on_every_rank(ConfigError(
                f"python -m pixelz_dist.evaluate runs as one process, not under torchrun (WORLD_SIZE="
                f"{read_env().world_size}): every process would evaluate every snapshot and append its rows. HINT: "
                "start it with python (on one GPU: --device cuda:N)."))
        model, dataset = build_dataset_and_model(opts, augment=False)  # a run's config holds its augmentation
        device = place_model(model, opts.device)
        evaluate = ModelEvaluation(model, dataset, use_ema=opts.use_ema, batch_size=opts.batch_size,
                                   metrics=build_metrics(opts), num_workers=opts.workers, device=device, amp=opts.amp)
        follower = SnapshotFollower(opts.snapshot_prefix, evaluate, use_ema=opts.use_ema,
                                    poll_seconds=opts.poll_seconds, timeout=opts.timeout)
        logger.info("evaluating the snapshots of %s (%d sample(s)%s) into %s%s", opts.snapshot_prefix, len(dataset),
                    ", EMA weights" if opts.use_ema else "", eval_file(opts.snapshot_prefix),
                    f"; following the run, every {opts.poll_seconds:g} s" if opts.follow else "")
        if opts.follow:
            follower.follow()
        else:
            added = follower.run_once()
            logger.info("%d snapshot(s) evaluated, %d evaluated before", added, len(follower.done) - added)
    except PixelzError as e:
        return cli.report_error(e)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C): the rows written stay; run again to evaluate the rest", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    return 0


if __name__ == "__main__":
    code = main()
    gc.freeze()  # as pixelz_dist.train: spare the garbage collections at exit
    sys.exit(code)
