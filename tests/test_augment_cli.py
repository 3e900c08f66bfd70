"""--crop / --hflip / --scale-range / --pad-value / --ignore-index: the joint augmentation of --data.

The samples' folders hold one picture in several forms: two identical label maps, an RGB photo and a grey image
whose pixels are ``50 * class``. Whatever one draw does to a sample, the two label maps must come out identical and
the photo must match them wherever nothing was interpolated.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIST_VARS, TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.cli.build import folder_dataset
from pixelz_dist.cli.options import parse
from pixelz_dist.data import MultiImgsDataset
from pixelz_dist.data import jpeg_region as jpeg_region_module
from pixelz_dist.data.crop_plan import CropPlanner

SIZES = [(20, 24), (20, 24), (12, 14), (28, 20), (20, 24), (16, 16)]  # (height, width); sample 2 is below the crop
CLASSES = 5


def classes(i: int, h: int, w: int) -> np.ndarray:
    """Blocks of 4 x 4 pixels: bilinear resizing leaves the blocks' inner pixels alone, nearest keeps every value."""
    rng = np.random.default_rng(i)
    blocks = rng.integers(0, CLASSES, (h // 4 + 1, w // 4 + 1), dtype=np.uint8)
    return np.kron(blocks, np.ones((4, 4), np.uint8))[:h, :w]


def write_folders(root, n=6, photo_format="png") -> list[str]:
    dirs = [os.path.join(root, d) for d in ("rgb", "grey", "label_a", "label_b")]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        c = classes(i, h, w)
        Image.fromarray(np.dstack([c * 50] * 3)).save(os.path.join(dirs[0], f"{i}.{photo_format}"))
        Image.fromarray(c * 50).save(os.path.join(dirs[1], f"{i}.png"))
        for d in dirs[2:]:
            Image.fromarray(c).save(os.path.join(d, f"{i}.png"))
    return dirs


def dataset(dirs, *flags: str, modes=("RGB", "L", "label", "label")) -> MultiImgsDataset:
    opts = parse("train", ["--model", "x:y", "--iters", "1", "--data", *dirs, "--modes", *modes, *flags])
    return folder_dataset(opts, opts.data, augment=True)


def original(dirs, i):
    return torch.from_numpy(np.array(Image.open(os.path.join(dirs[2], f"{i}.png")))).long()


def check_sample(sample, before, ignore=255, pad=0):
    """What holds for every draw: the folders agree, the label maps are integers of the input or the ignore value."""
    rgb, grey, la, lb = sample
    assert rgb.dtype == grey.dtype == torch.float32 and la.dtype == lb.dtype == torch.int64
    assert rgb.shape[1:] == grey.shape[1:] == la.shape == lb.shape
    assert torch.equal(la, lb), "two folders holding the same label map came out differently: not one draw"
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], grey[0])
    assert set(la.unique().tolist()) <= set(before.unique().tolist()) | {ignore}
    padded = la == ignore
    photo = (rgb[0] * 255).round().long()
    assert torch.all(photo[padded] == pad), "the photo is not padded where its label map is"
    return photo, la, padded


def test_crop_and_flip_are_one_draw_for_all_folders_and_pad_with_the_ignore_index(tmp_path):
    dirs = write_folders(tmp_path)
    for ignore, pad in ((255, 0), (-1, 7)):
        ds = dataset(dirs, "--crop", "16", "--hflip", "--pad-value", str(pad), "--ignore-index", str(ignore))
        assert ds.crop_aware
        positions = set()
        for seed in range(6):
            torch.manual_seed(seed)
            for i in range(len(ds)):
                before = original(dirs, i)
                photo, la, padded = check_sample(ds[i], before, ignore, pad)
                assert la.shape == (16, 16)
                # Nothing interpolated: the photo is exactly the label map wherever it is not padding.
                assert torch.equal(photo[~padded], la[~padded] * 50)
                h, w = SIZES[i]
                assert int(padded.sum()) == 16 * 16 - min(h, 16) * min(w, 16)  # below the crop: all of it, padded
                if i == 0:
                    positions.add(la.numpy().tobytes())
        assert len(positions) > 3, "the crop should land in different places"


def test_hflip_flips_every_folder_or_none_with_probability_one_half(tmp_path):
    dirs = write_folders(tmp_path)
    ds = dataset(dirs, "--hflip")
    assert not ds.crop_aware  # a flip alone: nothing to save by decoding part of an image
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        photo, la, _ = check_sample(ds[0], before := original(dirs, 0))
        assert la.shape == before.shape and torch.equal(photo, la * 50)
        assert torch.equal(la, before) or torch.equal(la, before.flip(-1))
        flipped += torch.equal(la, before.flip(-1))
    assert 10 <= flipped <= 30, flipped
    unflipped = dataset(dirs, "--crop", "20", "24")  # the whole image: no flip without --hflip
    for seed in range(5):
        torch.manual_seed(seed)
        assert torch.equal(unflipped[0][2], original(dirs, 0))


