"""A dataset's table of samples (stems and file names) in a form DataLoader workers read without copying it.

Why not lists of ``str``: a forked worker shares its parent's memory pages until it writes to them, and CPython
writes to every object it reads (the reference count lives in the object). A worker that takes paths from a list of
600 000 strings dirties every page that holds them and ends up with its own copy: measured here, each worker's
unique memory (USS) grew from 12 to 150 MiB over 20 000 samples, for every worker of every rank
(pytorch/pytorch#13246). Here every name is stored once in a :class:`StringTable`, one ``bytes`` buffer and one numpy
array of offsets, two objects whose data pages are never written when read, so workers keep sharing them.

With stem matching every folder's file names are the shared stems plus that folder's extension, so a folder's
column (:class:`FileColumn`) is the stems table and one small integer per sample naming its extension (``.png``,
``.JPG``, ...): for a million samples over three folders, about 20 MB instead of the 300 MB that lists of path
strings take. With ``match="sorted"`` each folder has a stems table of its own.

:meth:`SampleTable.encode` packs a table into one compressed ``bytes`` value, so that one process of a job lists
the folders and the others receive the table (:mod:`~pixelz_dist.distributed.once_per_job`).
"""

from __future__ import annotations

import json
import operator
import struct
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["FileColumn", "SampleTable", "StringTable"]

_ENCODING = ("utf-8", "surrogateescape")  # how os.scandir's str names map back to the bytes on disk, and back
_ITER_CHUNK = 4096  # names decoded per step of iteration: one decode and split instead of 4096
_MAGIC = b"PXZTABLE"
_PREFIX = struct.Struct("<8sI")  # magic, length of the JSON header that follows
_FORMAT = 1


class StringTable(Sequence):
    """A read-only sequence of strings kept as their UTF-8 bytes, NUL-separated in one ``bytes`` buffer, and an
    int64 array of where each starts (file names cannot contain NUL).

    It indexes, iterates, slices (a slice is a ``list``) and compares equal to a list of the same strings.
    """

    __slots__ = ("_data", "_starts")

    def __init__(self, data: bytes, starts: np.ndarray) -> None:
        self._data, self._starts = data, starts

    @classmethod
    def of(cls, strings: Sequence[str]) -> StringTable:
        return cls.from_joined("\0".join(strings).encode(*_ENCODING), len(strings))

    @classmethod
    def from_joined(cls, data: bytes, count: int) -> StringTable:
        """The table of ``count`` strings whose NUL-joined bytes are ``data``."""
        starts = np.empty(count + 1, dtype=np.int64)
        starts[0], starts[-1] = 0, len(data) + 1  # as if a NUL ended the last string too
        if count:
            separators = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0)
            if len(separators) != count - 1:
                raise DataError(f"a sample table's names are damaged: {len(separators) + 1} names where {count} "
                                "were expected")
            starts[1:-1] = separators + 1
        elif data:
            raise DataError(f"a sample table's names are damaged: {len(data)} bytes for no name")
        return cls(data, starts)

    def joined(self) -> bytes:
        """``"\\0".join(self).encode("utf-8", "surrogateescape")``, without building the strings."""
        return self._data

    @property
    def nbytes(self) -> int:
        return len(self._data) + self._starts.nbytes

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._starts) - 1
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} names")
        return self._data[self._starts[i] : self._starts[i + 1] - 1].decode(*_ENCODING)

    def __iter__(self) -> Iterator[str]:
        n, starts = len(self), self._starts
        for lo in range(0, n, _ITER_CHUNK):
            hi = min(lo + _ITER_CHUNK, n)
            yield from self._data[starts[lo] : starts[hi] - 1].decode(*_ENCODING).split("\0")

    def __eq__(self, other) -> bool:
        if isinstance(other, StringTable):
            return self._data == other._data and np.array_equal(self._starts, other._starts)
        return _equal(self, other)

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so unhashable like one

    def __repr__(self) -> str:
        return _repr(self)


