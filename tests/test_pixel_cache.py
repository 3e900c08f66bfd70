"""The pixel cache: bit-identical to fast_img_loader in every mode, keyed by file state, safe to share, never fatal."""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import multiprocessing
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from pixelz_dist.data import MultiImgsDataset
from pixelz_dist.data import images as images_module
from pixelz_dist.data.images import fast_img_loader
from pixelz_dist.data.pixel_cache import PixelCache, is_lossless
from pixelz_dist.errors import DataError

H, W = 23, 31  # odd sizes: no row or column count that happens to line up


def pixels(mode: str, seed: int = 0, h: int = H, w: int = W) -> Image.Image:
    """A test image in ``mode`` with every row different (so a wrong row or column shows)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "1":
        return Image.fromarray(rng.random((h, w)) > 0.5)
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 7, (h, w), dtype=np.uint8), "P")
        img.putpalette(list(rng.integers(0, 256, 7 * 3, dtype=np.uint8)))
        return img
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


def _writable(fmt: str, mode: str) -> bool:
    try:
        pixels(mode, h=4, w=4).save(io.BytesIO(), fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


CASES = [(fmt, mode) for fmt in ("PNG", "TIFF", "BMP") for mode in ("L", "RGB", "RGBA", "P", "LA", "I;16", "1")
         if _writable(fmt, mode)]
EXT = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}


def same(got, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected)
    else:
        assert isinstance(got, Image.Image) and got.mode == expected.mode and got.size == expected.size
        assert np.array_equal(np.array(got), np.array(expected))
        if expected.mode in ("P", "PA"):
            assert got.getpalette() == expected.getpalette()
        assert got.info.get("transparency") == expected.info.get("transparency")
        if expected.mode in ("P", "L", "RGB", "LA", "RGBA"):  # what the palette and transparency turn into
            assert np.array_equal(np.array(got.convert("RGBA")), np.array(expected.convert("RGBA")))


def only_cache(monkeypatch) -> None:
    """From now on decoding an image fails: whatever loads came from the cache."""
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded, although the entry should have been read from the cache")

    monkeypatch.setattr(images_module, "decode_image", no_decoding)


@pytest.mark.parametrize("fmt,file_mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_miss_then_hit_is_bit_identical_to_fast_img_loader(tmp_path, monkeypatch, fmt, file_mode):
    path = str(tmp_path / f"img{EXT[fmt]}")
    pixels(file_mode).save(path, fmt)
    cache = PixelCache(tmp_path / "cache")
    modes = ["unchanged", "auto", "RGB", "L"] + (["RGBA"] if file_mode in ("P", "RGBA", "LA") else [])
    expected = {(m, t): fast_img_loader(path, m, as_tensor=t) for m in modes for t in (True, False)}
    for (mode, as_tensor), want in expected.items():  # misses (the PIL form's miss, then the tensor form's hit)
        same(cache.load(path, mode, as_tensor=as_tensor), want)
    assert cache.image_size(path, "unchanged") == (H, W)
    only_cache(monkeypatch)
    for (mode, as_tensor), want in expected.items():
        same(cache.load(path, mode, as_tensor=as_tensor), want)


@pytest.mark.parametrize("mode,transparency", [("P", 3), ("P", b"\x00\x80\xff\x10"), ("RGB", (1, 2, 3)),
                                               ("L", 7)])
def test_transparency_survives_the_cache(tmp_path, monkeypatch, mode, transparency):
    path = str(tmp_path / "t.png")
    img = pixels(mode)
    if isinstance(transparency, bytes):
        img.info["transparency"] = transparency
        img.save(path)
    else:
        img.save(path, transparency=transparency)
    expected = fast_img_loader(path, "unchanged")
    assert expected.info.get("transparency") == transparency
    cache = PixelCache(tmp_path / "cache")
    same(cache.load(path, "unchanged", as_tensor=False), expected)
    only_cache(monkeypatch)
    same(cache.load(path, "unchanged", as_tensor=False), expected)


def test_rows_are_the_slice_of_the_whole_and_read_alone(tmp_path, monkeypatch):
    path = str(tmp_path / "a.png")
    pixels("RGB").save(path)
    full = fast_img_loader(path, "RGB", as_tensor=True)
    cache = PixelCache(tmp_path / "cache")
    bands = [(3, 11), (0, H), (5, 5), (-4, 100), (H - 1, H), (20, 2)]
    for rows in bands[:2]:  # misses
        assert torch.equal(cache.load(path, "RGB", as_tensor=True, rows=rows), full[:, rows[0] : rows[1]])
    only_cache(monkeypatch)
    for rows in bands:
        got = cache.load(path, "RGB", as_tensor=True, rows=rows)
        assert torch.equal(got, full[:, rows[0] : rows[1]]), rows
    with pytest.raises(TypeError, match="as_tensor=True"):
        cache.load(path, "RGB", as_tensor=False, rows=(0, 4))


def test_image_size_without_pixels(tmp_path):
    path = str(tmp_path / "a.png")
    pixels("L", h=40, w=9).save(path)
    cache = PixelCache(tmp_path / "cache")
    assert cache.image_size(path, "L") is None
    cache.load(path, "L", as_tensor=True)
    assert cache.image_size(path, "L") == (40, 9)
    assert cache.image_size(path, "RGB") is None  # another mode, another entry
    assert cache.image_size(str(tmp_path / "missing.png"), "L") is None


def test_an_edited_file_is_read_again_and_its_entry_replaced(tmp_path):
    path = str(tmp_path / "a.png")
    pixels("RGB", seed=1).save(path)
    cache = PixelCache(tmp_path / "cache")
    cache.load(path, "RGB", as_tensor=True)
    before = os.stat(path)
    pixels("RGB", seed=2, h=H + 5).save(path)  # another size, so the file's size changes too
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert cache.image_size(path, "RGB") is None
    assert torch.equal(cache.load(path, "RGB", as_tensor=True), fast_img_loader(path, "RGB", as_tensor=True))
    entries = [f for _, _, fs in os.walk(cache.root) for f in fs]
    assert len(entries) == 1, entries  # replaced, not added


def test_same_size_new_content_is_seen_through_mtime(tmp_path):
    path = str(tmp_path / "a.bmp")  # BMP: the size depends on the dimensions only
    pixels("RGB", seed=1).save(path)
    cache = PixelCache(tmp_path / "cache")
    old = cache.load(path, "RGB", as_tensor=True)
    st = os.stat(path)
    pixels("RGB", seed=2).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a filesystem with a coarse clock: still 1 ns newer
    assert os.path.getsize(path) == st.st_size
    new = cache.load(path, "RGB", as_tensor=True)
    assert torch.equal(new, fast_img_loader(path, "RGB", as_tensor=True)) and not torch.equal(new, old)


def _after_a_clock_tick(folder, st: os.stat_result) -> None:
    """Return once a file written now gets another change time than ``st``'s: the kernel stamps files with a coarse
    clock (a few ms), and a rewrite within the same tick could not be told apart by any timestamp."""
    probe = os.path.join(folder, ".probe")
    while True:
        with open(probe, "wb") as f:
            f.write(b"x")
        if os.stat(probe).st_ctime_ns != st.st_ctime_ns:
            os.remove(probe)
            return


def _stored_png(path, seed: int) -> None:
    """A PNG whose byte size depends on its dimensions only (no compression), with the same name chunk each time."""
    pixels("L", seed=seed).save(path, "PNG", compress_level=0)


@pytest.mark.parametrize("how", ["in-place", "replaced"])  # cp -p over the file / tar -x and rsync -t (rename over)
def test_a_same_size_rewrite_with_its_times_put_back_is_seen(tmp_path, how):
    path = str(tmp_path / "mask.png")
    _stored_png(path, seed=1)
    cache = PixelCache(tmp_path / "cache")
    old = cache.load(path, "L", as_tensor=True)
    assert cache.fill(path, "L") == "current"
    st = os.stat(path)
    _after_a_clock_tick(str(tmp_path), st)
    target = path if how == "in-place" else str(tmp_path / ".mask.png.part")
    _stored_png(target, seed=2)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p, tar -x and rsync -t do
    if how == "replaced":
        os.replace(target, path)
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)  # what the old key looked at
    new = fast_img_loader(path, "L", as_tensor=True)
    assert not torch.equal(new, old)
    assert cache.image_size(path, "L") is None
    assert torch.equal(cache.load(path, "L", as_tensor=True), new)
    assert cache.fill(path, "L") == "current"  # stored again by the load above: the entry follows the file
    assert len([f for _, _, fs in os.walk(cache.root) for f in fs]) == 1


@pytest.mark.parametrize("bump", ["DECODE_VERSION", "Pillow", "FORMAT_VERSION"])
def test_entries_of_another_decoder_or_format_are_misses(tmp_path, monkeypatch, bump):
    import PIL

    from pixelz_dist.data import pixel_cache as pixel_cache_module

    path = str(tmp_path / "a.png")
    pixels("P").save(path)
    cache = PixelCache(tmp_path / "cache")
    cache.load(path, "unchanged", as_tensor=True)
    assert cache.image_size(path, "unchanged") == (H, W)
    if bump == "DECODE_VERSION":
        monkeypatch.setattr(images_module, "DECODE_VERSION", images_module.DECODE_VERSION + 1)
    elif bump == "Pillow":
        monkeypatch.setattr(PIL, "__version__", PIL.__version__ + ".post1")
    else:
        monkeypatch.setattr(pixel_cache_module, "FORMAT_VERSION", pixel_cache_module.FORMAT_VERSION + 1)
    assert cache.image_size(path, "unchanged") is None
    assert cache.fill(path, "unchanged") == "stored"
    assert cache.fill(path, "unchanged") == "current"
    entries = sorted(f for _, _, fs in os.walk(cache.root) for f in fs)
    # another decoder replaces the entry in place; another format lives under another name, and prune removes it
    assert len(entries) == (2 if bump == "FORMAT_VERSION" else 1), entries
    pruned = cache.prune()
    assert (pruned.old, pruned.gone) == ((1, 0) if bump == "FORMAT_VERSION" else (0, 0))
    assert cache.image_size(path, "unchanged") == (H, W)


def test_prune_removes_entries_of_deleted_files_and_killed_writers_temporary_files(tmp_path):
    import time

    paths = [str(tmp_path / f"{name}.png") for name in ("a", "b", "c")]
    for i, p in enumerate(paths):
        pixels("RGB", seed=i).save(p)
    cache = PixelCache(tmp_path / "cache")
    for p in paths:
        for mode in ("RGB", "L"):
            cache.fill(p, mode)
    gone_entries = [cache.entry_path(paths[1], mode) for mode in ("RGB", "L")]
    gone_bytes = sum(os.path.getsize(e) for e in gone_entries)
    os.remove(paths[1])
    folder = os.path.dirname(cache.entry_path(paths[0], "RGB"))
    killed = os.path.join(folder, ".0123456789abcdef0123456789abcdef.px.k1ll3d.tmp")
    live = os.path.join(folder, ".fedcba9876543210fedcba9876543210.px.l1v3.tmp")
    for name in (killed, live):
        with open(name, "wb") as f:
            f.write(b"\0" * 1000)
    hours_ago = time.time() - 2 * 3600
    os.utime(killed, (hours_ago, hours_ago))
    foreign = [str(tmp_path / "cache" / "notes.txt"), os.path.join(folder, "notes.txt")]
    for name in foreign:
        with open(name, "w") as f:
            f.write("not the cache's")
    before = {os.path.join(d, f) for d, _, fs in os.walk(cache.root) for f in fs}

    pruned = cache.prune()
    after = {os.path.join(d, f) for d, _, fs in os.walk(cache.root) for f in fs}
    assert before - after == {killed, *gone_entries}  # exactly those
    assert (pruned.gone, pruned.old, pruned.entry_bytes, pruned.temps, pruned.temp_bytes) == (2, 0, gone_bytes, 1,
                                                                                              1000)
    for p in (paths[0], paths[2]):
        assert cache.fill(p, "RGB") == cache.fill(p, "L") == "current"
    assert cache.prune() == type(pruned)()  # nothing more to do
    assert PixelCache(tmp_path / "no_cache_yet").prune() == type(pruned)()


def test_a_writer_whose_temporary_file_was_pruned_just_does_not_store(tmp_path, caplog, monkeypatch):
    from pixelz_dist import fileio
    from pixelz_dist.data import pixel_cache as pixel_cache_module

    real = fileio.atomic_write

    @contextlib.contextmanager
    def pruned_meanwhile(path, *args, **kwargs):
        with real(path, *args, **kwargs) as f:
            yield f
            (temporary,) = glob.glob(os.path.join(os.path.dirname(path), ".*.tmp"))
            os.remove(temporary)  # prune ran while this writer was stopped (SIGSTOP, a suspended job)

    monkeypatch.setattr(pixel_cache_module, "atomic_write", pruned_meanwhile)
    path = str(tmp_path / "a.png")
    pixels("L").save(path)
    cache = PixelCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        assert torch.equal(cache.load(path, "L", as_tensor=True), fast_img_loader(path, "L", as_tensor=True))
        assert cache.fill(path, "L") == "not stored"
    assert not caplog.records  # a lost race, not an unwritable folder: later writes are still tried
    monkeypatch.undo()
    assert cache.fill(path, "L") == "stored"


def test_lossy_files_are_decoded_but_never_stored(tmp_path):
    cache = PixelCache(tmp_path / "cache")
    jpeg = str(tmp_path / "photo.jpg")
    pixels("RGB").save(jpeg, quality=90)
    disguised = str(tmp_path / "photo_really_a_jpeg.png")
    pixels("RGB", seed=3).save(disguised, "JPEG")
    for path in (jpeg, disguised):
        for as_tensor in (True, False):
            same(cache.load(path, "RGB", as_tensor=as_tensor), fast_img_loader(path, "RGB", as_tensor=as_tensor))
        assert torch.equal(cache.load(path, "RGB", as_tensor=True, rows=(2, 9)),
                           fast_img_loader(path, "RGB", as_tensor=True)[:, 2:9])
        assert cache.image_size(path, "RGB") is None
    assert not os.path.exists(cache.root)


def test_lossless_is_decided_by_content():
    for fmt, options, expected in [("PNG", {}, True), ("BMP", {}, True), ("TIFF", {}, True),
                                   ("TIFF", {"compression": "tiff_lzw"}, True), ("PPM", {}, True),
                                   ("JPEG", {}, False), ("TIFF", {"compression": "jpeg"}, False)]:
        buf = io.BytesIO()
        pixels("RGB").save(buf, fmt, **options)
        assert is_lossless(buf.getvalue()) is expected, (fmt, options)
    if features.check("webp"):
        for lossless in (True, False):
            buf = io.BytesIO()
            pixels("RGB").save(buf, "WEBP", lossless=lossless)
            assert is_lossless(buf.getvalue()) is lossless


def _error(fn, *args, **kwargs) -> str:
    """The DataError of ``fn(*args, **kwargs)``, without the addresses of objects (Pillow names its BytesIO)."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return re.sub(r" at 0x[0-9a-f]+", "", str(info.value))


