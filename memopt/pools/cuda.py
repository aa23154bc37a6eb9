"""A CUDA memory backend for torch over one reserved region, with the C core's checks and statistics.

``cuda_allocator(...)`` reserves ``capacity_bytes`` of device memory with ``cuMemAlloc`` and serves
torch's allocations out of it through ``torch.cuda.memory.CUDAPluggableAllocator``: either inside a
``torch.cuda.MemPool`` (only the tensors created under ``torch.cuda.use_mem_pool`` come from it) or
installed process-wide (every CUDA tensor does; must happen before the first CUDA allocation). Torch's
own memory statistics do not see a pluggable allocator, so ``stats()`` reports the arena's.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import torch

from memopt.errors import AllocatorError, CorruptionError

from . import _lib
from .arena import DEFAULT_QUARANTINE_BLOCKS, ArenaStats, _stats_from

__all__ = ["CudaArenaAllocator", "cuda_allocator"]

_active: dict[int, CudaArenaAllocator] = {}
_active_lock = threading.Lock()


class CudaArenaAllocator:
    """The region of one CUDA device and the pluggable allocator over it. Create with ``cuda_allocator``.

    Attributes:
        device (int): CUDA device index.
        capacity_bytes (int): bytes reserved.
        base_address (int): device address of the region's first byte.
    """

    def __init__(self, device: int, capacity_bytes: int, handle: int, base_address: int) -> None:
        self.device = device
        self.capacity_bytes = capacity_bytes
        self.base_address = base_address
        self._handle = handle
        self._lib = _lib.library()
        self._pluggable: Any = None
        self._closed = False

    def allocator(self) -> Any:
        """The ``torch.cuda.memory.CUDAPluggableAllocator`` whose malloc and free are this arena's."""
        if self._closed:
            raise AllocatorError(f"CUDA arena of device {self.device} is closed")
        if self._pluggable is None:
            self._pluggable = torch.cuda.memory.CUDAPluggableAllocator(
                str(_lib.library_path()), "mo_cuda_malloc", "mo_cuda_free")
        return self._pluggable

    def pool(self) -> Any:
        """A new ``torch.cuda.MemPool`` over this arena; use it with ``torch.cuda.use_mem_pool(pool)``."""
        return torch.cuda.MemPool(self.allocator().allocator())

    def install(self) -> None:
        """Serve every CUDA allocation of this process from the arena.

        Raises:
            RuntimeError: torch already allocated CUDA memory (torch allows the switch only before that).
        """
        torch.cuda.memory.change_current_allocator(self.allocator())

    def stats(self) -> ArenaStats:
        """The arena's counters (torch.cuda.memory_stats() does not see a pluggable allocator)."""
        raw = _lib.MoStats()
        rc = self._lib.mo_stats(self._handle, ctypes.byref(raw))
        if rc != _lib.OK:
            raise AllocatorError(f"CUDA arena of device {self.device}: stats: {_lib.last_error()}")
        return _stats_from(raw)

    def rejected_frees(self) -> tuple[int, str]:
        """Frees torch asked for that the arena refused (they cannot raise inside torch), and the last message."""
        buf = ctypes.create_string_buffer(256)
        count = self._lib.mo_cuda_rejected_frees(self.device, buf, len(buf))
        return int(count), buf.value.decode("utf-8", "replace")

    def check(self) -> None:
        """Verify the allocator's invariants and that no free was refused.

        Raises:
            CorruptionError: an invariant is broken, or torch freed a pointer the arena refused.
        """
        rc = self._lib.mo_check(self._handle)
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"CUDA arena of device {self.device}: check: {_lib.last_error()}")
        count, message = self.rejected_frees()
        if count:
            raise CorruptionError(f"CUDA arena of device {self.device}: {count} free(s) were refused; last: {message}")

    def close(self) -> None:
        """Give the region back to the driver. Every tensor from the arena must be gone (and its MemPool).

        Raises:
            AllocatorError: blocks are still live.
        """
        if self._closed:
            return
        rc = self._lib.mo_cuda_shutdown(self.device)
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"CUDA arena of device {self.device}: close: {_lib.last_error()}")
        self._closed = True
        with _active_lock:
            _active.pop(self.device, None)


def cuda_allocator(capacity_bytes: int | str, device: int | str | torch.device | None = None,
                   hardened: bool = True, quarantine: int | None = None) -> CudaArenaAllocator:
    """Reserve device memory and make a torch allocator backend over it.

    Args:
        capacity_bytes (int | str): bytes of device memory to reserve, e.g. ``"8GiB"``.
        device (int | str | torch.device | None, default None): the CUDA device; None is the current one.
        hardened (bool, default True): quarantine freed blocks (canaries and poison need host memory
            and are not available here). Double, unknown and interior frees are detected either way.
        quarantine (int | None, default None): freed blocks held back from reuse; None: 16 if hardened.

    Returns:
        CudaArenaAllocator: use ``.pool()`` with ``torch.cuda.use_mem_pool`` or ``.install()``.

    Raises:
        ValueError: an option is invalid, or CUDA is not available.
        AllocatorError: the device already has an arena, or the driver refused the reservation.

    Example:
        >>> backend = memopt.pools.cuda_allocator("1GiB")  # doctest: +SKIP
        >>> with torch.cuda.use_mem_pool(backend.pool()):  # doctest: +SKIP
        ...     x = torch.empty(1 << 20, device="cuda")
    """
    from memopt.units import parse_bytes

    capacity = parse_bytes(capacity_bytes, what="capacity_bytes")
    if not torch.cuda.is_available():
        raise ValueError("cuda_allocator needs a CUDA device and none is available; use Arena(..., device='cpu')")
    if device is None:
        index = torch.cuda.current_device()
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device!r}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    if quarantine is None:
        quarantine = DEFAULT_QUARANTINE_BLOCKS if hardened else 0
    if isinstance(quarantine, bool) or not isinstance(quarantine, int) or not 0 <= quarantine < 2**31:
        raise ValueError(f"quarantine must be a block count in [0, 2**31), got {quarantine!r}; e.g. 16")
    lib = _lib.library()
    handle, base = ctypes.c_uint64(), ctypes.c_uint64()
    seed = int.from_bytes(os.urandom(8), "little") or 1
    with _active_lock:
        rc = lib.mo_cuda_init(index, capacity, quarantine, seed, ctypes.byref(handle), ctypes.byref(base))
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"CUDA arena of device {index}: reserving {capacity} bytes failed: "
                                     f"{_lib.last_error()}")
        backend = CudaArenaAllocator(index, capacity, handle.value, base.value)
        _active[index] = backend
    return backend
