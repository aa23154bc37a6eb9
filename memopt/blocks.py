"""Which modules are planning units: the user's patterns, or the model's repeated blocks."""

from __future__ import annotations

import fnmatch
from collections import Counter

from torch import nn

__all__ = ["select_units"]


def select_units(model: nn.Module, patterns: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Return ``(path, module)`` of every planning unit, in registration (forward) order.

    Args:
        model (nn.Module): the model.
        patterns (list[str] | None): ``fnmatch`` patterns of module paths; None picks automatically:
            the blocks of the largest ``nn.ModuleList`` of same-class modules, else the children of a
            top-level ``nn.Sequential``.

    Raises:
        ValueError: a pattern matches nothing, units nest, or no repeated blocks were found.
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
        chosen = _repeated_blocks(model, named)
    names = [n for n, _ in chosen]
    for i, outer in enumerate(names):
        for inner in names[i + 1:]:
            if inner.startswith(outer + "."):
                raise ValueError(f"units must not nest: {inner!r} lies inside {outer!r}; list only one of them")
    if len({id(m) for _, m in chosen}) != len(chosen):
        raise ValueError(f"a module is reachable under several unit paths in {names}; list each module once")
    return chosen


def _repeated_blocks(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    best: list[tuple[str, nn.Module]] = []
    for name, module in named:
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = Counter(type(child) for child in module)
            kind, count = kinds.most_common(1)[0]
            if count >= 2 and count > len(best):
                best = [(f"{name}.{i}", child) for i, child in enumerate(module) if type(child) is kind]
    if best:
        return best
    sequential = model if isinstance(model, nn.Sequential) else None
    if sequential is None:
        candidates = [(n, m) for n, m in named if isinstance(m, nn.Sequential) and len(m) >= 2]
        if candidates:
            prefix, sequential = max(candidates, key=lambda item: len(item[1]))
            return [(f"{prefix}.{n}", m) for n, m in sequential.named_children()]
    if sequential is not None and len(sequential) >= 2:
        return [(n, m) for n, m in sequential.named_children()]
    raise ValueError(
        f"found no repeated blocks in {type(model).__name__}; pass MemoptConfig(units=[...]) with the module "
        "paths to plan, e.g. units=['encoder.layers.*']"
    )
