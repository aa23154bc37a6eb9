"""``MemoryMeter``: live and peak bytes of the tensors created while it is active.

A ``TorchDispatchMode`` that sees every op's outputs, counts each new storage once and notices when it
is freed. It measures what the runtime really holds, independently of any planner, on CPU, CUDA and
under ``FakeTensorMode`` alike. Storages that existed before the meter started (parameters, the batch)
are never counted.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._storages import StorageMap

__all__ = ["MemoryMeter"]


class MemoryMeter(TorchDispatchMode):
    """Track bytes of storages created under the meter.

    Example:
        >>> with MemoryMeter() as meter:
        ...     y = torch.ones(256) * 2
        >>> meter.peak_bytes >= 1024
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self._live = StorageMap()  # storage -> bytes, for storages allocated under the meter
        self._paused = StorageMap()  # storages allocated while paused: never counted
        self.current_bytes = 0
        self.peak_bytes = 0
        self.window_peak_bytes = 0
        self.paused = False

    def tracks(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s storage was allocated under the meter and is still alive."""
        return tensor.untyped_storage() in self._live

    def reset_window(self) -> int:
        """Start a new peak window at the current live bytes; returns them."""
        self.collect()
        self.window_peak_bytes = self.current_bytes
        return self.current_bytes

    def collect(self) -> None:
        """Drop storages that have been freed since the last op."""
        self.current_bytes -= sum(self._live.pop_expired())
        self._paused.pop_expired()

    def _track(self, out, inputs: set[int]) -> None:
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            # Views and in-place results share an input's storage: nothing new was allocated.
            if storage._cdata in inputs or storage in self._live or storage in self._paused:
                continue
            if self.paused:
                self._paused.add(storage, True)
                continue
            nbytes = storage.nbytes()
            self._live.add(storage, nbytes)
            self.current_bytes += nbytes
        if self.current_bytes > self.window_peak_bytes:
            # current_bytes is an upper bound until freed storages are collected; collecting only when
            # it would set a new peak keeps the meter cheap and the peak exact.
            self.collect()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self.window_peak_bytes = max(self.window_peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {leaf.untyped_storage()._cdata for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self._track(out, inputs)
        return out
