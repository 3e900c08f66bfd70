"""Tests for pixelz_dist.param_groups.make_param_groups, on real torch modules and optimizers."""

import copy

import pytest
import torch
from torch import nn

from pixelz_dist.engine.param_groups import make_param_groups
from pixelz_dist.errors import ConfigError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = Block()
        self.block2 = Block()

    def forward(self, x):
        return self.block2(self.block1(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv12 = nn.Conv2d(3, 3, 3, padding=1)
        self.encoder = Encoder()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.encoder(self.conv12(self.conv1(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def names(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in group["params"]]


def summary(model, groups):
    return [(g["name"], g.get("lr"), names(model, g)) for g in groups]


def all_trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_none_and_empty_give_one_default_group():
    model = make_net()
    for custom in (None, {}):
        groups = make_param_groups(model, custom)
        assert len(groups) == 1
        assert groups[0]["name"] == "default"
        assert "lr" not in groups[0]
        assert names(model, groups[0]) == all_trainable(model)


def test_exact_names():
    model = make_net()
    groups = make_param_groups(model, {"conv12.weight": 0.5, "head.bias": 0.25})
    assert summary(model, groups)[:2] == [("conv12.weight", 0.5, ["conv12.weight"]), ("head.bias", 0.25, ["head.bias"])]
    default = groups[2]
    assert default["name"] == "default" and "lr" not in default
    assert "conv12.weight" not in names(model, default) and "conv12.bias" in names(model, default)


def test_globs():
    model = make_net()
    groups = make_param_groups(model, {"conv12.*": 0.1, "*.bias": 0.0})
    s = summary(model, groups)
    assert s[0] == ("conv12.*", 0.1, ["conv12.weight", "conv12.bias"])
    # '*' crosses dots, and conv12.bias already belongs to the earlier key.
    expected_bias = [n for n in all_trainable(model) if n.endswith(".bias") and not n.startswith("conv12.")]
    assert s[1] == ("*.bias", 0.0, expected_bias)
    assert all(not n.endswith(".bias") for n in s[2][2])


def test_module_prefixes():
    model = make_net()
    groups = make_param_groups(model, {"encoder.block1": 0.3, "conv1": 0.2})
    s = summary(model, groups)
    assert s[0] == ("encoder.block1", 0.3, [n for n in all_trainable(model) if n.startswith("encoder.block1.")])
    # 'conv1' is a module prefix: it must not take conv12's parameters.
    assert s[1] == ("conv1", 0.2, ["conv1.weight", "conv1.bias"])
    assert "conv12.weight" in s[2][2] and "encoder.block2.conv.weight" in s[2][2]


def test_every_trainable_parameter_appears_exactly_once_in_model_order():
    model = make_net()
    groups = make_param_groups(model, {"head": 1.0, "*.weight": 0.1, "encoder": 0.01})
    seen = [n for g in groups for n in names(model, g)]
    assert sorted(seen) == sorted(all_trainable(model))
    assert len(seen) == len(set(seen))
    order = {n: i for i, n in enumerate(all_trainable(model))}
    for g in groups:
        idx = [order[n] for n in names(model, g)]
        assert idx == sorted(idx)


def test_precedence_first_key_wins():
    model = make_net()
    groups = make_param_groups(model, {"encoder": 0.1, "*.weight": 0.2})
    s = summary(model, groups)
    assert "encoder.block1.conv.weight" in s[0][2]
    assert all(not n.startswith("encoder.") for n in s[1][2])

    groups = make_param_groups(model, {"*.weight": 0.2, "encoder": 0.1})
    s = summary(model, groups)
    assert "encoder.block1.conv.weight" in s[0][2]
    assert s[1][2] == [n for n in all_trainable(model) if n.startswith("encoder.") and not n.endswith(".weight")]


def test_precedence_exact_name_beats_earlier_key():
    model = make_net()
    groups = make_param_groups(model, {"head": 0.1, "*.bias": 0.2, "head.bias": 0.3})
    s = summary(model, groups)
    assert s[0] == ("head", 0.1, ["head.weight"])
    assert "head.bias" not in s[1][2]
    assert s[2] == ("head.bias", 0.3, ["head.bias"])


def test_frozen_parameters_are_left_out():
    model = make_net()
    for p in model.conv1.parameters():
        p.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    groups = make_param_groups(model, {"head": 0.1})
    s = summary(model, groups)
    assert s[0] == ("head", 0.1, ["head.weight"])
    seen = [n for g in groups for n in names(model, g)]
    assert sorted(seen) == sorted(all_trainable(model))
    assert not any(n.startswith("conv1.") or n == "head.bias" for n in seen)


def test_tied_parameters_appear_once():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    groups = make_param_groups(model, {"1.weight": 0.1})  # the alias that named_parameters() hides
    assert len(groups) == 1
    assert groups[0]["params"] == [model[0].weight]
    groups = make_param_groups(model, None)
    assert len(groups[0]["params"]) == 1


def test_unknown_key_lists_close_matches():
    model = make_net()
    with pytest.raises(ConfigError) as info:
        make_param_groups(model, {"conv21.weight": 0.1})
    msg = str(info.value)
    assert "'conv21.weight'" in msg
    assert "conv12.weight" in msg
    assert "module prefix" in msg  # the matching hint


def test_unknown_module_prefix_suggests_module():
    model = make_net()
    with pytest.raises(ConfigError, match="encoder.block1"):
        make_param_groups(model, {"encoder.blok1": 0.1})


def test_multiple_bad_keys_reported_together():
    model = make_net()
    with pytest.raises(ConfigError) as info:
        make_param_groups(model, {"conv21.weight": 0.1, "head": 0.1, "haed.bias": 0.2, "decoder": 0.3, "x": -1})
    msg = str(info.value)
    for key in ("'conv21.weight'", "'haed.bias'", "'decoder'", "'x'"):
        assert key in msg
    assert "'head':" not in msg
    assert "head.bias" in msg  # close match for the typo
    assert "4 unusable" in msg


def test_frozen_only_key_error():
    model = make_net()
    for p in model.encoder.block2.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen") as info:
        make_param_groups(model, {"encoder.block2": 0.1})
    assert "encoder.block2.conv.weight" in str(info.value)


def test_key_with_all_matches_taken_is_an_error():
    model = make_net()
    with pytest.raises(ConfigError) as info:
        make_param_groups(model, {"head": 0.1, "head.*": 0.2})
    msg = str(info.value)
    assert "'head.*'" in msg and "already taken" in msg and "'head'" in msg

    with pytest.raises(ConfigError, match="already taken by higher-precedence key"):
        make_param_groups(model, {"*.bias": 0.1, "head.bias": 0.2, "*bias": 0.3})


@pytest.mark.parametrize("lr", [-0.1, "0.1", None, float("nan"), float("inf"), True, torch.tensor(0.1)])
def test_bad_lr_value(lr):
    with pytest.raises(ConfigError, match="'head'.*lr must be"):
        make_param_groups(make_net(), {"head": lr})


def test_bad_arguments():
    with pytest.raises(ConfigError):
        make_param_groups(make_net(), [("head", 0.1)])
    with pytest.raises(ConfigError, match="non-empty string"):
        make_param_groups(make_net(), {"": 0.1})
    frozen = make_net().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        make_param_groups(frozen, None)


def test_zero_and_int_lr_accepted():
    groups = make_param_groups(make_net(), {"head": 0, "conv1": 1})
    assert [g.get("lr") for g in groups] == [0, 1, None]


CUSTOM = {"encoder.block1": 0.05, "*.bias": 0.0, "head.weight": 0.3}


def loss_of(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 3, 6, 6, generator=gen)
    y = torch.randn(4, 2, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


def test_deterministic_structure():
    a = make_param_groups(make_net(), CUSTOM)
    b = make_param_groups(make_net(), dict(CUSTOM))
    model = make_net()
    assert summary(model, make_param_groups(model, CUSTOM)) == summary(model, make_param_groups(model, CUSTOM))
    assert [(g["name"], g.get("lr"), [tuple(p.shape) for p in g["params"]]) for g in a] == [
        (g["name"], g.get("lr"), [tuple(p.shape) for p in g["params"]]) for g in b
    ]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.9),
        lambda groups: torch.optim.AdamW(groups, lr=0.01),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_optimizer_state_dict_resumes_exactly(make_opt):
    model = make_net()
    opt = make_opt(make_param_groups(model, CUSTOM))
    assert [g["name"] for g in opt.param_groups] == ["encoder.block1", "*.bias", "head.weight", "default"]
    train(model, opt, 1)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert [g["name"] for g in saved_opt["param_groups"]] == ["encoder.block1", "*.bias", "head.weight", "default"]

    resumed = make_net(seed=1)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = make_opt(make_param_groups(resumed, dict(CUSTOM)))
    resumed_opt.load_state_dict(saved_opt)
    assert [g["name"] for g in resumed_opt.param_groups] == [g["name"] for g in opt.param_groups]
    assert [g["lr"] for g in resumed_opt.param_groups] == [0.05, 0.0, 0.3, 0.01]

    train(model, opt, 3, start=1)
    train(resumed, resumed_opt, 3, start=1)
    for (name, p), (name_r, p_r) in zip(model.named_parameters(), resumed.named_parameters()):
        assert name == name_r
        assert torch.equal(p, p_r), name


def test_custom_lr_is_applied_by_sgd():
    model = make_net()
    custom = {"encoder.block1": 0.05, "*.bias": 0.5, "head.weight": 0.3}
    default_lr = 0.01
    groups = make_param_groups(model, custom)
    opt = torch.optim.SGD(groups, lr=default_lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss_of(model, 0).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    for group in groups:
        lr = custom.get(group["name"], default_lr)
        for name in names(model, group):
            assert grads[name].abs().sum() > 0, name
            torch.testing.assert_close(before[name] - after[name].detach(), lr * grads[name], rtol=1e-5, atol=1e-7)


# -- no_decay_norm_bias ----------------------------------------------------------------------------------------------
class Normed(nn.Module):
    """Every kind of normalisation layer, a bias-free conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_no_decay_norm_bias_puts_biases_and_norm_parameters_at_weight_decay_0():
    model = Normed()
    groups = make_param_groups(model, None, no_decay_norm_bias=True)
    assert [(g["name"], g.get("weight_decay")) for g in groups] == [("default", None), ("default.no_decay", 0.0)]
    assert names(model, groups[0]) == ["conv.weight", "head.weight"]
    assert names(model, groups[1]) == ["bn.weight", "bn.bias", "gn.weight", "gn.bias", "inorm.weight",
                                       "inorm.bias", "ln.weight", "ln.bias", "head.bias"]
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # the rest keep the optimizer's


def test_no_decay_norm_bias_splits_each_custom_lr_group_and_keeps_its_lr():
    model = make_net()
    custom = {"encoder.block1": 0.05, "head": 0.3}
    groups = make_param_groups(model, custom, no_decay_norm_bias=True)
    assert summary(model, groups) == [
        ("encoder.block1", 0.05, ["encoder.block1.conv.weight"]),
        ("encoder.block1.no_decay", 0.05, ["encoder.block1.conv.bias", "encoder.block1.norm.weight",
                                           "encoder.block1.norm.bias"]),
        ("head", 0.3, ["head.weight"]),
        ("head.no_decay", 0.3, ["head.bias"]),
        ("default", None, ["conv1.weight", "conv12.weight", "encoder.block2.conv.weight"]),
        ("default.no_decay", None, ["conv1.bias", "conv12.bias", "encoder.block2.conv.bias",
                                    "encoder.block2.norm.weight", "encoder.block2.norm.bias"]),
    ]
    opt = torch.optim.SGD(groups, lr=0.01, weight_decay=1e-4)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (0.05, 1e-4), (0.05, 0.0), (0.3, 1e-4), (0.3, 0.0), (0.01, 1e-4), (0.01, 0.0)]
    # a step really leaves the no-decay parameters without decay: zero gradients, only decay could move them
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        decayed = name.endswith("weight") and ".norm." not in name
        assert torch.equal(p, before[name]) != decayed, name


def test_no_decay_norm_bias_off_keeps_the_groups_unchanged():
    model = make_net()
    custom = {"encoder.block1": 0.05, "*.bias": 0.5}
    assert summary(model, make_param_groups(model, custom, no_decay_norm_bias=False)) == \
        summary(model, make_param_groups(model, custom))
