"""``python -m pixelz_dist.train`` (also ``pixelz-train``): parse, build, train, report. Thin on purpose.

Examples::

    python -m pixelz_dist.train --demo                                   # one process, CPU, a few seconds
    torchrun --nproc_per_node=2 -m pixelz_dist.train --demo --iters 200
    python -m pixelz_dist.train --model mypkg.nets:unet --model-arg width=32 --data data/rgb data/mask \\
        --modes RGB L --optimizer adamw --lr 1e-3 --scheduler cosine --epochs 30 --snapshot-prefix runs/a/snap
    python -m pixelz_dist.train --config runs/a/snap_config.toml --resume auto   # the same run, continued

Options come from the command line, a ``--config`` TOML file and the defaults, in that order of precedence; the
resolved configuration is saved to ``{snapshot_prefix}_config.toml`` when training starts (after every check). Exit
codes: 0 done, 1 a bug (a traceback), 2 usage error or bad input (one line ``error: ...``), 71 a DataLoader worker was
killed (SIGKILL: usually out of memory) or exited with an error (one line ``error: DataLoader worker N (pid P) ...``;
fewer ``--workers`` or more memory, then ``--resume auto``), 75 preempted after a snapshot (start again with
``--resume auto``), 130 interrupted (Ctrl-C: after a snapshot; twice: at once). The codes live in
:mod:`pixelz_dist.errors` (``PixelzError.exit_code``, :data:`~pixelz_dist.errors.WORKER_DIED_EXIT_CODE`) and
:mod:`pixelz_dist.distributed.preemption`. Under torchrun the ``error:`` line names the rank that failed
(``error: [rank 1] ...``).
"""

from __future__ import annotations

import gc
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import options as cli
from .distributed.preemption import INTERRUPT_EXIT_CODE, Interrupted
from .errors import PixelzError

logger = logging.getLogger("pixelz_dist.train")  # not __name__: that is "__main__" under python -m


@record  # under torchrun, the failing rank's traceback is shown in the job summary
def main(argv=None) -> int:
    opts = cli.parse("train", argv)
    cli.setup_logging()
    from .cli.build import build_dataset_and_model, build_optimizer, build_scheduler, build_validation, place_model
    from .cli.checks import train_model_keywords
    from .cli.config import ConfigSaver
    from .distributed.env import read_env
    from .engine.train_model import train_model

    for note in opts.notes:
        logger.info("config: %s", note)
    env = read_env()
    if opts.deterministic:  # before anything starts CUDA: cuBLAS reads it once
        from .engine.determinism import set_cublas_workspace

        set_cublas_workspace()
    callbacks = []
    try:
        model, dataset = build_dataset_and_model(opts)
        place_model(model, opts.device)
        optimizer = build_optimizer(model, opts)
        scheduler = build_scheduler(optimizer, opts, len(dataset), env.world_size)
        validation = build_validation(opts)
        if validation is not None:  # first: a callback's place names its state in snapshots
            callbacks.append(validation)
        if opts.tensorboard:
            from .callbacks.tensorboard import TensorBoardLogger

            callbacks.append(TensorBoardLogger(opts.tensorboard, every=opts.display_iter))
        from .callbacks.progress_bar import ProgressBar, want_progress_bar

        if want_progress_bar():
            callbacks.append(ProgressBar(refresh_every=opts.display_iter))
        if opts.snapshot_prefix:
            callbacks.append(ConfigSaver(f"{opts.snapshot_prefix}_config.toml", cli.config_values(opts),
                                         "python -m pixelz_dist.train --config THIS_FILE repeats the run"))
        if opts.demo:
            logger.info("demo data in %s (%d samples)", opts.demo_dir, len(dataset))
        if opts.curves and opts.snapshot_prefix:  # the last callback: it draws what the others logged
            from .callbacks.plot_curves import PlotCurves

            callbacks.append(PlotCurves())
        if opts.snapshot_prefix and opts.keep_last:
            logger.info("keeping the %d newest snapshots (--keep-last; 0 keeps every one)", opts.keep_last)
        # the keywords the parser checked as train_model would (cli.checks): nothing is written before that check
        train_model(model, optimizer, scheduler, dataset, callbacks=callbacks, **train_model_keywords(vars(opts)))
    except PixelzError as e:
        return cli.report_error(e)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    except KeyboardInterrupt:
        print("stopped at once (Ctrl-C twice): the newest snapshot is the last one written before", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    finally:
        for cb in callbacks:  # a progress bar and TensorBoard hold a terminal and files: give them back
            if callable(getattr(cb, "close", None)):
                cb.close()
    return 0


if __name__ == "__main__":
    code = main()
    # The run is over and its files are written: spare the interpreter's garbage collections at exit (torch's 300,000
    # objects and more, about 1.3 s a process). Python promises no finalizer of garbage at exit either.
    gc.freeze()
    sys.exit(code)
