"""The sample table: arrays and byte buffers that DataLoader workers read without copying, and how it is handed over.

The hand-over tests use a real TCPStore server in this process, as torchrun's agent hosts one, and play the job's
ranks one after the other by setting RANK.
"""

import os
import pickle
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
import torch.distributed as tdist

from pixelz_dist.data.multi_images import MultiImgsDataset
from pixelz_dist.data.sample_table import FileColumn, SampleTable, StringTable
from pixelz_dist.distributed import once_per_job
from pixelz_dist.errors import DataError

NAMES = ["x1", "", "é2", "b\udcff", "x10"]  # an empty name, a non-ASCII one, one whose bytes are not UTF-8


def test_a_string_table_indexes_iterates_and_compares_like_the_list_it_holds():
    table = StringTable.of(NAMES)
    assert len(table) == 5 and table == NAMES and NAMES == table and list(table) == NAMES
    assert [table[i] for i in range(-5, 5)] == NAMES + NAMES
    assert table[1:4] == NAMES[1:4] and table[::-2] == NAMES[::-2] and table[np.int64(2)] == "é2"
    assert "x10" in table and table.index("x10") == 4 and table != NAMES[:4] and table != ["x1"] * 5
    assert table.joined() == "\0".join(NAMES).encode("utf-8", "surrogateescape")
    with pytest.raises(IndexError, match="index 5 out of range for 5 names"):
        table[5]
    assert StringTable.of([]) == [] and list(StringTable.of([""])) == [""]
    many = [f"n{i}" for i in range(10_000)]  # iteration decodes in chunks: across their borders
    assert list(StringTable.of(many)) == many
    assert pickle.loads(pickle.dumps(table)) == table


@pytest.mark.parametrize("shared", [True, False])
def test_a_sample_table_survives_its_encoding(shared):
    stems = ["a1", "a2", "a10"]
    names = [["a1.png", "a2.PNG", "a10.png"], ["a1.jpg", "a2.jpg", "a10.jpeg"] if shared else ["z.jpg", "y", "x.b.c"]]
    table = SampleTable.build(stems, names, shared_stems=shared)
    for t in (table, SampleTable.decode(table.encode())):
        columns = t.columns(["A/", "B/"])
        assert t.stems == stems and all(isinstance(c, FileColumn) for c in columns)
        assert columns[0] == ["A/" + n for n in names[0]] and columns[1] == ["B/" + n for n in names[1]]
        assert [columns[1].name(i) for i in range(3)] == names[1]
    with pytest.raises(DataError, match="cannot be read"):
        SampleTable.decode(table.encode()[:-5])


def _multi(tmp_path, n, folders=2):
    dirs = []
    for k in range(folders):
        d = tmp_path / f"f{k}"
        d.mkdir()
        for i in range(n):
            (d / f"img{i}.png").touch()
        dirs.append(str(d))
    return dirs


def _per_sample_containers(obj, n, seen=None, path="dataset"):
    """Paths of Python containers (list, tuple, dict, set) of ``n`` or more items reachable from ``obj``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = []
    if isinstance(obj, (list, tuple, dict, set, frozenset)):
        if len(obj) >= n:
            found.append(f"{path}: {type(obj).__name__} of {len(obj)}")
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            found += _per_sample_containers(value, n, seen, f"{path}[{key!r}]")
    elif type(obj).__module__.startswith("pixelz_dist"):
        slots = [s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ())]
        fields = {**getattr(obj, "__dict__", {}), **{s: getattr(obj, s) for s in slots if hasattr(obj, s)}}
        for name, value in fields.items():
            found += _per_sample_containers(value, n, seen, f"{path}.{name}")
    return found


@pytest.mark.parametrize("match", ["stem", "sorted"])
def test_the_dataset_holds_no_python_object_per_sample(tmp_path, match):
    """Lists of str are what forked workers end up copying: nothing per sample may be a Python container."""
    ds = MultiImgsDataset(_multi(tmp_path, 64), match=match)
    assert _per_sample_containers(ds, 64) == []
    assert isinstance(ds.stems, StringTable) and all(isinstance(c, FileColumn) for c in ds.files)
    assert ds.files[1][3] == os.path.join(tmp_path, "f1", "img3.png") and ds.stems[10] == "img10"


def test_without_a_torchrun_store_or_a_group_every_process_lists_for_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # an env:// launcher (srun) before the group: nothing to wait for
    assert MultiImgsDataset(_multi(tmp_path, 5)).stems == [f"img{i}" for i in range(5)]


# -- the hand-over through the job's store ----------------------------------------------------------------------------
@pytest.fixture
def job_store(monkeypatch):
    """A store as torchrun's agent hosts one, for a job of 3 ranks."""
    store = tdist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
    for name, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(store.port), "WORLD_SIZE": "3", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    return store


def as_rank(monkeypatch, rank):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(once_per_job, "_calls", Counter())  # each rank is a process of its own


def handover(produce, name="thing"):
    return once_per_job.from_rank0(name, produce, bytes, bytes, "the thing", "make it on rank 0")


def test_rank_0s_result_reaches_every_rank_in_chunks_and_leaves_the_store_clean(job_store, monkeypatch):
    big = os.urandom((8 << 20) + 12345)  # over the store's 8 MiB limit for one value
    as_rank(monkeypatch, 0)
    assert handover(lambda: big) == big and handover(lambda: b"second") == b"second"
    for rank in (1, 2):
        as_rank(monkeypatch, rank)
        assert handover(lambda: pytest.fail("only rank 0 produces")) == big
        assert handover(lambda: pytest.fail("only rank 0 produces")) == b"second"
    keys = [f"pixelz_dist/once/attempt_0/thing/{n}/{part}" for n in (1, 2) for part in ("0", "meta", "read")]
    assert not any(job_store.check([key]) for key in keys + ["pixelz_dist/once/attempt_0/thing/1/2"])  # deleted


@pytest.mark.parametrize("error,expected", [(DataError("folder 'x' does not exist"), "folder 'x' does not exist"),
                                            (PermissionError("denied"), "rank 0 failed: PermissionError: denied")])
def test_rank_0s_error_is_raised_on_every_rank_with_its_message(job_store, monkeypatch, error, expected):
    def fail():
        raise error

    as_rank(monkeypatch, 0)
    with pytest.raises(type(error)) as raised:
        handover(fail)
    assert getattr(raised.value, "on_every_rank", True)
    as_rank(monkeypatch, 1)
    with pytest.raises(DataError) as received:
        handover(fail)
    assert str(received.value) == expected and received.value.on_every_rank


def test_a_rank_whose_rank_0_hands_nothing_over_fails_after_the_timeout_with_a_hint(job_store, monkeypatch):
    monkeypatch.setenv("PIXELZ_DIST_TIMEOUT", "1")
    as_rank(monkeypatch, 2)
    with pytest.raises(DataError, match=r"rank 0 did not hand over the thing within 1 s .*HINT: make it on rank 0"):
        handover(bytes)
