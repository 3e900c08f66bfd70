"""config.py and imports.py: TOML written and read back, merge rules, literal KEY=VALUE parsing."""

import pytest

from pixelz_dist.cli.config import merge, save_config, tomllib
from pixelz_dist.cli.imports import parse_assignments, parse_literal
from pixelz_dist.errors import ConfigError


def test_dump_toml_round_trips_through_tomllib(tmp_path):
    values = {"name": 'a "quoted" path\\with\nnewline é', "n": 3, "x": 1e-7, "big": float("inf"), "on": False,
              "dirs": ["a", "b"], "unset": None, "empty": {}, "param_lr": {"conv.*": 0.1, "head": 0},
              "model_arg": {"width": 8, "act": None}}
    path = save_config(str(tmp_path / "sub" / "c.toml"), values, "header line")
    text = open(path).read()
    assert text.startswith("# header line\n") and "# unset = (not set)" in text
    loaded = tomllib.loads(text)
    assert {k: loaded[k] for k in ("name", "n", "x", "big", "on", "dirs", "param_lr")} == {
        k: values[k] for k in ("name", "n", "x", "big", "on", "dirs", "param_lr")}
    assert loaded["model_arg"] == ["width=8", "act=None"]  # None has no TOML form: KEY=literal strings instead
    assert parse_assignments(loaded["model_arg"], "--model-arg") == values["model_arg"]
    assert "unset" not in loaded and "empty" not in loaded
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.toml"]  # no temporary file left


def test_merge_precedence_and_exclusive_groups():
    defaults = {"epochs": None, "iters": None, "lr": 0.1, "t": {}}
    flags = {"epochs": "--epochs", "iters": "--iters", "lr": "--lr", "t": "--t"}
    values, notes = merge(defaults, {"epochs": 3, "lr": 0.2, "t": {"a": 1}}, {"iters": 5, "t": {"b": 2}},
                          [("epochs", "iters")], flags)
    assert values == {"epochs": None, "iters": 5, "lr": 0.2, "t": {"a": 1, "b": 2}}
    assert notes == ["the command line's --iters replaces the config file's epochs"]
    with pytest.raises(ConfigError, match="--epochs and --iters conflict"):
        merge(defaults, {}, {"epochs": 1, "iters": 2}, [("epochs", "iters")], flags)


def test_literals():
    assert [parse_literal(v) for v in ("3", "0.5", "True", "None", "[1, 2]", "'x'", "relu", "a b")] == [
        3, 0.5, True, None, [1, 2], "x", "relu", "a b"]
    assert parse_assignments(["a=1", "b = x=y"], "--model-arg") == {"a": 1, "b": " x=y"}
    with pytest.raises(ConfigError, match="--model-arg expects KEY=VALUE, got 'x', '=1'"):
        parse_assignments(["x", "=1"], "--model-arg")
