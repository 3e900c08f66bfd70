"""MultiImgsDataset with joint v2 transforms, per-folder transforms and modes, custom loaders, on_error='skip'."""

from __future__ import annotations

import functools
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as v1
from torchvision.transforms import v2

from pixelz_dist.data import MultiImgsDataset
from pixelz_dist.data.images import fast_img_loader
from pixelz_dist.errors import ConfigError, DataError

H, W = 48, 64


def _sample(i):
    """An RGB photo whose red channel *is* its mask (0/255), a grey hint, the mask, and an asymmetric shape.

    Any geometric transform that treats the three alike keeps ``rgb[0] == mask`` exactly (no interpolation for
    flips and crops), so the test sees at once whether input and mask moved together.
    """
    rng = np.random.default_rng(i)
    mask = np.zeros((H, W), np.uint8)
    y, x = int(rng.integers(0, H // 2)), int(rng.integers(0, W // 2))
    mask[y : y + H // 3, x : x + W // 4] = 255
    mask[y : y + 4, x : x + W // 2] = 255  # an L shape: flips and rotations are visible
    rgb = np.dstack([mask, rng.integers(0, 256, (H, W), dtype=np.uint8), np.full((H, W), 7 * i % 256, np.uint8)])
    hint = (mask // 2 + 60).astype(np.uint8)
    return rgb, hint, mask


@pytest.fixture
def seg_dirs(tmp_path):
    dirs = [tmp_path / "rgb", tmp_path / "hint", tmp_path / "mask"]
    for d in dirs:
        d.mkdir()
    for i in range(6):
        rgb, hint, mask = _sample(i)
        Image.fromarray(rgb).save(dirs[0] / f"{i:03d}.png")  # lossless, so rgb[0] == mask holds exactly
        Image.fromarray(hint).save(dirs[1] / f"{i:03d}.png")
        Image.fromarray(mask).save(dirs[2] / f"{i:03d}.png")
    return [str(d) for d in dirs]


MODES = ["RGB", "L", "L"]
KINDS = ["image", "image", "mask"]


def to_float(x):
    """Module level, so it pickles into workers."""
    return x.float() / 255


def test_joint_random_flip_and_crop_move_input_and_mask_together(seg_dirs):
    joint = v2.Compose([v2.RandomCrop((32, 40)), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
    ds = MultiImgsDataset(seg_dirs, joint, modes=MODES, kinds=KINDS)
    untouched = MultiImgsDataset(seg_dirs, modes=MODES)
    moved = 0
    torch.manual_seed(0)
    for _ in range(4):
        for i in range(len(ds)):
            rgb, hint, mask = ds[i]
            assert type(rgb) is torch.Tensor and type(mask) is torch.Tensor  # plain tensors, ready for model(*batch)
            assert rgb.shape == (3, 32, 40) and hint.shape == (1, 32, 40) and mask.shape == (1, 32, 40)
            assert rgb.dtype == mask.dtype == torch.uint8
            assert torch.equal(rgb[0:1], mask) and torch.equal(hint, mask // 2 + 60)
            original = torch.from_numpy(np.array(untouched[i][2]))[None]
            moved += not torch.equal(mask, original[:, :32, :40])
    assert moved > 10  # the transforms did draw different crops and flips


def test_joint_rotation_and_resize_keep_masks_crisp_and_unjittered(seg_dirs):
    joint = v2.Compose(
        [
            v2.RandomRotation(30),
            v2.Resize((37, 53)),
            v2.ColorJitter(brightness=0.5),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    ds = MultiImgsDataset(seg_dirs, joint, modes=MODES, kinds=KINDS)
    torch.manual_seed(1)
    rgb, hint, mask = ds[2]
    assert rgb.dtype == torch.float32 and mask.dtype == torch.uint8  # ToDtype(float) leaves masks alone
    assert set(mask.unique().tolist()) <= {0, 255}  # nearest for masks: no interpolated or jittered values
    red = rgb[0]
    assert ((red > 0.05) & (red < 0.95)).any()  # the image itself was interpolated
    # the rotation was the same: where the mask is on, the (rotated, jittered) red channel is bright
    assert red[mask[0] == 255].mean() > red[mask[0] == 0].mean() + 0.25


def test_joint_transform_is_reproducible_under_manual_seed(seg_dirs):
    joint = v2.Compose([v2.RandomResizedCrop((24, 24), antialias=True), v2.RandomHorizontalFlip()])
    ds = MultiImgsDataset(seg_dirs, joint, modes=MODES, kinds=KINDS)
    torch.manual_seed(5)
    first = [ds[i] for i in range(len(ds))]
    torch.manual_seed(5)
    again = [ds[i] for i in range(len(ds))]
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_joint_transform_in_dataloader_workers(seg_dirs):
    joint = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    ds = MultiImgsDataset(seg_dirs, joint, modes=MODES, kinds=KINDS)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.files == ds.files
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(batches) == 2
    rgb, hint, mask = batches[0]
    assert type(rgb) is torch.Tensor and rgb.shape == (4, 3, H, W) and rgb.dtype == torch.float32
    assert mask.shape == (4, 1, H, W) and mask.dtype == torch.uint8
    assert torch.equal((rgb[:, 0:1] * 255).round().to(torch.uint8), mask)


def test_joint_with_one_folder_and_a_plain_function(seg_dirs):
    ds = MultiImgsDataset(seg_dirs[:1], v2.RandomHorizontalFlip(p=1.0), modes=["RGB"])
    (rgb,) = ds[0]
    plain = MultiImgsDataset(seg_dirs[:1], [None], modes=["RGB"])
    assert torch.equal(rgb, torch.from_numpy(np.array(plain[0][0])).permute(2, 0, 1).flip(-1))

    def swap(a, b):  # any callable taking the images of a sample works as a joint transform
        return b, a

    ds2 = MultiImgsDataset(seg_dirs[1:], swap, kinds=["image", "mask"])
    mask, hint = ds2[1]
    assert torch.equal(hint, mask // 2 + 60)


def test_v1_joint_transform_is_refused_with_a_hint(seg_dirs):
    with pytest.raises(ConfigError, match="v1 transform.*HINT"):
        MultiImgsDataset(seg_dirs, v1.RandomHorizontalFlip())
    with pytest.raises(ConfigError, match="kinds"):
        MultiImgsDataset(seg_dirs, kinds=["image", "mask", "label"])
    with pytest.raises(ConfigError, match="got 2 modes for 3 folders"):
        MultiImgsDataset(seg_dirs, modes=["RGB", "L"])
    with pytest.raises(ConfigError, match="unknown image mode 'grey'"):
        MultiImgsDataset(seg_dirs, modes=["RGB", "grey", "L"])
    with pytest.raises(ConfigError, match="on_error"):
        MultiImgsDataset(seg_dirs, on_error="ignore")


def test_per_folder_transforms_v1_and_v2_with_modes(seg_dirs):
    v1_t = [v1.Compose([v1.ToTensor(), v1.Normalize([0.5] * 3, [0.5] * 3)]), v1.ToTensor(), v1.PILToTensor()]
    rgb, hint, mask = MultiImgsDataset(seg_dirs, v1_t, modes=MODES)[0]
    assert rgb.shape == (3, H, W) and hint.shape == (1, H, W) and mask.dtype == torch.uint8
    assert rgb.min() >= -1 and rgb.max() <= 1
    # modes declared once: the grey folders read as RGB unless told otherwise
    _, hint3, _ = MultiImgsDataset(seg_dirs, v1_t[:2] + [v1.PILToTensor()], modes=["RGB", "RGB", "L"])[0]
    assert hint3.shape == (3, H, W)
    # tensor-based v2 transforms on tensors straight from the decoder
    tensor_loader = functools.partial(fast_img_loader, as_tensor=True)
    v2_t = [v2.ToDtype(torch.float32, scale=True), to_float, None]
    rgb, hint, mask = MultiImgsDataset(seg_dirs, v2_t, tensor_loader, modes=MODES)[0]
    assert rgb.dtype == torch.float32 and hint.shape == (1, H, W) and mask.shape == (1, H, W)
    assert torch.equal((rgb[0:1] * 255).round().to(torch.uint8), mask)
    ds = MultiImgsDataset(seg_dirs, v2_t, tensor_loader, modes=MODES)
    assert len(list(DataLoader(ds, batch_size=3, num_workers=1))) == 2


def test_custom_loader_gets_the_mode_only_when_modes_are_given(seg_dirs):
    calls = []

    def loader(path, mode=None):
        calls.append((os.path.basename(os.path.dirname(path)), mode))
        return Image.open(path).convert(mode or "RGB")

    MultiImgsDataset(seg_dirs, None, loader)[0]
    assert calls == [("rgb", None), ("hint", None), ("mask", None)]
    calls.clear()
    MultiImgsDataset(seg_dirs, None, loader, modes=MODES)[0]
    assert calls == [("rgb", "RGB"), ("hint", "L"), ("mask", "L")]
    # a joint transform accepts whatever a loader returns: PIL images and arrays become tv_tensors
    rgb, hint, mask = MultiImgsDataset(
        seg_dirs,
        v2.RandomHorizontalFlip(p=1.0),
        lambda p, m: np.asarray(Image.open(p).convert(m)),
        modes=MODES,
        kinds=KINDS,
    )[0]
    assert rgb.shape == (3, H, W) and mask.shape == (1, H, W) and torch.equal(rgb[0:1], mask)


def _break(path):
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not the rest of a jpeg")


def test_on_error_raise_names_file_and_folder_even_from_workers(seg_dirs):
    bad = os.path.join(seg_dirs[2], "003.png")
    _break(bad)
    ds = MultiImgsDataset(seg_dirs, modes=MODES)
    with pytest.raises(DataError) as info:
        ds[3]
    assert repr(bad) in str(info.value) and repr(seg_dirs[2]) in str(info.value)
    batches = iter(DataLoader(MultiImgsDataset(seg_dirs, v2.ToDtype(torch.float32), modes=MODES), num_workers=1))
    with pytest.raises(DataError, match="003.png"):
        for _ in batches:
            pass
    # Dropped here, not by a later garbage collection: torch then waits 5 s for the worker (torch 2.14 behaviour).
    del batches


def test_on_error_skip_substitutes_the_next_good_sample(seg_dirs, caplog):
    for name in ("002.png", "003.png"):
        _break(os.path.join(seg_dirs[1], name))
    _break(os.path.join(seg_dirs[0], "005.png"))
    tensor_loader = functools.partial(fast_img_loader, as_tensor=True)
    ds = MultiImgsDataset(seg_dirs, [to_float] * 3, tensor_loader, modes=MODES, on_error="skip")
    clean = MultiImgsDataset(seg_dirs, [to_float] * 3, tensor_loader, modes=MODES)
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        got = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]
    expected_source = [0, 1, 4, 4, 4, 0]  # 2, 3 -> 4; 5 wraps around to 0
    for i, src in enumerate(expected_source):
        want = clean[src]
        assert all(torch.equal(a, b) for a, b in zip(got[i], want)), i
        assert all(torch.equal(a, b) for a, b in zip(again[i], want)), i
    assert caplog.text.count("skipping sample") == 3  # logged once per bad sample, not per access
    assert "002.png" in caplog.text and "005.png" in caplog.text and repr(seg_dirs[1]) in caplog.text
    from_workers = list(DataLoader(ds, batch_size=6, num_workers=2))
    assert all(torch.equal(a, torch.stack([g[k] for g in got])) for k, a in enumerate(from_workers[0]))


def test_on_error_skip_raises_when_nothing_decodes(seg_dirs):
    for name in os.listdir(seg_dirs[2]):
        _break(os.path.join(seg_dirs[2], name))
    ds = MultiImgsDataset(seg_dirs, on_error="skip")
    with pytest.raises(DataError, match="no sample.*can be loaded.*first error.*004.png"):
        ds[4]
    with pytest.raises(DataError, match="no sample"):
        ds[0]  # every sample is now known to be bad