def test_bad_files_fail_exactly_as_without_cache_and_are_not_stored(tmp_path):
    good = tmp_path / "good.png"
    pixels("L").save(good)
    data = good.read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    cache = PixelCache(tmp_path / "cache")
    for name in ("empty.png", "truncated.png", "garbage.png", "missing.png"):
        path = str(tmp_path / name)
        for as_tensor in (True, False):
            expected = _error(fast_img_loader, path, "L", as_tensor=as_tensor)
            assert _error(cache.load, path, "L", as_tensor=as_tensor) == expected
        assert cache.image_size(path, "L") is None
    assert not os.path.exists(cache.root)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other-path", "empty"])
def test_a_torn_or_foreign_entry_is_a_miss_and_rewritten(tmp_path, damage):
    path, other = str(tmp_path / "a.bmp"), str(tmp_path / "b.bmp")
    pixels("RGB", seed=1).save(path)
    pixels("RGB", seed=2).save(other)
    os.utime(other, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))  # same size and time: only the path
    cache = PixelCache(tmp_path / "cache")
    cache.load(path, "RGB", as_tensor=True)
    cache.load(other, "RGB", as_tensor=True)
    entry = cache.entry_path(path, "RGB")
    good = open(entry, "rb").read()
    damaged = {"truncated": good[:-7], "foreign": b"NOTACACHE" + good[9:], "empty": b"",
               "other-path": open(cache.entry_path(other, "RGB"), "rb").read()}[damage]
    with open(entry, "wb") as f:
        f.write(damaged)
    assert cache.image_size(path, "RGB") is None
    assert torch.equal(cache.load(path, "RGB", as_tensor=True, rows=(4, 20)),
                       fast_img_loader(path, "RGB", as_tensor=True)[:, 4:20])
    assert open(entry, "rb").read() == good


