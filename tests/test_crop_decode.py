"""Crop-aware loading: the crop drawn from the images' sizes, only the crop decoded, samples bit-identical."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from pixelz_dist.data import MultiImgsDataset
from pixelz_dist.data import jpeg_region as jpeg_region_module
from pixelz_dist.data.crop_plan import CropPlanner
from pixelz_dist.data.sampler import BatchKey
from pixelz_dist.data.seeding import SeededDataset
from pixelz_dist.errors import ConfigError, DataError

SIZES = [(75, 100), (61, 83), (64, 64), (97, 130), (40, 200), (120, 90)]  # (height, width): odd, non-multiples of 16
KINDS = ["image", "image", "mask"]
MODES = ["RGB", "L", "L"]


def region_decoder_built() -> bool:
    """Whether the C region decoder is here; where CI builds it (PIXELZ_REQUIRE_JPEG_REGION=1) it must be."""
    if jpeg_region_module.region_decoder_available():
        return True
    if os.environ.get("PIXELZ_REQUIRE_JPEG_REGION") == "1":
        pytest.fail("PIXELZ_REQUIRE_JPEG_REGION=1 but pixelz_dist.data._jpeg_region is not built")
    return False  # the samples must still be equal (whole decodes); only the region checks are left out


def photo(h: int, w: int, seed: int, noise: float = 18) -> np.ndarray:
    """Gradients, texture and noise: what shows chroma-upsampling errors at crop edges, unlike flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx * 255 / w, yy * 255 / h, (np.sin(xx / 5) + np.cos(yy / 7)) * 60 + 128], axis=-1)
    return np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)


def write_sample_folders(root, jpeg_options=None) -> list[str]:
    dirs = [os.path.join(root, d) for d in ("rgb", "hint", "mask")]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    variants = jpeg_options or [dict(quality=90), dict(quality=75, subsampling=0), dict(quality=95, subsampling=1),
                                dict(quality=90, progressive=True), dict(quality=85, subsampling=2),
                                dict(quality=92, progressive=True, subsampling=0)]
    for i, (h, w) in enumerate(SIZES):
        rgb = photo(h, w, i)
        Image.fromarray(rgb).save(os.path.join(dirs[0], f"{i:03d}.jpg"), **variants[i % len(variants)])
        Image.fromarray(rgb).convert("L").save(os.path.join(dirs[1], f"{i:03d}.jpg"), quality=90)  # a grey JPEG
        mask = (rgb[:, :, 0] > 128).astype(np.uint8) * 255
        Image.fromarray(mask).save(os.path.join(dirs[2], f"{i:03d}.png"))
    return dirs


TRANSFORMS = {
    "rrc+flip+float": lambda: v2.Compose([v2.RandomResizedCrop(32, scale=(0.1, 1.0)), v2.RandomHorizontalFlip(),
                                          v2.ToDtype(torch.float32, scale=True)]),
    "flips+rrc": lambda: v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                                     v2.RandomResizedCrop((24, 40), scale=(0.05, 0.6), ratio=(0.5, 2.0))]),
    "randomcrop": lambda: v2.Compose([v2.RandomCrop(33), v2.RandomVerticalFlip()]),
    "randomcrop-padded": lambda: v2.RandomCrop(70, pad_if_needed=True, fill=3),
    "centercrop": lambda: v2.Compose([v2.RandomHorizontalFlip(), v2.CenterCrop(31)]),
    "centercrop-padded": lambda: v2.CenterCrop(90),
    "resize": lambda: v2.Compose([v2.Resize(29), v2.RandomHorizontalFlip()]),
    "pointwise+flip+rrc": lambda: v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(p=0.7),
                                              v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.2] * 3),
                                              v2.RandomResizedCrop(21), v2.RandomVerticalFlip()]),
    "rrc-alone": lambda: v2.RandomResizedCrop(16),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_planner_draws_exactly_what_the_transform_draws(name):
    transform = TRANSFORMS[name]()
    planner = CropPlanner(transform)
    assert planner.supported
    img = torch.randint(0, 256, (3, 75, 100), dtype=torch.uint8)
    mask = torch.randint(0, 3, (1, 75, 100), dtype=torch.uint8)
    for seed in range(25):
        torch.manual_seed(seed)
        expected = transform(tv_tensors.Image(img), tv_tensors.Mask(mask))
        next_draw = torch.rand(1)
        torch.manual_seed(seed)
        plan = planner.plan(75, 100)
        b = plan.box
        boxes = [tv_tensors.Image(img[:, b.top : b.top + b.height, b.left : b.left + b.width].clone()),
                 tv_tensors.Mask(mask[:, b.top : b.top + b.height, b.left : b.left + b.width].clone())]
        got = planner.finish(plan, boxes)
        assert torch.equal(torch.rand(1), next_draw), "the RNG stream after the sample must be the same"
        for e, g in zip(expected, got):
            assert type(e) is type(g) and torch.equal(e, g), f"{name}, seed {seed}"


