"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (torchrun's agent, its workers,
their DataLoader workers): appends ``pid RANK path`` to $LISTING_SPY_LOG for each ``os.scandir`` / ``os.listdir`` of
a folder under $LISTING_SPY_ROOT (``os.walk`` and ``glob`` list through ``os.scandir`` too)."""

import os

_ROOT = os.environ.get("LISTING_SPY_ROOT")
_LOG = os.environ.get("LISTING_SPY_LOG")


def _spy(real):
    def listing(path=None, *args, **kwargs):
        where = "." if path is None else path
        if not isinstance(where, int):  # a file descriptor names no path
            where = os.path.abspath(os.fsdecode(where))
            if where == _ROOT or where.startswith(_ROOT + os.sep):
                with open(_LOG, "a") as log:
                    log.write(f"{os.getpid()} {os.environ.get('RANK', '-')} {where}\n")
        return real(*(() if path is None else (path,)), *args, **kwargs)

    return listing


if _ROOT and _LOG:
    os.scandir = _spy(os.scandir)
    os.listdir = _spy(os.listdir)
