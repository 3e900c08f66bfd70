"""mode="label": class-index maps read exactly, as int64 H x W, on every decoding path; colour and lossy files are
refused."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from conftest import DIST_VARS, TESTS
from pixelz_dist.data import MultiImgsDataset
from pixelz_dist.data import images as images_module
from pixelz_dist.data.images import fast_img_loader
from pixelz_dist.data.pixel_cache import PixelCache
from pixelz_dist.errors import ConfigError, DataError

H, W = 26, 37
CLASSES = 5
#: A palette whose colours are nothing like the indices: a decoder that took the colours would be caught.
PALETTE = [0, 0, 0, 250, 10, 10, 10, 250, 10, 10, 10, 250, 200, 200, 30]


def classes(seed: int, h: int = H, w: int = W, top: int = CLASSES) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, top, (h, w)).astype(np.uint8 if top <= 256 else np.uint16)


def save_label(path, cls: np.ndarray, file_mode: str) -> None:
    if file_mode == "P":
        img = Image.fromarray(cls, "P")
        img.putpalette(PALETTE)
    elif file_mode == "1":
        img = Image.fromarray(cls.astype(bool))
    else:
        img = Image.fromarray(cls)  # L for uint8, I;16 for uint16
    assert img.mode == file_mode
    img.save(path)


def folders(root, n: int = 6, file_mode: str = "P") -> tuple[list[str], list[np.ndarray]]:
    """rgb/ (lossless photos whose red channel is 50 * class) and labels/ (the classes), ``n`` samples."""
    dirs = [os.path.join(root, "rgb"), os.path.join(root, "labels")]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    drawn = []
    for i in range(n):
        cls = classes(i)
        noise = np.random.default_rng(100 + i).integers(0, 256, (H, W, 2), dtype=np.uint8)
        Image.fromarray(np.dstack([cls * 50, noise])).save(os.path.join(dirs[0], f"{i}.png"))
        save_label(os.path.join(dirs[1], f"{i}.png"), cls, file_mode)
        drawn.append(cls)
    return dirs, drawn


def classes_of(rgb: torch.Tensor) -> torch.Tensor:
    """The classes a sample's photo encodes (its red channel), from uint8 or float [0, 1] pixels."""
    red = rgb[0] if rgb.dtype == torch.uint8 else (rgb[0] * 255).round()
    return torch.div(red.long(), 50, rounding_mode="floor")


# -- what a label map is ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_mode", ["P", "L", "I;16", "1"])
def test_stored_integers_come_back_exactly_as_int64_h_x_w(tmp_path, file_mode):
    top = {"P": CLASSES, "L": 256, "I;16": 65536, "1": 2}[file_mode]
    cls = classes(1, top=top)
    path = str(tmp_path / "m.png")
    save_label(path, cls, file_mode)
    want = torch.from_numpy(cls.astype(np.int64))
    assert torch.equal(torch.from_numpy(np.array(fast_img_loader(path, "label"))).long(), want)
    tensor = fast_img_loader(path, "label", as_tensor=True)
    assert tensor.shape == (1, H, W) and not tensor.is_floating_point() and torch.equal(tensor[0].long(), want)
    (tmp_path / "labels").mkdir()
    os.replace(path, tmp_path / "labels" / "m.png")
    (target,) = MultiImgsDataset([str(tmp_path / "labels")], modes=["label"])[0]
    assert target.dtype == torch.int64 and target.shape == (H, W) and torch.equal(target, want)


