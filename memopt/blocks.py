"""Which modules are planning units: the user's patterns, or the model's repeated blocks.

A planning unit is one call of a module. A module the step calls several times (a weight-shared layer, as
in ALBERT or a looped/recurrent-depth model) is that many units, named ``path#0``, ``path#1``, ... in call
order; the profiler finds them while it runs the step (``call_name``, ``split_name``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

__all__ = ["NoRepeatedBlocks", "call_name", "shared_blocks", "select_units", "split_name", "units_for_plan"]


class NoRepeatedBlocks(ValueError):
    """Automatic unit selection found no repeated blocks in the model's structure."""


def call_name(path: str, call: int) -> str:
    """The unit name of one call of a module called several times per step: ``"path#call"``."""
    return f"{path}#{call}"


def split_name(name: str) -> tuple[str, int | None]:
    """``(module path, call index)`` of a unit name; the call index is None for a module called once."""
    path, sep, call = name.rpartition("#")
    if sep and call.isdigit():
        return path, int(call)
    return name, None


def select_units(model: nn.Module, patterns: list[str] | None = None,
                 calls: Callable[[], dict[str, int]] | None = None) -> list[tuple[str, nn.Module]]:
    """Return ``(path, module)`` of every planning unit, in registration (forward) order.

    Args:
        model (nn.Module): the model.
        patterns (list[str] | None): ``fnmatch`` patterns of module paths; None picks automatically:
            the children of ``nn.ModuleList``s of the most common class (an encoder-decoder's encoder and
            decoder blocks together); else, when ``calls`` is given,
            the blocks the step calls several times (``shared_blocks``); else the children of the largest
            ``nn.Sequential``.
        calls (Callable[[], dict[str, int]] | None): calls per module path in one forward, computed only
            when needed (a forward of the model costs time).

    Raises:
        ValueError: a pattern matches nothing, units nest, or no repeated blocks were found
            (``NoRepeatedBlocks``).
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if patterns is not None:
        chosen = []
        for pattern in patterns:
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                sample = ", ".join(n for n, _ in named[:8])
                raise ValueError(f"unit pattern {pattern!r} matches no module; module paths look like: {sample}")
            chosen.extend(h for h in hits if h[0] not in {c[0] for c in chosen})
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen.sort(key=lambda item: order[item[0]])
    else:
        chosen = _module_list_blocks(named)
        if not chosen and calls is not None:
            chosen = shared_blocks(model, calls())
        if not chosen:
            chosen = _sequential_children(model, named)
        if not chosen:
            how = "" if calls is None else ", and no block is called more than once per step"
            raise NoRepeatedBlocks(
                f"found no repeated blocks in {type(model).__name__}{how}; pass MemoptConfig(units=[...]) with the "
                f"module paths to plan, e.g. units={_example(named)!r}")
    names = [n for n, _ in chosen]
    for i, outer in enumerate(names):
        for inner in names[i + 1:]:
            if inner.startswith(outer + "."):
                raise ValueError(f"units must not nest: {inner!r} lies inside {outer!r}; list only one of them")
    if len({id(m) for _, m in chosen}) != len(chosen):
        raise ValueError(f"a module is reachable under several unit paths in {names}; list each module once")
    return chosen


def _module_list_blocks(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The children of ``nn.ModuleList``s of the class most of them have (at least 2 in all; ties go to the
    outermost class): an encoder-decoder's encoder and decoder blocks (T5) are both planned."""
    found: dict[type, list[tuple[str, nn.Module]]] = {}
    for name, module in named:
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                found.setdefault(type(child), []).append((f"{name}.{i}", child))
    candidates = [blocks for blocks in found.values() if len(blocks) >= 2]
    if not candidates:
        return []
    best = max(candidates, key=lambda blocks: (len(blocks), -min(n.count(".") for n, _ in blocks)))
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(best, key=lambda item: order[item[0]])


def _sequential_children(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        return list(model.named_children()) if len(model) >= 2 else []
    candidates = [(n, m) for n, m in named if isinstance(m, nn.Sequential) and len(m) >= 2]
    if not candidates:
        return []
    prefix, sequential = max(candidates, key=lambda item: len(item[1]))
    return [(f"{prefix}.{n}", m) for n, m in sequential.named_children()]


def _example(named: list[tuple[str, nn.Module]]) -> list[str]:
    """A units argument built from paths the model has: its largest container's children, else its first
    children."""
    containers = [(n, m) for n, m in named if isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and len(m)]
    if containers:
        name, _ = max(containers, key=lambda item: len(item[1]))
        return [f"{name}.*"]
    top = [n for n, _ in named if "." not in n]
    return top[:2] or ["<module path>"]


def shared_blocks(model: nn.Module, calls: dict[str, int]) -> list[tuple[str, nn.Module]]:
    """The blocks a step calls most often (at least twice), outermost first found: the shared layer of a
    weight-shared model (ALBERT runs one layer ``num_hidden_layers`` times), the block of a looped model.
    A block has submodules of its own: a shared activation or a single linear is no block.

    Args:
        model (nn.Module): the model.
        calls (dict[str, int]): calls per module path in one forward.

    Returns:
        list[tuple[str, nn.Module]]: the blocks; empty when none is called twice.
    """
    named = [(name, module) for name, module in model.named_modules()
             if name and not isinstance(module, _CONTAINERS) and next(module.children(), None) is not None]
    most = max((calls.get(n, 0) for n, _ in named), default=0)
    chosen: list[tuple[str, nn.Module]] = []
    if most < 2:
        return chosen
    for name, module in named:
        if calls.get(name, 0) == most and not any(name.startswith(c + ".") for c, _ in chosen):
            chosen.append((name, module))
    return chosen


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def units_for_plan(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """``(unit name, module)`` for each unit a plan names, in its order.

    Raises:
        ValueError: a name is no module of the model, units nest, or a shared module's calls are not
            numbered 0, 1, ... in order.
    """
    out, calls = [], {}
    modules = dict(model.named_modules())
    for name in names:
        path, call = split_name(name)
        module = modules.get(path) if path else None
        if module is None:
            raise ValueError(
                f"the plan is for units {names[:4]}... but {type(model).__name__} has no module {path!r}; make the "
                "plan for this model (memopt.profile + memopt.plan) with the same MemoptConfig(units=...)")
        expected = calls.get(path, 0)
        if (call or 0) != expected or (call is None and expected):
            raise ValueError(f"the plan's unit {name!r} is out of order: the calls of {path!r} must be numbered "
                             f"{path}#0, {path}#1, ... in forward order")
        calls[path] = expected + 1
        out.append((name, module))
    paths = sorted(calls)
    for i, outer in enumerate(paths):
        for inner in paths[i + 1:]:
            if inner.startswith(outer + "."):
                raise ValueError(f"the plan's units nest: {inner!r} lies inside {outer!r}")
    return out
