"""A resume onto a dataset that changed since the snapshot: refused in the middle of an epoch (saying what changed
and the choices), continued only when asked, a warning at an epoch's boundary; ranks that see different data refuse.

Real image folders (Pillow writes them), real training runs and the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from conftest import DIST_VARS, TESTS
from pixelz_dist import MultiImgsDataset, SnapshotError, train_model
from pixelz_dist.data.sample_list import MAX_STORED_BYTES, SampleList, sample_names
from test_failures import cli, image_folders

sys.path.insert(0, os.path.join(TESTS, "jobs"))
from slow_data import TwoFolderNet  # noqa: E402  (the --model the command-line tests use)


def train(folders, prefix, num_epochs, **kw):
    model = TwoFolderNet()
    dataset = MultiImgsDataset(folders, [lambda x: x, lambda x: x], modes=["RGB", "L"],
                               loader=_tensor_loader)
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, dataset, 2, shuffle=True,
                num_epochs=num_epochs, snapshot_prefix=str(prefix), num_workers=0, **kw)
    return model


def _tensor_loader(path, mode):
    from pixelz_dist import fast_img_loader

    return fast_img_loader(path, mode, as_tensor=True).float() / 255


def snapshot_mid_epoch(tmp_path):
    """20 samples, batch 2: a snapshot at iteration 3 (6 samples into epoch 0), the run stopped there."""
    folders = image_folders(tmp_path / "data", n=20)
    prefix = tmp_path / "run" / "s"
    train(folders, prefix, 1, snapshot_interval=0.3)  # snapshots at iterations 3, 6, 9 and 10
    for name in os.listdir(prefix.parent):
        if name.startswith("s_iter_") and name != "s_iter_3.pt":
            os.unlink(prefix.parent / name)
    return folders, prefix


def rename(folders, old: str, new: str) -> None:
    for folder, ext in zip(folders, (".jpg", ".png")):
        os.rename(os.path.join(folder, old + ext), os.path.join(folder, new + ext))


def test_a_renamed_file_mid_epoch_is_refused_naming_it_and_allow_changed_data_goes_on(tmp_path, caplog):
    folders, prefix = snapshot_mid_epoch(tmp_path)
    rename(folders, "007", "zz_007")
    with pytest.raises(SnapshotError, match=r"taken 6 samples into epoch 0: 20 samples when the snapshot was "
                                            r"written, 20 now; 1 added \('zz_007'\); 1 gone \('007'\).*"
                                            r"allow_changed_data=True \(--allow-changed-data\).*"
                                            r"restore_dataloader=False"):
        train(folders, prefix, 2, load_snapshot_path="auto")
    caplog.set_level("WARNING", logger="pixelz_dist")
    train(folders, prefix, 2, load_snapshot_path="auto", allow_changed_data=True)
    final = torch.load(f"{prefix}_iter_20.pt", weights_only=True)  # it trained on to the end of epoch 1
    assert (final["progress"]["iteration"], final["data"]["epoch"], final["data"]["position"]) == (20, 2, 0)
    assert "epoch 0 goes on at position 6 of the new list" in caplog.text


def test_added_and_removed_files_are_counted(tmp_path):
    folders, prefix = snapshot_mid_epoch(tmp_path)
    extra = image_folders(tmp_path / "extra", n=25)
    for k in range(20, 25):  # 5 added
        for src, dst, ext in zip(extra, folders, (".jpg", ".png")):
            os.rename(os.path.join(src, f"{k:03d}{ext}"), os.path.join(dst, f"{k:03d}{ext}"))
    for k in range(5):  # 5 removed
        for folder, ext in zip(folders, (".jpg", ".png")):
            os.unlink(os.path.join(folder, f"{k:03d}{ext}"))
    with pytest.raises(SnapshotError, match=r"20 samples when the snapshot was written, 20 now; 5 added \('020', "
                                            r"'021', '022', \.\.\.\); 5 gone \('000', '001', '002', \.\.\.\)"):
        train(folders, prefix, 2, load_snapshot_path="auto")


def test_a_change_at_an_epoch_boundary_is_a_warning_and_the_new_list_trains(tmp_path, caplog):
    folders = image_folders(tmp_path / "data", n=8)
    prefix = tmp_path / "run" / "s"
    train(folders, prefix, 1)  # the final snapshot is at the end of epoch 0
    rename(folders, "003", "zz_003")
    caplog.set_level("WARNING", logger="pixelz_dist")
    train(folders, prefix, 2, load_snapshot_path="auto")
    assert "the dataset changed since the snapshot (8 samples when the snapshot was written, 8 now; 1 added " \
           "('zz_003'); 1 gone ('003')): epoch 1 starts on the new list" in caplog.text


def test_an_unchanged_dataset_resumes_without_a_word(tmp_path, caplog):
    folders, prefix = snapshot_mid_epoch(tmp_path)
    caplog.set_level("WARNING", logger="pixelz_dist")
    train(folders, prefix, 1, load_snapshot_path="auto")
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_names_come_through_subset_and_concat_and_long_lists_keep_only_their_hash():
    class Named(TensorDataset):
        def sample_names(self):
            return [f"n{i}" for i in range(len(self))]

    base = Named(torch.zeros(4, 1))
    assert sample_names(Subset(base, [3, 1])) == ["n3", "n1"]
    assert sample_names(ConcatDataset([base, base]))[4:] == ["n0", "n1", "n2", "n3"]
    assert sample_names(TensorDataset(torch.zeros(2))) is None
    assert SampleList.of(TensorDataset(torch.zeros(3))).difference({"count": 2, "digest": None}) == \
        "2 samples when the snapshot was written, 3 now"

    class Huge(TensorDataset):
        def sample_names(self):
            return [os.urandom(16).hex() for _ in range(len(self))]

    big = SampleList.of(Huge(torch.zeros(MAX_STORED_BYTES // 10)))
    assert big.packed is None and big.digest is not None
    other = SampleList.of(Huge(torch.zeros(MAX_STORED_BYTES // 10)))
    assert "their names differ" in other.difference(big.state_dict())


@pytest.mark.slow
def test_the_command_line_refuses_a_changed_data_folder_mid_epoch_with_exit_2(tmp_path):
    folders = image_folders(tmp_path / "data", n=20)
    prefix = str(tmp_path / "run" / "s")
    common = ["--model", "slow_data:TwoFolderNet", "--data", *folders, "--batch-size", "2", "--workers", "0",
              "--shuffle", "--snapshot-prefix", prefix, "--epochs", "1", "--no-curves"]
    jobs = os.path.join(TESTS, "jobs")
    first = cli(*common, "--snapshot-interval", "0.3", "--time-budget", "1e-9", cwd=jobs)  # stops after step 1
    assert first.returncode == 0, first.stderr
    rename(folders, "011", "zz_011")
    again = cli(*common, "--resume", "auto", cwd=jobs)
    assert again.returncode == 2, again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 added ('zz_011'); 1 gone ('011')" in errors[0], again.stderr
    assert "--allow-changed-data" in errors[0] and "Traceback" not in again.stderr
    allowed = cli(*common, "--resume", "auto", "--allow-changed-data", cwd=jobs)
    assert allowed.returncode == 0, allowed.stderr
    assert "goes on at position" in allowed.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_that_see_different_data_refuse_to_train(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pixelz_dist.train", "--model",
                           "slow_data:TinySegNetPlus", "--dataset", "slow_data:per_rank", "--dataset-arg",
                           f"root={str(tmp_path / 'd')!r}", "--iters", "2", "--workers", "0"],
                          env=env, cwd=os.path.join(TESTS, "jobs"), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]  # every rank refuses; rank 0 alone prints it
    assert "the ranks see different datasets (rank 0: 12 samples" in errors[0] and "rank 1: 11 samples" in errors[0]
