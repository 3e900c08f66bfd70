"""The CUDA paths: side-stream prefetch, AMP, channels_last, memory display, exact resume with CUDA RNG, the CLI.

Skipped on machines without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DIST_VARS
from pixelz_dist import NondeterministicOp, train_model
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.cli.demo import DemoDataset, TinySegNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts, as --deterministic does


def demo_run(root, prefix=None, n=12, resume=None, model=None, **kw):
    torch.manual_seed(0)
    model = (model or TinySegNet(width=8, dropout=0.2)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    kw.setdefault("deterministic", True)  # the library's own switch: what makes GPU runs comparable bit for bit
    return train_model(model, opt, sched, DemoDataset(root), 4, shuffle=True, num_iters=n, display_iter=3,
                       snapshot_prefix=prefix, load_snapshot_path=resume, num_workers=2, **kw)


class Upsampling(TinySegNet):
    """Bilinear upsampling, whose backward has no deterministic CUDA kernel (atomic adds)."""

    def predict(self, rgb, hint):
        x = torch.nn.functional.avg_pool2d(torch.cat([rgb, hint], dim=1), 2)
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(self.decoder(self.dropout(self.encoder(x))))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_side_stream_prefetch_gives_the_same_weights_as_plain_copies(demo_root, monkeypatch):
    """The batches are copied on a side stream with prefetch (on the compute stream without), and the weights are the
    same: equal weights alone would also pass with the side stream switched off."""
    from pixelz_dist.data import device_feed

    streams = []
    real = device_feed.to_device

    def recording_to_device(batch, device, channels_last=False):
        streams.append(torch.cuda.current_stream(device))  # the stream this copy is queued on
        return real(batch, device, channels_last)

    monkeypatch.setattr(device_feed, "to_device", recording_to_device)
    compute = torch.cuda.current_stream()
    with_prefetch = params(demo_run(demo_root, prefetch=True))
    side, streams[:] = list(streams), []
    without = params(demo_run(demo_root, prefetch=False))
    assert side and all(s != compute for s in side), "prefetch=True: the copies were meant to run on a side stream"
    assert streams and all(s == compute for s in streams)
    for p, q in zip(with_prefetch, without):
        assert torch.equal(p, q)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_and_clipping_train_on_the_gpu(demo_root, tmp_path, amp):
    prefix = str(tmp_path / "s")
    model = demo_run(demo_root, prefix, amp=amp, channels_last=True, clip_grad_norm=1.0, display_gpu=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line) for line in open(f"{prefix}_metrics.jsonl")]
    assert all(r["gpu_allocated_mib"] > 0 and r["gpu_peak_mib"] >= r["gpu_allocated_mib"] for r in rows)
    assert all("grad_norm" in r for r in rows)
    snap = load_snapshot(list_snapshots(prefix)[0][1])
    assert (snap["grad_scaler"] is not None) == (amp == "fp16")


def test_resume_on_the_gpu_is_bitwise_identical(demo_root, tmp_path):
    straight = params(demo_run(demo_root, str(tmp_path / "a"), n=12))
    demo_run(demo_root, str(tmp_path / "b"), n=5)
    resumed = params(demo_run(demo_root, str(tmp_path / "b"), n=12, resume="auto"))
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_deterministic_refuses_an_op_that_has_no_deterministic_cuda_kernel_and_restores_the_settings(demo_root):
    torch.backends.cudnn.benchmark = True
    with pytest.raises(NondeterministicOp, match="upsample_bilinear2d_backward"):
        demo_run(demo_root, n=2, model=Upsampling())
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = False
    demo_run(demo_root, n=2, model=Upsampling(), deterministic=False)  # trains without the switch


@pytest.mark.slow
def test_compile_on_the_gpu(demo_root):
    model = demo_run(demo_root, n=4, compile=True, amp="bf16")
    assert type(model) is TinySegNet


@pytest.mark.slow
def test_the_command_line_trains_on_the_gpu_by_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    cmd = [sys.executable, "-m", "pixelz_dist.train", "--demo", "--demo-dir", str(tmp_path / "demo"), "--iters", "4",
           "--batch-size", "4", "--amp", "bf16", "--channels-last", "--clip-grad-norm", "1", "--display-gpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda" in proc.stderr and "gpu " in proc.stderr and "grad_norm" in proc.stderr


def test_background_snapshots_of_cuda_tensors_hold_the_state_of_their_iteration(demo_root, tmp_path):
    """The side-stream copy into pinned memory must be complete before the next step changes the parameters: each
    background snapshot equals the weights recorded at its iteration, and a synchronous run's snapshots alike."""
    from pixelz_dist import Callback
    from pixelz_dist.checkpoint.staging import HostStaging

    class Weights(Callback):
        def __init__(self):
            self.at = {}

        def on_iteration_end(self, state):
            self.at[state.iteration] = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}

    weights = Weights()
    demo_run(demo_root, str(tmp_path / "a"), n=12, snapshot_interval=2, callbacks=[weights])
    found = list_snapshots(str(tmp_path / "a"))
    assert [it for it, _ in found] == [12, 10, 8, 6, 4, 2]
    for iteration, path in found:
        saved = load_snapshot(path)["model"]
        assert all(torch.equal(saved[k], weights.at[iteration][k]) for k in saved), iteration
    staged = HostStaging().stage({"w": torch.ones(3, device="cuda")})
    staged.wait()
    assert staged.state["w"].is_pinned() and staged.state["w"].device.type == "cpu"
