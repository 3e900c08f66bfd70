"""cli.py: parsing, the config file's precedence rules, and every usage error as one line with exit code 2."""

import argparse
import os

import pytest
import torch

from pixelz_dist.cli import options as cli
from pixelz_dist.cli.build import build_dataset_and_model, build_optimizer, build_scheduler
from pixelz_dist.errors import ConfigError, DataError


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


@pytest.mark.parametrize("command", ["train", "find_lr"])
def test_no_option_is_taken_by_torchruns_own_parser(command):
    """torchrun parses every option-like argument, those after ``-m pixelz_dist.train`` too: an option of ours that is
    a prefix of one of torchrun's (``--monitor`` of ``--monitor-interval``) stops torchrun before the trainer starts,
    or is silently taken as torchrun's."""
    from torch.distributed.run import get_args_parser

    torchrun = [s for action in get_args_parser()._actions for s in action.option_strings if s.startswith("--")]
    ours = [s for action in cli.build_parser(command)._actions for s in action.option_strings
            if s.startswith("--") and s != "--help"]
    taken = {o: [t for t in torchrun if t.startswith(o)] for o in ours if any(t.startswith(o) for t in torchrun)}
    assert not taken, taken


# -- counts, close matches, --help, defaults (issue 24: statements that were false when tried) ----------------------
@pytest.mark.parametrize("scheduler", cli.SCHEDULERS)
@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--iter-size", "0"), ("--batch-size", "-2"),
                                           ("--epochs", "0"), ("--iters", "-1")])
def test_a_count_below_one_is_a_usage_error_with_every_scheduler(capsys, scheduler, option, value):
    """`--batch-size 0 --scheduler cosine` was a ZeroDivisionError traceback (exit 1): the scheduler divided the run's
    length by it before train_model's check ran."""
    length = [] if option in ("--epochs", "--iters") else ["--epochs", "2"]
    err = usage_error(capsys, ["--demo", "--scheduler", scheduler, "--step-size", "1", "--milestones", "1",
                               *length, option, value])
    assert err == f"error: {option} must be >= 1, got {value}"


