"""Mixed precision, channels_last, torch.compile, the device feed and closure optimizers (LBFGS), on CPU."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pixelz_dist import train_model
from pixelz_dist.checkpoint.file_format import list_snapshots, load_snapshot
from pixelz_dist.data.device_feed import DeviceFeed, to_device
from pixelz_dist.errors import ConfigError


class ConvNet(nn.Module):
    """Records how its inputs arrive: dtype under autocast, memory format."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)
        self.autocast_dtypes, self.channels_last_inputs = [], []

    def forward(self, x, y):
        self.channels_last_inputs.append(x.is_contiguous(memory_format=torch.channels_last))
        h = self.conv(x)
        self.autocast_dtypes.append(h.dtype)
        return nn.functional.mse_loss(self.head(h.mean((2, 3))).float(), y)


def images(n=16):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 1, generator=g))


def run(model, prefix=None, n=6, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return train_model(model, opt, None, images(), 4, shuffle=True, num_iters=n, snapshot_prefix=prefix, **kw)


def test_bf16_autocast_runs_the_forward_in_bfloat16():
    plain, mixed = ConvNet(), ConvNet()
    run(plain)
    run(mixed, amp="bf16")
    assert set(plain.autocast_dtypes) == {torch.float32} and set(mixed.autocast_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # master weights stay fp32
    assert not torch.equal(plain.conv.weight, mixed.conv.weight)


def test_fp16_grad_scaler_state_is_saved_and_resume_is_exact(tmp_path):
    straight = run(ConvNet(), str(tmp_path / "a" / "s"), n=8, amp="fp16")
    run(ConvNet(), str(tmp_path / "b" / "s"), n=4, amp="fp16")
    snap = load_snapshot(list_snapshots(str(tmp_path / "b" / "s"))[0][1])
    assert set(snap["grad_scaler"]) >= {"scale", "_growth_tracker"}
    resumed = run(ConvNet(), str(tmp_path / "b" / "s"), n=8, amp="fp16", load_snapshot_path="auto")
    assert set(resumed.autocast_dtypes) == {torch.float16}
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_channels_last_converts_the_model_and_the_inputs():
    model = ConvNet()
    run(model, channels_last=True)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(model.channels_last_inputs)
    control = ConvNet()
    run(control)
    assert not any(control.channels_last_inputs)


def test_to_device_leaves_integer_and_3d_tensors_alone():
    batch = {"x": torch.zeros(2, 3, 4, 4), "mask": torch.zeros(2, 1, 4, 4, dtype=torch.long), "v": torch.zeros(2, 3)}
    out = to_device(batch, torch.device("cpu"), channels_last=True)
    assert out["x"].is_contiguous(memory_format=torch.channels_last)
    assert out["mask"].is_contiguous() and out["v"].is_contiguous()


def test_device_feed_on_cpu_passes_batches_through_in_order():
    batches = [(torch.full((2, 3, 2, 2), float(i)),) for i in range(5)]
    untouched = iter(batches)
    assert DeviceFeed(torch.device("cpu")).feed(untouched) is untouched  # nothing to copy: the loader's own iterator
    fed = list(DeviceFeed(torch.device("cpu"), channels_last=True).feed(iter(batches)))
    assert [b[0][0, 0, 0, 0].item() for b in fed] == [0, 1, 2, 3, 4]


def test_a_cuda_feed_copies_ahead_on_a_stream_of_its_own_unless_prefetch_is_off(monkeypatch):
    """Which copy path is chosen, without a GPU: torch.cuda.Stream (which needs one) is replaced by a stand-in, the
    choice itself is the library's. tests/test_gpu.py checks on a GPU that the copies really run on that stream."""
    import pixelz_dist.engine.loop as loop_module

    class StandInStream:
        def __init__(self, device):
            self.device = device

    monkeypatch.setattr(torch.cuda, "Stream", StandInStream)
    cuda = torch.device("cuda", 0)
    ahead = DeviceFeed(cuda)
    assert isinstance(ahead.stream, StandInStream) and ahead.stream.device == cuda
    assert ahead.feed(iter([])).__name__ == "_ahead"  # the side-stream path (a generator, not run here)
    assert DeviceFeed(cuda, ahead=False).stream is None
    assert DeviceFeed(torch.device("cpu"), channels_last=True).stream is None
    # and train_model hands prefetch= to the feed
    asked = []

    class RecordingFeed(DeviceFeed):
        def __init__(self, device, channels_last=False, ahead=True):
            asked.append(ahead)
            super().__init__(device, channels_last, ahead)

    monkeypatch.setattr(loop_module, "DeviceFeed", RecordingFeed)
    run(ConvNet(), n=1)
    run(ConvNet(), n=1, prefetch=False)
    assert asked == [True, False]


@pytest.mark.slow
def test_compile_trains_and_snapshots_the_plain_module(tmp_path):
    prefix = str(tmp_path / "s")
    eager = run(ConvNet(), n=3)
    compiled = run(ConvNet(), prefix, n=3, compile={"backend": "aot_eager"})
    assert type(compiled) is ConvNet  # what comes back is the user's module, not torch's OptimizedModule
    keys = load_snapshot(list_snapshots(prefix)[0][1])["model"].keys()
    assert not any("_orig_mod" in k for k in keys)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_true_uses_torch_compile_default_backend():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3 * 8 * 8, 1)

        def forward(self, x, y):
            return nn.functional.mse_loss(self.lin(x.flatten(1)), y)

    model = run(Tiny(), n=2, compile=True)
    assert type(model) is Tiny and torch.isfinite(model.lin.weight).all()


# -- closures ---------------------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """A badly conditioned least-squares problem: LBFGS solves it in a few steps, SGD crawls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6))

    def forward(self, a, b):
        return ((a @ self.w - b) ** 2).mean()


def quadratic_data():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 6, generator=g) * torch.tensor([10.0, 5, 1, 1, 0.5, 0.1])
    return TensorDataset(a, a @ torch.randn(6, generator=g))


