"""The flat layout's module paths (pixelz_dist 0.1.0) still import, with a DeprecationWarning naming the new place."""

import importlib
import sys

import pytest

import pixelz_dist
from pixelz_dist._moved import MOVED


def forget(old):
    """As in a fresh process: the alias not imported yet."""
    sys.modules.pop(f"pixelz_dist.{old}", None)
    pixelz_dist.__dict__.pop(old, None)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_module_path_imports_with_a_warning_naming_the_new_one(old):
    forget(old)
    with pytest.warns(DeprecationWarning, match=rf"pixelz_dist\.{old} is now pixelz_dist\."):
        module = importlib.import_module(f"pixelz_dist.{old}")
    for target in MOVED[old]:
        new = importlib.import_module(f"pixelz_dist.{target}")
        for name, value in vars(new).items():
            if not name.startswith("_") and getattr(value, "__module__", None) == new.__name__:
                assert getattr(module, name) is value, (old, name)


def test_what_old_scripts_and_the_old_readme_used():
    forget("hooks")
    forget("preemption")
    with pytest.warns(DeprecationWarning):
        from pixelz_dist.hooks import Callback, TrainState
    assert Callback is pixelz_dist.Callback and TrainState is pixelz_dist.TrainState
    with pytest.warns(DeprecationWarning):
        assert pixelz_dist.preemption.PREEMPTION_EXIT_CODE == pixelz_dist.PREEMPTION_EXIT_CODE == 75
    from pixelz_dist.callbacks import GradientClipping, ProgressBar, StopOnLoss, TensorBoardLogger  # noqa: F401
    from pixelz_dist.data import MultiImgsDataset  # noqa: F401
    from pixelz_dist.lr_finder import LRFinderResult, find_lr, suggest_lr  # noqa: F401
    with pytest.raises(AttributeError):
        pixelz_dist.no_such_module  # noqa: B018
