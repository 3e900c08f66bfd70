"""The segmentation walkthrough's demo data and model: real files, class indices only, a model that learns them."""

import numpy as np
import torch
from PIL import Image

from pixelz_dist.cli.segmentation_demo import IGNORE_INDEX, SegmentationNet
from pixelz_dist.make_demo import main


def test_demo_folders_hold_photos_and_class_index_labels(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--train", "6", "--val", "3", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert f"train: {tmp_path}/d/train/images {tmp_path}/d/train/labels" in out
    for split, count in (("train", 6), ("val", 3)):
        photos = sorted((tmp_path / "d" / split / "images").iterdir())
        labels = sorted((tmp_path / "d" / split / "labels").iterdir())
        assert [p.stem for p in photos] == [p.stem for p in labels] == [f"{i:05d}" for i in range(count)]
        for path in labels:
            with Image.open(path) as img:
                assert img.mode == "L" and img.size == (32, 32)
                values = set(np.unique(np.asarray(img)).tolist())
            assert values <= {0, 1, 2, IGNORE_INDEX} and 0 in values, (path, values)
    shapes = set()
    for path in (tmp_path / "d" / "train" / "labels").iterdir():
        shapes |= set(np.unique(np.asarray(Image.open(path))).tolist()) & {1, 2}
    assert shapes == {1, 2}  # both shapes occur


def test_bad_counts_are_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--train", "0"]) == 2
    assert "at least one training sample" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_model_returns_loss_and_logits_and_ignores_the_ignore_index():
    torch.manual_seed(0)
    model = SegmentationNet(width=4)
    image = torch.rand(2, 3, 16, 16)
    target = torch.randint(0, 3, (2, 16, 16))
    out = model(image, target)
    assert out["logits"].shape == (2, 3, 16, 16)
    ignored = target.clone()
    ignored[:, :8] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(out["logits"][:, :, 8:], target[:, 8:])
    torch.testing.assert_close(model(image, ignored)["loss"], expected)
    assert set(model(image)) == {"logits"}