class MyCrop(v2.RandomResizedCrop):
    pass


@pytest.mark.parametrize("transform", [
    v2.Compose([v2.ColorJitter(0.2), v2.RandomResizedCrop(16)]),
    v2.RandomRotation(10),
    MyCrop(16),  # a subclass may draw differently
    v2.Compose([v2.RandomHorizontalFlip()]),
], ids=["jitter-first", "rotation", "subclass", "flip-only"])
def test_other_heads_are_not_planned(tmp_path, transform):
    assert not CropPlanner(transform).supported
    ds = MultiImgsDataset(write_sample_folders(tmp_path), transform, modes=MODES, kinds=KINDS)
    assert ds._planner is None


class RegionSpy:
    """The real region decoder, counting its calls and the pixels it returns."""

    def __init__(self, monkeypatch):
        self.calls, self.pixels = 0, 0
        real = jpeg_region_module.decode_jpeg_region

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls += 1
            self.pixels += out.shape[0] * out.shape[1]
            return out

        monkeypatch.setattr(jpeg_region_module, "decode_jpeg_region", spy)


def epoch(ds, seed=0):
    out = []
    for i in range(len(ds)):
        torch.manual_seed(seed * 1000 + i)
        out.append(ds[i])
    return out, torch.rand(1)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_crop_aware_samples_equal_whole_decode_samples(tmp_path, monkeypatch, name):
    dirs = write_sample_folders(tmp_path)
    spy = RegionSpy(monkeypatch)
    exact = MultiImgsDataset(dirs, TRANSFORMS[name](), modes=MODES, kinds=KINDS)
    whole = MultiImgsDataset(dirs, TRANSFORMS[name](), modes=MODES, kinds=KINDS, crop_decode="off")
    assert exact._planner is not None and whole._planner is None
    for seed in range(4):
        (a, after_a), (b, after_b) = epoch(exact, seed), epoch(whole, seed)
        assert torch.equal(after_a, after_b)
        for i, (sa, sb) in enumerate(zip(a, b)):
            for k, (x, y) in enumerate(zip(sa, sb)):
                assert x.dtype == y.dtype and torch.equal(x, y), f"{name}: sample {i}, image {k}, seed {seed}"
    if name.startswith(("rrc", "flips", "randomcrop")) and name != "randomcrop-padded" and region_decoder_built():
        assert spy.calls > 0, "the JPEGs were meant to be decoded by region"
        full = sum(h * w for h, w in SIZES) * 2 * 4  # two JPEG folders, four epochs
        assert spy.pixels < full


def test_colour_jpeg_decoded_as_grey_by_region(tmp_path, monkeypatch):
    """mode "L" on a colour JPEG: Pillow's RGB -> L rounding on the region, as on the whole image."""
    dirs = write_sample_folders(tmp_path)
    spy = RegionSpy(monkeypatch)
    t = v2.RandomResizedCrop(20, scale=(0.1, 0.5))
    a = MultiImgsDataset(dirs[:1], t, modes=["L"])
    b = MultiImgsDataset(dirs[:1], t, modes=["L"], crop_decode="off")
    for (sa,), (sb,) in zip(epoch(a)[0], epoch(b)[0]):
        assert sa.shape[0] == 1 and torch.equal(sa, sb)
    assert spy.calls == (len(SIZES) if region_decoder_built() else 0)


