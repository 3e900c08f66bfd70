"""cli.py: parsing, the config file's precedence rules, and every usage error as one line with exit code 2."""

import os

import pytest
import torch

from pixelz_dist.cli import options as cli
from pixelz_dist.cli.build import build_dataset_and_model, build_optimizer, build_scheduler
from pixelz_dist.errors import ConfigError


def usage_error(capsys, argv, command="train") -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse(command, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_and_types(tmp_path):
    o = cli.parse("train", ["--demo", "--demo-dir", str(tmp_path)])
    assert (o.epochs, o.iters, o.batch_size, o.optimizer, o.momentum, o.weight_decay) == (5, None, 8, "sgd", 0.9, 0.0)
    assert o.snapshot_prefix == os.path.join(str(tmp_path), "snapshots", "demo") and o.lr == 0.01
    o = cli.parse("train", ["--demo", "--iters", "7", "--optimizer", "adamw", "--no-shuffle", "--param-lr",
                            "head=1e-3", "--param-lr", "encoder.*=0"])
    assert (o.iters, o.epochs, o.weight_decay, o.momentum, o.shuffle) == (7, None, 0.01, None, False)
    assert o.param_lr == {"head": 1e-3, "encoder.*": 0}


def test_underscore_spellings_and_the_old_misspelling_are_accepted(tmp_path):
    o = cli.parse("train", ["--demo", "--batch_size", "3", "--snaphot_prefix", str(tmp_path / "p")])
    assert o.batch_size == 3 and o.snapshot_prefix == str(tmp_path / "p")


def test_the_same_spelling_twice_last_wins_two_spellings_conflict(capsys):
    assert cli.parse("train", ["--demo", "--resume", "auto", "--lr", "1", "--lr", "2"]).lr == 2.0
    err = usage_error(capsys, ["--demo", "--snapshot-prefix", "a", "--snapshot_prefix", "b"])
    assert "--snapshot-prefix and --snapshot_prefix both given" in err
    assert "--shuffle and --no-shuffle" in usage_error(capsys, ["--demo", "--shuffle", "--no-shuffle"])


@pytest.mark.parametrize("argv, expected", [
    (["--demo", "--epochs", "1", "--iters", "2"], "--epochs and --iters conflict"),
    (["--demo", "--model", "m:f"], "--demo and --model conflict"),
    (["--model", "m:f", "--data", "x", "--dataset", "d:f", "--epochs", "1"], "--data and --dataset conflict"),
    (["--data", "x", "--epochs", "1"], "no model: pass --model"),
    (["--model", "m:f", "--epochs", "1"], "no data: pass --data"),
    (["--model", "m:f", "--data", "/no/such/folder", "--epochs", "1"], "--data folder '/no/such/folder' does not"),
    (["--model", "m:f", "--dataset", "d:f"], "how long to train: pass --epochs N or --iters N"),
    (["--demo", "--resume", "/no/such.pt"], "--resume '/no/such.pt': no such snapshot file"),
    (["--model", "m:f", "--dataset", "d:f", "--iters", "1", "--resume", "auto"], "pass --snapshot-prefix"),
    (["--demo", "--optimizer", "adam", "--momentum", "0.9"], "--momentum is for sgd"),
    (["--demo", "--scheduler", "step"], "--scheduler step needs --step-size"),
    (["--demo", "--scheduler", "multistep"], "needs --milestones"),
    (["--demo", "--model-arg", "width=2"], "--model-arg needs --model"),
    (["--model", "m:f", "--dataset", "d:f", "--iters", "1", "--model-arg", "oops"], "expects KEY=VALUE, got 'oops'"),
    (["--demo", "--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
    (["--demo", "--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["--demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--demo", "--config", "/no/such.toml"], "--config '/no/such.toml': no such file"),
])
def test_usage_errors_are_one_line(capsys, argv, expected):
    assert expected in usage_error(capsys, argv)


def test_find_lr_usage_errors(capsys):
    assert "no model" in usage_error(capsys, [], "find_lr")
    assert "no such snapshot file" in usage_error(capsys, ["--demo", "--resume", "/no/such.pt"], "find_lr")


def test_config_file_then_command_line(tmp_path, capsys):
    cfg = write(tmp_path, 'demo = true\nepochs = 3\nlr = 0.5\nbatch_size = 4\nmilestones = [1, 2]\n'
                          '[param_lr]\n"head" = 0.1\n')
    o = cli.parse("train", ["--config", cfg, "--batch-size", "6", "--param-lr", "encoder=0.2"])
    assert (o.epochs, o.lr, o.batch_size, o.milestones) == (3, 0.5, 6, [1, 2])
    assert o.param_lr == {"head": 0.1, "encoder": 0.2}  # tables merge key by key
    o = cli.parse("train", ["--config", cfg, "--iters", "10"])  # the command line's length replaces the file's
    assert (o.iters, o.epochs) == (10, None)
    assert o.notes == ["the command line's --iters replaces the config file's epochs"]
    model_cfg = write(tmp_path, 'model = "m:f"\ndata = ["x"]\nmodes = ["RGB"]\n', "m.toml")
    o = cli.parse("train", ["--config", model_cfg, "--demo"])  # --demo drops the file's model, data and modes
    assert o.demo and o.model is None and o.data is None and o.modes is None
    o = cli.parse("train", ["--config", write(tmp_path, "demo = true\nbatch-size = 5\n", "dash.toml")])
    assert o.batch_size == 5  # a key may also be written with dashes, as on the command line


def test_config_file_errors(tmp_path, capsys):
    err = usage_error(capsys, ["--config", write(tmp_path, "demo = true\nbatch_sise = 4\nepochs = '3'\n")])
    assert "unknown key 'batch_sise' (did you mean 'batch_size'" in err and "epochs must be an integer" in err
    err = usage_error(capsys, ["--config", write(tmp_path, "demo = true\nepochs = 1\niters = 2\n")])
    assert "epochs and iters conflict (both set on the config file)" in err
    assert "is not valid TOML" in usage_error(capsys, ["--config", write(tmp_path, "demo = \n")])
    assert "optimizer must be one of sgd, adamw, adam" in usage_error(
        capsys, ["--config", write(tmp_path, "demo = true\noptimizer = 'lion'\n")])


def test_find_lr_reads_a_training_config_and_ignores_training_only_keys(tmp_path):
    cfg = write(tmp_path, 'demo = true\nepochs = 3\nscheduler = "cosine"\nlr = 0.2\nbatch_size = 4\n')
    o = cli.parse("find_lr", ["--config", cfg, "--method", "sweep"])
    assert (o.lr, o.batch_size, o.method) == (0.2, 4, "sweep") and not hasattr(o, "epochs")


def test_print_config_is_the_resolved_configuration_and_loads_back(tmp_path, capsys):
    argv = ["--demo", "--demo-dir", str(tmp_path), "--iters", "9", "--optimizer", "adamw", "--param-lr",
            "head=0.1", "--scheduler", "multistep", "--milestones", "3", "6"]
    with pytest.raises(SystemExit) as e:
        cli.parse("train", argv + ["--print-config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "weight_decay = 0.01" in printed and "iters = 9" in printed and "# epochs = (not set)" in printed
    again = cli.parse("train", ["--config", write(tmp_path, printed)])
    assert cli.config_values(again) == cli.config_values(cli.parse("train", argv))


def test_tensorboard_missing_is_a_usage_error_with_the_install_command(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    assert 'pip install "pixelz-dist[tensorboard]"' in usage_error(capsys, ["--demo", "--tensorboard", "tb"])


# -- building from the options ---------------------------------------------------------------------------------------
def test_model_and_data_from_factories_and_folders(demo_root):
    dirs = [os.path.join(demo_root, d) for d in ("rgb", "hint", "mask")]
    o = cli.parse("train", ["--model", "pixelz_dist.cli.demo:TinySegNet", "--model-arg", "width=3", "--data", *dirs,
                            "--modes", "RGB", "L", "L", "--iters", "1"])
    model, dataset = build_dataset_and_model(o)
    rgb, hint, mask = dataset[0]
    assert rgb.dtype == hint.dtype == mask.dtype and rgb.shape[0] == 3 and hint.shape[0] == 1
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1
    assert model.head.in_channels == 3
    assert model(rgb[None], hint[None], mask[None]).ndim == 0


def test_cache_dir_reaches_the_dataset_and_needs_data(demo_root, tmp_path, capsys):
    dirs = [os.path.join(demo_root, d) for d in ("rgb", "hint", "mask")]
    cache = str(tmp_path / "cache")
    o = cli.parse("train", ["--model", "pixelz_dist.cli.demo:TinySegNet", "--data", *dirs, "--modes", "RGB", "L", "L",
                            "--cache-dir", cache, "--iters", "1"])
    _, dataset = build_dataset_and_model(o)
    first = [torch.clone(x) for x in dataset[0]]
    hint = dataset.files[1][0]
    assert dataset.cache.image_size(hint, "L") is not None  # the demo's PNG hint is now in the cache
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[0]))
    assert "--cache-dir needs --data" in usage_error(capsys, ["--demo", "--cache-dir", cache])


@pytest.mark.parametrize("spec, expected", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("pixelz_dist.cli.demo:TinySegNt", "has no attribute 'TinySegNt'; did you mean 'TinySegNet'?"),
    ("pixelz_dist.cli.demo:DEMO_FOLDERS", "not a callable"),
    ("pixelz_dist.cli.demo:to_mask", "cannot be called with {'width': 2}"),
    ("pixelz_dist.cli.demo", "expected 'package.module:name'"),
])
def test_model_factory_errors(demo_root, spec, expected):
    o = cli.parse("train", ["--model", spec, "--model-arg", "width=2", "--data", os.path.join(demo_root, "rgb"),
                            "--iters", "1"])
    with pytest.raises(ConfigError, match="--model") as e:
        build_dataset_and_model(o)
    assert expected in str(e.value)


def test_factory_results_are_checked(demo_root, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "jobs"))
    o = cli.parse("train", ["--model", "pixelz_dist.cli.demo:make_demo_dataset", "--model-arg", f"root={demo_root!r}",
                            "--model-arg", "num_samples=40", "--model-arg", "size=24", "--model-arg", "seed=3",
                            "--data", os.path.join(demo_root, "rgb"), "--iters", "1"])
    with pytest.raises(ConfigError, match="returned list, not a torch.nn.Module"):
        build_dataset_and_model(o)
    o = cli.parse("train", ["--model", "pixelz_dist.cli.demo:TinySegNet", "--dataset", "slow_data:not_a_dataset",
                            "--iters", "1"])
    with pytest.raises(ConfigError, match="returned int, not a map-style dataset"):
        build_dataset_and_model(o)


@pytest.mark.parametrize("argv, cls, on_iter", [
    (["--scheduler", "step", "--step-size", "2"], "StepLR", False),
    (["--scheduler", "multistep", "--milestones", "1", "2"], "MultiStepLR", False),
    (["--scheduler", "cosine"], "CosineAnnealingLR", False),
    (["--scheduler", "cosine", "--schedule-on-iter"], "CosineAnnealingLR", True),
    (["--scheduler", "onecycle"], "OneCycleLR", True),
])
def test_schedulers(argv, cls, on_iter):
    from pixelz_dist.cli.demo import TinySegNet

    o = cli.parse("train", ["--demo", "--epochs", "3", "--batch-size", "4", "--iter-size", "2",
                            "--param-lr", "head=0.5", *argv])
    model = TinySegNet()
    opt = build_optimizer(model, o)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01]
    s = build_scheduler(opt, o, num_samples=40, world_size=2)  # 40 / 8 = 5 batches -> 3 iterations per epoch
    assert type(s).__name__ == cls and o.schedule_on_iter is on_iter
    if cls == "CosineAnnealingLR":
        assert s.T_max == (9 if on_iter else 3)
    if cls == "OneCycleLR":
        assert s.total_steps == 9


def test_step_and_stop_options_reach_train_model_and_find_lr():
    o = cli.parse("train", ["--demo", "--amp", "bf16", "--channels-last", "--clip-grad-norm", "0.5",
                            "--on-nonfinite", "skip", "--time-budget", "3600", "--stop-patience", "50"])
    assert cli.step_options(o) == {"amp": "bf16", "channels_last": True, "compile": False, "clip_grad_norm": 0.5,
                                   "clip_grad_value": None}
    assert (o.on_nonfinite, o.time_budget, o.stop_patience, o.stop_min_delta, o.device) == ("skip", 3600.0, 50, 0.0,
                                                                                            "auto")
    f = cli.parse("find_lr", ["--demo", "--amp", "fp16", "--compile"])
    assert cli.step_options(f)["amp"] == "fp16" and cli.step_options(f)["compile"] is True


def test_device_errors_are_usage_errors(tmp_path):
    from pixelz_dist.cli.build import place_model

    opts = cli.parse("train", ["--demo", "--demo-dir", str(tmp_path), "--demo-samples", "4"])
    model = build_dataset_and_model(opts)[0]
    assert place_model(model, "cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        place_model(model, "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            place_model(model, "cuda")