def test_scale_comes_before_the_crop_images_bilinear_label_maps_nearest(tmp_path):
    dirs = write_folders(tmp_path)
    half = dataset(dirs, "--crop", "16", "--scale-range", "0.5", "0.5")
    assert not half.crop_aware  # a rescale needs every pixel, and says so
    photo, la, padded = check_sample(half[0], original(dirs, 0))
    assert la.shape == (16, 16) and int(padded.sum()) == 16 * 16 - 10 * 12  # 20 x 24 halved, then padded

    ds = dataset(dirs, "--crop", "12", "10", "--scale-range", "0.6", "2.5", "--hflip")
    interpolated = agree = total = 0
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        for i in range(len(ds)):
            photo, la, padded = check_sample(ds[i], original(dirs, i))
            assert la.shape == (12, 10)
            interpolated += int((photo % 50 != 0).sum())
            agree += int((photo[~padded] == la[~padded] * 50).sum())
            total += int((~padded).sum())
            sizes.add(int(padded.sum()))
    assert interpolated > 0, "the photo was meant to be resized bilinearly"
    assert agree > 0.6 * total, "photo and label map were not rescaled and cropped alike"
    assert len(sizes) > 3, "the scale should vary"


class PlanSpy:
    def __init__(self, monkeypatch):
        self.boxes = []
        real = CropPlanner.plan

        def plan(planner, height, width):
            out = real(planner, height, width)
            self.boxes.append((height, width, out.box.height, out.box.width))
            return out

        monkeypatch.setattr(CropPlanner, "plan", plan)


@pytest.mark.parametrize("flags", [["--crop", "16"], ["--crop", "12", "10", "--hflip", "--ignore-index", "-1"]],
                         ids=["crop", "crop-hflip-wide-ignore"])
