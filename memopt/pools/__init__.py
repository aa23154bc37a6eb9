"""Memory pools over memopt's hardened C allocator.

``Arena`` manages a region of host memory (optionally pinned) or GPU memory: blocks are offsets,
tensors are views, and misuse is reported as a ``memopt.AllocatorError`` subclass instead of
corrupting anything: a double free, a free of an unknown or interior offset or through an altered
``Block``, use of a closed arena, and (host arenas, hardened by default) an overflow past a block.
After a free: a hardened host arena zeroes each freed block of at most 1 KiB, and ``check()`` reports
a write into one while it is held back; larger freed blocks keep their contents, and reuse verifies
nothing, unless ``poison=True``, which poisons all free memory and reports a write after free into
any block when it is handed out again or checked. ``cuda_allocator`` puts the same core behind torch's
pluggable CUDA allocator, with frees ordered by stream and the replay of a recorded step's layout
(``memopt.pools.cuda``; its ``memory_stats`` and kin answer where torch's cannot).

Example:
    >>> import torch
    >>> from memopt.pools import Arena
    >>> with Arena("4MiB", hardened=True) as arena:
    ...     block = arena.alloc(1024)
    ...     arena.tensor(block, torch.float32, (256,)).fill_(1.0).sum().item()
    256.0
"""

from memopt.errors import AllocatorError, ArenaExhausted, CorruptionError, DoubleFree, InvalidFree

from ._lib import InvalidRequest, library_path
from ._device import DeviceStats
from .arena import Arena, ArenaConfig, ArenaStats, Block
from .cuda import CudaArenaAllocator, cuda_allocator

__all__ = sorted([
    "AllocatorError",
    "Arena",
    "ArenaConfig",
    "ArenaExhausted",
    "ArenaStats",
    "Block",
    "CorruptionError",
    "CudaArenaAllocator",
    "DeviceStats",
    "DoubleFree",
    "InvalidFree",
    "InvalidRequest",
    "cuda_allocator",
    "library_path",
])
