"""MultiImgsDataset at a million files: DataLoader workers' memory, construction time, and the table's hand-over.

    python benchmarks/dataset_scale.py                 # 3 x 200 000 files for the workers, 3 x 1 M for the rest
    python benchmarks/dataset_scale.py --quick         # 3 x 20 000 and 3 x 50 000: seconds
    python benchmarks/dataset_scale.py --skip-million  # the workers' memory only

The files are hard links of tiny PNGs (one source file per 50 000 links: ext4 allows about 65 000 links per inode),
made in a temporary folder and removed at the end. Each measurement is one JSON line:

* ``worker_uss``: 2 DataLoader workers (fork) read ``--samples`` shuffled samples (the real ``__getitem__``, the
  PNGs decoded, batches of 32); each worker's unique memory (USS, ``memory_full_info().uss``: RSS counts the pages it
  shares with its parent in full) after its first batch and at the end. Four variants, each in a fresh process,
  rounds interleaved: ``table="arrays"`` (the dataset as it is) or ``"lists of str"`` (the same dataset with
  ``files`` and ``stems`` turned back into the lists of ``str`` it held before issue 22 (ffa8613), read by the same
  code), and ``gc_frozen_at_fork`` (the workers started as ``train_model`` starts them,
  ``batch_source.start_iterator``) or not (a plain ``iter(loader)``, as before). ``worker_uss_summary``: the largest
  growth of each.
* ``construction``: building a ``MultiImgsDataset`` over 3 folders of ``--million`` files each (median of
  ``--rounds``, a warm-up round first), beside the floor (listing the folders with ``os.scandir``, nothing else)
  and a copy of the construction before issue 22 (the same listing and pairing, then lists of path strings); the
  table's bytes against those lists' (``sys.getsizeof`` of every list and string).
* ``handover``: what one listing per job costs the other ranks: rank 0 encodes the million-sample table and puts it
  in a real TCPStore (in this process, as torchrun's agent hosts one), a second client fetches and decodes it; the
  bytes each rank downloads; then ``--receivers`` processes fetch and decode it at once (wall time of them all). The
  files' names compress well; a synthetic table of random hex names (as content hashes) shows the other end.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta

import numpy as np
import psutil
import torch
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pixelz_dist")):  # measure the checkout this script is in, installed or not
    sys.path.insert(0, _ROOT)

import pixelz_dist  # noqa: E402
from pixelz_dist.data import folder_listing  # noqa: E402
from pixelz_dist.data.batch_source import start_iterator  # noqa: E402
from pixelz_dist.data.sample_table import SampleTable  # noqa: E402
from pixelz_dist.distributed import once_per_job  # noqa: E402

LINKS_PER_SOURCE = 50_000
FOLDERS = (("rgb", ".png", "RGB"), ("hint", ".png", "L"), ("mask", ".png", "L"))
#: (table, garbage collector frozen while the workers fork): now, each change alone, and before.
VARIANTS = (("arrays", True), ("lists of str", True), ("arrays", False), ("lists of str", False))


def make_folders(root: str, n: int) -> list[str]:
    """3 folders of ``n`` hard links to tiny PNGs each (named like a video's frames); the folders' paths."""
    dirs = []
    for sub, ext, mode in FOLDERS:
        folder = os.path.join(root, sub)
        os.makedirs(folder)
        sources = []
        for s in range((n + LINKS_PER_SOURCE - 1) // LINKS_PER_SOURCE):
            sources.append(os.path.join(root, f".{sub}_source{s}{ext}"))  # outside the folder: not a sample
            Image.new(mode, (8, 8), s).save(sources[-1])
        for i in range(n):
            os.link(sources[i // LINKS_PER_SOURCE], os.path.join(folder, f"clip{i // 1000:04d}_frame{i:07d}{ext}"))
        dirs.append(folder)
    return dirs


def as_lists(dataset):
    """The same dataset with its table held as before issue 22: lists of str (read by the very same ``__getitem__``)."""
    legacy = copy.copy(dataset)
    legacy.files = [list(column) for column in dataset.files]
    legacy.stems = list(dataset.stems)
    return legacy


def worker_uss(dataset, samples: int, seed: int, frozen: bool = True) -> tuple[list[float], list[float]]:
    """USS (MiB) of each of 2 workers after their first batch and after ``samples`` shuffled samples; workers forked
    as train_model forks them (``frozen``: the garbage collector frozen), or by a plain ``iter(loader)``."""
    from torch.utils.data import DataLoader

    order = np.random.default_rng(seed).permutation(len(dataset))[:samples].tolist()
    batches = [order[i : i + 32] for i in range(0, samples, 32)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=2, persistent_workers=True, prefetch_factor=2)
    it = start_iterator(loader) if frozen else iter(loader)
    next(it), next(it)  # one batch from each worker
    workers = psutil.Process().children()
    start = [w.memory_full_info().uss / 2**20 for w in workers]
    for _ in it:
        pass
    end = [w.memory_full_info().uss / 2**20 for w in workers]
    del it, loader
    return start, end


def measure_worker_uss(cfg: dict) -> None:
    """One ``worker_uss`` measurement, in this fresh process: prints ``[start USS], [end USS]`` as JSON."""
    from torchvision.transforms import v2

    torch.set_num_threads(1)
    dataset = pixelz_dist.MultiImgsDataset(cfg["dirs"], v2.ToDtype(torch.float32, scale=True),
                                           modes=[mode for _, _, mode in FOLDERS])
    if cfg["table"] == "lists of str":
        dataset = as_lists(dataset)
    print(json.dumps(worker_uss(dataset, cfg["samples"], cfg["seed"], cfg["frozen"])))


def legacy_construction(dirs: list[str]) -> tuple[list[str], list[list[str]]]:
    """A copy of MultiImgsDataset's construction before issue 22: list, pair by stem, lists of path strings."""
    names = [folder_listing.scan_folder(d) for d in dirs]
    stems, per_folder = folder_listing.match_by_stem(dirs, names)
    return stems, [[prefix + name for name in folder_names]
                   for prefix, folder_names in zip((os.path.join(d, "") for d in dirs), per_folder)]


def list_sizes(lists) -> int:
    return sum(sys.getsizeof(x) for column in lists for x in column) + sum(map(sys.getsizeof, lists))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def handover(table: SampleTable, rounds: int, receivers: int) -> dict:
    """Rank 0's publish and one other rank's fetch + decode of ``table``, through a real TCPStore; then ``receivers``
    processes fetching and decoding it at once."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60))
    client = torch.distributed.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=60))
    times: dict = {"rank0_encode_s": [], "rank0_publish_s": [], "other_rank_fetch_s": [], "other_rank_decode_s": []}
    for r in range(rounds + 1):  # round 0 warms up
        base, marks = f"bench/{r}", [time.perf_counter()]
        value = table.encode()
        marks.append(time.perf_counter())
        once_per_job._publish(server, base, lambda: table, lambda _, v=value: v)
        marks.append(time.perf_counter())
        received = once_per_job._receive(client, base, 2, 60.0, "the table", "")
        marks.append(time.perf_counter())
        decoded = SampleTable.decode(received)
        marks.append(time.perf_counter())
        assert decoded.stems == table.stems and len(decoded.folders) == len(table.folders)
        for key, t0, t1 in zip(times, marks, marks[1:]):
            times[key] += [t1 - t0] if r else []
    out = {"payload_bytes": len(value), "chunks": -(-len(value) // once_per_job.CHUNK_BYTES),
           **{key: round(statistics.median(v), 3) for key, v in times.items()}}
    # Many ranks fetch at once from the one store: processes of their own, each with its own connection.
    once_per_job._publish(server, "bench/many", lambda: table, lambda _: value)
    with ProcessPoolExecutor(receivers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_connect, [server.port] * receivers))  # the processes are up before the clock starts
        t0 = time.perf_counter()
        sizes = list(pool.map(_fetch, [(server.port, receivers)] * receivers))
        out[f"{receivers}_ranks_fetch_and_decode_s"] = round(time.perf_counter() - t0, 3)
    assert sizes == [len(table)] * receivers
    return out


_client: list = []


def _connect(port: int, hold: bool = True) -> None:
    if not _client:
        _client.append(torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60)))
    if hold:
        time.sleep(0.2)  # keep this process busy until every one has started


def _fetch(args) -> int:
    port, receivers = args
    _connect(port, hold=False)
    return len(SampleTable.decode(once_per_job._receive(_client[0], "bench/many", receivers + 1, 60.0, "the table",
                                                        "")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--per-folder", type=int, default=None, help="files per folder for worker_uss (200000; quick 20000)")
    p.add_argument("--samples", type=int, default=None, help="samples the workers read (20000; quick 5000)")
    p.add_argument("--million", type=int, default=None, help="files per folder for construction (1000000; quick 50000)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of each measurement (2; quick 1)")
    p.add_argument("--skip-million", action="store_true", help="worker_uss only")
    p.add_argument("--receivers", type=int, default=8, help="processes fetching the table at once (default 8)")
    p.add_argument("--worker-uss", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = p.parse_args(argv)
    if args.worker_uss:
        measure_worker_uss(json.loads(args.worker_uss))
        return 0
    per_folder = args.per_folder or (20_000 if args.quick else 200_000)
    samples = args.samples or (5_000 if args.quick else 20_000)
    million = args.million or (50_000 if args.quick else 1_000_000)
    rounds = args.rounds or (1 if args.quick else 2)
    torch.set_num_threads(1)
    common = {"python": platform.python_version(), "torch": torch.__version__, "pixelz_dist": pixelz_dist.__version__,
              "cpus": os.cpu_count(), "start_method": "fork"}
    root = tempfile.mkdtemp(prefix="pixelz_scale_")
    try:
        t_make, dirs = timed(lambda: make_folders(os.path.join(root, "uss"), per_folder))
        growth: dict = {}
        for r in range(rounds):
            for table, frozen in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                # A fresh process each: a process's earlier gc.freeze() changes when its later collections run.
                cmd = [sys.executable, os.path.abspath(__file__), "--worker-uss", json.dumps(
                    {"dirs": dirs, "table": table, "frozen": frozen, "samples": samples, "seed": r})]
                start, end = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                growth.setdefault(f"{table}, gc {'frozen' if frozen else 'not frozen'}", []).extend(
                    b - a for a, b in zip(start, end))
                print(json.dumps({"benchmark": "dataset_scale", "measure": "worker_uss", "table": table,
                                  "gc_frozen_at_fork": frozen, "round": r, "files": 3 * per_folder,
                                  "samples": samples, "workers": 2, "uss_start_mib": [round(x, 1) for x in start],
                                  "uss_end_mib": [round(x, 1) for x in end],
                                  "growth_mib": [round(b - a, 1) for a, b in zip(start, end)], **common}), flush=True)
        worst = {name: round(max(g), 1) for name, g in growth.items()}
        print(json.dumps({"benchmark": "dataset_scale", "measure": "worker_uss_summary", "files": 3 * per_folder,
                          "samples": samples, "max_growth_mib": worst,
                          "ratio_before_over_now": round(worst["lists of str, gc not frozen"]
                                                        / max(worst["arrays, gc frozen"], 0.1), 1),
                          "links_made_s": round(t_make, 1), **common}), flush=True)
        shutil.rmtree(os.path.join(root, "uss"))
        if args.skip_million:
            return 0

        t_make, dirs = timed(lambda: make_folders(os.path.join(root, "million"), million))
        times = {"scandir": [], "MultiImgsDataset": [], "before": []}
        for r in range(rounds + 1):  # round 0 warms the directory cache
            order = ("scandir", "MultiImgsDataset", "before") if r % 2 else ("before", "MultiImgsDataset", "scandir")
            for name in order:
                if name == "scandir":
                    dt, _ = timed(lambda: [sum(1 for _ in os.scandir(d)) for d in dirs])
                elif name == "before":
                    dt, (stems, files) = timed(lambda: legacy_construction(dirs))
                    lists_bytes = list_sizes(files) + list_sizes([stems])
                    del stems, files
                else:
                    dt, _ = timed(lambda: pixelz_dist.MultiImgsDataset(dirs, shared_listing=False))
                if r:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        table = folder_listing.list_samples(dirs, "stem")
        print(json.dumps({"benchmark": "dataset_scale", "measure": "construction", "samples": million, "folders": 3,
                          "rounds": rounds, "scandir_s": round(med["scandir"], 2),
                          "multi_imgs_dataset_s": round(med["MultiImgsDataset"], 2),
                          "before_s": round(med["before"], 2),
                          "ratio_to_scandir": round(med["MultiImgsDataset"] / med["scandir"], 2),
                          "ratio_to_before": round(med["MultiImgsDataset"] / med["before"], 2),
                          "table_mb": round(table.nbytes / 1e6, 1), "lists_of_str_mb": round(lists_bytes / 1e6, 1),
                          "links_made_s": round(t_make, 1), **common}), flush=True)
        rng = np.random.default_rng(0)  # names that compress as badly as content hashes do
        stems = [f"{x:016x}" for x in rng.integers(0, 2**63, million).tolist()]
        synthetic = SampleTable.build(stems, [[s + ext for s in stems] for _, ext, _ in FOLDERS], shared_stems=True)
        for names, t in (("the files' (clip0001_frame0001234)", table), ("random hex, synthetic", synthetic)):
            print(json.dumps({"benchmark": "dataset_scale", "measure": "handover", "names": names, "samples": million,
                              "folders": 3, "rounds": rounds, **handover(t, rounds, args.receivers),
                              "listing_s": round(med["MultiImgsDataset"], 2), **common}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
