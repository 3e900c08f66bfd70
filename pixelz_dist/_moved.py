"""Module paths of the flat layout (pixelz_dist 0.1.0), still importable: ``pixelz_dist.hooks`` and the like are
built on first import from the modules their names moved to, with a DeprecationWarning naming the new place.

A meta-path finder rather than one stub file per old module: the package stays the shape it is documented to be.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module -> the modules that hold its public names now
MOVED = {
    "amp": ("engine.precision",),
    "batch_source": ("data.dataset_source",),
    "build": ("cli.build",),
    "checkpointing": ("checkpoint.checkpointer",),
    "config": ("cli.config",),
    "demo": ("cli.demo",),
    "device_feed": ("data.device_feed",),
    "dist": ("distributed.env", "distributed.model_wrapping"),
    "hooks": ("callbacks.base", "engine.state"),
    "images": ("data.images",),
    "imports": ("cli.imports",),
    "model_io": ("engine.model_call",),
    "multigpu": ("engine.multigpu", "lr_finder.multigpu", "distributed.launch"),
    "order_record": ("checkpoint.order_record",),
    "param_groups": ("engine.param_groups",),
    "preemption": ("distributed.preemption",),
    "progress": ("engine.state",),
    "progress_bar": ("callbacks.progress_bar",),
    "rng": ("checkpoint.rng",),
    "sampler": ("data.sampler",),
    "seeding": ("data.seeding",),
    "settings": ("engine.settings",),
    "snapshot": ("checkpoint.file_format", "checkpoint.parts"),
    "tensorboard": ("callbacks.tensorboard",),
    "trainer": ("engine.train_model",),
    "user_loader": ("data.user_loader",),
}
PACKAGE = __name__.rpartition(".")[0]


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == PACKAGE and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default: an empty module, filled below

    def exec_module(self, module) -> None:
        old = module.__name__.rpartition(".")[2]
        targets = [f"{PACKAGE}.{t}" for t in MOVED[old]]
        warnings.warn(f"{module.__name__} is now {' and '.join(targets)}: import from there (or from {PACKAGE} "
                      "itself for the public names); the old path will go away", DeprecationWarning, stacklevel=2)
        for name in reversed(targets):  # the first target wins a name both define
            module.__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items()
                                    if not k.startswith("__")})
        module.__doc__ = f"Moved: see {', '.join(targets)}."


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())  # before any finder that could still see an old file


def old_module(name: str):
    """``pixelz_dist.<old name>`` as an attribute (what ``import pixelz_dist`` used to make available)."""
    if name in MOVED:
        return importlib.import_module(f"{PACKAGE}.{name}")
    raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
