"""Memory pools over memopt's hardened C allocator.

``Arena`` manages a region of host memory (optionally pinned) or GPU memory: blocks are offsets,
tensors are views, and every misuse (double, unknown or interior free, use of a closed arena,
overflow past a block, write after free) is reported as a ``memopt.AllocatorError`` subclass instead
of corrupting anything. ``cuda_allocator`` puts the same core behind torch's pluggable CUDA allocator.

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
    "DoubleFree",
    "InvalidFree",
    "InvalidRequest",
    "cuda_allocator",
    "library_path",
])
