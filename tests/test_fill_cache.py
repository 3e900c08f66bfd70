"""python -m pixelz_dist.prepare: fills the cache training reads, in parallel, and says what it did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_pixel_cache import _folders
from torchvision.transforms import v2

from pixelz_dist.cli.fill_cache import main
from pixelz_dist.data.images import fast_img_loader
from pixelz_dist.data.pixel_cache import PixelCache
from pixelz_dist.errors import PixelzError

MODES = ["RGB", "L", "unchanged"]


def prepare(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pixelz_dist.prepare", *args], capture_output=True, text=True,
                          env=env, timeout=240)


def test_fills_then_finds_everything_current_then_only_what_changed(tmp_path):
    dirs = _folders(tmp_path)  # 6 samples: JPEG photo, PNG hint, palette PNG mask
    cache_dir = str(tmp_path / "cache")
    args = ["--data", *dirs, "--modes", *MODES, "--cache-dir", cache_dir]
    first = prepare(*args, "--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "prepare: 100%" in first.stderr and "18/18" in first.stderr  # the progress bar went to the end
    assert first.stdout.startswith("12 cached, 0 already current, 6 not lossless (skipped), 0 failed;"), first.stdout
    cache = PixelCache(cache_dir)
    for folder, mode in zip(dirs, MODES):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".png"):
                assert cache.image_size(path, mode) is not None, path
                assert torch.equal(cache.load(path, mode, as_tensor=True), fast_img_loader(path, mode, as_tensor=True))
            else:
                assert cache.image_size(path, mode) is None, path

    again = prepare(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 cached, 12 already current, 6 not lossless (skipped), 0 failed;"), again.stdout

    hint = os.path.join(dirs[1], "4.png")
    st = os.stat(hint)
    os.utime(hint, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # edited
    bad = os.path.join(dirs[2], "1.png")
    with open(bad, "r+b") as f:
        f.truncate(40)  # cut short
    third = prepare(*args, "--workers", "2", "--no-progress")
    assert third.returncode == 2, third.stderr
    assert third.stdout.startswith("1 cached, 10 already current, 6 not lossless (skipped), 1 failed;"), third.stdout
    assert f"failed: {bad}: cannot decode image" in third.stderr
    assert "error: 1 file(s) could not be cached" in third.stderr and "prepare:" not in third.stderr


def _error_of(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    dirs = _folders(tmp_path)
    cache = str(tmp_path / "cache")
    assert "--modes has 2 entries for 3 --data folders" in _error_of(capsys, "--data", *dirs, "--modes", "RGB", "L",
                                                                      "--cache-dir", cache)
    assert "unknown image mode 'RGBX2'" in _error_of(capsys, "--data", dirs[0], "--modes", "RGBX2", "--cache-dir",
                                                     cache)
    assert "does not exist" in _error_of(capsys, "--data", str(tmp_path / "nowhere"), "--cache-dir", cache)
    os.remove(os.path.join(dirs[2], "5.png"))
    assert "do not hold the same file stems" in _error_of(capsys, "--data", *dirs, "--cache-dir", cache)
    (tmp_path / "a_file").write_text("x")
    assert "cannot be written" in _error_of(capsys, "--data", dirs[0], "--cache-dir", str(tmp_path / "a_file" / "c"))
    assert "--workers must be at least 1" in _error_of(capsys, "--data", dirs[0], "--cache-dir", cache,
                                                       "--workers", "0")
    assert not os.path.exists(cache)
    with pytest.raises(SystemExit) as info:
        main(["--data", dirs[0]])  # no --cache-dir: argparse's usage error
    assert info.value.code == 2


def _killed(job):
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would


def test_a_killed_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    from pixelz_dist.cli import fill_cache as fill_cache_module

    dirs = _folders(tmp_path)
    monkeypatch.setattr(fill_cache_module, "_fill_one", _killed)  # the forked workers inherit it
    with pytest.raises(PixelzError, match="a worker process died"):
        fill_cache_module.prepare_cache(dirs[1:], str(tmp_path / "cache"), workers=2, progress=False)


def test_every_console_script_names_a_callable():
    """pyproject's [project.scripts] (``pixelz-prepare`` and the others) point at functions that exist."""
    import importlib
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pixelz-prepare"] == "pixelz_dist.prepare:main"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_a_same_size_rewrite_with_its_time_put_back_is_stored_again_and_trained_on(tmp_path, capsys):
    from test_pixel_cache import _after_a_clock_tick, pixels

    from pixelz_dist.data import MultiImgsDataset

    dirs = _folders(tmp_path)
    hint = os.path.join(dirs[1], "2.png")
    pixels("L", seed=1, h=46, w=46).save(hint, "PNG", compress_level=0)  # no compression: the size is the shape's
    pixels("P", seed=1, h=46, w=46).save(os.path.join(dirs[2], "2.png"))
    pixels("RGB", seed=1, h=46, w=46).save(os.path.join(dirs[0], "2.jpg"))
    cache = str(tmp_path / "cache")
    args = ["--data", *dirs, "--modes", *MODES, "--cache-dir", cache, "--no-progress", "--workers", "1"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("12 cached, 0 already current")
    st = os.stat(hint)
    _after_a_clock_tick(dirs[1], st)
    pixels("L", seed=2, h=46, w=46).save(hint, "PNG", compress_level=0)
    os.utime(hint, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p, tar -x, rsync -t
    assert (os.stat(hint).st_size, os.stat(hint).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("1 cached, 11 already current")
    new = fast_img_loader(hint, "L", as_tensor=True)
    ds = MultiImgsDataset(dirs, v2.RandomCrop(46), modes=MODES, kinds=["image", "image", "mask"], cache_dir=cache)
    assert torch.equal(ds[2][1], new)


def test_prune_then_fill_and_prune_alone(tmp_path, capsys):
    import time

    dirs = _folders(tmp_path)
    cache = str(tmp_path / "cache")
    args = ["--data", *dirs, "--modes", *MODES, "--cache-dir", cache, "--no-progress", "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    gone = [os.path.join(dirs[1], "5.png"), os.path.join(dirs[2], "5.png")]
    gone_bytes = sum(os.path.getsize(PixelCache(cache).entry_path(p, m)) for p, m in zip(gone, MODES[1:]))
    for folder in dirs:
        for name in os.listdir(folder):
            if name.startswith("5."):
                os.remove(os.path.join(folder, name))
    killed = os.path.join(cache, "00", ".00000000000000000000000000000000.px.dead.tmp")
    os.makedirs(os.path.dirname(killed), exist_ok=True)
    with open(killed, "wb") as f:
        f.write(b"\0" * 2048)
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    assert main([*args, "--prune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"pruned 2 entries ({gone_bytes / 1024:.1f} KiB): 2 of files that are gone, 0 of an older "
                      "format or unreadable; 1 temporary files of killed writers (2.0 KiB)"), out
    assert out[1].startswith("0 cached, 10 already current, 5 not lossless (skipped), 0 failed;"), out
    assert not os.path.exists(killed)
    assert main(["--cache-dir", cache, "--prune"]) == 0  # no --data: prune only
    assert capsys.readouterr().out.startswith("pruned 0 entries (0.0 KiB): 0 of files that are gone")
    with pytest.raises(SystemExit) as info:
        main(["--cache-dir", cache])
    assert info.value.code == 2 and "--data (or --prune)" in capsys.readouterr().err
