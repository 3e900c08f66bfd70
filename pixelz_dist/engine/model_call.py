"""How a batch reaches the model and how a loss comes back: the only contract between a user's model and the loop."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def call_model(model, batch):
    """``model(*batch)`` for a tuple or list, ``model(**batch)`` for a dict, ``model(batch)`` otherwise."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def extract_loss(output) -> torch.Tensor:
    """The loss in what the model returned: a scalar tensor, a dict or object with ``loss`` (Hugging Face style).

    A tensor with more than one element is reduced by its mean, as if the model had returned per-sample losses.

    Raises:
        TypeError: nothing usable came back, naming what did.
    """
    if type(output) is torch.Tensor and output.ndim == 0:  # the common case, first
        return output
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, Mapping) and "loss" in output:
        loss = output["loss"]
    elif not isinstance(output, Mapping) and getattr(output, "loss", None) is not None:
        loss = output.loss
    else:
        what = f"a dict with keys {sorted(map(str, output))}" if isinstance(output, Mapping) else \
            f"{type(output).__name__} {output!r:.80}"
        raise TypeError(f"the model's forward returned {what}; pixelz_dist needs the loss: a scalar tensor, or a "
                        "dict / object with a 'loss' entry. HINT: compute the loss inside forward and return it.")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the model's loss is a {type(loss).__name__} ({loss!r:.80}), not a tensor. "
                        "HINT: return the loss tensor itself, not loss.item().")
    if loss.dim() != 0:
        loss = loss.mean()
    return loss
