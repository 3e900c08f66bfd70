"""Every training step runs in train mode, whatever happened before it; the model goes back as it came.

A model handed over in eval mode (``model.eval()`` after loading pretrained weights) or left in eval mode by a
callback's validation pass would otherwise train with frozen BatchNorm statistics and without dropout, and nothing
would fail. ``model.train()`` walks every module (850 us for a ResNet-50), too slow for every step; reading each
module's ``training`` flag costs about 5 us, so that is what the loop does before each step, and it calls
``train()`` only when some module is found in eval mode.
"""

from __future__ import annotations

import logging
import operator

from torch import nn

logger = logging.getLogger(__name__)

#: ``TRAINING(module)`` is ``module.training``; ``all(map(TRAINING, modules))`` is the loop's per-step check.
TRAINING = operator.attrgetter("training")


class TrainMode:
    """The modes ``model`` arrived in, and the switch back to train mode (one warning per run).

    Args:
        model: the user's module, before any wrapping (its modes are recorded by module name, since undoing
            SyncBatchNorm makes new module objects).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.arrival = {name: m.training for name, m in model.named_modules()}
        self.forward_model = model
        self.modules: tuple = tuple(model.modules())
        self.warned = False

    def watch(self, forward_model: nn.Module) -> None:
        """Check the modules of what the loop calls (the DDP / compile wrappers included)."""
        self.forward_model = forward_model
        self.modules = tuple(forward_model.modules())

    def ensure(self, when: str) -> None:
        """Put every module in train mode if one is not; ``when`` says at which point, for the warning."""
        if all(map(TRAINING, self.modules)):
            return
        named = list(self.model.named_modules())
        in_eval = [(name, m) for name, m in named if not m.training]
        leaves = [f"{name or 'the model'} ({type(m).__name__})" for name, m in in_eval if next(m.children(), None)
                  is None] or [name or "the model" for name, _ in in_eval]
        (logger.debug if self.warned else logger.warning)(
            "%s %d of its %d modules in eval mode (%s); every training step runs in train mode (BatchNorm "
            "statistics update, dropout is on), so model.train() was called; the model is returned in the modes it "
            "arrived in. HINT: to keep layers frozen while training, override the model's train() method to keep "
            "them in eval mode; a callback that evaluates can call model.train() when it is done", when,
            len(in_eval), len(named), _few(leaves))
        self.warned = True
        self.forward_model.train()

    def restore(self) -> None:
        """Each module back in the mode it arrived in; the wrappers are let go (a DDP wrapper holds the process
        group, and must be freed before the group is destroyed: see Engine.run)."""
        self.forward_model, self.modules = self.model, ()
        for name, module in self.model.named_modules():
            if name in self.arrival:
                module.training = self.arrival[name]


def _few(names: list, shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
