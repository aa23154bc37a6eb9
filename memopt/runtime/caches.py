"""A replay sees a cache argument as it was when the forward began, and never changes the caller's.

A unit that is passed a Hugging Face ``Cache`` (a prefix cache, or a cache a user turned on for training)
appends its keys and values to it in the forward. Replaying the unit against the same object would append
them a second time. At the forward, ``CacheSnapshots`` takes a structural copy of each cache argument: new
cache and layer objects holding the same tensors (no tensor is copied). A replay runs on a fresh copy of
that snapshot, whose updates rebind the copy's tensors and leave the caller's cache alone. A cache that is
updated in place (a static cache) cannot be shielded this way; the replay then stops with an error
naming the unit, before the caller could use a changed cache.
"""

from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_map

__all__ = ["CacheSnapshots", "changed", "copy_caches", "is_cache"]


def is_cache(value: object) -> bool:
    """Whether ``value`` is a Hugging Face cache (``transformers.cache_utils.Cache`` or a subclass), told by
    its class hierarchy so that transformers is never imported here."""
    return any(cls.__name__ == "Cache" and cls.__module__.startswith("transformers")
               for cls in type(value).__mro__)


def _copy(cache):
    """New cache and layer objects over the same tensors."""
    clone = copy.copy(cache)
    for name, value in vars(cache).items():
        if is_cache(value):
            setattr(clone, name, _copy(value))
        elif isinstance(value, list):
            setattr(clone, name, [v if isinstance(v, torch.Tensor) or not hasattr(v, "__dict__") else copy.copy(v)
                                  for v in value])
        elif isinstance(value, dict):
            setattr(clone, name, dict(value))
    return clone


def copy_caches(sample):
    """``sample`` with every cache in it replaced by a structural copy, so that a profiled step, which appends to
    a cache like any forward, leaves the caller's caches as they were."""
    return tree_map(lambda value: _copy(value) if is_cache(value) else value, sample)


def _tensors(cache) -> list[torch.Tensor]:
    """Tensors a cache holds, one level into its layers."""
    out = []
    for value in vars(cache).values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, torch.Tensor):
                out.append(item)
            elif is_cache(item):
                out.extend(_tensors(item))
            elif hasattr(item, "__dict__"):
                out.extend(v for v in vars(item).values() if isinstance(v, torch.Tensor))
    return out


class CacheSnapshots:
    """Snapshots of the cache arguments of one forward call.

    Args:
        args (tuple): the call's positional arguments.
        kwargs (dict): its keyword arguments.
    """

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.snapshots = {id(v): (v, _copy(v)) for v in (*args, *kwargs.values()) if is_cache(v)}

    def __bool__(self) -> bool:
        return bool(self.snapshots)

    def replay_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args`` and ``kwargs`` with each cache replaced by a fresh copy of its snapshot."""
        def swap(value):
            entry = self.snapshots.get(id(value))
            return _copy(entry[1]) if entry is not None and entry[0] is value else value

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def versions(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor of the caller's caches with its version counter, to tell an in-place update."""
        return [(t, t._version) for original, _ in self.snapshots.values() for t in _tensors(original)]


def changed(versions: list[tuple[torch.Tensor, int]]) -> bool:
    """Whether any tensor was updated in place since ``CacheSnapshots.versions`` read it."""
    return any(t._version != v for t, v in versions)

