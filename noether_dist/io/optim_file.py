"""Optimizer state dicts from consolidated files, matched to a live optimizer by parameter name.

Three layouts are read:

- ours: ``state`` and each group's ``params`` keyed by parameter name;
- Noether's (``OptimizerWrapper.state_dict()``): keyed by index, with ``param_idx_to_name``
  and named groups (``default``, ``weight_decay=0``, ...). Its index order is the order of its
  merged groups, not ``model.parameters()`` order, so indices are read only through
  ``param_idx_to_name``;
- torch's (``Optimizer.state_dict()``): keyed by index, no names. The indices are then read
  the way torch itself reads them (the target optimizer's own order), and only when the
  file's groups have exactly the target's group sizes; anything else is ambiguous.

:func:`match_optimizer_file` checks everything before anything is applied (names missing
or unknown, the shape of every state tensor against its parameter's global shape, group
settings that cannot land on one group) and raises :class:`StateMismatchError` naming
what does not fit. Its result has one group per target group (the file's settings of the
group its parameters came from), keyed by name, ready for ``set_optimizer_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import StateMismatchError

__all__ = ["PARAM_IDX_TO_NAME", "match_optimizer_file", "names_from_file", "to_noether_layout"]

PARAM_IDX_TO_NAME = "param_idx_to_name"
"""Key of Noether's index -> parameter name mapping in its optimizer files."""
_STATE, _GROUPS, _PARAMS = "state", "param_groups", "params"


def _groups(osd: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    groups = osd.get(_GROUPS)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get(_PARAMS), list)
                                                for g in groups):
        raise StateMismatchError(f"{what} is not an optimizer state dict: it needs 'param_groups', "
                                 "a list of dicts with 'params'")
    return groups


def names_from_file(osd: Mapping[str, Any], what: str = "optimizer file") -> dict[str, Any] | None:
    """The file keyed by parameter name when the file itself says the names (ours, or
    Noether's ``param_idx_to_name``); None for torch's index-keyed files without names."""
    groups = _groups(osd, what)
    state = osd.get(_STATE) or {}
    keys = [p for g in groups for p in g[_PARAMS]] + list(state)
    if all(isinstance(k, str) for k in keys):
        return {_STATE: dict(state), _GROUPS: [dict(g) for g in groups]}
    mapping = osd.get(PARAM_IDX_TO_NAME)
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping) or not all(isinstance(k, int) and isinstance(v, str) for k, v in mapping.items()):
        raise StateMismatchError(f"{what}: {PARAM_IDX_TO_NAME} must map parameter indices to names")
    if len(set(mapping.values())) != len(mapping):
        raise StateMismatchError(f"{what}: {PARAM_IDX_TO_NAME} names a parameter twice")
    unnamed = sorted({k for k in keys if not isinstance(k, int) or k not in mapping}, key=str)
    if unnamed:
        raise StateMismatchError(f"{what}: parameter indices {unnamed} have no name in {PARAM_IDX_TO_NAME}")
    return {_STATE: {mapping[i]: v for i, v in state.items()},
            _GROUPS: [{**g, _PARAMS: [mapping[i] for i in g[_PARAMS]]} for g in groups]}


def _positional(osd: Mapping[str, Any], target_groups: list[list[str]], what: str) -> dict[str, Any]:
    """torch's own rule for index-keyed files: index i is the target optimizer's i-th
    parameter, provided the group sizes match exactly."""
    groups = _groups(osd, what)
    have = [len(g[_PARAMS]) for g in groups]
    want = [len(t) for t in target_groups]
    if have != want:
        raise StateMismatchError(
            f"{what} keys optimizer state by parameter index and has no {PARAM_IDX_TO_NAME}, and its param groups "
            f"(sizes {have}) are not the optimizer's (sizes {want}): which state belongs to which parameter cannot "
            "be proven; save it with names (Noether's OptimizerWrapper or noether_dist) or build the optimizer "
            "with the same param groups")
    order = [n for t in target_groups for n in t]
    index = {i: order[pos] for pos, i in enumerate(p for g in groups for p in g[_PARAMS])}
    bad = sorted({k for k in osd.get(_STATE) or {} if k not in index}, key=str)
    if bad or len(index) != len(order):
        raise StateMismatchError(f"{what}: optimizer state for parameter indices {bad or 'repeated'} that are "
                                 "in no param group")
    return {_STATE: {index[i]: v for i, v in (osd.get(_STATE) or {}).items()},
            _GROUPS: [{**g, _PARAMS: [index[i] for i in g[_PARAMS]]} for g in groups]}


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != _PARAMS}


