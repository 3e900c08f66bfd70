"""Recognising the list of samples a snapshot was taken on, so a resume onto a changed dataset is never silent.

The data position is a count of samples into an epoch's order, and that order is a permutation of the dataset's
indices. If files were added, removed or renamed between a snapshot and the resume, the same position points into a
different list: the rest of that epoch trains some samples twice and never shows others, and nothing fails. So the
snapshot records the list's length and a hash of its sample names, and the resume compares.

Names come from the dataset: :class:`~pixelz_dist.data.multi_images.MultiImgsDataset` has them (its stems), torch's
``Subset`` and ``ConcatDataset`` pass their members' through, and any dataset can offer them with a
``sample_names()`` method returning one string per index. Without names only the length is compared. Lists whose
names compress to at most :data:`MAX_STORED_BYTES` are also stored, so the refusal can name what changed; longer
ones (over about 100 000 samples) are recognised by their hash alone, to keep snapshots small.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

from torch.utils.data import ConcatDataset, Subset

from .sample_table import StringTable

#: Compressed name lists up to this size travel in every snapshot (``"\0"``-joined names, zlib level 1).
MAX_STORED_BYTES = 1 << 20
_SHOWN = 3


def sample_names(dataset) -> Sequence[str] | None:
    """One name per index of ``dataset``, or None when it offers none."""
    own = getattr(dataset, "sample_names", None)
    if callable(own):
        return own()
    if isinstance(dataset, Subset):
        inner = sample_names(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [sample_names(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [name for part in parts for name in part]
    return None


class SampleList:
    """The identity of a dataset's sample list: its length, and the hash (and, when small, the text) of its names."""

    def __init__(self, count: int, digest: str | None = None, packed: bytes | None = None):
        self.count, self.digest, self.packed = count, digest, packed

    @classmethod
    def of(cls, dataset) -> SampleList:
        names = sample_names(dataset)
        if names is None:
            return cls(len(dataset))
        # A dataset's StringTable holds exactly these bytes already: a million names hash without becoming strings.
        joined = (names.joined() if isinstance(names, StringTable)
                  else "\0".join(names).encode("utf-8", "surrogateescape"))
        packed = zlib.compress(joined, 1)
        return cls(len(names), hashlib.blake2b(joined, digest_size=16).hexdigest(),
                   packed if len(packed) <= MAX_STORED_BYTES else None)

    def state_dict(self) -> dict:
        return {"count": self.count, "digest": self.digest, "names": self.packed}

    def names(self) -> list[str] | None:
        if self.packed is None:
            return None
        text = zlib.decompress(self.packed).decode("utf-8", "surrogateescape")
        return text.split("\0") if text or self.count else []

    def difference(self, saved: dict | None) -> str | None:
        """How the list described by ``saved`` (a :meth:`state_dict`) differs from this one; None when it does not
        (or when ``saved`` is absent: a snapshot written before lists were recorded)."""
        if not saved:
            return None
        then = SampleList(int(saved["count"]), saved.get("digest"), saved.get("names"))
        if then.count == self.count and (then.digest is None or self.digest is None or then.digest == self.digest):
            return None
        counts = f"{then.count} samples when the snapshot was written, {self.count} now"
        old, new = then.names(), self.names()
        if old is None or new is None:
            if then.digest is not None and self.digest is not None and then.count == self.count:
                return f"{counts}, but their names differ (a rename or a swap; the list is too long to keep its names)"
            return counts
        old_set, new_set = set(old), set(new)
        added = [n for n in new if n not in old_set]
        removed = [n for n in old if n not in new_set]
        parts = [counts]
        if added:
            parts.append(f"{len(added)} added ({_few(added)})")
        if removed:
            parts.append(f"{len(removed)} gone ({_few(removed)})")
        if not added and not removed:
            parts.append("the same names in another order")
        return "; ".join(parts)


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (", ..." if len(names) > _SHOWN else "")
