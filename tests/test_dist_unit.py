"""dist.py without a process group: environment, device / backend / SyncBN decisions, the worker cap, SyncBN undo."""

import pytest
import torch
from torch import nn

from pixelz_dist.distributed import env as dist
from pixelz_dist.distributed.env import DistEnv, read_env
from pixelz_dist.distributed.model_wrapping import convert_sync_batchnorm, plan_devices, revert_sync_batchnorm
from pixelz_dist.errors import ConfigError


def test_read_env_defaults_and_torchrun_values():
    assert read_env({}) == DistEnv(0, 0, 1, 1)
    env = read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.is_distributed and not env.is_main
    with pytest.raises(ValueError, match="RANK='x'"):
        read_env({"RANK": "x"})


def test_plan_single_process_keeps_the_users_device():
    plan = plan_devices(DistEnv(), torch.device("cpu"), sync_bn=True, has_batchnorm=True, cuda_available=True)
    assert plan.device == torch.device("cpu") and plan.backend is None and not plan.sync_bn and not plan.pin_memory


def test_plan_under_torchrun_with_gpus_uses_nccl_local_rank_syncbn_and_pinned_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # the device query only
    env = DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4)
    plan = plan_devices(env, torch.device("cpu"), sync_bn=True, has_batchnorm=True, cuda_available=True)
    assert plan.device == torch.device("cuda", 1) and plan.backend == "nccl"
    assert plan.sync_bn and plan.pin_memory and plan.local_processes == 4
    assert not plan_devices(env, torch.device("cpu"), sync_bn=False, has_batchnorm=True, cuda_available=True).sync_bn
    assert not plan_devices(env, torch.device("cpu"), sync_bn=True, has_batchnorm=False, cuda_available=True).sync_bn
    assert plan_devices(env, torch.device("cpu"), True, True, cuda_available=True, backend="gloo").backend == "gloo"


def test_more_local_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env = DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 but this node has 1 visible GPU.*--nproc_per_node=1"):
        plan_devices(env, torch.device("cpu"), sync_bn=True, has_batchnorm=True, cuda_available=True)


def test_plan_on_cpu_uses_gloo_and_warns_that_syncbn_is_impossible(caplog):
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)
    with caplog.at_level("WARNING", logger="pixelz_dist"):
        plan = plan_devices(env, torch.device("cpu"), sync_bn=True, has_batchnorm=True, cuda_available=False)
    assert plan.device == torch.device("cpu") and plan.backend == "gloo" and not plan.sync_bn
    assert not plan.pin_memory and "SyncBatchNorm needs GPU" in caplog.text


@pytest.mark.parametrize("cpus,slurm,local,expected", [(16, None, 8, 2), (16, None, 1, 6), (3, None, 8, 1),
                                                      (16, "4", 2, 2), (2, None, 2, 1)])
def test_worker_cap_is_shared_by_the_local_processes(monkeypatch, cpus, slurm, local, expected):
    monkeypatch.setattr("psutil.Process.cpu_affinity", lambda self: list(range(cpus)))
    environ = {"SLURM_CPUS_PER_TASK": slurm} if slurm else {}
    assert dist.default_num_workers(local, environ=environ) == expected


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, momentum=0.3, eps=1e-4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))


def test_syncbn_is_undone_with_the_trained_parameters_and_statistics():
    model = Net()
    weight = model.bn.weight
    originals = convert_sync_batchnorm(model)
    assert set(originals) == {"bn", "head.1"}
    assert isinstance(model.bn, nn.SyncBatchNorm) and model.bn.weight is weight  # the optimizer's parameter
    with torch.no_grad():
        model.bn.weight.add_(2.0)
        model.bn.running_mean.add_(0.5)
        model.bn.num_batches_tracked.add_(7)
        model.head[1].running_var.mul_(3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    revert_sync_batchnorm(model, originals)
    assert type(model.bn) is nn.BatchNorm2d and type(model.head[1]) is nn.BatchNorm1d
    assert model.bn.weight is weight and model.bn.momentum == 0.3 and model.bn.eps == 1e-4
    assert not model.bn.training and model.head[1].weight is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    out = model.bn(torch.randn(2, 4, 3, 3))  # a plain BatchNorm again: runs on CPU
    assert out.shape == (2, 4, 3, 3)


def test_process_group_is_a_no_op_without_torchrun():
    with dist.process_group() as env:
        assert env == DistEnv() and not torch.distributed.is_initialized()


def test_timeout_from_argument_or_environment(monkeypatch):
    assert dist.timeout_seconds(None) == dist.DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv("PIXELZ_DIST_TIMEOUT", "42")
    assert dist.timeout_seconds(None) == 42 and dist.timeout_seconds(5) == 5


@pytest.mark.parametrize("message,expected", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.213.7.2]:42167: Connection reset by "
     "peer. This is typically caused by a remote worker hanging", "another process of the job is gone"),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 5000ms for send "
     "operation to complete", "stopped answering for the collective timeout (5 s, PIXELZ_DIST_TIMEOUT)"),
    ("Application timeout caused pair closure", "stopped answering"),
    ("DataLoader timed out after 3 seconds", None),
    ("CUDA out of memory", None),
])
def test_a_collectives_failure_is_explained_with_what_to_do(message, expected):
    """The words gloo used on the 2-node cluster (tests/test_multinode.py) for a lost node and a partition."""
    why = dist.explain_collective_failure(RuntimeError(message), 5.0)
    if expected is None:
        assert why is None
    else:
        assert expected in why and "--resume auto" in why and "HINT:" in why
        assert "pair.cc" not in why and "typically caused" not in why
        assert "Read error [10.213.7.2]:42167: Connection reset by peer)" in why if "10.213.7.2" in message else True
    assert dist.explain_collective_failure(ValueError(message), 5.0) is None