def _label(group: Mapping[str, Any], index: int) -> str:
    return repr(group["name"]) if isinstance(group.get("name"), str) else f"#{index}"


def match_optimizer_file(osd: Mapping[str, Any], target: Mapping[str, Any], shapes: Mapping[str, torch.Size],
                         what: str = "optimizer file") -> dict[str, Any]:
    """Match a file's optimizer state dict to the optimizer whose name-keyed state dict is
    ``target`` (``get_optimizer_state_dict``), given every parameter's global shape.

    Returns a name-keyed full state dict with the target's groups in the target's order,
    each with the file's settings of the group its parameters were in (settings the file
    lacks keep the target's values). Raises StateMismatchError, before anything is applied,
    when the mapping is ambiguous, a name is missing or unknown, a state tensor's shape is
    not its parameter's, or one target group would need the settings of two file groups
    that differ."""
    target_groups = [list(g[_PARAMS]) for g in target[_GROUPS]]
    named = names_from_file(osd, what)
    if named is None:
        named = _positional(osd, target_groups, what)
    wanted = [n for t in target_groups for n in t]
    owner: dict[str, int] = {}
    for gi, group in enumerate(named[_GROUPS]):
        for name in group[_PARAMS]:
            if name in owner:
                raise StateMismatchError(f"{what}: parameter {name!r} is in two param groups")
            owner[name] = gi
    state = named[_STATE]
    missing = sorted(set(wanted) - set(owner))
    unknown = sorted((set(owner) | set(state)) - set(wanted))
    no_state = sorted(n for n in target.get(_STATE, {}) if n in owner and n not in state)
    problems = []
    if missing:
        problems.append(f"parameters of the optimizer missing in the file: {', '.join(missing)}")
    if unknown:
        problems.append(f"parameters in the file the optimizer does not have: {', '.join(unknown)}")
    if no_state:
        problems.append(f"parameters without optimizer state in the file: {', '.join(no_state)}")
    for name in sorted(set(state) & set(wanted)):
        want = tuple(shapes.get(name, ()))
        for key, value in (state[name] or {}).items():
            # per-parameter tensors must have the parameter's (global) shape; 0-dim ones (step) are scalars
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != want:
                problems.append(f"{key} of {name} has shape {list(value.shape)}, the parameter {list(want)}")
    out_groups = []
    if not problems:
        for ti, (names, tgroup) in enumerate(zip(target_groups, target[_GROUPS])):
            sources = sorted({owner[n] for n in names})
            settings = [_settings(named[_GROUPS][gi]) for gi in sources]
            if any(s != settings[0] for s in settings[1:]):
                labels = ", ".join(_label(named[_GROUPS][gi], gi) for gi in sources)
                problems.append(f"param group {ti} of the optimizer holds parameters of the file's groups {labels}, "
                                "whose settings differ; build the optimizer with the same param groups")
                continue
            out_groups.append({**_settings(tgroup), **(settings[0] if settings else {}), _PARAMS: names})
    if problems:
        raise StateMismatchError(f"{what} does not match the optimizer: {'; '.join(problems)}")
    return {_STATE: {n: state[n] for n in wanted if n in state}, _GROUPS: out_groups}


def to_noether_layout(osd: Mapping[str, Any], what: str = "optimizer state") -> dict[str, Any]:
    """A name-keyed optimizer state dict in Noether's layout: keyed by index in group order,
    with ``param_idx_to_name``, so that Noether's ``OptimizerWrapper.load_state_dict`` (and
    our reader) match it by name."""
    named = names_from_file(osd, what)
    if named is None:
        raise StateMismatchError(f"{what} is not keyed by parameter name")
    order = [n for g in named[_GROUPS] for n in g[_PARAMS]]
    index = {n: i for i, n in enumerate(order)}
    return {_STATE: {index[n]: v for n, v in named[_STATE].items()},
            _GROUPS: [{**g, _PARAMS: [index[n] for n in g[_PARAMS]]} for g in named[_GROUPS]],
            PARAM_IDX_TO_NAME: dict(enumerate(order))}
