"""``Arena``: a region of host or device memory whose blocks are handed out by the C allocator.

The arena owns one uint8 tensor (``.buffer``); blocks are offsets into it, and ``.tensor(block, ...)``
is a view, so a swapped activation is copied in with ``.copy_()`` and nothing is allocated per block.
The allocator keeps all of its bookkeeping outside that memory, which is why the same arena type
manages pinned host memory and GPU memory.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from memopt.errors import AllocatorError, InvalidFree
from memopt.units import parse_bytes

from . import _lib
from ._lib import InvalidRequest

__all__ = ["Arena", "ArenaConfig", "ArenaStats", "Block"]

DEFAULT_QUARANTINE_BLOCKS = 16
_names = itertools.count()


@dataclass
class ArenaConfig:
    """Options of an ``Arena``.

    Args:
        capacity_bytes (int | str): bytes the arena manages, e.g. ``"256MiB"``; rounded down to 16.
        device (str | torch.device, default "cpu"): where the memory lives: ``"cpu"`` or a CUDA device.
        pin_memory (bool, default False): page-lock host memory (needs CUDA), so copies to and from the
            GPU run asynchronously.
        hardened (bool, default True): turn on the checks the memory kind allows at a modest cost (see
            bench/README.md): on host arenas the guard canaries, the quarantine and the zeroing of freed
            small blocks, on GPU arenas the quarantine. Double, unknown, interior and altered-handle frees
            are detected either way.
        quarantine (int | None, default None): freed blocks held back from reuse, oldest released
            first; None means 16 when hardened, else 0. An allocation that only fits by reusing them
            releases the whole quarantine instead of failing.
        canaries (bool | None, default None): an 8-byte canary from the first byte past each block's
            requested size (random per arena), checked on free and by ``check()``; with ``poison`` on
            as well it fills the block's whole rounding slack. Host arenas only. None follows
            ``hardened``.
        poison (bool, default False): fill every freed block, and all free memory, with a poison byte
            (random per arena) and verify it whenever memory is handed out again and in ``check()``: a
            write after free into any block is reported. Host arenas only. Costs a pass over each freed
            block, one over each reused one and one over the whole arena at creation.
        name (str | None, default None): the arena's name in error messages; None picks ``arena-<n>``.
        zero_small_on_free (bool | None, default None): zero each freed block of a span of at most 1 KiB
            (guard bytes included) at once, so a freed small block never keeps its contents, and have
            ``check()`` report a byte written into one after its free: while it is held back (quarantine,
            or the slot cache of a slab slot: a block whose span is at most 1 KiB and a multiple of its
            alignment) and, for a slot, while it is free in its slab. Reuse does not verify the zeros
            (that pass cost more than the zeroing); larger blocks keep their contents. ``poison``
            covers both, at a higher cost. Host arenas only. None follows ``hardened``; ``poison``
            supersedes it.
    """

    capacity_bytes: int | str
    device: str | torch.device = "cpu"
    pin_memory: bool = False
    hardened: bool = True
    quarantine: int | None = None
    canaries: bool | None = None
    poison: bool = False
    name: str | None = None
    zero_small_on_free: bool | None = None

    def __post_init__(self) -> None:
        self.capacity_bytes = parse_bytes(self.capacity_bytes, what="capacity_bytes")
        if self.capacity_bytes < _lib.GRANULE_BYTES:
            raise ValueError(f"capacity_bytes must be at least {_lib.GRANULE_BYTES}, got {self.capacity_bytes!r}")
        try:
            self.device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'cpu' or a CUDA device such as 'cuda:0', got {self.device!r}") from exc
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device such as 'cuda:0', got {self.device!r}")
        host = self.device.type == "cpu"
        if self.pin_memory and not host:
            raise ValueError(f"pin_memory=True applies to host arenas, but device is {self.device}; drop pin_memory")
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available; pass pin_memory=torch.cuda.is_available()")
        if self.quarantine is None:
            self.quarantine = DEFAULT_QUARANTINE_BLOCKS if self.hardened else 0
        if isinstance(self.quarantine, bool) or not isinstance(self.quarantine, int) or not 0 <= self.quarantine < 2**31:
            raise ValueError(f"quarantine must be a block count in [0, 2**31), got {self.quarantine!r}; e.g. 16")
        if self.canaries is None:
            self.canaries = self.hardened and host
        if self.zero_small_on_free is None:
            self.zero_small_on_free = self.hardened and host
        if (self.canaries or self.poison or self.zero_small_on_free) and not host:
            raise ValueError(f"canaries, poison and zeroing need host memory; device {self.device} cannot be written "
                             "by the allocator, so pass canaries=False, poison=False, zero_small_on_free=False")
        if self.name is None:
            self.name = f"arena-{next(_names)}"


@dataclass(frozen=True)
class Block:
    """A block of an arena.

    Attributes:
        offset (int): byte offset of the block in the arena.
        nbytes (int): bytes requested for it (the block may span a few more: ``span_bytes``).
        span_bytes (int): bytes the block occupies, guard bytes and rounding included.

    A block from ``alloc`` also carries (unshown) the arena that handed it out, its allocation number
    and a keyed hash of its offset, size and number: so a free through a stale copy is a ``DoubleFree``
    and one through a copy with an altered field (``dataclasses.replace(block, offset=...)``) an
    ``InvalidFree``. A ``Block(offset, nbytes)`` made by hand is judged by its offset and size alone.
    """

    offset: int
    nbytes: int
    span_bytes: int = 0
    # Which arena handed it out, its allocation number and the check of the three fields above it.
    arena_key: int = field(default=0, repr=False, compare=False)
    serial: int = field(default=0, repr=False, compare=False)
    check: int = field(default=0, repr=False, compare=False)


@dataclass(frozen=True)
class ArenaStats:
    """A snapshot of an arena's counters (bytes unless said otherwise).

    Attributes:
        capacity_bytes: managed bytes.
        allocated_bytes: bytes in live blocks, rounding and guard bytes included.
        requested_bytes: bytes the live blocks were asked for.
        peak_bytes: highest ``allocated_bytes`` so far.
        free_bytes: bytes in free blocks (quarantined bytes are not free yet).
        largest_free_bytes: the largest free block.
        fragmentation: external fragmentation, ``1 - largest_free_bytes / free_bytes`` (0 when nothing is free).
        live_blocks: blocks allocated and not freed.
        quarantined_bytes: freed bytes held back from reuse.
        quarantined_blocks: blocks in quarantine.
        high_water_bytes: highest end offset any block reached: the memory the arena really needed.
        metadata_bytes: host bytes of the allocator's own bookkeeping.
        peak_metadata_bytes: the highest ``metadata_bytes`` so far.
        alloc_count: successful allocations.
        free_count: successful frees.
        quarantine_flushes: times an allocation released the quarantine (and the slot caches and empty
            slabs) to fit.
        cached_bytes: bytes of free slots in small-object slabs: blocks of spans up to 1 KiB (whose span
            is a multiple of their alignment) are slots of slabs of about 64 slots (1-16 KiB), and a
            free slot, whether in its slab or in the per-span cache of recently freed slots, serves only
            a request of its span; they count as free.
        cached_blocks: free slots in those slabs.
    """

    capacity_bytes: int
    allocated_bytes: int
    requested_bytes: int
    peak_bytes: int
    free_bytes: int
    largest_free_bytes: int
    fragmentation: float
    live_blocks: int
    quarantined_bytes: int
    quarantined_blocks: int
    high_water_bytes: int
    metadata_bytes: int
    peak_metadata_bytes: int
    alloc_count: int
    free_count: int
    quarantine_flushes: int
    cached_bytes: int
    cached_blocks: int


def _stats_from(raw: _lib.MoStats) -> ArenaStats:
    free = raw.free_bytes
    return ArenaStats(
        capacity_bytes=raw.capacity_bytes, allocated_bytes=raw.allocated_bytes, requested_bytes=raw.requested_bytes,
        peak_bytes=raw.peak_bytes, free_bytes=free, largest_free_bytes=raw.largest_free_bytes,
        fragmentation=1.0 - raw.largest_free_bytes / free if free else 0.0, live_blocks=raw.live_blocks,
        quarantined_bytes=raw.quarantined_bytes, quarantined_blocks=raw.quarantined_blocks,
        high_water_bytes=raw.high_water_bytes, metadata_bytes=raw.metadata_bytes,
        peak_metadata_bytes=raw.peak_metadata_bytes, alloc_count=raw.alloc_count, free_count=raw.free_count,
        quarantine_flushes=raw.quarantine_flushes, cached_bytes=raw.cached_bytes, cached_blocks=raw.cached_blocks,
    )


class Arena:
    """A fixed region of memory with a hardened allocator over it.

    Args:
        capacity_bytes (int | str): bytes to manage, e.g. ``1 << 30`` or ``"1GiB"``.
        device (str | torch.device, default "cpu"): ``"cpu"`` or a CUDA device.
        pin_memory (bool, default False): page-locked host memory (needs CUDA).
        hardened (bool, default True): the checks the memory kind allows at a modest cost (canaries,
            quarantine and zeroing of freed small blocks on host, quarantine on GPU).
        quarantine (int | None, default None): freed blocks held back from reuse; None: 16 if hardened.
        canaries (bool | None, default None): guard bytes after each block (host only); None: hardened.
        poison (bool, default False): poison all freed memory and report writes after free into any
            block (host only).
        name (str | None, default None): name used in error messages.
        zero_small_on_free (bool | None, default None): zero freed blocks of at most 1 KiB, and have
            ``check()`` report writes into them while they are held back (host only); None: hardened.
            See ``ArenaConfig``.

    Every method is thread-safe. A call that raises leaves the arena exactly as it was.

    Raises:
        ValueError: an option is invalid (see ``ArenaConfig``).

    Example:
        >>> arena = Arena("1MiB")
        >>> block = arena.alloc(4096)
        >>> view = arena.tensor(block, torch.float32, (32, 32))
        >>> view.copy_(torch.ones(32, 32)).sum().item()
        1024.0
        >>> arena.free(block)
        >>> arena.check()
        >>> arena.close()
    """

    def __init__(self, capacity_bytes: int | str, device: str | torch.device = "cpu", pin_memory: bool = False,
                 hardened: bool = True, quarantine: int | None = None, canaries: bool | None = None,
                 poison: bool = False, name: str | None = None, zero_small_on_free: bool | None = None) -> None:
        self._key = 0  # the C handle; kept after close() so late calls are reported as such
        self._closed = True
        self.config = ArenaConfig(capacity_bytes, device, pin_memory, hardened, quarantine, canaries, poison, name,
                                  zero_small_on_free)
        cfg = self.config
        self.name: str = cfg.name
        self.device: torch.device = cfg.device
        self._lib = _lib.library()
        self.buffer: torch.Tensor = torch.empty(cfg.capacity_bytes, dtype=torch.uint8, device=cfg.device,
                                                pin_memory=cfg.pin_memory)
        host = cfg.device.type == "cpu"
        flags = ((_lib.F_CANARIES if cfg.canaries else 0) | (_lib.F_POISON if cfg.poison else 0)
                 | (_lib.F_ZERO_SMALL if cfg.zero_small_on_free else 0))
        handle = ctypes.c_uint64()
        seed = int.from_bytes(os.urandom(8), "little") or 1
        base = ctypes.c_void_p(self.buffer.data_ptr() if host else None)
        rc = self._lib.mo_arena_create(cfg.capacity_bytes, base, cfg.quarantine, flags, seed, ctypes.byref(handle))
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"arena {self.name!r}: creating it failed: {_lib.last_error()}")
        self._key = handle.value
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def _error(self, rc: int, what: str) -> AllocatorError:
        if rc == _lib.E_BAD_HANDLE:
            detail = "the arena is closed"
            cls = InvalidFree if what.startswith("free") else AllocatorError
        else:
            detail, cls = _lib.last_error(), _lib.error_for(rc)
        return cls(f"arena {self.name!r}: {what}: {detail}")

    def alloc(self, nbytes: int, alignment: int = 256) -> Block:
        """Allocate a block.

        Args:
            nbytes (int): bytes wanted, at least 1.
            alignment (int, default 256): the block's offset is a multiple of this power of two.

        Returns:
            Block: the block; its memory is ``arena.buffer[block.offset : block.offset + block.nbytes]``.

        Raises:
            InvalidRequest: ``nbytes`` is not a positive int, or ``alignment`` is not a power of two.
            ArenaExhausted: no free block fits (or ``nbytes`` exceeds the capacity).
            CorruptionError: with poison on, the memory about to be handed out was written after free.
            AllocatorError: the arena is closed.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidRequest(f"arena {self.name!r}: alloc of {nbytes!r} bytes: the size must be a positive int; "
                                 "ask for at least 1 byte")
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise InvalidRequest(f"arena {self.name!r}: alloc of {nbytes} bytes: alignment {alignment!r} is not a "
                                 "power of two; use e.g. 256")
        if nbytes >= 2**64 or alignment >= 2**64:
            raise InvalidRequest(f"arena {self.name!r}: alloc of {nbytes} bytes at alignment {alignment}: out of "
                                 "the 64-bit range")
        offset, span, serial, check = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
        rc = self._lib.mo_alloc(self._key, nbytes, alignment, ctypes.byref(offset), ctypes.byref(span),
                                ctypes.byref(serial), ctypes.byref(check))
        if rc != _lib.OK:
            raise self._error(rc, f"alloc of {nbytes} bytes (alignment {alignment})")
        return Block(offset.value, nbytes, span.value, self._key, serial.value, check.value)

    def _handle(self, block: Block, what: str) -> tuple[int, int, int, int]:
        """The four words the C library judges a block by; InvalidFree for a block that cannot be one."""
        if not isinstance(block, Block):
            raise InvalidFree(f"arena {self.name!r}: {what} of {block!r}: pass a Block returned by alloc()")
        offset = block.offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**64:
            raise InvalidFree(f"arena {self.name!r}: {what} of offset {offset!r}: not an offset this arena returned")
        if block.arena_key and block.arena_key != self._key:
            raise InvalidFree(f"arena {self.name!r}: {what} of offset {offset}: the block belongs to another arena")
        # A block made by hand (no arena key) is judged by its offset and its size (0: unknown) alone; one from
        # alloc() by all four words, none of which alloc() ever leaves 0.
        words = (offset, block.nbytes, block.serial, block.check) if block.arena_key else (offset, block.nbytes, 0, 0)
        lowest, why = (1, "the Block was altered") if block.arena_key else (0, "pass the size alloc() was given")
        for name, value in zip(("size", "serial", "check"), words[1:]):
            if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value < 2**64:
                raise InvalidFree(f"arena {self.name!r}: {what} of offset {offset}: its {name} {value!r} is not one "
                                  f"this arena returned: {why}")
        return words

    def free(self, block: Block) -> None:
        """Free a block.

        Args:
            block (Block): a block this arena returned.

        Raises:
            DoubleFree: the block was freed already (this very allocation: a stale copy of its Block).
            InvalidFree: the block is not one of this arena's: an unknown or interior offset, a Block whose
                offset, size or serial was altered, another arena's block, or the arena is closed.
            CorruptionError: the block's guard canary was overwritten (a buffer overflow); the block
                stays allocated.
        """
        words = self._handle(block, "free")
        rc = self._lib.mo_free(self._key, *words)
        if rc != _lib.OK:
            raise self._error(rc, f"free of offset {words[0]}")

    def tensor(self, block: Block, dtype: torch.dtype, shape: Sequence[int] | int) -> torch.Tensor:
        """A view of a live block's memory as a tensor (no copy, no allocation).

        Args:
            block (Block): a live block of this arena.
            dtype (torch.dtype): element type; the block's offset must be a multiple of its size.
            shape (Sequence[int] | int): the view's shape; it must fit in ``block.nbytes``.

        Raises:
            AllocatorError: the block is not live in this arena (freed, altered or another arena's).
            ValueError: the shape does not fit the block, or the offset is misaligned for ``dtype``.
        """
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if nbytes > block.nbytes:
            raise ValueError(f"arena {self.name!r}: a {dtype} tensor of shape {shape} needs {nbytes} bytes, but the "
                             f"block at offset {block.offset} has {block.nbytes}; allocate a larger block")
        if block.offset % itemsize:
            raise ValueError(f"arena {self.name!r}: block at offset {block.offset} is not aligned for {dtype} "
                             f"({itemsize} bytes); allocate it with alignment >= {itemsize}")
        try:
            words = self._handle(block, "tensor()")
        except InvalidFree as exc:
            raise AllocatorError(str(exc)) from None
        live_nbytes, span = ctypes.c_uint64(), ctypes.c_uint64()
        rc = self._lib.mo_query(self._key, *words, ctypes.byref(live_nbytes), ctypes.byref(span))
        if rc != _lib.OK:
            raise AllocatorError(f"arena {self.name!r}: tensor() of block at offset {block.offset}: "
                                 f"{'the arena is closed' if rc == _lib.E_BAD_HANDLE else _lib.last_error()}")
        if nbytes > live_nbytes.value:
            raise ValueError(f"arena {self.name!r}: block at offset {block.offset} holds {live_nbytes.value} bytes, "
                             f"fewer than the {nbytes} a {dtype} tensor of shape {shape} needs")
        return self.buffer[block.offset:block.offset + nbytes].view(dtype).view(shape)

    def check(self) -> None:
        """Verify every invariant of the allocator, and every canary and poison byte.

        Raises:
            CorruptionError: a canary or poison byte was overwritten, or the metadata is inconsistent.
            AllocatorError: the arena is closed.
        """
        rc = self._lib.mo_check(self._key)
        if rc != _lib.OK:
            raise self._error(rc, "check")

    def stats(self) -> ArenaStats:
        """The arena's counters now (see ``ArenaStats``).

        Raises:
            AllocatorError: the arena is closed.
        """
        raw = _lib.MoStats()
        rc = self._lib.mo_stats(self._key, ctypes.byref(raw))
        if rc != _lib.OK:
            raise self._error(rc, "stats")
        return _stats_from(raw)

    def close(self) -> None:
        """Release the allocator's metadata. Tensors viewing ``buffer`` stay valid; blocks do not.
        Closing twice is allowed."""
        # Calls after this still reach the C library, whose handle check reports them: a destroyed
        # arena's handle never matches again.
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._lib.mo_arena_destroy(self._key)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_lib", None) is not None:
            try:
                self._lib.mo_arena_destroy(self._key)
            except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes already
                pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.stats().allocated_bytes} allocated"
        return f"Arena(name={self.name!r}, capacity_bytes={self.config.capacity_bytes}, device={str(self.device)!r}, {state})"