def test_pickles_and_reads_in_another_process_object(tmp_path):
    path = str(tmp_path / "a.png")
    pixels("LA").save(path)
    cache = PixelCache(tmp_path / "cache")
    cache.load(path, "unchanged", as_tensor=True)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.root == cache.root and copy.image_size(path, "unchanged") == (H, W)


# -- a folder that cannot be written ---------------------------------------------------------------------------------
def _check_degrades(cache: PixelCache, tmp_path, caplog) -> None:
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"big{i}.png"))
        pixels("RGB", seed=i, h=150, w=200).save(paths[-1])  # 90 KB decoded: more than the small disk holds
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        for _ in range(2):
            for p in paths:
                assert torch.equal(cache.load(p, "RGB", as_tensor=True), fast_img_loader(p, "RGB", as_tensor=True))
                same(cache.load(p, "RGB", as_tensor=False), fast_img_loader(p, "RGB"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("pixelz_dist")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert cache.root in message and "training goes on" in message
    return message


def test_an_unwritable_folder_warns_once_and_gives_the_right_pixels(tmp_path, caplog):
    (tmp_path / "a_file").write_bytes(b"not a folder")
    cache = PixelCache(tmp_path / "a_file" / "cache")  # works as root too, unlike a chmod
    assert "NotADirectoryError" in _check_degrades(cache, tmp_path, caplog)


def test_a_full_disk_warns_once_and_gives_the_right_pixels(tmp_path, caplog):
    from test_failures import tmpfs

    with tmpfs(tmp_path / "disk", "size=64k") as mount:
        cache = PixelCache(mount / "cache")
        assert "No space left" in _check_degrades(cache, tmp_path, caplog)
        leftovers = [f for _, _, fs in os.walk(mount) for f in fs]
        assert not leftovers, leftovers  # no temporary file left behind on the full disk


def test_a_read_only_folder_warns_once_and_still_reads_its_entries(tmp_path, caplog):
    import subprocess

    from test_failures import tmpfs

    with tmpfs(tmp_path / "ro", "size=2m") as mount:
        path = str(tmp_path / "kept.png")
        pixels("L").save(path)
        PixelCache(mount).load(path, "L", as_tensor=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        cache = PixelCache(mount)
        assert cache.image_size(path, "L") == (H, W)
        assert "Read-only" in _check_degrades(cache, tmp_path, caplog)
        assert torch.equal(cache.load(path, "L", as_tensor=True), fast_img_loader(path, "L", as_tensor=True))


# -- several processes filling one cache -----------------------------------------------------------------------------
def _fill(args) -> list[bytes]:
    root, paths, seed = args
    cache = PixelCache(root)
    order = np.random.default_rng(seed).permutation(len(paths))
    out = []
    for i in order:
        for mode in ("unchanged", "RGB"):
            out.append(cache.load(paths[i], mode, as_tensor=True).numpy().tobytes())
    return out


def test_processes_filling_one_cache_at_once(tmp_path):
    paths = []
    for i, mode in enumerate(["L", "RGB", "RGBA", "P", "I;16", "1", "LA", "RGB"] * 2):
        paths.append(str(tmp_path / f"{i}.png"))
        pixels(mode, seed=i, h=97, w=131).save(paths[-1])
    root = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_fill, [(root, paths, seed) for seed in range(4)])
    cache = PixelCache(root)
    files = [f for _, _, fs in os.walk(root) for f in fs]
    assert len(files) == 2 * len(paths) and all(f.endswith(".px") for f in files), files  # no temporary file left
    for p in paths:
        for mode in ("unchanged", "RGB"):
            assert cache.image_size(p, mode) == (97, 131)
            for rows in (None, (10, 60)):
                want = fast_img_loader(p, mode, as_tensor=True)
                want = want if rows is None else want[:, rows[0] : rows[1]]
                assert torch.equal(cache.load(p, mode, as_tensor=True, rows=rows), want)


# -- through MultiImgsDataset ----------------------------------------------------------------------------------------
def _folders(root) -> list[str]:
    dirs = [os.path.join(root, d) for d in ("rgb", "hint", "mask")]
    for d in dirs:
        os.makedirs(d)
    for i in range(6):
        h, w = 40 + 3 * i, 50 - 2 * i
        pixels("RGB", seed=i, h=h, w=w).save(os.path.join(dirs[0], f"{i}.jpg"), quality=90)
        pixels("L", seed=10 + i, h=h, w=w).save(os.path.join(dirs[1], f"{i}.png"))
        pixels("P", seed=20 + i, h=h, w=w).save(os.path.join(dirs[2], f"{i}.png"))
    return dirs


def _tensors(sample) -> tuple[torch.Tensor, ...]:
    return tuple(x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)) for x in sample)


