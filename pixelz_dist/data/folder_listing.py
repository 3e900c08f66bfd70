"""Listing image folders and pairing their files into samples: by stem (``0001.png`` with ``0001.jpg``), or by
their natural sorted position for legacy data whose folders use different names.

The folders are scanned once with ``os.scandir`` and no image is opened, so listing a hundred thousand files takes a
fraction of a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ..errors import DataError
from .sample_table import SampleTable

__all__ = ["IMAGE_EXTENSIONS", "list_samples", "match_by_stem", "match_sorted", "natural_key", "scan_folder",
           "scan_images"]

#: Lower-case extensions treated as images; anything else in a folder is ignored.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

_MAX_LISTED = 5
_DIGITS = re.compile(r"\d+")


def _pad_digits(m: re.Match) -> str:
    digits = m.group().lstrip("0") or "0"
    return f"{len(digits):03d}{digits}"  # length first, so string order is numeric order


def natural_key(name: str) -> str:
    """Sort key under which ``img2`` comes before ``img10``, as people number files.

    Letters compare case-insensitively; the raw name breaks ties so the order is total and stable. The key is one
    string (digit runs rewritten as length + digits) because comparing strings is several times faster than
    comparing tuples, which matters when sorting 100 000 names.
    """
    return _DIGITS.sub(_pad_digits, name.lower()) + "\x00" + name


def scan_folder(folder: str) -> list[str]:
    # Unsorted: with stem matching only the first folder's stems need sorting.
    try:
        with os.scandir(folder) as it:
            names = [
                e.name
                for e in it
                # rfind rather than os.path.splitext: this runs once per name, 100 000s of times.
                if e.name[0] != "." and e.name[e.name.rfind(".") :].lower() in IMAGE_EXTENSIONS and e.is_file()
            ]
    except FileNotFoundError as exc:
        raise DataError(f"image folder {folder!r} does not exist") from exc
    except NotADirectoryError as exc:
        raise DataError(f"image folder {folder!r} is not a directory") from exc
    if not names:
        raise DataError(f"image folder {folder!r} holds no image files (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return names


def scan_images(folder: str) -> list[str]:
    """Names of the image files directly inside ``folder``, in natural order.

    Hidden files (leading dot) and non-images are skipped, which also ignores editors' and writers' temp files.

    Raises:
        DataError: the folder does not exist, is not a directory, or holds no image.
    """
    return sorted(scan_folder(folder), key=natural_key)


def _stem(name: str) -> str:
    # Only called on names that passed the extension filter, so a dot is always there and not leading.
    return name[: name.rfind(".")]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def match_by_stem(dirs: list[str], names: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """``(stems, names per folder in stem order)``: files pair by name without extension, so a missing partner is
    named rather than silently shifting every later pair.

    Raises:
        DataError: a folder holds two files of one stem, or the folders' stems differ (each missing one listed).
    """
    by_stem: list[dict[str, str]] = []
    for d, folder_names in zip(dirs, names):
        mapping = {_stem(n): n for n in folder_names}
        if len(mapping) != len(folder_names):
            seen: dict[str, str] = {}
            dups = []
            for n in sorted(folder_names, key=natural_key):
                s = _stem(n)
                if s in seen:
                    dups.append(f"{seen[s]} / {n}")
                seen[s] = n
            raise DataError(
                f"folder {d!r} holds several images with the same stem, so they cannot be paired: {_listing(dups)}"
            )
        by_stem.append(mapping)

    reference = by_stem[0].keys()
    if any(m.keys() != reference for m in by_stem[1:]):
        every = set().union(*(m.keys() for m in by_stem))
        counts = ", ".join(f"{d!r} has {len(m)} files" for d, m in zip(dirs, by_stem))
        missing = "; ".join(
            f"missing from {d!r}: {_listing(sorted(every - m.keys(), key=natural_key))}"
            for d, m in zip(dirs, by_stem)
            if len(m) != len(every)
        )
        raise DataError(f"image folders do not hold the same file stems: {counts}; {missing}")

    stems = sorted(reference, key=natural_key)
    return stems, [[m[s] for s in stems] for m in by_stem]


def match_sorted(dirs: list[str], names: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Pair by natural sorted position (legacy data whose folders use different names): only counts can be checked.

    Raises:
        DataError: the folders hold different numbers of files.
    """
    counts = [len(n) for n in names]
    if len(set(counts)) != 1:
        listed = ", ".join(f"{d!r} has {c} files" for d, c in zip(dirs, counts))
        raise DataError(f"image folders hold different numbers of files (match='sorted'): {listed}")
    names = [sorted(n, key=natural_key) for n in names]
    return [_stem(n) for n in names[0]], names



def list_samples(dirs: list[str], match: str) -> SampleTable:
    """List ``dirs`` and pair their files (``match``: ``"stem"`` or ``"sorted"``) into a :class:`SampleTable`.

    Raises:
        DataError: a folder is missing or empty, or the folders do not pair up.
    """
    names = [scan_folder(d) for d in dirs]
    stems, per_folder = (match_by_stem if match == "stem" else match_sorted)(dirs, names)
    return SampleTable.build(stems, per_folder, shared_stems=match == "stem")