def test_a_crop_without_rescale_still_decodes_only_the_crop(tmp_path, monkeypatch, flags):
    dirs = write_folders(tmp_path, photo_format="jpg")
    spy = PlanSpy(monkeypatch)
    calls = []
    real = jpeg_region_module.decode_jpeg_region
    monkeypatch.setattr(jpeg_region_module, "decode_jpeg_region", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = dataset(dirs, *flags)
    assert ds.crop_aware
    whole = MultiImgsDataset(dirs, ds.joint_transform, modes=ds.modes, crop_decode="off")
    for seed in range(3):
        torch.manual_seed(seed)
        a = [ds[i] for i in range(len(ds))]
        torch.manual_seed(seed)
        b = [whole[i] for i in range(len(ds))]
        assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    crop_h, crop_w = (16, 16) if len(flags) == 2 else (12, 10)
    assert len(spy.boxes) == 3 * len(SIZES)
    for h, w, box_h, box_w in spy.boxes:  # the box read: the crop, or the whole image when it needs padding
        assert (box_h, box_w) == ((crop_h, crop_w) if h >= crop_h and w >= crop_w else (h, w))
    if ds.region_decoding:
        assert calls, "the JPEG photos were meant to be decoded by region"
    elif os.environ.get("PIXELZ_REQUIRE_JPEG_REGION") == "1":
        pytest.fail("PIXELZ_REQUIRE_JPEG_REGION=1 but the JPEG region decoder is not in use")


def test_config_file_keys_and_the_saved_configuration(tmp_path, capsys):
    dirs = write_folders(tmp_path, n=1)
    config = tmp_path / "run.toml"
    config.write_text(f"model = 'x:y'\niters = 1\ndata = {dirs!r}\nmodes = ['RGB', 'L', 'label', 'label']\n"
                      "crop = 16\nhflip = true\nscale_range = [0.5, 2]\npad_value = 3\nignore_index = 250\n")
    opts = parse("train", ["--config", str(config)])
    assert (opts.crop, opts.hflip, opts.scale_range, opts.pad_value, opts.ignore_index) == ([16], True, [0.5, 2.0],
                                                                                            3, 250)
    opts = parse("train", ["--config", str(config), "--no-hflip", "--crop", "8", "12"])
    assert (opts.crop, opts.hflip) == ([8, 12], False)
    with pytest.raises(SystemExit) as info:
        parse("train", ["--config", str(config), "--print-config"])
    assert info.value.code == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    again = parse("train", ["--config", str(printed)])
    assert vars(again) | {"notes": []} == vars(parse("train", ["--config", str(config)])) | {"notes": []}
    other = parse("train", ["--config", str(config), "--dataset", "x:z"])  # the file's data and its augmentation go
    assert other.crop is None and other.scale_range is None and other.data is None


@pytest.mark.parametrize("flags, message", [
    (["--crop", "8", "--scale-range", "2", "1"], "--scale-range takes LO HI with 0 < LO <= HI"),
    (["--crop", "8", "--scale-range", "0", "1"], "--scale-range takes LO HI with 0 < LO <= HI"),
    (["--scale-range", "0.5", "2"], "--scale-range without --crop"),
    (["--crop", "8", "8", "8"], "--crop takes one size"),
    (["--crop", "0"], "--crop takes one size"),
    (["--crop", "8", "--pad-value", "300"], "--pad-value 300 is not a pixel value"),
    (["--pad-value", "3"], "--pad-value is what --crop pads"),
], ids=["lo-above-hi", "zero", "scale-without-crop", "three-sizes", "crop-zero", "pad-300", "pad-without-crop"])
def test_bad_augmentation_options_are_one_line_errors(tmp_path, capsys, flags, message):
    dirs = write_folders(tmp_path, n=1)
    with pytest.raises(SystemExit) as info:
        parse("train", ["--model", "x:y", "--iters", "1", "--data", *dirs, *flags])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


@pytest.mark.parametrize("source, message", [(["--dataset", "x:y"], "--dataset factory builds its own transforms"),
                                             (["--demo"], "demo's samples are fixed")])
def test_augmentation_without_data_is_refused(capsys, source, message):
    with pytest.raises(SystemExit) as info:
        parse("train", [*source, *([] if source == ["--demo"] else ["--model", "x:y"]), "--iters", "1", "--crop",
                        "8", "--hflip"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --crop, --hflip augment --data folders") and message in err and "HINT" in err


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.join(TESTS, "jobs"), os.path.dirname(TESTS),
                                                                   env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pixelz_dist.train", *args], env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
def test_augmented_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path):
    from test_resume import assert_same_training_state

    dirs = write_folders(tmp_path, n=10)
    common = ["--model", "aug_model:AugNet", "--data", dirs[0], dirs[2], "--modes", "RGB", "label", "--crop", "14",
              "--hflip", "--scale-range", "0.5", "1.5", "--batch-size", "3", "--optimizer", "adamw", "--lr", "0.05",
              "--display-iter", "1", "--seed", "3"]
    # 10 samples, batches of 3: 4 batches per epoch. The snapshot of iteration 3 (mid-epoch 0) is where a stopped run
    # would start again: a fresh process continues from it, with other workers, to iteration 7 (in epoch 1).
    first = str(tmp_path / "a" / "s")
    straight = _train(*common, "--iters", "7", "--snapshot-interval", "3", "--workers", "0", "--snapshot-prefix", first)
    assert straight.returncode == 0, straight.stderr
    assert "augmentation (one draw per sample, all folders): random scale 0.5-1.5 x, random crop 14 x 14" in \
        straight.stderr and "the random rescale before the crop needs every pixel" in straight.stderr
    stopped_at = dict(list_snapshots(first))[3]
    prefix = str(tmp_path / "b" / "s")
    resumed = _train(*common, "--iters", "7", "--workers", "2", "--snapshot-prefix", prefix, "--resume", stopped_at)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "iter 7/7" in resumed.stderr
    a = load_snapshot(list_snapshots(first)[0][1])
    b = load_snapshot(list_snapshots(prefix)[0][1])
    assert a["progress"]["iteration"] == 7
    assert_same_training_state(a, b)


def test_python_api_checks_its_arguments():
    from pixelz_dist.data.augment import RandomScale, joint_augmentation

    for bad in ((2.0, 1.0), (0.0, 1.0), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="0 < lo <= hi"):
            RandomScale(bad)
    for bad in (0, (3, 4, 5), (3, -1), 2.5):
        with pytest.raises(ValueError, match="a crop is one positive size"):
            joint_augmentation(crop=bad)


def test_other_folders_decoded_alike_are_not_augmented(tmp_path):
    """folder_dataset(opts, folders) without augment=True (validation folders): whole images, no random draw."""
    dirs = write_folders(tmp_path, n=2)
    opts = parse("train", ["--model", "x:y", "--iters", "1", "--data", *dirs, "--modes", "RGB", "L", "label", "label",
                           "--crop", "8", "--hflip", "--scale-range", "0.5", "2"])
    plain = folder_dataset(opts, dirs)
    for seed in range(3):
        torch.manual_seed(seed)
        photo, la, padded = check_sample(plain[0], before := original(dirs, 0))
        assert torch.equal(la, before) and torch.equal(photo, la * 50) and not padded.any()
