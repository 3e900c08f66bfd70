"""The ``pixelz_dist`` logger hierarchy: a handler when the application set none, filters on the library's loggers,
the rank in a record's message.

Every module logs through ``logging.getLogger(__name__)``, so one ``logging.getLogger("pixelz_dist").setLevel(...)``
sets the whole library and a filter can pick records by module (``record.name``), never by file name. Under torchrun
the relay of :mod:`pixelz_dist.distributed.log_relay` decides which rank prints what.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

ROOT = "pixelz_dist"
logger = logging.getLogger(ROOT)  # the library's root logger: every module's logger propagates to it


def ensure_handler() -> None:
    """Show INFO progress lines when the application configured no logging at all (a script, a notebook)."""
    if logger.handlers or logging.getLogger().handlers:
        if logger.level == logging.NOTSET and logging.getLogger().level > logging.INFO:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    rank = _rank_in_job()
    if rank:  # a line printed by a rank other than 0 says so (its warnings outside train_model, its errors)
        handler.addFilter(RankTag(rank))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


@contextmanager
def filtering(log_filter: logging.Filter, *modules: str):
    """While active, ``log_filter`` sees every record of the library's modules (``modules``: name prefixes such as
    ``"pixelz_dist.engine"``; none: the whole library).

    A logger's filters see only the records logged to that very logger, not those its children propagate, so the
    filter goes on each module's logger (they all exist once the modules are imported, which ``import pixelz_dist``
    does).
    """
    prefixes = modules or (ROOT,)
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith(prefixes)
             and (n == ROOT or n.startswith(ROOT + "."))]
    loggers = [logging.getLogger(n) for n in names]
    if ROOT in prefixes and logger not in loggers:
        loggers.append(logger)
    for lg in loggers:
        lg.addFilter(log_filter)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(log_filter)


def tag_rank(record: logging.LogRecord, rank) -> None:
    """Start the record's message with ``[rank N]`` (or the ranks given, ``"ranks 1,3-5"``), once."""
    if getattr(record, "pixelz_ranks", None) is None:
        label = f"rank {rank}" if isinstance(rank, int) else rank
        record.msg, record.args = f"[{label}] {record.getMessage()}", None
        record.pixelz_ranks = label


class RankTag(logging.Filter):
    """Tags every record it sees with this process's rank (see :func:`tag_rank`); lets all through."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        tag_rank(record, self.rank)
        return True


def _rank_in_job() -> int:
    """RANK when this process is one of several (WORLD_SIZE > 1), else 0. Read here, not through
    :mod:`pixelz_dist.distributed.env`, which needs a valid environment: logging must work without one."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0
