"""A slow, obviously correct model of an arena, to test the C allocator against.

It does not choose offsets (any placement policy is allowed); it checks what the allocator chose:
that a block is aligned, inside the arena and overlaps no live or quarantined block, that a failure
was justified (no gap could hold the request), that frees are classified as the rules say, and it
keeps the statistics the allocator must report. Used by the differential test and the fuzz harness.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from memopt.errors import ArenaExhausted, DoubleFree, InvalidFree

from ._lib import GRANULE_BYTES, InvalidRequest

__all__ = ["ReferenceArena", "ReferenceMismatch"]

CANARY_MIN_BYTES = 8
CACHE_MAX_SPAN = 1024
CACHE_DEPTH = 16


class ReferenceMismatch(AssertionError):
    """The allocator did something the reference model says it must not."""


@dataclass
class _Entry:
    offset: int
    span: int
    nbytes: int
    serial: int
    quarantined: bool = False
    cached: bool = False


def _round_up(x: int, align: int) -> int:
    return (x + align - 1) // align * align


class ReferenceArena:
    """Model of one arena.

    Args:
        capacity_bytes (int): the arena's capacity (rounded down to the granule as the allocator does).
        quarantine (int): quarantine length in blocks.
        canaries (bool): whether blocks carry guard bytes.
    """

    def __init__(self, capacity_bytes: int, quarantine: int, canaries: bool) -> None:
        self.capacity = capacity_bytes // GRANULE_BYTES * GRANULE_BYTES
        self.quarantine_len = quarantine
        self.guard = CANARY_MIN_BYTES if canaries else 0
        self.starts: list[int] = []          # sorted offsets of live and quarantined blocks
        self.entries: dict[int, _Entry] = {}  # by offset
        self.quarantine: deque[int] = deque()
        self.cache: dict[int, list[int]] = {}  # span -> offsets, last one reused first
        self.cached_blocks = self.cached_bytes = 0
        self.freed_serials: set[int] = set()
        self.max_serial = 0
        self.allocated = self.requested = self.quarantined_bytes = 0
        self.peak = self.high_water = self.alloc_count = self.free_count = self.flushes = 0

    # -- queries ---------------------------------------------------------------------------------
    def span_of(self, nbytes: int) -> int:
        return _round_up(nbytes + self.guard, GRANULE_BYTES)

    def gaps(self, include_quarantined: bool):
        """Maximal free ranges [start, end) of the free lists; with ``include_quarantined``, also counting
        the quarantined and cached blocks (what releasing them would give)."""
        cursor = 0
        for start in self.starts:
            entry = self.entries[start]
            if (entry.quarantined or entry.cached) and include_quarantined:
                continue
            if start > cursor:
                yield cursor, start
            cursor = start + entry.span
        if cursor < self.capacity:
            yield cursor, self.capacity

    def fits(self, span: int, alignment: int, include_quarantined: bool) -> bool:
        align = max(alignment, GRANULE_BYTES)
        return any(_round_up(s, align) + span <= e for s, e in self.gaps(include_quarantined))

    def largest_free(self) -> int:
        return max((e - s for s, e in self.gaps(False)), default=0)

    def expected_stats(self) -> dict[str, int]:
        return {
            "capacity_bytes": self.capacity, "allocated_bytes": self.allocated, "requested_bytes": self.requested,
            "quarantined_bytes": self.quarantined_bytes, "peak_bytes": self.peak,
            "free_bytes": self.capacity - self.allocated - self.quarantined_bytes,
            "high_water_bytes": self.high_water,
            "live_blocks": len(self.entries) - len(self.quarantine) - self.cached_blocks,
            "cached_blocks": self.cached_blocks, "cached_bytes": self.cached_bytes,
            "quarantined_blocks": len(self.quarantine), "alloc_count": self.alloc_count,
            "free_count": self.free_count, "quarantine_flushes": self.flushes,
        }

    def compare_stats(self, stats, *, largest_free: bool = False) -> None:
        """Raise ReferenceMismatch unless ``stats`` (ArenaStats or MoStats) match the model."""
        for name, want in self.expected_stats().items():
            got = getattr(stats, name)
            if got != want:
                raise ReferenceMismatch(f"stat {name}: allocator {got}, reference {want}")
        if largest_free and stats.largest_free_bytes != self.largest_free():
            raise ReferenceMismatch(f"largest free block: allocator {stats.largest_free_bytes}, "
                                    f"reference {self.largest_free()}")

    # -- transitions -----------------------------------------------------------------------------
    def _drop(self, offset: int) -> None:
        del self.entries[offset]
        self.starts.pop(bisect.bisect_left(self.starts, offset))

    def _retire(self, entry: _Entry) -> None:
        """A block leaves use or the quarantine: small spans wait in the cache while it has room."""
        entry.quarantined = False
        stack = self.cache.setdefault(entry.span, []) if entry.span <= CACHE_MAX_SPAN else None
        if stack is not None and len(stack) < CACHE_DEPTH:
            entry.cached = True
            stack.append(entry.offset)
            self.cached_blocks += 1
            self.cached_bytes += entry.span
        else:
            self._drop(entry.offset)

    def _release_oldest(self) -> None:
        entry = self.entries[self.quarantine.popleft()]
        self.quarantined_bytes -= entry.span
        self._retire(entry)

    def _flush(self) -> None:
        while self.quarantine:
            entry = self.entries[self.quarantine.popleft()]
            self.quarantined_bytes -= entry.span
            self._drop(entry.offset)
        for stack in self.cache.values():
            for offset in stack:
                self._drop(offset)
            stack.clear()
        self.cached_blocks = self.cached_bytes = 0
        self.flushes += 1

    def on_alloc(self, nbytes: int, alignment: int, result, flushes_after: int) -> None:
        """Check an alloc's outcome: ``result`` is (offset, span, serial) or the exception raised."""
        valid_args = isinstance(nbytes, int) and nbytes > 0 and alignment > 0 and not alignment & (alignment - 1)
        if isinstance(result, BaseException):
            if not valid_args:
                if not isinstance(result, InvalidRequest):
                    raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) raised {result!r}, expected InvalidRequest")
                return
            if not isinstance(result, ArenaExhausted):
                raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) raised {result!r}")
            span = self.span_of(nbytes)
            if nbytes <= self.capacity and self.fits(span, min(alignment, 1 << 62), include_quarantined=True):
                raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) reported exhaustion but a gap fits it")
            if flushes_after != self.flushes:
                raise ReferenceMismatch("a failed alloc released the quarantine")
            return
        if not valid_args:
            raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) succeeded; expected InvalidRequest")
        offset, span, serial = result
        stack = self.cache.get(self.span_of(nbytes))
        if stack and stack[-1] % max(alignment, GRANULE_BYTES) == 0:
            # The cache must serve a request of a cached span whose last cached block is aligned.
            if offset != stack[-1] or flushes_after != self.flushes:
                raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) gave {offset}, not the cached block "
                                        f"at {stack[-1]}")
            stack.pop()
            self._drop(offset)
            self.cached_blocks -= 1
            self.cached_bytes -= span
        elif flushes_after == self.flushes + 1:
            if self.fits(self.span_of(nbytes), alignment, include_quarantined=False):
                raise ReferenceMismatch("the quarantine and cache were released although a free block fitted")
            self._flush()
        elif flushes_after != self.flushes:
            raise ReferenceMismatch(f"quarantine flush count jumped from {self.flushes} to {flushes_after}")
        if span != self.span_of(nbytes):
            raise ReferenceMismatch(f"alloc({nbytes}) spans {span}, expected {self.span_of(nbytes)}")
        if offset % max(alignment, GRANULE_BYTES) and offset != 0:
            raise ReferenceMismatch(f"offset {offset} is not aligned to {alignment}")
        if offset < 0 or offset + span > self.capacity:
            raise ReferenceMismatch(f"block [{offset}, {offset + span}) leaves the arena of {self.capacity}")
        # Serials are (allocation count << 32 | the allocator's node index): the count must grow.
        if serial >> 32 <= self.max_serial >> 32:
            raise ReferenceMismatch(f"serial {serial:#x} was not fresh (last {self.max_serial:#x})")
        i = bisect.bisect_left(self.starts, offset)
        if i < len(self.starts) and self.starts[i] < offset + span:
            raise ReferenceMismatch(f"block [{offset}, {offset + span}) overlaps the block at {self.starts[i]}")
        if i > 0:
            prev = self.entries[self.starts[i - 1]]
            if prev.offset + prev.span > offset:
                raise ReferenceMismatch(f"block [{offset}, {offset + span}) overlaps [{prev.offset}, "
                                        f"{prev.offset + prev.span}){' (quarantined)' if prev.quarantined else ''}")
        self.starts.insert(i, offset)
        self.entries[offset] = _Entry(offset, span, nbytes, serial)
        self.max_serial = serial
        self.allocated += span
        self.requested += nbytes
        self.alloc_count += 1
        self.peak = max(self.peak, self.allocated)
        self.high_water = max(self.high_water, offset + span)

    def expected_free_error(self, offset: int, serial: int) -> type[Exception] | None:
        """The exception a free must raise, or None when it must succeed."""
        entry = self.entries.get(offset)
        if entry is not None and not (entry.quarantined or entry.cached) and serial in (0, entry.serial):
            return None
        if entry is not None and (entry.quarantined or entry.cached):
            return DoubleFree
        if entry is not None or (serial and serial in self.freed_serials):
            return DoubleFree  # a stale handle: its block was freed (and maybe the offset reused)
        return InvalidFree

    def reject_free(self, arena, block, serial: int) -> None:
        """Free ``block`` in the real ``arena`` expecting a rejection: the error must be the one this model
        predicts, and the arena's statistics must not move."""
        from memopt.errors import AllocatorError

        before = arena.stats()
        error = None
        try:
            arena.free(block)
        except AllocatorError as exc:
            error = exc
        self.on_free(block.offset, serial, error)
        if error is None or arena.stats() != before:
            raise ReferenceMismatch(f"free({block.offset}) should have been rejected and left the arena as it was")

    def on_free(self, offset: int, serial: int, error: BaseException | None) -> None:
        """Check a free's outcome (``error`` is the exception raised, or None) and apply it."""
        expected = self.expected_free_error(offset, serial)
        if expected is None:
            if error is not None:
                raise ReferenceMismatch(f"free({offset}) raised {error!r}; the block is live")
        else:
            if not isinstance(error, expected):
                raise ReferenceMismatch(f"free({offset}, serial {serial}) gave {error!r}, expected {expected.__name__}")
            return
        entry = self.entries[offset]
        self.allocated -= entry.span
        self.requested -= entry.nbytes
        self.free_count += 1
        self.freed_serials.add(entry.serial)
        if self.quarantine_len == 0:
            self._retire(entry)
            return
        if len(self.quarantine) == self.quarantine_len:
            self._release_oldest()
        entry.quarantined = True
        self.quarantine.append(offset)
        self.quarantined_bytes += entry.span
