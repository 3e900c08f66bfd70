"""Run configurations as TOML files: load and check against the options, merge with the command line, save.

Keys are the long option names with ``-`` written ``_`` (``--batch-size`` -> ``batch_size``); repeatable
``KEY=VALUE`` options (``--model-arg``, ``--dataset-arg``, ``--param-lr``) are tables; an option that takes several
values takes a list, or one value as on the command line (``crop = 512``). Precedence: the command line,
then the file, then the defaults. Options that exclude each other (``epochs`` / ``iters``; ``demo`` / ``model``;
``demo`` / ``data`` / ``dataset``) may not both come from one source; when the command line sets one of them, the
file's others are dropped (``--iters 100`` on the command line replaces the file's ``epochs``).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from ..callbacks.base import Callback
from ..distributed.env import read_env
from ..errors import ConfigError
from ..fileio import atomic_write
from .imports import parse_assignments

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["ConfigSaver", "OptionSpec", "check_table", "dump_toml", "load_toml", "merge", "save_config"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptionSpec:
    """What a config value of one option must be. ``kind``: ``"flag"`` (bool), ``"list"``, ``"table"`` (KEY=VALUE
    pairs) or ``"scalar"``; ``type``: the element / scalar type (int, float or str)."""

    key: str
    flag: str
    kind: str
    type: type = str
    choices: tuple | None = None


def load_toml(path: str) -> dict:
    """The TOML file at ``path`` as a dict. Raises ConfigError: missing or not valid TOML (with the position)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"--config {path!r}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path!r} is not valid TOML: {e}") from e


def _convert(spec: OptionSpec, value: Any) -> Any:
    """The option's value from a TOML value, or raise ValueError saying what was expected."""
    if spec.kind == "flag":
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if spec.kind == "table":
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return parse_assignments(value, spec.key)
        raise ValueError("a table (key = value) or a list of 'KEY=VALUE' strings")
    if spec.kind == "list":
        if not isinstance(value, list):
            value = [value]  # as on the command line: `crop = 512` is `--crop 512`
        return [_scalar(spec, v) for v in value]
    return _scalar(spec, value)


def _scalar(spec: OptionSpec, value: Any) -> Any:
    ok = (isinstance(value, int) and not isinstance(value, bool) if spec.type is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if spec.type is float else
          isinstance(value, str))
    if not ok:
        raise ValueError({int: "an integer", float: "a number", str: "a string"}.get(spec.type, spec.type.__name__))
    if spec.choices and value not in spec.choices:
        raise ValueError(f"one of {', '.join(map(str, spec.choices))}")
    return float(value) if spec.type is float else value


def check_table(table: dict, specs: dict[str, OptionSpec], source: str, ignored=frozenset()) -> dict:
    """The options set by a config file, converted; keys in ``ignored`` (another command's) are dropped.

    Raises:
        ConfigError: unknown keys (with close matches) and values of the wrong type, all listed in one message.
    """
    out, problems = {}, []
    for key, value in table.items():
        if key in ignored:
            continue
        spec = specs.get(key) or specs.get(key.replace("-", "_"))
        if spec is None:
            close = difflib.get_close_matches(key, list(specs), n=3)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                                       if close else ""))
            continue
        try:
            out[spec.key] = _convert(spec, value)
        except (ValueError, ConfigError) as e:
            problems.append(f"{spec.key} must be {e}, got {value!r}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return out


def merge(defaults: dict, from_file: dict, from_cli: dict, exclusive: list[tuple[str, ...]],
          flags: dict[str, str], dependents: dict[str, tuple[str, ...]] | None = None) -> tuple[dict, list[str]]:
    """Defaults, overridden by the file, overridden by the command line; returns ``(values, notes)``.

    A file option dropped for an exclusive command-line one takes its ``dependents`` with it (``model_arg`` goes
    with ``model``).

    Raises:
        ConfigError: two options of one exclusive group set by the same source.
    """
    notes = []
    file_values = dict(from_file)
    for group in exclusive:
        for source, values, name in (("the command line", from_cli, flags.get), ("the config file", file_values,
                                                                                   str)):
            given = [k for k in group if _is_set(values, k)]
            if len(given) > 1:
                raise ConfigError(f"{' and '.join(name(k) for k in given)} conflict (both set on {source}); "
                                  "give one of them")
        on_cli = [k for k in group if _is_set(from_cli, k)]
        dropped = [k for k in group if on_cli and k not in on_cli and _is_set(file_values, k)]
        for k in dropped:
            for d in (k, *(dependents or {}).get(k, ())):
                file_values.pop(d, None)
            notes.append(f"the command line's {flags[on_cli[0]]} replaces the config file's {k}")
    values = dict(defaults)
    values.update(file_values)
    for key, value in from_cli.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):  # tables merge key by key
            value = {**values[key], **value}
        values[key] = value
    return values, notes


def _is_set(values: dict, key: str) -> bool:
    value = values.get(key)
    return value is not None and value is not False and value != {} and value != []


# -- writing --------------------------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def _representable(value: Any) -> bool:
    try:
        _toml_value(value)
    except TypeError:
        return False
    return True


def dump_toml(values: dict, header: str = "") -> str:
    """``values`` as TOML: scalars and lists first, then one table per dict. ``None`` (not set) becomes a comment;
    a dict holding values TOML cannot write (``None``, tuples of tuples...) is written as ``'KEY=repr'`` strings."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = []
    for key, value in values.items():  # top-level keys first: in TOML they must come before any [table]
        if value is None:
            lines.append(f"# {key} = (not set)")
        elif not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
        elif value and all(_representable(v) for v in value.values()):
            tables.append(key)
        elif value:
            lines.append(f"{key} = {_toml_value([f'{k}={v!r}' for k, v in value.items()])}")
    for key in tables:
        lines.append(f"\n[{key}]")
        lines += [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in values[key].items()]
    return "\n".join(lines) + "\n"


def save_config(path: str, values: dict, header: str = "") -> str:
    """Write ``dump_toml(values)`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(dump_toml(values, header))
    return path


class ConfigSaver(Callback):
    """Writes the resolved configuration when training starts (rank 0, once): after every argument, the snapshot
    prefix and any snapshot to resume were checked, so an invocation that fails never rewrites a run's saved
    configuration."""

    def __init__(self, path: str, values: dict, header: str = ""):
        self.path, self.values, self.header = path, values, header
        self.saved = False

    def on_train_start(self, state):
        if not self.saved and read_env().is_main:
            logger.info("configuration saved to %s", save_config(self.path, self.values, self.header))
        self.saved = True
