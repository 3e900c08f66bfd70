"""The per-iteration order record a run writes beside its snapshots, and the comparison of two records."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import DataError
from ..fileio import AppendFile

HEADER = "iteration\tepoch\tfrom\tto\tdigest"


def open_order_record(prefix: str) -> AppendFile:
    """The record a run appends one line per iteration to: which global positions (and a digest of which samples)
    it consumed; a resumed run appends to the same file."""
    return AppendFile(f"{prefix}_order.tsv", HEADER)


def order_record_path(path_or_prefix: str) -> str:
    if os.path.isfile(path_or_prefix):
        return path_or_prefix
    candidate = f"{path_or_prefix}_order.tsv"
    if os.path.isfile(candidate):
        return candidate
    raise DataError(f"no order record at {path_or_prefix!r} nor {candidate!r}. HINT: pass the *_order.tsv file a "
                    "run wrote beside its snapshots, or the run's snapshot_prefix.")


def read_order_record(path_or_prefix: str) -> dict[int, tuple[int, int, int, str]]:
    """Iteration -> (epoch, from, to, digest). A resumed run appends; the last record of an iteration wins."""
    path = order_record_path(path_or_prefix)
    records = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("iteration"):
                continue
            parts = line.split("\t")
            if len(parts) != 5:
                raise DataError(f"{path}:{lineno} is not an order record line (expected 5 tab-separated fields): "
                                f"{line!r:.100}")
            it, epoch, begin, end = (int(x) for x in parts[:4])
            records[it] = (epoch, begin, end, parts[4])
    return records


@dataclass
class OrderComparison:
    """The outcome of :func:`compare_order_records`."""

    common: int
    mismatches: list[int] = field(default_factory=list)
    only_in_a: list[int] = field(default_factory=list)
    only_in_b: list[int] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.mismatches or self.only_in_a or self.only_in_b)

    def summary(self) -> str:
        if self.identical:
            return f"identical: {self.common} iterations consumed the same samples in the same order"
        parts = [f"{self.common} iterations in both"]
        if self.mismatches:
            parts.append(f"{len(self.mismatches)} differ (first at iteration {self.mismatches[0]})")
        if self.only_in_a:
            parts.append(f"{len(self.only_in_a)} only in the first (iterations {_span(self.only_in_a)})")
        if self.only_in_b:
            parts.append(f"{len(self.only_in_b)} only in the second (iterations {_span(self.only_in_b)})")
        return "DIFFERENT: " + ", ".join(parts)


def _span(its: list[int]) -> str:
    return str(its[0]) if len(its) == 1 else f"{its[0]}..{its[-1]}"


def compare_order_records(a: str, b: str) -> OrderComparison:
    """Compare the sample order two runs recorded (files or snapshot prefixes)."""
    ra, rb = read_order_record(a), read_order_record(b)
    common = sorted(set(ra) & set(rb))
    return OrderComparison(common=len(common), mismatches=[i for i in common if ra[i] != rb[i]],
                           only_in_a=sorted(set(ra) - set(rb)), only_in_b=sorted(set(rb) - set(ra)))
