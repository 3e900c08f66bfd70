"""The relay of warnings from every rank (pixelz_dist.distributed.log_relay), over a real TCPStore in this process.

Each relay stands for one rank; records are handed to its filter as the library's loggers would. The torchrun tests
(tests/test_distributed.py) show the same through real jobs.
"""

import logging
import os
from datetime import timedelta

import pytest
import torch.distributed as tdist

from pixelz_dist.distributed.log_relay import LogRelay, rank_list

NAME = "pixelz_dist.data.multi_images"


@pytest.fixture
def store():
    server = tdist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield server
    del server


def relays(store, ranks, namespace="pixelz_dist/logs/attempt_0/call_1"):
    """One relay per rank, each connecting its own client per process (as each rank and each worker does)."""
    def connect():
        return tdist.PrefixStore(namespace, tdist.TCPStore("127.0.0.1", store.port, is_master=False,
                                                           timeout=timedelta(seconds=10)))

    return {rank: LogRelay(rank, namespace, connect=connect) for rank in ranks}


def record(message, level=logging.WARNING, *args, name=NAME):
    return logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level),
                                  "msg": message, "args": args})


def shown(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("pixelz_dist")]


def test_rank_lists_name_runs_as_ranges():
    assert rank_list({3}) == "rank 3"
    assert rank_list({1, 0}) == "ranks 0,1"
    assert rank_list({1, 3, 4, 5, 9}) == "ranks 1,3-5,9"
    assert rank_list(range(64)) == "ranks 0-63"


def test_the_same_warning_of_many_ranks_is_one_line_naming_them(store, caplog):
    r = relays(store, range(6))
    for rank in (5, 3, 1, 4):
        assert r[rank].filter(record("skipping sample %d", logging.WARNING, 7)) is False  # not printed there
    assert r[0].filter(record("skipping sample %d", logging.WARNING, 7)) is False  # rank 0's waits to be merged
    assert r[2].filter(record("only rank 2 saw this", logging.ERROR)) is False
    assert r[1].filter(record("progress", logging.INFO)) is False  # INFO: rank 0 only
    assert r[0].filter(record("progress", logging.INFO)) is True
    with caplog.at_level(logging.INFO):
        r[0].flush()
        r[0].flush()  # nothing twice: each entry is taken once
    assert shown(caplog) == [("WARNING", "[ranks 0,1,3-5] skipping sample 7"),
                             ("ERROR", "[rank 2] only rank 2 saw this")]


def test_a_forked_process_sends_through_a_connection_of_its_own(store, caplog):
    """A DataLoader worker is a fork of its rank: the inherited socket is not usable, the relay opens another."""
    r = relays(store, (0, 1))
    assert r[1].filter(record("from the main process of rank 1")) is False  # connects in this process first
    pid = os.fork()
    if pid == 0:  # the "worker"
        os._exit(0 if r[1].filter(record("from a worker of rank 1")) is False else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert r[1].filter(record("from the main process again")) is False  # the parent's connection still works
    with caplog.at_level(logging.WARNING):
        r[0].flush(final=True)
    assert [m for _, m in shown(caplog)] == ["[rank 1] from the main process of rank 1",
                                             "[rank 1] from a worker of rank 1",
                                             "[rank 1] from the main process again"]


def test_without_a_store_each_rank_prints_its_own_warnings_at_once():
    no_store = {rank: LogRelay(rank, "ns", connect=lambda: None) for rank in (0, 1)}
    mine = record("skipping sample 3")
    assert no_store[1].filter(mine) is True and mine.getMessage() == "[rank 1] skipping sample 3"
    ours = record("skipping sample 3")
    assert no_store[0].filter(ours) is True and ours.getMessage() == "skipping sample 3"  # rank 0 as before


def test_every_rank_logs_everything_at_once_when_asked(store):
    loud = LogRelay(2, "ns", all_ranks=True, connect=lambda: pytest.fail("nothing is sent in this mode"))
    info = record("progress")
    info.levelno = logging.INFO
    assert loud.filter(info) is True and info.getMessage() == "[rank 2] progress"


@pytest.mark.parametrize("all_ranks, level", [(None, logging.WARNING), ("1", logging.INFO)])
def test_the_command_lines_rank_1_logs_info_only_when_every_ranks_lines_are_asked_for(monkeypatch, all_ranks, level):
    """The entry points quiet ranks other than 0 to warnings, except under PIXELZ_LOG_ALL_RANKS=1 ("INFO too")."""
    from pixelz_dist.cli.options import setup_logging

    library = logging.getLogger("pixelz_dist")
    monkeypatch.setattr(library, "level", library.level)  # restored after the test
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    if all_ranks is None:
        monkeypatch.delenv("PIXELZ_LOG_ALL_RANKS", raising=False)
    else:
        monkeypatch.setenv("PIXELZ_LOG_ALL_RANKS", all_ranks)
    library.setLevel(logging.INFO)
    setup_logging()
    assert library.level == level
