"""The built-in demo: synthetic image files, the augmented dataset and the tiny segmentation net."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pixelz_dist.cli.demo import DemoDataset, TinySegNet, build_demo, make_demo_dataset
from pixelz_dist.errors import ConfigError

N, SIZE = 16, 24


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    make_demo_dataset(root, num_samples=N, size=SIZE, seed=3)
    return root


def _all_files(dirs):
    return sorted(os.path.join(d, n) for d in dirs for n in os.listdir(d))


def test_files_counts_modes_sizes(tmp_path):
    dirs = make_demo_dataset(tmp_path, num_samples=N, size=SIZE, seed=1)
    assert dirs == [os.path.join(str(tmp_path), s) for s in ("rgb", "hint", "mask")]
    for d, ext, mode in zip(dirs, (".jpg", ".png", ".png"), ("RGB", "L", "L")):
        names = sorted(os.listdir(d))
        assert names == [f"{i:05d}{ext}" for i in range(N)]
        for name in names:
            with Image.open(os.path.join(d, name)) as img:
                assert img.mode == mode and img.size == (SIZE, SIZE)
    masks = np.stack([np.asarray(Image.open(os.path.join(dirs[2], f"{i:05d}.png"))) for i in range(N)])
    assert set(np.unique(masks)) <= {0, 255}
    assert 0.02 < (masks == 255).mean() < 0.8  # shapes are there, not everywhere


def test_deterministic_and_seed_dependent(tmp_path):
    first = make_demo_dataset(tmp_path / "a", num_samples=4, size=SIZE, seed=5)
    again = make_demo_dataset(tmp_path / "b", num_samples=4, size=SIZE, seed=5)
    other = make_demo_dataset(tmp_path / "c", num_samples=4, size=SIZE, seed=6)

    def contents(dirs):
        return [open(p, "rb").read() for p in _all_files(dirs)]

    assert contents(first) == contents(again)
    assert contents(first) != contents(other)


def test_regeneration_skipped_then_redone_on_change(tmp_path):
    dirs = make_demo_dataset(tmp_path, num_samples=N, size=SIZE)
    before = {p: os.stat(p).st_mtime_ns for p in _all_files(dirs)}
    assert make_demo_dataset(tmp_path, num_samples=N, size=SIZE) == dirs
    assert {p: os.stat(p).st_mtime_ns for p in _all_files(dirs)} == before

    make_demo_dataset(tmp_path, num_samples=5, size=SIZE)  # fewer samples: leftovers removed
    assert all(len(os.listdir(d)) == 5 for d in dirs)
    make_demo_dataset(tmp_path, num_samples=5, size=16)  # same names, other size: rewritten
    with Image.open(os.path.join(dirs[2], "00004.png")) as img:
        assert img.size == (16, 16)
    assert len(DemoDataset(tmp_path)) == 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path, num_samples=0)
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path, size=2)


def test_dataset_shapes_dtypes_values(demo_root):
    ds = DemoDataset(demo_root)
    assert len(ds) == N
    torch.manual_seed(0)
    for rgb, hint, mask in (ds[0], ds[N - 1]):
        assert rgb.shape == (3, SIZE, SIZE) and hint.shape == (1, SIZE, SIZE) and mask.shape == (1, SIZE, SIZE)
        assert rgb.dtype == hint.dtype == mask.dtype == torch.float32
        assert 0.0 <= rgb.min() and rgb.max() <= 1.0 and 0.0 <= hint.min() and hint.max() <= 1.0
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert [t.shape for t in batch] == [(4, 3, SIZE, SIZE), (4, 1, SIZE, SIZE), (4, 1, SIZE, SIZE)]


def _corr(x, y):
    return float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])


def test_augmentation_flips_jointly_and_is_reproducible(demo_root):
    plain = DemoDataset(demo_root, augment=False)
    aug = DemoDataset(demo_root, augment=True)
    index = next(i for i in range(N) if not torch.equal(plain[i][2], plain[i][2].flip(-1)))
    rgb0, hint0, mask0 = plain[index]
    seen = set()
    jittered = False
    for seed in range(16):
        torch.manual_seed(seed)
        rgb, hint, mask = aug[index]
        torch.manual_seed(seed)
        again = aug[index]
        assert all(torch.equal(u, v) for u, v in zip((rgb, hint, mask), again))

        flipped = torch.equal(mask, mask0.flip(-1))
        assert flipped or torch.equal(mask, mask0)
        ref_rgb, ref_hint = (rgb0.flip(-1), hint0.flip(-1)) if flipped else (rgb0, hint0)
        other_rgb = rgb0 if flipped else rgb0.flip(-1)
        assert torch.equal(hint, ref_hint)  # hint follows the mask and is not jittered
        assert _corr(rgb, ref_rgb) > 0.95 and _corr(rgb, ref_rgb) > _corr(rgb, other_rgb) + 0.05
        jittered |= not torch.allclose(rgb, ref_rgb, atol=1e-3)
        seen.add(flipped)
    assert seen == {True, False} and jittered


def test_dataset_pickles(demo_root):
    ds = DemoDataset(demo_root, augment=False)
    clone = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(u, v) for u, v in zip(ds[3], clone[3]))


def test_tiny_segnet_loss_and_predict(demo_root):
    rgb, hint, mask = next(iter(DataLoader(DemoDataset(demo_root), batch_size=4)))
    model = TinySegNet()
    loss = model(rgb, hint, mask)
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.predict(rgb, hint).shape == (4, 1, SIZE, SIZE)
    assert any(isinstance(m, torch.nn.Dropout2d) for m in model.modules())
    with pytest.raises(ConfigError):
        TinySegNet(dropout=1.5)


def test_build_demo_seeded_and_leaves_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    model_a, ds = build_demo(tmp_path, num_samples=4, size=16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    model_b, _ = build_demo(tmp_path, num_samples=4, size=16, seed=7)
    model_c, _ = build_demo(tmp_path, num_samples=4, size=16, seed=8)
    sa, sb, sc = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert isinstance(ds, DemoDataset) and ds.augment and len(ds) == 4


@pytest.mark.slow
def test_training_reduces_loss(tmp_path):
    torch.manual_seed(0)
    model, train_set = build_demo(tmp_path, num_samples=64, size=32, seed=0)
    eval_batch = next(iter(DataLoader(DemoDataset(tmp_path, augment=False), batch_size=64)))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return float(model(*eval_batch))

    before = eval_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(train_set, batch_size=8, shuffle=True, drop_last=True)
    steps = 0
    model.train()
    while steps < 30:
        for batch in loader:
            loss = model(*batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 30:
                break
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_the_demo_tensors_equal_torchvisions_conversions_bit_for_bit():
    """The demo converts images without importing torchvision (a second saved per process); the values must be
    torchvision's, or resumed runs of older snapshots would differ."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from pixelz_dist.cli.demo import to_mask, to_tensor_grey, to_tensor_rgb

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8))
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))  # every value once
    assert torch.equal(to_tensor_rgb(rgb), TF.to_dtype(TF.pil_to_tensor(rgb), torch.float32, scale=True))
    assert torch.equal(to_tensor_grey(grey), TF.to_dtype(TF.pil_to_tensor(grey), torch.float32, scale=True))
    assert torch.equal(to_mask(grey), (TF.pil_to_tensor(grey) > 127).to(torch.float32))
