"""``MemoryMeter``: live and peak bytes of the tensors created while it is active.

A ``TorchDispatchMode`` that sees every op's outputs, counts each new storage once and notices when it
is freed. It measures what the runtime really holds, independently of any planner, on CPU, CUDA and
under ``FakeTensorMode`` alike. Storages that existed before the meter started (parameters, the batch)
are never counted.

What a kernel allocates and frees inside one op (a CUDA kernel's scratch: cross-entropy's, attention's
backward) is no op's output, so the meter alone never sees it. Given a ``probe`` of the device allocator's
counters, a window's peak (``window_peak()``) is raised to what the allocator held above the window's start
at its peak, less what it allocated outside any tensor and kept (cuBLAS workspaces: fixed bytes, counted
apart by the profiler).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._storages import StorageMap

__all__ = ["DeviceProbe", "MemoryMeter"]


class DeviceProbe:
    """The CUDA allocator's counters on ``device`` (an installed memopt arena's where there is one)."""

    def __init__(self, device: torch.device) -> None:
        from memopt.pools import cuda

        self.device, self._cuda = device, cuda

    def allocated(self) -> int:
        return self._cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return self._cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        self._cuda.reset_peak_memory_stats(self.device)


class MemoryMeter(TorchDispatchMode):
    """Track bytes of storages created under the meter.

    Example:
        >>> with MemoryMeter() as meter:
        ...     y = torch.ones(256) * 2
        >>> meter.peak_bytes >= 1024
        True
    """

    def __init__(self, probe: DeviceProbe | None = None) -> None:
        super().__init__()
        self.probe = probe  # the device allocator's counters, for what kernels allocate inside an op
        self._window_start: tuple[int, int] | None = None  # (meter bytes, device bytes) as the window began
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
        if self.probe is not None:
            self.probe.reset_peak()
            self._window_start = (self.current_bytes, self.probe.allocated())
        return self.current_bytes

    def window_peak(self) -> int:
        """The peak live bytes of the window so far: the meter's, or with a probe the device allocator's peak
        over the window's start where higher (scratch inside kernels), less what the allocator allocated
        outside any tensor and still holds (workspaces kept for later steps)."""
        if self.probe is None or self._window_start is None:
            return self.window_peak_bytes
        self.collect()
        meter_start, device_start = self._window_start
        kept_outside = max(0, (self.probe.allocated() - device_start) - (self.current_bytes - meter_start))
        device_peak = meter_start + (self.probe.peak() - device_start) - kept_outside
        return max(self.window_peak_bytes, device_peak)

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
