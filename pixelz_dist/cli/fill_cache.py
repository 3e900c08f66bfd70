"""Fill a pixel cache ahead of training: every lossless image of the ``--data`` folders, decoded once, in parallel.

The folders are paired exactly as training pairs them (a :class:`~pixelz_dist.data.multi_images.MultiImgsDataset`
is built over them, so a missing partner fails here as it would there) and each folder's images are stored in the
mode it trains with (``--modes``, default ``auto``, as ``python -m pixelz_dist.train``). Files whose entry is already
current are skipped, so running it again after adding or editing images stores only those. ``--prune`` first
removes what no reader will use again (:meth:`~pixelz_dist.data.pixel_cache.PixelCache.prune`): entries of files that
are gone, of an older format, and temporary files of killed writers.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from ..errors import ConfigError, DataError, PixelzError

__all__ = ["PrepareSummary", "build_parser", "main", "prepare_cache", "prune_line"]

logger = logging.getLogger(__name__)

#: Filling is decoding plus writing: past this many processes the disk, not the cores, sets the pace.
MAX_WORKERS = 32


@dataclass
class PrepareSummary:
    """What a run of :func:`prepare_cache` did, file by file counted once per (file, mode)."""

    stored: int = 0
    current: int = 0
    not_lossless: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    cache_bytes: int = 0

    def line(self, root: str) -> str:
        return (f"{self.stored} cached, {self.current} already current, {self.not_lossless} not lossless (skipped), "
                f"{len(self.failed)} failed; {root} holds {_size(self.cache_bytes)}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def prune_line(pruned) -> str:
    """What :meth:`~pixelz_dist.data.pixel_cache.PixelCache.prune` removed, in one line."""
    return (f"pruned {pruned.gone + pruned.old} entries ({_size(pruned.entry_bytes)}): {pruned.gone} of files that "
            f"are gone, {pruned.old} of an older format or unreadable; {pruned.temps} temporary files of killed "
            f"writers ({_size(pruned.temp_bytes)})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixelz_dist.prepare", description="Fill a pixel cache ahead of "
                                "training: every lossless image of the --data folders, decoded once, in parallel. "
                                "Exit 0 when done, 2 on bad options or folders, or files that failed (named).")
    p.add_argument("--data", nargs="+", metavar="DIR",
                   help="the training --data folders (one per image of a sample); may be left out with --prune")
    p.add_argument("--cache-dir", required=True, metavar="CACHE", help="the cache folder training gets as --cache-dir")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="per --data folder, as for training: RGB, L, unchanged, auto or label (default: auto)")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"processes decoding at once (default: the CPUs this process may use, at most {MAX_WORKERS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    p.add_argument("--prune", action="store_true", help="first remove entries whose image file is gone (run it where "
                   "all the data is mounted), entries of an older format, and temporary files of killed writers "
                   "(untouched for an hour); then fill, if --data is given")
    return p


def _fill_one(job: tuple[str, str, str]) -> tuple[str, str, str | None]:
    """``(path, outcome, why)`` for one file; never raises, so one bad file cannot stop the others."""
    from ..data.pixel_cache import PixelCache

    root, path, mode = job
    try:
        return path, PixelCache(root).fill(path, mode), None
    except DataError as exc:
        return path, "failed", str(exc)
    except Exception as exc:  # a bug or an odd file must not stop the run: report it with the others
        return path, "failed", f"{type(exc).__name__}: {exc}"


def _fill_chunk(jobs: list[tuple[str, str, str]]) -> list[tuple[str, str, str | None]]:
    return [_fill_one(job) for job in jobs]


def _run(jobs: list[tuple[str, str, str]], workers: int) -> Iterator[tuple[str, str, str | None]]:
    """Each job's result as it completes: in this process with one worker, else in a pool of processes."""
    if workers == 1 or len(jobs) < 2:
        yield from map(_fill_one, jobs)
        return
    workers = min(workers, len(jobs))
    size = max(1, min(16, len(jobs) // (4 * workers)))  # a few chunks per worker keeps them all busy to the end
    # fork on Linux: the workers start at once, with everything already imported (no threads are running yet).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_fill_chunk, jobs[i : i + size]) for i in range(0, len(jobs), size)]
            for future in as_completed(futures):
                yield from future.result()
    except BrokenProcessPool as exc:  # a worker was killed (out of memory?): say so rather than hang or trace back
        raise PixelzError(f"a worker process died ({exc}); the entries written so far are complete and kept. HINT: "
                          "run the command again (with fewer --workers if memory ran out)") from exc


def _jobs(dirs: list[str], root: str, modes: list[str] | None) -> list[tuple[str, str, str]]:
    from ..data.multi_images import MultiImgsDataset

    if modes is not None and len(modes) != len(dirs):
        raise ConfigError(f"--modes has {len(modes)} entries for {len(dirs)} --data folders; give one per folder")
    dataset = MultiImgsDataset(dirs, modes=modes)  # the pairing (and its errors) of training itself
    seen, jobs = set(), []
    for files, mode in zip(dataset.files, dataset.modes):
        for path in files:
            if (path, mode) not in seen:  # a folder given twice with one mode is filled once
                seen.add((path, mode))
                jobs.append((root, path, mode))
    return jobs


def _check_writable(root: str) -> None:
    import tempfile

    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ConfigError(f"cache folder {root!r} cannot be written ({type(exc).__name__}: {exc.strerror or exc}); "
                          "HINT: pick a writable --cache-dir with space for the decoded images") from exc


def cache_bytes(root: str) -> int:
    """Bytes of the entries under ``root``."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".px"):
                try:
                    total += os.path.getsize(os.path.join(folder, name))
                except OSError:
                    pass  # replaced or removed meanwhile
    return total


def prepare_cache(dirs: list[str], cache_dir: str, modes: list[str] | None = None, workers: int | None = None,
                  progress: bool = True) -> PrepareSummary:
    """Store every lossless image of ``dirs`` in the cache ``cache_dir``, ``workers`` processes at once.

    Raises:
        ConfigError: bad ``modes`` or ``workers``, or ``cache_dir`` cannot be written.
        DataError: the folders are missing, empty or do not pair up (as for training).
    """
    from ..distributed.env import cpus_available

    root = os.path.abspath(cache_dir)
    if workers is None:
        workers = min(cpus_available(), MAX_WORKERS)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    jobs = _jobs(dirs, root, modes)
    _check_writable(root)
    summary = PrepareSummary()
    bar = None
    if progress:
        from ..callbacks.progress_bar import TerminalBar

        bar = TerminalBar(len(jobs), desc="prepare", unit="file")
    counters = {"stored": "stored", "current": "current", "not lossless": "not_lossless"}
    try:
        for path, outcome, why in _run(jobs, workers):
            if outcome in counters:
                setattr(summary, counters[outcome], getattr(summary, counters[outcome]) + 1)
            else:
                summary.failed.append((path, why or "the cache folder cannot be written (see the warning above)"))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    summary.failed.sort()
    summary.cache_bytes = cache_bytes(root)
    return summary


def main(argv=None) -> int:
    """``python -m pixelz_dist.prepare``: exit 0 when every file is cached (or needs no cache), 2 otherwise."""
    from .options import error_line, setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data and not args.prune:
        parser.error("the following arguments are required: --data (or --prune)")
    setup_logging()
    try:
        if args.prune:
            from ..data.pixel_cache import PixelCache

            try:
                print(prune_line(PixelCache(args.cache_dir).prune()))
            except OSError as exc:  # a folder or file of the cache this user may not remove
                raise PixelzError(f"cannot prune the cache {args.cache_dir!r}: {exc}; HINT: run it as the user who "
                                  "fills the cache, or fix the folder's permissions") from exc
        if not args.data:
            return 0
        summary = prepare_cache(args.data, args.cache_dir, args.modes, args.workers, progress=not args.no_progress)
    except PixelzError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped (Ctrl-C): the entries written so far are complete and kept", file=sys.stderr)
        return 130
    for path, why in summary.failed:
        print(f"failed: {path}: {why}", file=sys.stderr)
    print(summary.line(os.path.abspath(args.cache_dir)))
    if summary.failed:
        print(f"error: {len(summary.failed)} file(s) could not be cached (listed above); the others were",
              file=sys.stderr)
        return 2
    return 0
