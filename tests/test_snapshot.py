"""Snapshots: atomic writes that survive a kill, weights_only loading, clear refusals, 'auto' skipping bad files."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pixelz_dist.checkpoint.file_format import (
    FORMAT_VERSION,
    REQUIRED_KEYS,
    NoLoadableSnapshot,
    find_latest_valid,
    list_snapshots,
    load_snapshot,
    prune_snapshots,
    save_snapshot,
    snapshot_path,
)
from pixelz_dist.checkpoint.parts import check_model_state
from pixelz_dist.errors import SnapshotError


def fake_snapshot(value=0.0, size=4):
    snap = {k: {} for k in REQUIRED_KEYS[FORMAT_VERSION]}
    snap.update(format_version=FORMAT_VERSION, scheduler=None, model={"w": torch.full((size,), value)},
                progress={"iteration": 0}, rng=[{}])
    return snap


def test_names_and_listing_newest_first(tmp_path):
    prefix = str(tmp_path / "run" / "snap")
    for it in (3, 12, 7):
        save_snapshot(fake_snapshot(it), snapshot_path(prefix, it))
    save_snapshot(fake_snapshot(), str(tmp_path / "run" / "snap_other_iter_99.pt"))  # another prefix
    (tmp_path / "run" / "snap_iter_5.pt.tmp").write_bytes(b"x")
    assert [it for it, _ in list_snapshots(prefix)] == [12, 7, 3]
    assert snapshot_path(prefix, 12).endswith("snap_iter_12.pt")
    prune_snapshots(prefix, 2, keep=snapshot_path(prefix, 12))
    assert [it for it, _ in list_snapshots(prefix)] == [12, 7]
    assert list_snapshots(str(tmp_path / "missing" / "snap")) == []


@pytest.mark.slow
def test_a_process_killed_mid_write_leaves_the_previous_snapshots_intact(tmp_path):
    prefix = str(tmp_path / "snap")
    save_snapshot(fake_snapshot(1.0), snapshot_path(prefix, 10))
    save_snapshot(fake_snapshot(2.0), snapshot_path(prefix, 20))
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pixelz_dist.checkpoint import file_format as snapshot

        real_save = torch.save
        def save_then_die(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.flush()
            f.truncate(f.tell() // 2)       # half of the bytes are on disk ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
        torch.save = save_then_die
        big = {{"format_version": 1, "model": {{"w": torch.randn(1_000_000)}}}}
        snapshot.save_snapshot(big, {snapshot_path(prefix, 20)!r})   # overwriting an existing snapshot
        snapshot.save_snapshot(big, {snapshot_path(prefix, 30)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [it for it, _ in list_snapshots(prefix)] == [20, 10]
    assert torch.equal(load_snapshot(snapshot_path(prefix, 20))["model"]["w"], torch.full((4,), 2.0))
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".")  # hidden, never taken for a snapshot
    path, snap = find_latest_valid(prefix)
    assert path == snapshot_path(prefix, 20)


def test_auto_skips_a_truncated_newest_snapshot_with_a_warning(tmp_path, caplog):
    prefix = str(tmp_path / "snap")
    save_snapshot(fake_snapshot(1.0), snapshot_path(prefix, 4))
    save_snapshot(fake_snapshot(2.0, size=100_000), snapshot_path(prefix, 8))
    data = open(snapshot_path(prefix, 8), "rb").read()
    open(snapshot_path(prefix, 8), "wb").write(data[: len(data) // 3])
    open(snapshot_path(prefix, 9), "wb").close()  # empty file
    with caplog.at_level("WARNING", logger="pixelz_dist"):
        path, snap = find_latest_valid(prefix)
    assert path == snapshot_path(prefix, 4)
    assert "snap_iter_8.pt" in caplog.text and "snap_iter_9.pt" in caplog.text
    with pytest.raises(SnapshotError, match="truncated"):
        load_snapshot(snapshot_path(prefix, 8))


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_snapshot_made_of_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = Exploit()
    Exploit.marker = str(marker)
    snap = fake_snapshot()
    snap["meta"] = evil
    path = str(tmp_path / "snap_iter_5.pt")
    torch.save(snap, path)
    with pytest.raises(SnapshotError, match="could run code") as err:
        load_snapshot(path)
    assert "system" in str(err.value)  # names the global it refused
    assert not marker.exists()
    with pytest.raises(NoLoadableSnapshot, match="could run code"):  # never taken for "no snapshot" either
        find_latest_valid(str(tmp_path / "snap"))
    assert not marker.exists()


def test_missing_keys_newer_format_and_non_dict_are_named(tmp_path):
    path = str(tmp_path / "s.pt")
    torch.save({"model": {}, "format_version": 1}, path)
    with pytest.raises(SnapshotError, match=r"lacks key\(s\) \['optimizer', 'scheduler', 'progress'"):
        load_snapshot(path)
    snap = fake_snapshot()
    snap["format_version"] = 99
    torch.save(snap, path)
    with pytest.raises(SnapshotError, match="newer than"):
        load_snapshot(path)
    torch.save([1, 2], path)
    with pytest.raises(SnapshotError, match="holds a list"):
        load_snapshot(path)
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshot(str(tmp_path / "nope.pt"))


def test_model_mismatch_lists_every_key():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1)}
    with pytest.raises(SnapshotError) as err:
        check_model_state(model, state)
    msg = str(err.value)
    assert "0.weight: snapshot (5, 3) vs model (4, 3)" in msg
    assert "'1.weight'" in msg and "'1.bias'" in msg and "'2.weight'" in msg
    good = model.state_dict()
    check_model_state(model, good)
    partial = {k: v for k, v in good.items() if k.startswith("0.")}
    check_model_state(model, partial, strict=False)
    with pytest.raises(SnapshotError):
        check_model_state(model, partial, strict=True)
