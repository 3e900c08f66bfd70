"""Ranks whose data differ in length end each epoch together (pixelz_dist/engine/uneven.py), through real torchrun.

Rank 0 reads 7 records per epoch, rank 1 reads 4. Before, one rank aborted in gloo (``EnforceNotMet``) and the other
reported a lost node.
"""

import json
import os
import re
from collections import Counter

import pytest

from conftest import TESTS
from pixelz_dist.checkpoint.file_format import list_snapshots
from pixelz_dist.engine.uneven import describe_left
from test_distributed import torchrun

LOADER_JOB = os.path.join(TESTS, "jobs", "loader_job.py")
LINE = re.compile(r"epoch (\d+) ended on every rank after (\d+) batches, when the first rank ran out; batches left "
                  r"unused: ([^.]*)\. HINT")


def result(out, rank, tag):
    with open(os.path.join(out, f"rank{rank}{tag}.json")) as f:
        return json.load(f)


def test_the_batches_left_are_named_per_rank_and_ranks_alike_together():
    assert describe_left([(3, True), (0, True)]) == "rank 0: 3; rank 1: 0"
    assert describe_left([(1, False), (0, True)] + [(1, False)] * 62) == "ranks 0, 2-63: at least 1; rank 1: 0"


@pytest.mark.slow
@pytest.mark.distributed
def test_the_epoch_ends_on_every_rank_when_the_first_runs_out(tmp_path):
    """Without a length (the ranks agree per window), with a length per rank (once per epoch), with a batch sampler
    of the user's; batches of 1 and 2 records; accumulation of 1 and 2 batches. Also: a snapshot interval in epochs
    is due on both ranks alike (each rank's own length would make it due at different iterations)."""
    runs, expected_lines = [], Counter()
    for data in ("plain_stream", "stream_len", "batch_sampler"):
        for batch in (1, 2):
            for iter_size in (1, 2):
                tag = f"_{data}_{batch}_{iter_size}"
                runs.append({"data": data, "batch_size": batch, "iter_size": iter_size, "tag": tag})
                batches = (7 + batch - 1) // batch, (4 + batch - 1) // batch
                left = (f"at least {iter_size}" if data == "plain_stream" else str(batches[0] - batches[1]))
                expected_lines[(batches[1], f"rank 0: {left}; rank 1: 0")] += 2  # epochs 0 and 1
    runs.append({"data": "stream_len", "tag": "_fraction", "interval": 0.5, "prefix": str(tmp_path / "f")})
    expected_lines[(4, "rank 0: 3; rank 1: 0")] += 2
    proc = torchrun({"lengths": [7, 4], "num_epochs": 2, "out": str(tmp_path), "runs": runs}, job=LOADER_JOB,
                    timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "EnforceNotMet" not in proc.stderr and "another process of the job is gone" not in proc.stderr
    found = LINE.findall(proc.stderr)
    assert Counter((int(n), left) for _, n, left in found) == expected_lines, proc.stderr
    # a warning the first time, merged across the ranks that logged it; then INFO (rank 0 alone)
    assert proc.stderr.count("WARNING [ranks 0,1] the ranks' data differ in length") == len(runs), proc.stderr
    for run in runs:
        ranks = [result(tmp_path, rank, run["tag"]) for rank in (0, 1)]
        batch, iter_size = run.get("batch_size", 1), run.get("iter_size", 1)
        batches = (4 + batch - 1) // batch  # rank 1's, the fewest
        steps = 2 * -(-batches // iter_size)
        assert [r["steps"] for r in ranks] == [steps, steps], run
        assert ranks[0]["epochs_ended"] == ranks[1]["epochs_ended"] == [steps // 2, steps], run
        assert [r["lr"] for r in ranks] == [pytest.approx(0.05 * 0.9 ** 2)] * 2, run  # the scheduler stepped twice
        assert [len(r["seen"]) for r in ranks] == [8, 8], run  # 4 records a rank and epoch: rank 1's all
    assert [it for it, _ in list_snapshots(str(tmp_path / "f"))] == [8, 6, 4, 2]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_resume_after_an_early_epoch_end_continues_exactly(tmp_path):
    """torchdata's StatefulDataLoader without a length, 7 vs 4 records: killed at iteration 7, resumed from the
    snapshot of iteration 6 (two batches into epoch 1). Each rank trains on the same records as the straight run,
    the same number of steps, and the scheduler stepped once per epoch."""
    cfg = {"data": "stream", "lengths": [7, 4], "num_iters": 10, "interval": 3}
    for name in ("straight", "killed", "resumed"):
        (tmp_path / name).mkdir()
    straight = torchrun({**cfg, "prefix": str(tmp_path / "a"), "out": str(tmp_path / "straight")}, job=LOADER_JOB)
    assert straight.returncode == 0, straight.stderr
    prefix = str(tmp_path / "b")
    killed = torchrun({**cfg, "prefix": prefix, "out": str(tmp_path / "killed"), "kill_at": 7}, job=LOADER_JOB)
    assert killed.returncode != 0 and [it for it, _ in list_snapshots(prefix)] == [6, 3], killed.stderr
    resumed = torchrun({**cfg, "prefix": prefix, "out": str(tmp_path / "resumed"), "resume": "auto"}, job=LOADER_JOB)
    assert resumed.returncode == 0, resumed.stderr
    assert "iteration 6, epoch 1, position 2" in resumed.stderr
    for rank in (0, 1):
        whole = result(tmp_path / "straight", rank, "")
        after = result(tmp_path / "resumed", rank, "")
        assert result(tmp_path / "killed", rank, "_at6") + after["seen"] == whole["seen"], rank
        assert (whole["steps"], after["steps"]) == (10, 4)
        assert after["lr"] == whole["lr"] == pytest.approx(0.05 * 0.9 ** 2)
    assert result(tmp_path / "straight", 0, "")["seen"][:5] == [0, 1, 2, 3, 0]  # epoch 0 ended after 4 on rank 0 too
