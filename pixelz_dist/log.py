"""The ``pixelz_dist`` logger hierarchy: a handler when the application set none, rank-0-only output under torchrun.

Every module logs through ``logging.getLogger(__name__)``, so one ``logging.getLogger("pixelz_dist").setLevel(...)``
sets the whole library and a filter can pick records by module (``record.name``), never by file name.
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


class RankFilter(logging.Filter):
    """Rank 0's records only, unless every rank was asked to log (then each record names its rank)."""

    def __init__(self, rank: int, all_ranks: bool = False):
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        if self.all_ranks:
            record.msg = f"[rank {self.rank}] {record.msg}"
            return True
        return self.rank == 0


@contextmanager
def rank_logging(rank: int, world_size: int):
    """While active, only rank 0 logs (all ranks, each line prefixed, with PIXELZ_LOG_ALL_RANKS=1)."""
    if world_size <= 1:
        yield
        return
    with filtering(RankFilter(rank, os.environ.get("PIXELZ_LOG_ALL_RANKS") == "1")):
        yield