@pytest.mark.parametrize("command, argv, expected", [
    ("train", ["--display-iter", "0"], "--display-iter must be >= 1, got 0"),
    ("train", ["--snapshot-interval", "0"], "--snapshot-interval must be positive, got 0"),
    ("train", ["--snapshot-interval", "-1", "--workers", "-1"],
     "--workers must be >= 0, got -1; --snapshot-interval must be positive, got -1"),  # every problem, one line
    ("train", ["--iters", "5", "--snapshot-interval", "2.5"], "--snapshot-interval counts iterations with --iters"),
    ("train", ["--demo-samples", "0"], "--demo-samples must be >= 1, got 0"),
    ("train", ["--keep-last", "-1"], "--keep-last must be >= 0, got -1"),
    ("train", ["--scheduler", "step", "--step-size", "0"], "--step-size must be >= 1, got 0"),
    ("train", ["--scheduler", "multistep", "--milestones", "-1"], "--milestones must be >= 0, got -1"),
    ("train", ["--stop-patience", "0"], "--stop-patience must be >= 1, got 0"),
    ("train", ["--time-budget", "0"], "--time-budget must be positive, got 0"),
    ("train", ["--clip-grad-norm", "-1"], "--clip-grad-norm must be positive, got -1"),
    ("train", ["--warmup-iters", "-1"], "--warmup-iters must be >= 0, got -1"),
    ("find_lr", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("find_lr", ["--iter-size", "0"], "--iter-size must be >= 1, got 0"),
    ("find_lr", ["--iter-per-run", "1"], "--iter-per-run must be an integer >= 2"),  # the finder's own check
    ("find_lr", ["--method", "sweep", "--num-iters", "0"], "--num-iters must be an integer >= 3 for the sweep"),
    ("evaluate", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_every_count_is_checked_when_parsing(capsys, command, argv, expected):
    assert expected in usage_error(capsys, ["--demo", *argv], command)


def test_what_train_model_would_refuse_is_refused_when_parsing(capsys):
    """train_model's own check runs on what the command will pass it, in the parse: one line naming the options,
    before the model, the data or any file is made."""
    err = usage_error(capsys, ["--model", "m:f", "--dataset", "d:f", "--iters", "3", "--snapshot-interval", "1"])
    assert err == ("error: --snapshot-interval is set but --snapshot-prefix is not given, so no snapshot would be "
                   "written; set --snapshot-prefix (e.g. 'runs/exp1/snapshot')")


def test_build_scheduler_refuses_a_zero_count_from_python():
    """build_scheduler is public: called with unchecked options it raises ConfigError, not ZeroDivisionError."""
    from pixelz_dist.cli.demo import TinySegNet

    o = cli.parse("train", ["--demo", "--epochs", "2", "--scheduler", "cosine", "--iters", "4"][:-2])
    o.batch_size = 0
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        build_scheduler(build_optimizer(TinySegNet(), o), o, num_samples=40, world_size=1)
    o.batch_size, o.iters, o.epochs = 4, 5, None
    with pytest.raises(DataError, match="empty"):
        build_scheduler(build_optimizer(TinySegNet(), o), o, num_samples=0, world_size=1)


@pytest.mark.parametrize("command, argv, expected", [
    ("train", ["--epoch", "3"], "unrecognized arguments: --epoch 3 (did you mean --epochs?)"),
    ("train", ["--snaphot-interval", "2"], "unrecognized arguments: --snaphot-interval 2 (did you mean "
                                           "--snapshot-interval"),
    ("train", ["--snaphot_interval=2"], "(did you mean --snapshot-interval"),
    ("train", ["--lrr", "1", "--epoch=3"], "(--lrr: did you mean --lr?; --epoch: did you mean --epochs?)"),
    ("find_lr", ["--num-run", "3"], "(did you mean --num-runs"),
    ("evaluate", ["--folow"], "(did you mean --follow?)"),
    ("train", ["--zzzzzz"], "unrecognized arguments: --zzzzzz (see --help)"),
])
def test_unknown_options_get_close_matches(capsys, command, argv, expected):
    """The close matches that config keys had, for command-line typos too (every command of the shared parser)."""
    assert expected in usage_error(capsys, ["--demo", *argv], command)


def test_old_spellings_still_work_beside_the_close_matches(tmp_path):
    o = cli.parse("train", ["--demo", "--snaphot-prefix", str(tmp_path / "p"), "--snaphost_interval", "2"])
    assert o.snapshot_prefix == str(tmp_path / "p") and o.snapshot_interval == 2.0


#: options whose absence does something the reader must be told (their --help says "default: ...")
SAYS_WHAT_HAPPENS_WITHOUT = {"demo_dir", "modes", "workers", "momentum", "weight_decay", "snapshot_prefix",
                             "snapshot_interval", "monitor_mode", "on_nonfinite", "val_batch_size", "result_file",
                             "timeout", "epochs"}


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_shows_the_default_of_every_option(command):
    """Every option with a default shows it in --help (--optimizer, --min-lr, --max-lr showed none); a switch that is
    on by default says so; the options in SAYS_WHAT_HAPPENS_WITHOUT say what happens without them."""
    p = cli.build_parser(command)
    full = " ".join(p.format_help().split())
    checked = 0
    for action in p._actions:
        if action.dest == "help" or isinstance(action, argparse._StoreTrueAction):
            continue
        text = " ".join(p._get_formatter()._get_help_string(action).split())
        assert action.help, action.option_strings  # argparse prints nothing, not even the default, for help=None
        default = action.pixelz_default
        if isinstance(action, argparse.BooleanOptionalAction):
            assert default is False or "default" in text, (action.option_strings, text)
        elif default not in (None, {}):
            assert f"(default: {default})" in text, (action.option_strings, text)
            checked += 1
        elif action.dest in SAYS_WHAT_HAPPENS_WITHOUT:
            assert "default" in text, (action.option_strings, text)
    assert checked >= 4
    if command == "train":
        assert "(default: no snapshots" in full and "--keep-last K keep only the K newest" in full
        assert "(default: 3)" in " ".join(p._get_formatter()._get_help_string(p._option_string_actions[
            "--keep-last"]).split())


def test_seed_sets_the_initial_weights_of_a_users_model(tmp_path):
    """--seed's help says it seeds the model's initial weights, a --model factory's too: the same seed, the same
    weights; another seed, others."""
    def weights(seed):
        o = cli.parse("train", ["--model", "pixelz_dist.demo:TinySegNet", "--dataset", "engine_helpers:make_data",
                                "--iters", "1", "--seed", str(seed)])
        return build_dataset_and_model(o)[0].head.weight.detach().clone()

    assert torch.equal(weights(3), weights(3)) and not torch.equal(weights(3), weights(4))


def test_keep_last_defaults_to_3_and_0_keeps_every_snapshot(tmp_path):
    from pixelz_dist.cli.checks import train_model_keywords
    from pixelz_dist.train import main

    assert cli.parse("train", ["--demo"]).keep_last == 3
    assert train_model_keywords(vars(cli.parse("train", ["--demo", "--keep-last", "0"])))["keep_last"] is None
    run = ["--model", "engine_helpers:LinReg", "--dataset", "engine_helpers:make_data", "--batch-size", "2",
           "--iters", "6", "--snapshot-interval", "1", "--workers", "0", "--device", "cpu", "--no-curves"]
    from pixelz_dist.checkpoint.file_format import list_snapshots

    assert main([*run, "--snapshot-prefix", str(tmp_path / "a" / "s")]) == 0
    assert [it for it, _ in list_snapshots(str(tmp_path / "a" / "s"))] == [6, 5, 4]  # the final one among them
    assert main([*run, "--snapshot-prefix", str(tmp_path / "b" / "s"), "--keep-last", "0"]) == 0
    assert [it for it, _ in list_snapshots(str(tmp_path / "b" / "s"))] == [6, 5, 4, 3, 2, 1]


def test_a_run_without_snapshot_prefix_warns_once_that_it_saves_nothing(tmp_path, caplog, monkeypatch):
    from pixelz_dist.train import main

    monkeypatch.chdir(tmp_path)
    caplog.set_level("WARNING", logger="pixelz_dist")
    assert main(["--model", "engine_helpers:LinReg", "--dataset", "engine_helpers:make_data", "--iters", "2",
                 "--workers", "0", "--device", "cpu"]) == 0
    warned = [r.getMessage() for r in caplog.records if "saves nothing" in r.getMessage()]
    assert warned == ["no snapshot_prefix (--snapshot-prefix): this run saves nothing, no snapshot, not even a final "
                      "one, so it cannot be resumed. HINT: pass --snapshot-prefix DIR/NAME (train_model("
                      "snapshot_prefix='DIR/NAME'))"]
    assert os.listdir(tmp_path) == []


def test_the_demo_snapshots_periodically_and_checks_its_arguments_before_writing_images(tmp_path, capsys):
    from pixelz_dist.train import main

    assert cli.parse("train", ["--demo"]).snapshot_interval == 1.0  # every epoch
    assert cli.parse("train", ["--demo", "--iters", "50"]).snapshot_interval == 10.0
    assert cli.parse("train", ["--demo", "--snapshot-interval", "3"]).snapshot_interval == 3.0
    assert cli.parse("train", ["--model", "m:f", "--dataset", "d:f", "--iters", "5"]).snapshot_interval is None
    with pytest.raises(SystemExit) as e:
        main(["--demo", "--demo-dir", str(tmp_path / "demo"), "--batch-size", "0", "--scheduler", "onecycle"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --batch-size must be >= 1, got 0\n"
    assert not (tmp_path / "demo").exists()
