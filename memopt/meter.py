"""``MemoryMeter``: live and peak bytes of the tensors created while it is active.

A ``TorchDispatchMode`` that sees every op's outputs, counts each new storage once and notices when it
is freed. It measures what the runtime really holds, independently of any planner, on CPU, CUDA and
under ``FakeTensorMode`` alike. Storages that existed before the meter started (parameters, the batch)
are never counted.
"""

from __future__ import annotations

from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torch

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
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._known: dict[int, StorageWeakRef] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.window_peak_bytes = 0
        self.paused = False
        self.trace: list[list[int]] = []
        self._clock = 0
        self._born: dict[int, int] = {}

    def tracks(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s storage was allocated under the meter and is still alive."""
        entry = self._live.get(tensor.untyped_storage()._cdata)
        return entry is not None and not entry[0].expired()

    def reset_window(self) -> int:
        """Start a new peak window at the current live bytes; returns them."""
        self.collect()
        self.window_peak_bytes = self.current_bytes
        return self.current_bytes

    def collect(self) -> None:
        """Drop storages that have been freed since the last op."""
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self._drop(key)
        for key in [key for key, ref in self._known.items() if ref.expired()]:
            del self._known[key]

    def _drop(self, key: int) -> None:
        _, nbytes = self._live.pop(key)
        self.current_bytes -= nbytes
        self.trace.append([nbytes, self._born.pop(key), self._clock])

    def _track(self, out, inputs: set[int]) -> None:
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            key = storage._cdata
            # Views and in-place results share an input's storage: nothing new was allocated.
            if key in inputs:
                continue
            # A freed storage's address may be reused before it was collected: same key, new storage.
            if key in self._live and self._live[key][0].expired():
                self._drop(key)
            if key in self._known and self._known[key].expired():
                del self._known[key]
            if key in self._live or key in self._known:
                continue
            if self.paused:
                self._known[key] = StorageWeakRef(storage)
                continue
            nbytes = storage.nbytes()
            self._live[key] = (StorageWeakRef(storage), nbytes)
            self._born[key] = self._clock
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
        self._clock += 1
        self._track(out, inputs)
        return out
