"""Per-parameter learning rates: turn a ``{key: lr}`` mapping into deterministic optimizer param groups."""

from __future__ import annotations

import difflib
import fnmatch
import math
import numbers
from collections.abc import Mapping

from torch import nn

from ..errors import ConfigError

__all__ = ["make_param_groups"]

DEFAULT_GROUP_NAME = "default"

_MATCHING_HINT = (
    "a key matches a parameter by its exact name ('conv12.weight'), by an fnmatch glob over the full name "
    "('conv12.*', '*.bias'; '*' also crosses dots), or as a module prefix ('encoder.block1' takes every "
    "parameter under that module); only trainable parameters (requires_grad=True) are grouped"
)

# Keep error messages readable for large models.
_MAX_LISTED = 5


def make_param_groups(model: nn.Module, custom_lr: Mapping[str, float] | None = None, *,
                      no_decay_norm_bias: bool = False) -> list[dict]:
    """Build optimizer param groups that give chosen parameters their own learning rate (and, on request, no weight
    decay to biases and normalisation layers).

    Every key of ``custom_lr`` becomes one group ``{"name": key, "lr": lr, "params": [...]}``, in the
    order of ``custom_lr``. All remaining trainable parameters go into a final
    ``{"name": "default", "params": [...]}`` group without an ``"lr"`` entry, so the optimizer's own
    ``lr`` applies to them; that group is omitted when it would be empty. Parameters inside every group
    follow ``model.named_parameters()`` order, so the same model and mapping always give the same
    structure and an optimizer ``state_dict`` saved in one run loads in the next.

    A key matches a parameter name when it is

    * the exact name (``"conv12.weight"``),
    * an :func:`fnmatch.fnmatchcase` glob over the full name (``"conv12.*"``, ``"*.bias"``; ``*`` also
      matches dots), or
    * a module prefix (``"conv12"``, ``"encoder.block1"``): the name equals the key or starts with
      ``key + "."``.

    Precedence, when several keys match the same parameter: a key equal to the parameter's exact name
    wins; otherwise the first matching key in ``custom_lr``'s order wins. Tied (shared) parameters
    appear once, under their first name in ``named_parameters()``, and a key matching any of their names
    matches them. Frozen parameters (``requires_grad=False``) are left out of every group.

    With ``no_decay_norm_bias=True`` every group above is split in two: its parameters that are a bias
    (named ``bias`` or ``*.bias``) or belong to a normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm,
    GroupNorm, LayerNorm, LocalResponseNorm, RMSNorm) go into ``{"name": NAME + ".no_decay", "weight_decay":
    0.0, ...}`` right after it, the others stay in ``NAME`` with the optimizer's weight decay; the lr of
    ``NAME`` applies to both, and empty halves are left out. Decaying a bias or a norm's scale toward 0
    only constrains the layer's shift and scale, not its capacity; it hurts more than it regularises, the
    practice of most reference recipes (timm, torchvision's ``--norm-weight-decay 0``).

    Args:
        model: The module whose parameters are grouped.
        custom_lr: Mapping from key to learning rate (a real number ``>= 0``). ``None`` or an empty
            mapping gives a single default group holding every trainable parameter.
        no_decay_norm_bias: Give biases and normalisation parameters a weight decay of 0 (see above).
            False (the default) keeps the groups exactly as without it.

    Returns:
        A list of param group dicts, ready for any ``torch.optim`` optimizer. The extra ``"name"`` entry
        is kept by torch optimizers and appears in their ``state_dict``.

    Raises:
        ConfigError: If ``custom_lr`` is not a mapping, a key is not a non-empty string, an lr is not a
            finite number ``>= 0``, a key matches no trainable parameter (the message lists close
            matches), a key matches only frozen parameters, a key's every match is taken by a
            higher-precedence key, or the model has no trainable parameters. All bad keys are
            reported together in one error.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential()
        >>> model.add_module("backbone", torch.nn.Linear(4, 4))
        >>> model.add_module("head", torch.nn.Linear(4, 2))
        >>> groups = make_param_groups(model, {"head": 1e-2, "*.bias": 0.0})
        >>> [(g["name"], g.get("lr"), len(g["params"])) for g in groups]
        [('head', 0.01, 2), ('*.bias', 0.0, 1), ('default', None, 1)]
        >>> opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
        >>> [g["lr"] for g in opt.param_groups]
        [0.01, 0.0, 0.001]
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if custom_lr is None:
        custom_lr = {}
    if not isinstance(custom_lr, Mapping):
        raise ConfigError(f"custom_lr must be a mapping of key -> lr or None, got {type(custom_lr).__name__}")

    problems = _check_keys_and_lrs(custom_lr)
    keys = [k for k in custom_lr if isinstance(k, str) and k]

    # remove_duplicate=False yields every alias of a tied parameter, so a key written against the
    # "second" name of a shared weight still finds it; the parameter itself is grouped only once.
    params: list[nn.Parameter] = []
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in names_of:
            names_of[id(param)] = []
            params.append(param)
        names_of[id(param)].append(name)

    owner_of: dict[int, str | None] = {}  # id(param) -> winning key (None: default group)
    trainable_hits: dict[str, list[str]] = {k: [] for k in keys}
    frozen_hits: dict[str, list[str]] = {k: [] for k in keys}
    for param in params:
        names = names_of[id(param)]
        matching = [k for k in keys if any(_matches(k, n) for n in names)]
        for k in matching:
            (trainable_hits if param.requires_grad else frozen_hits)[k].append(names[0])
        if not param.requires_grad:
            continue
        exact = [k for k in matching if k in names]
        owner_of[id(param)] = exact[0] if exact else (matching[0] if matching else None)

    groups: list[dict] = []
    for key in keys:
        owned = [p for p in params if owner_of.get(id(p)) == key]
        if owned:
            groups.append({"name": key, "lr": custom_lr[key], "params": owned})
        elif frozen_hits[key] and not trainable_hits[key]:
            msg = (
                f"matches only frozen parameters (requires_grad=False): {_listing(frozen_hits[key])}; "
                "unfreeze them before building the optimizer or drop the key"
            )
            problems.append((key, msg))
        elif not trainable_hits[key]:
            close = _close_matches(key, names_of.values())
            suggestion = f"close matches: {_listing(close)}" if close else "no close matches"
            problems.append((key, f"matches no parameter; {suggestion}"))
        else:
            # Silently dropping the group would leave the user believing the lr is in effect.
            owner_by_name = {names_of[id(p)][0]: owner_of.get(id(p)) for p in params}
            taken_by = {owner_by_name[n] for n in trainable_hits[key]}
            msg = (
                f"every parameter it matches ({_listing(trainable_hits[key])}) was already taken by "
                f"higher-precedence key(s) {_listing([k for k in keys if k in taken_by])}; "
                "remove the key or make the patterns disjoint"
            )
            problems.append((key, msg))

    if problems:
        # A key can have two problems (bad lr and no match): count keys, list problems in custom_lr's order.
        position = {k: i for i, k in enumerate(custom_lr)}
        problems.sort(key=lambda problem: position[problem[0]])
        n_bad = len({k for k, _ in problems})
        lines = "".join(f"\n  - {k!r}: {text}" for k, text in problems)
        raise ConfigError(f"custom_lr has {n_bad} unusable key(s):{lines}\n({_MATCHING_HINT})")

    rest = [p for p in params if p.requires_grad and owner_of[id(p)] is None]
    if rest:
        groups.append({"name": DEFAULT_GROUP_NAME, "params": rest})
    if not groups:
        raise ConfigError(f"model {type(model).__name__} has no trainable parameters (all are frozen or absent)")
    if no_decay_norm_bias:
        groups = _split_no_decay(model, groups, names_of)
    return groups


#: Normalisation layers, whose weight and bias get no weight decay with no_decay_norm_bias (BatchNorm*,
#: SyncBatchNorm and InstanceNorm* all derive from _NormBase).
NORM_LAYERS = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                getattr(nn, "RMSNorm", None)) if t is not None)
NO_DECAY_SUFFIX = ".no_decay"


def _split_no_decay(model: nn.Module, groups: list[dict], names_of: dict[int, list[str]]) -> list[dict]:
    in_norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    out = []
    for group in groups:
        no_decay = [p for p in group["params"] if id(p) in in_norm
                    or any(n == "bias" or n.endswith(".bias") for n in names_of[id(p)])]
        taken = {id(p) for p in no_decay}
        decay = [p for p in group["params"] if id(p) not in taken]
        if decay:
            out.append({**group, "params": decay})
        if no_decay:
            out.append({**group, "name": group["name"] + NO_DECAY_SUFFIX, "params": no_decay, "weight_decay": 0.0})
    return out


def _check_keys_and_lrs(custom_lr: Mapping) -> list[tuple[object, str]]:
    problems = []
    for key, lr in custom_lr.items():
        if not isinstance(key, str) or not key:
            problems.append((key, "keys must be non-empty strings"))
            continue
        # bool is an Integral, but lr=True is almost certainly a mistake.
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
            problems.append((key, f"lr must be a finite number >= 0, got {lr!r}"))
    return problems


def _matches(key: str, name: str) -> bool:
    # fnmatchcase, not fnmatch: parameter names are case-sensitive on every OS.
    return name == key or name.startswith(key + ".") or fnmatch.fnmatchcase(name, key)


def _close_matches(key: str, all_names) -> list[str]:
    candidates = set()
    for names in all_names:
        for name in names:
            candidates.add(name)
            parts = name.split(".")
            candidates.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return difflib.get_close_matches(key, sorted(candidates), n=_MAX_LISTED, cutoff=0.6)


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
