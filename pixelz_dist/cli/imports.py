"""Resolving ``package.module:name`` specs and ``key=value`` arguments given on the command line or in a config.

Every failure is a :class:`~pixelz_dist.errors.ConfigError` whose one-line message names the option, the value
received and the fix, so the command line can print it without a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["call_factory", "parse_assignments", "parse_literal", "resolve_object"]


def resolve_object(spec: str, option: str) -> Any:
    """The object named by ``"package.module:attribute"`` (``attribute`` may be dotted: ``module:Class.create``).

    The current directory is searched like ``python -m`` does, also from the ``pixelz-train`` console script.

    Raises:
        ConfigError: a malformed spec, a module that does not import, or a name that is not in it.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{option} {spec!r}: expected 'package.module:name' (e.g. 'mymodels.unet:build')")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{option} {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). "
                          f"HINT: is it installed or in the current directory ({os.getcwd()})?") from e
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name + "".join("." + p for p in attr.split(".")[:i])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{option} {spec!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def call_factory(spec: str, option: str, kwargs: Mapping[str, Any], check: Callable[[Any], bool],
                 expected: str) -> Any:
    """Resolve ``spec``, call it with ``kwargs`` and check what it returned.

    Raises:
        ConfigError: the spec does not resolve, is not callable, does not take these keyword arguments, or returned
            something that fails ``check`` (``expected`` says what it should be).
    """
    factory = resolve_object(spec, option)
    if not callable(factory):
        raise ConfigError(f"{option} {spec!r} is a {type(factory).__name__}, not a callable that returns {expected}")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{option} {spec!r} cannot be called with {dict(kwargs)}: {e}") from e
    except ValueError:  # no signature (some builtins): let the call itself decide
        pass
    made = factory(**kwargs)
    if not check(made):
        raise ConfigError(f"{option} {spec!r} returned {type(made).__name__}, not {expected}")
    return made


def parse_literal(text: str) -> Any:
    """A Python literal (``3``, ``0.5``, ``True``, ``None``, ``[1, 2]``, ``'a'``); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_assignments(items: Iterable[str], option: str, literal: bool = True) -> dict[str, Any]:
    """``["width=16", "name=unet"]`` -> ``{"width": 16, "name": "unet"}`` (values as Python literals, in order).

    Raises:
        ConfigError: an item without ``=`` or with an empty key (all such items listed).
    """
    out: dict[str, Any] = {}
    bad = []
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            bad.append(item)
            continue
        out[key] = parse_literal(value) if literal else value
    if bad:
        raise ConfigError(f"{option} expects KEY=VALUE, got {', '.join(map(repr, bad))}")
    return out