@pytest.mark.parametrize("file_mode", ["P", "L"])
def test_dataset_without_and_with_a_joint_transform(tmp_path, file_mode):
    dirs, drawn = folders(tmp_path, file_mode=file_mode)
    plain = MultiImgsDataset(dirs, modes=["RGB", "label"])
    for i, cls in enumerate(drawn):
        rgb, target = plain[i]
        assert isinstance(rgb, Image.Image)  # the other folders are as before
        assert target.dtype == torch.int64 and torch.equal(target, torch.from_numpy(cls).long())
    joint = v2.Compose([v2.RandomCrop(17), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    ds = MultiImgsDataset(dirs, joint, modes=["RGB", "label"])
    assert ds.kinds == ["image", "mask"]
    torch.manual_seed(0)
    batches = list(DataLoader(ds, batch_size=3, num_workers=1))
    flipped = 0
    for rgb, target in batches:
        assert rgb.dtype == torch.float32 and target.dtype == torch.int64 and target.shape == (3, 17, 17)
        assert set(target.unique().tolist()) <= set(range(CLASSES))
        assert all(torch.equal(t, classes_of(x)) for x, t in zip(rgb, target))  # aligned with the photo
        logits = torch.zeros(3, CLASSES, 17, 17, requires_grad=True)
        F.cross_entropy(logits, target).backward()
        flipped += sum(not any(torch.equal(t, torch.from_numpy(c[r : r + 17, k : k + 17]).long())
                               for c in drawn for r in range(H - 16) for k in range(W - 16)) for t in target)
    assert flipped > 0  # the flip did happen to some, and the masks moved with the photos
    resized = MultiImgsDataset(dirs, v2.Compose([v2.RandomResizedCrop(31, antialias=True)]), modes=["RGB", "label"])
    for i in range(len(resized)):
        _, target = resized[i]
        assert set(target.unique().tolist()) <= set(range(CLASSES))  # nearest: no class in between


def test_a_per_folder_transform_gets_the_int64_map_and_must_keep_integers(tmp_path):
    dirs, drawn = folders(tmp_path, n=2)
    got = []
    ds = MultiImgsDataset(dirs, [None, lambda t: got.append(t) or t.flip(-1)], modes=["RGB", "label"])
    assert torch.equal(ds[1][1], torch.from_numpy(drawn[1]).long().flip(-1))
    assert got[0].dtype == torch.int64 and got[0].shape == (H, W)
    scaled = MultiImgsDataset(dirs, [None, lambda t: t.float() / 255], modes=["RGB", "label"])
    with pytest.raises(ConfigError, match=r"label folder '.*labels'.*torch.float32.*HINT"):
        scaled[0]
    to_float = v2.ToDtype({tv_tensors.Mask: torch.float32, "others": None})
    with pytest.raises(ConfigError, match="label map came out of the transform as torch.float32"):
        MultiImgsDataset(dirs, to_float, modes=["RGB", "label"])[0]


def test_a_label_folder_is_a_mask_never_an_image(tmp_path):
    dirs, _ = folders(tmp_path, n=1)
    with pytest.raises(ConfigError, match=r"mode 'label' \(class indices\) but kind 'image'.*HINT"):
        MultiImgsDataset(dirs, v2.RandomCrop(8), modes=["RGB", "label"], kinds=["image", "image"])
    assert MultiImgsDataset(dirs, modes=["RGB", "label"], kinds=["image", "mask"]).kinds == ["image", "mask"]


# -- what is refused -------------------------------------------------------------------------------------------------
def _refusal(ds, index) -> str:
    with pytest.raises(DataError) as info:
        ds[index]
    return str(info.value)


@pytest.mark.parametrize("bad", ["rgb-png", "rgba-png", "jpeg", "grey-jpeg-named-png"])
def test_colour_and_lossy_files_in_a_label_folder_are_refused_on_every_path(tmp_path, bad):
    dirs, drawn = folders(tmp_path, n=3)
    os.remove(os.path.join(dirs[1], "1.png"))
    path = os.path.join(dirs[1], "1.jpg" if bad == "jpeg" else "1.png")
    cls = drawn[1]
    if bad == "rgb-png":
        Image.fromarray(np.dstack([cls] * 3)).save(path)
    elif bad == "rgba-png":
        Image.fromarray(np.dstack([cls] * 4)).save(path)
    else:
        Image.fromarray(cls * 50).save(path, "JPEG", quality=100)
    why = "is a JPEG: lossy compression" if "jpeg" in bad else "-channel RGB" if bad == "rgb-png" else "RGBA image"
    crop = v2.Compose([v2.RandomCrop(9), v2.ToDtype(torch.float32, scale=True)])
    paths = {
        "plain": MultiImgsDataset(dirs, modes=["RGB", "label"]),
        "joint": MultiImgsDataset(dirs, crop, modes=["RGB", "label"], crop_decode="off"),
        "crop-aware": MultiImgsDataset(dirs, crop, modes=["RGB", "label"]),
        "cache": MultiImgsDataset(dirs, crop, modes=["RGB", "label"], cache_dir=tmp_path / "cache"),
        "cache-whole": MultiImgsDataset(dirs, None, modes=["RGB", "label"], cache_dir=tmp_path / "cache"),
    }
    assert paths["crop-aware"]._planner is not None
    for name, ds in paths.items():
        message = _refusal(ds, 1)
        assert path in message and why in message and "HINT:" in message and "sample 1" in message, (name, message)
        ds[0], ds[2]  # the good samples load
    skipping = MultiImgsDataset(dirs, modes=["RGB", "label"], on_error="skip")
    assert torch.equal(skipping[1][1], torch.from_numpy(drawn[2]).long())  # a refusal is a bad file for skip too
    with pytest.raises(DataError, match="label image"):
        fast_img_loader(path, "label")
    with pytest.raises(DataError, match="label image"):
        PixelCache(tmp_path / "cache").fill(path, "label")
    assert fast_img_loader(path, "L") is not None  # in any other mode the file is what it always was


# -- every decoding path gives the same tensors ----------------------------------------------------------------------
def test_cache_and_crop_aware_paths_give_identical_tensors(tmp_path, monkeypatch):
    dirs, _ = folders(tmp_path, file_mode="P")
    Image.fromarray(classes(9, top=1000)).save(os.path.join(dirs[1], "5.png"))  # one 16-bit map among palettes
    crop = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(15), v2.ToDtype(torch.float32, scale=True)])
    kw = dict(modes=["RGB", "label"])
    variants = {
        "whole": MultiImgsDataset(dirs, crop, crop_decode="off", **kw),
        "crop-aware": MultiImgsDataset(dirs, crop, **kw),
        "cache-crop-aware": MultiImgsDataset(dirs, crop, cache_dir=tmp_path / "cache", **kw),
        "cache-whole": MultiImgsDataset(dirs, crop, crop_decode="off", cache_dir=tmp_path / "cache", **kw),
    }

    def epoch(ds):
        torch.manual_seed(5)
        return [ds[i] for i in range(len(ds))]

    expected = epoch(variants["whole"])
    assert expected[5][1].max() > 255
    for _ in range(2):  # the first pass fills the cache, the second reads it
        for name, ds in variants.items():
            for want, got in zip(expected, epoch(ds)):
                for x, y in zip(want, got):
                    assert x.dtype == y.dtype and torch.equal(x, y), name
    plain = [MultiImgsDataset(dirs, cache_dir=tmp_path / "cache", **kw)[i][1] for i in range(6)]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded, although the entry should have been read from the cache")

    monkeypatch.setattr(images_module, "decode_image", no_decoding)  # from here on, only the cache answers
    assert epoch(variants["cache-crop-aware"])[3][1].dtype == torch.int64
    for i, want in enumerate(plain):
        assert torch.equal(MultiImgsDataset(dirs, cache_dir=tmp_path / "cache", **kw)[i][1], want)


