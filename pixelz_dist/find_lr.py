"""``python -m pixelz_dist.find_lr`` (also ``pixelz-find-lr``): the learning-rate finder from the command line.

The model, data and optimizer options (and ``--config`` files) are the training command's, so the suggestion is for
the run you will start; training-only keys of a config file are ignored. The suggestion goes to stdout; progress
(one line per run, or a bar on a terminal) to stderr. Exit codes: 0 a suggestion, 1 none (or a bug, with its
traceback), and the training command's for the rest: 2 bad input, 71 a DataLoader worker was killed, 130 Ctrl-C.

Examples::

    python -m pixelz_dist.find_lr --demo                                  # 15 runs of 20 iterations, a few seconds
    python -m pixelz_dist.find_lr --demo --method sweep --plot lr.png     # one rising-rate run, and a plot
    python -m pixelz_dist.find_lr --config run.toml --method sweep        # the training run's model, data, optimizer
    torchrun --nproc_per_node=2 -m pixelz_dist.find_lr --demo --batch-size 4
"""

from __future__ import annotations

import gc
import logging
import sys
import types

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import options as cli
from .distributed.preemption import INTERRUPT_EXIT_CODE
from .errors import PixelzError

logger = logging.getLogger("pixelz_dist.find_lr")  # not __name__: "__main__" under python -m


@record  # under torchrun, the failing rank's traceback is shown in the job summary
def main(argv=None) -> int:
    opts = cli.parse("find_lr", argv)
    cli.setup_logging()
    from .cli.build import build_dataset_and_model, build_optimizer, place_model
    from .cli.config import ConfigSaver
    from .distributed.env import read_env
    from .lr_finder.search import find_lr

    is_main = read_env().is_main
    try:
        model, dataset = build_dataset_and_model(opts)
        place_model(model, opts.device)
        optimizer = build_optimizer(model, opts)
        torch.manual_seed(opts.seed)  # dropout draws from the global RNG: the same --seed gives the same curve
        stem = opts.result_file[:-4] if opts.result_file.endswith(".npz") else opts.result_file
        saver = ConfigSaver(f"{stem}_config.toml", cli.config_values(opts),
                            "python -m pixelz_dist.find_lr --config THIS_FILE repeats the search")
        model = find_lr(model, optimizer, dataset, callbacks=[saver], train_kwargs=cli.step_options(opts),
                        **cli.keywords(opts, cli.FIND_LR_ARGUMENTS))
    except PixelzError as e:
        return cli.report_error(e)
    except KeyboardInterrupt:  # the finder's runs are short: Ctrl-C ends it (an Interrupted one is a KeyboardInterrupt)
        print("stopped (Ctrl-C): no result written", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    result = model.lr_finder_result
    if not is_main:
        return 0
    if opts.plot:
        try:
            logger.info("lr finder: plot written to %s", result.plot(opts.plot))
        except ImportError as e:
            logger.warning("%s", e)
    if result.suggestion is None:
        print(f"no suggestion: {result.note}")
        return 1
    print(f"suggested lr: {result.suggestion:.3g}")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module rebinds the package attribute ``pixelz_dist.find_lr`` from the function to the module
    (the import system does it after the module runs, so it cannot be undone here). Calling the module calls the
    function, so ``pixelz_dist.find_lr(model, ...)`` keeps working in a process that imported the command line."""

    def __call__(self, *args, **kwargs):
        from .lr_finder.search import find_lr

        return find_lr(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    code = main()
    # The run is over and its files are written: spare the interpreter's garbage collections at exit (torch's 300,000
    # objects and more, about 1.3 s a process). Python promises no finalizer of garbage at exit either.
    gc.freeze()
    sys.exit(code)
