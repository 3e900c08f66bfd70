"""MultiImgsDataset: folder scanning, pairing, errors, loading and use in DataLoader workers."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pixelz_dist.data import multi_images as data_mod
from pixelz_dist.data.images import fast_img_loader
from pixelz_dist.data.multi_images import MultiImgsDataset, natural_key, pil_loader, scan_images
from pixelz_dist.errors import ConfigError, DataError, PixelzError


def _write(path, value=0, mode="RGB", size=(6, 4)):
    """A small real image; ``value`` makes contents distinguishable."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "RGB":
        arr = np.full((size[1], size[0], 3), value % 256, dtype=np.uint8)
        arr[0, 0] = (value * 7) % 256
    else:
        arr = np.full((size[1], size[0]), value % 256, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)


def _touch(path):
    with open(path, "wb"):
        pass


def to_tensor(img):
    """Module level, so it pickles into DataLoader workers."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


def _two_folders(tmp_path, stems, exts=(".png", ".jpg")):
    a, b = tmp_path / "a", tmp_path / "b"
    for i, s in enumerate(stems):
        _write(str(a / f"{s}{exts[0]}"), value=i * 10)
        _write(str(b / f"{s}{exts[1]}"), value=i * 10, mode="L")
    return str(a), str(b)


def test_natural_key_orders_numbers_numerically():
    names = ["img10.png", "img2.png", "Img1.png", "img1b.png", "a.png", "img002.png"]
    assert sorted(names, key=natural_key) == ["a.png", "Img1.png", "img1b.png", "img002.png", "img2.png", "img10.png"]


def test_stem_matching_across_extensions(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for s in ["0002_x", "0001_abc", "0003_q"]:
        _write(str(a / f"{s}.png"))
        _write(str(b / f"{s}.jpg"), mode="L")
    ds = MultiImgsDataset([a, str(b)])
    assert len(ds) == 3
    assert ds.stems == ["0001_abc", "0002_x", "0003_q"]
    assert ds.files[0] == [os.path.join(str(a), f"{s}.png") for s in ds.stems]
    assert ds.files[1] == [os.path.join(str(b), f"{s}.jpg") for s in ds.stems]
    img_a, img_b = ds[1]
    assert img_a.mode == "RGB" and img_b.mode == "L"
    assert img_a.size == (6, 4)


def test_stem_matching_pairs_by_name_not_position(tmp_path):
    # Different extensions sort differently ("b.jpg" vs "b.png") only by name; pairing must follow stems.
    a, b = tmp_path / "a", tmp_path / "b"
    _write(str(a / "x.png"), value=10)
    _write(str(a / "y.png"), value=200)
    _write(str(b / "x.bmp"), value=10, mode="L")
    _write(str(b / "y.tif"), value=200, mode="L")
    ds = MultiImgsDataset([a, b], [to_tensor, to_tensor])
    for rgb, grey in ds:
        assert int(rgb[1, 1, 0]) == int(grey[1, 1])


def test_natural_sort_order(tmp_path):
    stems = ["img10", "img2", "img1", "img100", "img20"]
    a, b = _two_folders(tmp_path, stems)
    ds = MultiImgsDataset([a, b])
    assert ds.stems == ["img1", "img2", "img10", "img20", "img100"]
    assert [os.path.basename(p) for p in ds.files[0]] == [f"{s}.png" for s in ds.stems]


def test_hidden_non_image_and_case_insensitive(tmp_path):
    a, b = _two_folders(tmp_path, ["s1", "s2"])
    _write(os.path.join(a, ".hidden.png"))
    _write(os.path.join(b, ".s3.jpg"), mode="L")
    for junk in ["notes.txt", "Thumbs.db", "s9.png.bak", "README"]:
        (tmp_path / "a" / junk).write_text("not an image")
    os.makedirs(os.path.join(a, "looks_like.png"))  # a directory is not a file
    _write(os.path.join(a, "S3.PNG"))
    _write(os.path.join(b, "S3.JpEg"), mode="L")
    _write(os.path.join(a, "s4.Tiff"))
    _write(os.path.join(b, "s4.WEBP"), mode="L")
    ds = MultiImgsDataset([a, b])
    assert ds.stems == ["s1", "s2", "S3", "s4"]
    assert os.path.basename(ds.files[1][2]) == "S3.JpEg"
    assert all(len(sample) == 2 for sample in ds)


def test_mismatch_error_names_folders_counts_and_missing_stems(tmp_path):
    a, b = tmp_path / "left", tmp_path / "right"
    for i in range(10):
        _write(str(a / f"f{i}.png"))
    for i in [0, 1, 3]:
        _write(str(b / f"f{i}.png"))
    _write(str(b / "extra.png"))
    with pytest.raises(DataError) as info:
        MultiImgsDataset([a, b])
    msg = str(info.value)
    assert repr(str(a)) in msg and repr(str(b)) in msg
    assert "has 10 files" in msg and "has 4 files" in msg
    # first five missing stems from 'right', in natural order, then how many more
    assert "'f2', 'f4', 'f5', 'f6', 'f7' (and 2 more)" in msg
    assert "f8" not in msg
    assert f"missing from {str(a)!r}: 'extra'" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, PixelzError)


def test_duplicate_stems_in_one_folder(tmp_path):
    a, b = _two_folders(tmp_path, ["p", "q"])
    _write(os.path.join(a, "q.jpg"))
    with pytest.raises(DataError, match=r"same stem.*q\.jpg / q\.png"):
        MultiImgsDataset([a, b])


def test_sorted_mode_pairs_by_position_and_checks_counts(tmp_path):
    a, b = tmp_path / "img", tmp_path / "lbl"
    for i in [1, 2, 10]:
        _write(str(a / f"photo{i}.jpg"), value=i)
        _write(str(b / f"label_{i:03d}.png"), value=i, mode="L")
    with pytest.raises(DataError, match="missing from"):
        MultiImgsDataset([a, b])
    ds = MultiImgsDataset([a, b], match="sorted")
    assert ds.stems == ["photo1", "photo2", "photo10"]
    assert [os.path.basename(p) for p in ds.files[1]] == ["label_001.png", "label_002.png", "label_010.png"]

    _write(str(b / "label_011.png"), mode="L")
    with pytest.raises(DataError) as info:
        MultiImgsDataset([a, b], match="sorted")
    assert f"{str(a)!r} has 3 files" in str(info.value) and f"{str(b)!r} has 4 files" in str(info.value)


def test_missing_and_empty_folders(tmp_path):
    a, _ = _two_folders(tmp_path, ["x"])
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match="nope.*does not exist"):
        MultiImgsDataset([a, missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    _write(str(empty / ".hidden.png"))
    with pytest.raises(DataError, match="empty.*no image files"):
        MultiImgsDataset([a, empty])
    with pytest.raises(DataError, match="not a directory"):
        MultiImgsDataset([a, str(empty / "readme.txt")])


def test_config_errors(tmp_path):
    a, b = _two_folders(tmp_path, ["x"])
    with pytest.raises(ConfigError, match="got 1 transforms for 2 folders"):
        MultiImgsDataset([a, b], [to_tensor])
    with pytest.raises(ConfigError, match="got 3 transforms for 2 folders"):
        MultiImgsDataset([a, b], (to_tensor, None, None))
    with pytest.raises(ConfigError, match="not callable"):
        MultiImgsDataset([a, b], [to_tensor, 3])
    with pytest.raises(ConfigError, match="match"):
        MultiImgsDataset([a, b], match="fuzzy")
    with pytest.raises(ConfigError, match="single path"):
        MultiImgsDataset(a)
    with pytest.raises(ConfigError, match="empty"):
        MultiImgsDataset([])
    ds = MultiImgsDataset([a, b], [None, to_tensor])
    img, t = ds[0]
    assert isinstance(img, Image.Image) and isinstance(t, torch.Tensor)


def test_undecodable_file_names_file_and_folder(tmp_path):
    a, b = _two_folders(tmp_path, ["ok", "broken"])
    bad = os.path.join(b, "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\x00definitely not a jpeg" * 10)
    ds = MultiImgsDataset([a, b])  # construction opens nothing, so it succeeds
    ds[1]  # "ok" sorts after "broken"
    with pytest.raises(DataError) as info:
        ds[0]
    assert repr(bad) in str(info.value) and repr(b) in str(info.value)
    assert info.value.__cause__ is not None


def test_index_bounds(tmp_path):
    ds = MultiImgsDataset(list(_two_folders(tmp_path, ["a", "b"])), [to_tensor, to_tensor])
    assert torch.equal(ds[-1][0], ds[1][0])
    with pytest.raises(IndexError):
        ds[2]
    assert len(list(ds)) == 2


def test_pil_loader_modes(tmp_path):
    cases = {
        "grey.png": (Image.new("L", (3, 3), 7), "L"),
        "deep.png": (Image.new("I;16", (3, 3), 4000), "I;16"),
        "float.tiff": (Image.new("F", (3, 3), 0.5), "F"),
        "alpha.png": (Image.new("RGBA", (3, 3), (1, 2, 3, 4)), "RGB"),
        "palette.png": (Image.new("P", (3, 3), 1), "RGB"),
        "bits.png": (Image.new("1", (3, 3), 1), "RGB"),
    }
    for name, (img, expected) in cases.items():
        path = str(tmp_path / name)
        img.save(path)
        loaded = pil_loader(path)
        assert loaded.mode == expected, name
        assert loaded.size == (3, 3)
    assert pil_loader(str(tmp_path / "deep.png")).getpixel((0, 0)) == 4000


def test_pickle_round_trip(tmp_path):
    a, b = _two_folders(tmp_path, ["a1", "a2", "a3"])
    ds = MultiImgsDataset([a, b], [to_tensor, to_tensor])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.files == ds.files and clone.stems == ds.stems and clone.loader is fast_img_loader
    for x, y in zip(ds, clone):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_dataloader_workers_match_main_process(tmp_path):
    stems = [f"s{i}" for i in range(12)]
    a, b = _two_folders(tmp_path, stems)
    ds = MultiImgsDataset([a, b], [to_tensor, to_tensor])
    main = list(DataLoader(ds, batch_size=5, num_workers=0))
    workers = list(DataLoader(ds, batch_size=5, num_workers=2))
    assert len(main) == len(workers) == 3
    for x, y in zip(main, workers):
        assert len(x) == len(y) == 2
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert main[0][0].shape == (5, 4, 6, 3) and main[0][1].shape == (5, 4, 6)


def test_scan_images_public_order(tmp_path):
    a, _ = _two_folders(tmp_path, ["x10", "x9", "X1"])
    assert scan_images(a) == ["X1.png", "x9.png", "x10.png"]


@pytest.mark.slow
def test_100k_names_scan_without_opening_an_image(tmp_path, monkeypatch):
    """Construction reads names only (its speed is measured in benchmarks/dataset_scan.py, not asserted here)."""
    n = 50_000  # two folders: 100 000 file names
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(n):
        _touch(os.path.join(a, f"img{i}.png"))
        _touch(os.path.join(b, f"img{i}.jpg"))

    def no_open(*args, **kwargs):
        raise AssertionError("an image was opened during construction")

    opened = []
    monkeypatch.setattr(data_mod.Image, "open", no_open)
    ds = MultiImgsDataset([a, b], loader=opened.append)
    assert len(ds) == n and not opened
    assert ds.stems[:3] == ["img0", "img1", "img2"] and ds.stems[10] == "img10" and ds.stems[-1] == f"img{n - 1}"
    ds[5]
    assert opened == [os.path.join(a, "img5.png"), os.path.join(b, "img5.jpg")]
    monkeypatch.undo()
    with pytest.raises(DataError, match="img7.png"):  # an empty file does not decode
        MultiImgsDataset([a, b])[7]
    # pytest keeps the last three temporary trees; 100 000 files would slow the cleanup of a later test.
    shutil.rmtree(a)
    shutil.rmtree(b)
