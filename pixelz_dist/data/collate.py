"""Making a batch, with errors that name the samples: torch's ``stack expects each tensor to be equal size, but got
[3, 32, 32] at entry 0 and [3, 30, 32] at entry 1`` says neither which dataset sample is the odd one nor what to do."""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import default_collate

from ..errors import DataError


def _shapes(sample, where: str = "") -> list[tuple[str, tuple]]:
    """``[(where in the sample, shape)]`` of every tensor or array in a (nested) sample."""
    if hasattr(sample, "shape") and not isinstance(sample, (str, bytes)):
        return [(where, tuple(sample.shape))]
    if isinstance(sample, Mapping):
        return [x for k, v in sample.items() for x in _shapes(v, f"{where}[{k!r}]")]
    if isinstance(sample, (list, tuple)):
        return [x for i, v in enumerate(sample) for x in _shapes(v, f"{where}[{i}]")]
    return []


class NamedCollate:
    """Wraps the DataLoader's ``collate_fn`` (torch's default one when None); ``source`` is what fetched the batch
    (a :class:`~pixelz_dist.data.seeding.SeededDataset`, whose ``last_indices`` name the samples), or None."""

    def __init__(self, collate_fn=None, source=None):
        self.collate_fn = collate_fn or default_collate
        self.source = source

    def __call__(self, samples):
        try:
            return self.collate_fn(samples)
        except (RuntimeError, TypeError, ValueError) as e:
            raise DataError(self.describe(samples, e)) from e

    def describe(self, samples: list, error: Exception) -> str:
        indices = getattr(self.source, "last_indices", None)
        name = (lambda k: f"sample {indices[k]}") if indices and len(indices) == len(samples) else (
            lambda k: f"the batch's sample #{k}")
        first = _shapes(samples[0]) if samples else []
        for k, sample in enumerate(samples[1:], 1):
            for (where, shape), (_, other) in zip(first, _shapes(sample)):
                if shape != other:
                    return (f"cannot make a batch: {name(k)}{where} has shape {other}, {name(0)}{where} has "
                            f"{shape}. HINT: give every sample the same size (a resize or crop in the dataset's "
                            "transform), or pass a collate_fn that pads them.")
        return f"cannot make a batch of {len(samples)} samples ({name(0)} first): {type(error).__name__}: {error}"