# -- the command line ------------------------------------------------------------------------------------------------
def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    # tests/jobs for the model factory, then this checkout's package (as `python -m` from the repository root)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.join(TESTS, "jobs"), os.path.dirname(TESTS),
                                                                   env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_train_and_prepare_with_modes_rgb_label(tmp_path):
    dirs, _ = folders(tmp_path, n=8, file_mode="P")
    for i in range(4, 8):  # half of them grey: both kinds of file in one folder
        save_label(os.path.join(dirs[1], f"{i}.png"), classes(i), "L")
    cache = str(tmp_path / "cache")
    prepared = _run("pixelz_dist.prepare", "--data", *dirs, "--modes", "RGB", "label", "--cache-dir", cache,
                    "--no-progress")
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.startswith("16 cached, 0 already current"), prepared.stdout
    common = ["--model", "label_model:LabelNet", "--data", *dirs, "--modes", "RGB", "label", "--iters", "4",
              "--batch-size", "2", "--workers", "0", "--display-iter", "1"]
    for extra in ([], ["--cache-dir", cache]):
        trained = _run("pixelz_dist.train", *common, *extra)
        assert trained.returncode == 0, trained.stderr  # the model asserts dtype, shape and the exact classes
        assert "iter 4/4" in trained.stderr
    Image.fromarray(classes(3) * 50).save(os.path.join(dirs[1], "3.jpg"), "JPEG")
    os.remove(os.path.join(dirs[1], "3.png"))
    refused = _run("pixelz_dist.prepare", "--data", *dirs, "--modes", "RGB", "label", "--cache-dir", cache,
                   "--no-progress")
    assert refused.returncode == 2
    assert f"failed: {os.path.join(dirs[1], '3.jpg')}: label image" in refused.stderr and "is a JPEG" in refused.stderr
    bad = _run("pixelz_dist.train", *common)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: label image"), bad.stderr