def test_same_batches_for_zero_one_and_two_workers(tmp_path):
    dirs = write_sample_folders(tmp_path)
    t = TRANSFORMS["rrc+flip+float"]()
    keys = [BatchKey(11, [0, 3, 5]), BatchKey(12, [1, 2, 4]), BatchKey(13, [5, 0, 1])]
    reference = list(DataLoader(SeededDataset(MultiImgsDataset(dirs, t, modes=MODES, kinds=KINDS, crop_decode="off")),
                                batch_sampler=keys, num_workers=0))
    for workers in (0, 1, 2):
        ds = MultiImgsDataset(dirs, t, modes=MODES, kinds=KINDS)
        got = list(DataLoader(SeededDataset(ds), batch_sampler=keys, num_workers=workers))
        for ra, rb in zip(reference, got):
            assert all(torch.equal(x, y) for x, y in zip(ra, rb)), f"{workers} workers"


def test_rotated_and_truncated_jpegs_are_decoded_whole(tmp_path, monkeypatch):
    dirs = write_sample_folders(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: its box would need mapping, so it is decoded whole
    h, w = SIZES[0]
    Image.fromarray(photo(w, h, 0)).save(os.path.join(dirs[0], "000.jpg"), quality=90, exif=exif)
    spy = RegionSpy(monkeypatch)
    t = v2.RandomResizedCrop(16)
    a = MultiImgsDataset(dirs[:1], t)
    b = MultiImgsDataset(dirs[:1], t, crop_decode="off")
    torch.manual_seed(0)
    sa = a[0]
    torch.manual_seed(0)
    assert torch.equal(sa[0], b[0][0])
    assert spy.calls == 0

    # Truncated: the part above the cut would decode, but the file must fail as it always did.
    path = os.path.join(dirs[0], "001.jpg")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    errors = []
    for ds in (a, b):
        torch.manual_seed(0)
        with pytest.raises(DataError) as info:
            ds[1]
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "001.jpg" in errors[0] and f"folder {dirs[0]!r}, sample 1" in errors[0]


def test_bad_files_named_as_before_and_skip_substitutes_the_same_sample(tmp_path, caplog):
    dirs = write_sample_folders(tmp_path)
    with open(os.path.join(dirs[0], "002.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    os.remove(os.path.join(dirs[2], "004.png"))
    open(os.path.join(dirs[2], "004.png"), "wb").close()  # empty
    t = TRANSFORMS["flips+rrc"]()
    messages = []
    for crop_decode in ("exact", "off"):
        ds = MultiImgsDataset(dirs, t, modes=MODES, kinds=KINDS, crop_decode=crop_decode)
        for i in (2, 4):
            with pytest.raises(DataError) as info:
                ds[i]
            messages.append(str(info.value))
    assert messages[:2] == messages[2:]
    assert "002.jpg" in messages[0] and "empty" in messages[1]

    skipping = [MultiImgsDataset(dirs, t, modes=MODES, kinds=KINDS, on_error="skip", crop_decode=c)
                for c in ("exact", "off")]
    (a, after_a), (b, after_b) = epoch(skipping[0]), epoch(skipping[1])
    assert torch.equal(after_a, after_b)
    for sa, sb in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_images_of_different_sizes_fail_as_the_transform_says(tmp_path):
    dirs = write_sample_folders(tmp_path)
    Image.new("L", (10, 10)).save(os.path.join(dirs[2], "000.png"))
    t = v2.RandomResizedCrop(16)
    errors = []
    for crop_decode in ("exact", "off"):
        with pytest.raises(ValueError) as info:
            MultiImgsDataset(dirs, t, modes=MODES, kinds=KINDS, crop_decode=crop_decode)[0]
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_a_bad_jpeg_beside_an_image_of_another_size_is_named_with_its_folder(tmp_path):
    """Sizes differ, so the images are read whole: a JPEG whose header reads but whose data cannot decode still fails
    with its folder and sample, as without crop-aware decoding."""
    dirs = write_sample_folders(tmp_path)
    Image.new("L", (10, 10)).save(os.path.join(dirs[2], "000.png"))
    path = os.path.join(dirs[0], "000.jpg")
    data = bytearray(open(path, "rb").read())
    dht = data.find(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # bogus Huffman counts: the size still reads, the pixels do not
    open(path, "wb").write(bytes(data))
    errors = []
    for crop_decode in ("exact", "off"):
        with pytest.raises(DataError) as info:
            MultiImgsDataset(dirs, v2.RandomResizedCrop(16), modes=MODES, kinds=KINDS, crop_decode=crop_decode)[0]
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "000.jpg" in errors[0] and f"folder {dirs[0]!r}, sample 0" in errors[0]


def test_scaled_decode_is_close_and_shaped_like_the_exact_one(tmp_path):
    """crop_decode="scaled": a JPEG whose crop is at least twice the output decodes at 1/2, 1/4 or 1/8 (not exact)."""
    if not region_decoder_built():
        pytest.skip("DCT scaling is done by the region decoder, which is not built")
    root = tmp_path / "big"
    root.mkdir()
    Image.fromarray(photo(600, 800, 1, noise=3)).save(root / "0.jpg", quality=92)
    t = v2.RandomResizedCrop(64, scale=(0.5, 1.0))
    exact = MultiImgsDataset([root], t)
    scaled = MultiImgsDataset([root], t, crop_decode="scaled")
    psnr = []
    for seed in range(8):
        torch.manual_seed(seed)
        (a,) = exact[0]
        torch.manual_seed(seed)
        (b,) = scaled[0]
        assert a.shape == b.shape == (3, 64, 64)
        mse = ((a.float() - b.float()) ** 2).mean()
        psnr.append(float(10 * torch.log10(255**2 / mse)) if mse > 0 else 99.0)
    assert min(psnr) > 25, psnr  # a misplaced window or wrong scale gives < 15
    assert any(p < 99 for p in psnr), "the scaled path should have been taken at least once"


def test_crop_decode_is_checked():
    with pytest.raises(ConfigError, match="crop_decode"):
        MultiImgsDataset(["x"], None, crop_decode="fast")


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical_with_crop_decode_and_cache(tmp_path, demo_root):
    from test_resume import assert_same_training_state, final_snapshot

    from conftest import run_job
    from pixelz_dist.checkpoint.file_format import list_snapshots

    base = dict(data=demo_root, optimizer="adamw", iter_size=2, workers=2, num_iters=9, interval=3,
                joint=True, cache=str(tmp_path / "cache"))
    straight = run_job("resume_job.py", json.dumps({**base, "prefix": str(tmp_path / "straight" / "snap")}))
    assert straight.returncode == 0, straight.stderr
    prefix = str(tmp_path / "resumed" / "snap")
    killed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "kill_at": 5}))
    assert killed.returncode == -9, killed.stderr
    assert [it for it, _ in list_snapshots(prefix)] == [3]
    resumed = run_job("resume_job.py", json.dumps({**base, "prefix": prefix, "resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(final_snapshot(str(tmp_path / "straight" / "snap"))[1], final_snapshot(prefix)[1])
    assert os.listdir(tmp_path / "cache"), "the lossless images were meant to be cached"


def test_a_region_decoder_that_disagrees_is_switched_off(tmp_path, monkeypatch, caplog):
    """Built against a libjpeg that rounds differently, the region decoder is not used: whole decodes, same samples."""
    if not region_decoder_built():
        pytest.skip("the region decoder is not built (pip install with a C compiler and libjpeg's headers)")
    dirs = write_sample_folders(tmp_path)
    real = jpeg_region_module._jpeg_region.decode_region

    def off_by_one(*args):
        buf, h, w, c = real(*args)
        buf[len(buf) // 2] ^= 1
        return buf, h, w, c

    monkeypatch.setattr(jpeg_region_module, "_agrees", None)
    monkeypatch.setattr(jpeg_region_module._jpeg_region, "decode_region", off_by_one)
    transform = TRANSFORMS["rrc+flip+float"]
    with caplog.at_level("WARNING", logger="pixelz_dist"):
        ds = MultiImgsDataset(dirs, transform(), modes=MODES, kinds=KINDS)
    assert not ds._regions and ds._planner is not None
    assert "JPEG region decoding switched off" in caplog.text
    spy = RegionSpy(monkeypatch)
    whole = MultiImgsDataset(dirs, transform(), modes=MODES, kinds=KINDS, crop_decode="off")
    (a, _), (b, _) = epoch(ds), epoch(whole)
    assert spy.calls == 0
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    monkeypatch.setattr(jpeg_region_module, "_agrees", None)
    monkeypatch.setattr(jpeg_region_module._jpeg_region, "decode_region", real)
    assert jpeg_region_module.region_decoder_agrees()