def final_loss(model, ds):
    with torch.no_grad():
        return model(*ds.tensors).item()


def test_lbfgs_is_detected_and_beats_sgd_on_a_quadratic():
    ds = quadratic_data()
    lbfgs_model, sgd_model = Quadratic(), Quadratic()
    lbfgs = torch.optim.LBFGS(lbfgs_model.parameters(), lr=1, max_iter=20, line_search_fn="strong_wolfe")
    train_model(lbfgs_model, lbfgs, None, ds, 64, num_iters=5)  # LBFGS.step without a closure would raise
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.004)
    train_model(sgd_model, sgd, None, ds, 64, num_iters=5)
    assert final_loss(lbfgs_model, ds) < 1e-6 < final_loss(sgd_model, ds)


def test_closure_optimizer_refuses_accumulation_and_fp16():
    model = Quadratic()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ConfigError, match=r"(?s)iter_size=2.*amp='fp16'"):
        train_model(model, opt, None, quadratic_data(), 16, num_iters=1, iter_size=2, amp="fp16")


def test_a_declared_closure_optimizer_gets_a_closure_and_resumes_exactly(tmp_path):
    class NeedsClosure(torch.optim.SGD):
        def step(self, closure=None):
            assert closure is not None, "no closure"
            loss = closure()
            super().step()
            return loss

    def go(prefix, n, **kw):
        model = Quadratic()
        opt = NeedsClosure(model.parameters(), lr=0.001, momentum=0.9)
        return train_model(model, opt, None, quadratic_data(), 16, shuffle=True, num_iters=n,
                           snapshot_prefix=prefix, closure=True, **kw)

    straight = go(str(tmp_path / "a"), 9)
    go(str(tmp_path / "b"), 4)
    resumed = go(str(tmp_path / "b"), 9, load_snapshot_path="auto")
    assert torch.equal(straight.w, resumed.w)