class FileColumn(Sequence):
    """One folder's files in sample order, as full paths: ``folder prefix + stem + extension`` per sample.

    Read-only; it indexes, iterates, slices (a slice is a ``list``) and compares equal to a list of the same paths.
    """

    __slots__ = ("prefix", "_stems", "_codes", "_exts")

    def __init__(self, prefix: str, stems: StringTable, codes: np.ndarray, exts: tuple[str, ...]) -> None:
        self.prefix, self._stems, self._codes, self._exts = prefix, stems, codes, exts

    def name(self, index: int) -> str:
        """The file name of sample ``index``, without its folder."""
        return self._stems[index] + self._exts[self._codes[index]]

    def __len__(self) -> int:
        return len(self._codes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.prefix + self.name(index)

    def __iter__(self) -> Iterator[str]:
        prefix, exts, codes = self.prefix, self._exts, self._codes
        for i, stem in enumerate(self._stems):
            yield prefix + stem + exts[codes[i]]

    def __eq__(self, other) -> bool:
        return _equal(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return _repr(self)


def _equal(seq: Sequence, other) -> bool:
    if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
        return NotImplemented
    return len(seq) == len(other) and all(a == b for a, b in zip(seq, other))


def _repr(seq: Sequence) -> str:
    shown = ", ".join(repr(s) for s in seq[:3])
    return f"{type(seq).__name__}([{shown}{', ...' if len(seq) > 3 else ''}], {len(seq)} items)"


def _codes(stems: Sequence[str], names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per name, the index of its extension (what follows its stem) in the returned tuple of extensions."""
    index: dict[str, int] = {}
    codes = [index.setdefault(n[len(s) :], len(index)) for s, n in zip(stems, names)]
    dtype = np.uint8 if len(index) <= 256 else np.int32
    return np.array(codes, dtype=dtype), tuple(index)


class SampleTable:
    """The samples of a dataset over several folders: the stem of each, and each folder's file name of it.

    Args:
        stems: per sample, its stem (with ``match="sorted"``: the first folder's).
        folders: per folder, ``(stems of its files, extension code per sample, the extensions)``; with stem matching
            every folder's stems are ``stems`` itself.
    """

    def __init__(self, stems: StringTable, folders: list[tuple[StringTable, np.ndarray, tuple[str, ...]]]) -> None:
        self.stems, self.folders = stems, folders

    @classmethod
    def build(cls, stems: list[str], names: list[list[str]], shared_stems: bool) -> SampleTable:
        """The table of matched listings: ``stems`` and, per folder, its file names in sample order.
        ``shared_stems``: every folder's names are ``stems`` plus an extension (stem matching)."""
        table = StringTable.of(stems)
        folders = []
        for k, folder_names in enumerate(names):
            own = stems if shared_stems or k == 0 else [n[: n.rfind(".")] for n in folder_names]
            codes, exts = _codes(own, folder_names)
            folders.append((table if own is stems else StringTable.of(own), codes, exts))
        return cls(table, folders)

    def __len__(self) -> int:
        return len(self.stems)

    def columns(self, prefixes: Sequence[str]) -> list[FileColumn]:
        """Each folder's column of paths, under that folder's prefix (its path and a separator)."""
        return [FileColumn(prefix, *folder) for prefix, folder in zip(prefixes, self.folders)]

    @property
    def nbytes(self) -> int:
        tables = {id(t): t.nbytes for t, _, _ in self.folders}
        tables[id(self.stems)] = self.stems.nbytes
        return sum(tables.values()) + sum(codes.nbytes for _, codes, _ in self.folders)

    def encode(self) -> bytes:
        """One compressed value: a JSON header, then the stems' bytes and each folder's (own stems and) codes."""
        sections = [self.stems.joined()]
        folders = []
        for table, codes, exts in self.folders:
            own = table is not self.stems
            if own:
                sections.append(table.joined())
            sections.append(codes.tobytes())
            folders.append({"exts": list(exts), "own_stems": own, "dtype": codes.dtype.str})
        header = json.dumps({"format": _FORMAT, "count": len(self), "folders": folders,
                             "sections": [len(s) for s in sections]}).encode()
        return zlib.compress(b"".join([_PREFIX.pack(_MAGIC, len(header)), header, *sections]), 1)

    @classmethod
    def decode(cls, payload: bytes) -> SampleTable:
        """The table :meth:`encode` packed.

        Raises:
            DataError: ``payload`` is not such a table (damaged, or of another format).
        """
        try:
            raw = zlib.decompress(payload)
            magic, size = _PREFIX.unpack_from(raw)
            header = json.loads(raw[_PREFIX.size : _PREFIX.size + size]) if magic == _MAGIC else {}
        except (zlib.error, struct.error, ValueError) as e:
            raise DataError(f"a sample table that was handed over cannot be read ({e})") from e
        if header.get("format") != _FORMAT:
            raise DataError(f"a sample table that was handed over has format {header.get('format')!r}, not "
                            f"{_FORMAT}: the job's processes run different pixelz_dist versions. HINT: install one "
                            "version everywhere")
        view, offset, count = memoryview(raw), _PREFIX.size + size, header["count"]
        sections = []
        for length in header["sections"]:
            sections.append(view[offset : offset + length])
            offset += length
        parts = iter(sections)
        stems = StringTable.from_joined(bytes(next(parts)), count)
        folders = []
        for folder in header["folders"]:
            table = StringTable.from_joined(bytes(next(parts)), count) if folder["own_stems"] else stems
            codes = np.frombuffer(next(parts), dtype=np.dtype(folder["dtype"])).copy()
            folders.append((table, codes, tuple(folder["exts"])))
        return cls(stems, folders)