def _epoch(ds, workers: int, seed: int = 0) -> list:
    torch.manual_seed(seed)
    return [_tensors(s) for s in DataLoader(ds, batch_size=None, num_workers=workers, shuffle=False)]


@pytest.mark.parametrize("transform", ["crop", "none"])
def test_dataset_with_cache_equals_without(tmp_path, transform):
    dirs = _folders(tmp_path)
    t = v2.Compose([v2.RandomCrop(21), v2.RandomHorizontalFlip()]) if transform == "crop" else None
    kw = dict(modes=["RGB", "L", "unchanged"], kinds=["image", "image", "mask"])
    plain = MultiImgsDataset(dirs, t, **kw)
    cached = MultiImgsDataset(dirs, t, cache_dir=tmp_path / "cache", **kw)
    for workers in (2, 0, 1, 2):  # the first fills the cache (two workers at once), the others read it
        expected, got = _epoch(plain, workers), _epoch(cached, workers)  # workers draw from seeds of their own
        assert len(got) == len(expected) == 6
        for a, b in zip(got, expected):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len([f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]) == 12  # the PNGs, not the JPEGs


def test_dataset_errors_and_skipping_are_unchanged_by_the_cache(tmp_path):
    dirs = _folders(tmp_path)
    open(os.path.join(dirs[1], "2.png"), "wb").close()  # empty
    kw = dict(modes=["RGB", "L", "unchanged"], kinds=["image", "image", "mask"])
    for t in (None, v2.RandomCrop(21)):
        plain, cached = MultiImgsDataset(dirs, t, **kw), MultiImgsDataset(dirs, t, cache_dir=tmp_path / "c", **kw)
        expected = _error(plain.__getitem__, 2)
        assert dirs[1] in expected
        assert _error(cached.__getitem__, 2) == expected
        torch.manual_seed(0)
        skipped_plain = MultiImgsDataset(dirs, t, on_error="skip", **kw)[2]
        torch.manual_seed(0)
        skipped_cached = MultiImgsDataset(dirs, t, on_error="skip", cache_dir=tmp_path / "c", **kw)[2]
        assert all(torch.equal(a, b) for a, b in zip(_tensors(skipped_plain), _tensors(skipped_cached)))


def test_the_exif_flag_is_part_of_the_key(tmp_path):
    path = str(tmp_path / "rotated.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    pixels("RGB").save(path, exif=exif)
    cache = PixelCache(tmp_path / "cache")
    for _ in range(2):
        for flag in (True, False):
            want = fast_img_loader(path, "RGB", as_tensor=True, exif=flag)
            assert torch.equal(cache.load(path, "RGB", as_tensor=True, exif=flag), want)
    assert cache.image_size(path, "RGB", exif=True) == (W, H)
    assert cache.image_size(path, "RGB", exif=False) == (H, W)
