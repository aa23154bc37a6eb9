"""A slow, obviously correct model of an arena, to test the C allocator against.

It does not choose offsets (any placement policy is allowed); it checks what the allocator chose:
that a block is aligned, inside the arena and overlaps no live or quarantined block, that a failure
was justified (no gap could hold the request), that frees are classified as the rules say, and it
keeps the statistics the allocator must report. Used by the differential test and the fuzz harness.

The rules for a free, which the model applies with a full record of every handle ever handed out:
a ``Block`` from ``alloc`` (it carries an arena key) frees its block when all its fields (offset,
size, serial, check) are exactly those ``alloc`` returned and the block is live; it is a
``DoubleFree`` when they are and the block was freed; any altered field makes it an ``InvalidFree``.
A ``Block`` made by hand is judged by its offset and its size (0: unknown): a live block there of that
size is freed, a freed block still held back (quarantine or slot cache) is a ``DoubleFree``, anything
else an ``InvalidFree``.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from memopt.errors import ArenaExhausted, DoubleFree, InvalidFree

from ._lib import GRANULE_BYTES, InvalidRequest

__all__ = ["ReferenceArena", "ReferenceMismatch"]

CANARY_MIN_BYTES = 8
SLAB_MAX_SPAN = 1024
SLAB_TARGET_SLOTS = 64
SLAB_MIN_BYTES = 1024
SLAB_MAX_BYTES = 16384
CACHE_DEPTH = 16


class ReferenceMismatch(AssertionError):
    """The allocator did something the reference model says it must not."""


@dataclass
class _Entry:
    """A block handed out and not yet released: live, freed and in quarantine, or a slot in the cache."""

    offset: int
    span: int
    nbytes: int
    serial: int
    quarantined: bool = False
    cached: bool = False      # a slot waiting in its span's cache
    slab: _Slab | None = None  # the slab whose slot it is, None for a block of its own


@dataclass
class _Slab:
    """A block of the core of ``nbytes`` (``slab_bytes(span)``) cut into ``slots`` slots of ``span``
    bytes (and a tail shorter than a slot) for small requests."""

    start: int
    span: int
    slots: int
    used: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)  # slots in quarantine or in the slot cache
    nbytes: int = 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.used) - len(self.held)


def _round_up(x: int, align: int) -> int:
    return (x + align - 1) // align * align


def slab_bytes(span: int) -> int:
    """Size of a slab of ``span``-byte slots: the power of two at or above ``SLAB_TARGET_SLOTS`` slots,
    within [``SLAB_MIN_BYTES``, ``SLAB_MAX_BYTES``]."""
    nbytes = SLAB_MIN_BYTES
    while nbytes < span * SLAB_TARGET_SLOTS and nbytes < SLAB_MAX_BYTES:
        nbytes *= 2
    return nbytes


class ReferenceArena:
    """Model of one arena.

    Small requests (a span of at most 1 KiB that is a multiple of the alignment) take the slot last put
    in their span's slot cache (a LIFO stack of up to ``CACHE_DEPTH`` slots that left use or the
    quarantine); else a free slot of a slab of their span; without one, a new slab (slot 0 of it;
    ``slab_bytes(span)`` at a multiple of its size, or at 0 in a smaller arena) when a free block holds
    it, else a block of their own. A slot leaving use goes to the cache while it has room, else back to its slab; a slab
    that empties goes back to the free space when its class has another slab with a free slot. An
    allocation that fits only once the quarantine is released releases it, the caches and every empty
    slab (a flush). The model checks each of these choices; it names the slot only for a cached one.

    Args:
        capacity_bytes (int): the arena's capacity (rounded down to the granule as the allocator does).
        quarantine (int): quarantine length in blocks.
        canaries (bool): whether blocks carry guard bytes.
    """

    def __init__(self, capacity_bytes: int, quarantine: int, canaries: bool) -> None:
        self.capacity = capacity_bytes // GRANULE_BYTES * GRANULE_BYTES
        self.align_cap = 1 << max(0, (self.capacity - 1).bit_length())
        self.quarantine_len = quarantine
        self.guard = CANARY_MIN_BYTES if canaries else 0
        self.starts: list[int] = []                   # sorted starts of the blocks and slabs of the core
        self.ranges: dict[int, _Entry | _Slab] = {}   # by start
        self.entries: dict[int, _Entry] = {}          # every live or quarantined block (slots too), by offset
        self.slabs_of: dict[int, list[_Slab]] = {}    # span -> its slabs
        self.cache: dict[int, list[_Entry]] = {}      # span -> slots waiting for reuse, last one first
        self.quarantine: deque[int] = deque()
        self.cached_blocks = self.cached_bytes = 0    # free and cached slots of slabs
        self.handles: dict[int, tuple[int, int, int]] = {}  # serial -> (offset, nbytes, check), every alloc
        self.max_serial = 0
        self.allocated = self.requested = self.quarantined_bytes = 0
        self.peak = self.high_water = self.alloc_count = self.free_count = self.flushes = 0

    # -- queries ---------------------------------------------------------------------------------
    def span_of(self, nbytes: int) -> int:
        return _round_up(nbytes + self.guard, GRANULE_BYTES)

    def align_of(self, alignment: int) -> int:
        return min(max(alignment, GRANULE_BYTES), self.align_cap)

    def is_live(self, offset: int) -> bool:
        """Whether a live block starts at ``offset`` (freeing it would be legitimate)."""
        entry = self.entries.get(offset)
        return entry is not None and not entry.quarantined and not entry.cached

    def gaps(self, include_held: bool):
        """Maximal free ranges [start, end) of the core's free lists; with ``include_held``, also counting
        quarantined blocks and slabs without a live block (what a flush would give back)."""
        cursor = 0
        for start in self.starts:
            item = self.ranges[start]
            if include_held and (item.quarantined if isinstance(item, _Entry) else not item.used):
                continue
            if start > cursor:
                yield cursor, start
            cursor = start + (item.span if isinstance(item, _Entry) else item.nbytes)
        if cursor < self.capacity:
            yield cursor, self.capacity

    def fits(self, span: int, alignment: int, include_held: bool) -> bool:
        align = max(alignment, GRANULE_BYTES)
        return any(_round_up(s, align) + span <= e for s, e in self.gaps(include_held))

    def largest_free(self) -> int:
        return max((e - s for s, e in self.gaps(False)), default=0)

    def _slot_free(self, span: int) -> bool:
        return any(slab.free_slots for slab in self.slabs_of.get(span, ()))

    def _slab_fits(self, span: int) -> bool:
        """Whether a free block holds a new slab for ``span``-byte slots (at a multiple of its size)."""
        nbytes = slab_bytes(span)
        return self.fits(nbytes, min(nbytes, self.align_cap), False)

    def _fits_now(self, span: int, align: int, eligible: bool) -> bool:
        if eligible and (self.cache.get(span) or self._slot_free(span) or self._slab_fits(span)):
            return True
        return self.fits(span, align, False)

    def _fits_after_flush(self, span: int, align: int, eligible: bool) -> bool:
        if eligible and any(slab.used and len(slab.used) < slab.slots for slab in self.slabs_of.get(span, ())):
            return True
        return self.fits(span, align, True)

    def expected_stats(self) -> dict[str, int]:
        return {
            "capacity_bytes": self.capacity, "allocated_bytes": self.allocated, "requested_bytes": self.requested,
            "quarantined_bytes": self.quarantined_bytes, "peak_bytes": self.peak,
            "free_bytes": self.capacity - self.allocated - self.quarantined_bytes,
            "high_water_bytes": self.high_water,
            "live_blocks": len(self.entries) - len(self.quarantine) - sum(map(len, self.cache.values())),
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
    def _place(self, start: int, item: _Entry | _Slab) -> None:
        """Add a block or slab of the core at ``start``, which must lie in free space."""
        end = start + (item.span if isinstance(item, _Entry) else item.nbytes)
        what = "slab" if isinstance(item, _Slab) else "block"
        if start < 0 or end > self.capacity:
            raise ReferenceMismatch(f"{what} [{start}, {end}) leaves the arena of {self.capacity}")
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] < end:
            raise ReferenceMismatch(f"{what} [{start}, {end}) overlaps the block at {self.starts[i]}")
        if i > 0:
            prev = self.ranges[self.starts[i - 1]]
            prev_end = prev.offset + prev.span if isinstance(prev, _Entry) else prev.start + prev.nbytes
            if prev_end > start:
                held = " (quarantined)" if isinstance(prev, _Entry) and prev.quarantined else ""
                raise ReferenceMismatch(f"{what} [{start}, {end}) overlaps [{self.starts[i - 1]}, {prev_end}){held}")
        self.starts.insert(i, start)
        self.ranges[start] = item
        self.high_water = max(self.high_water, end)

    def _unplace(self, start: int) -> None:
        del self.ranges[start]
        self.starts.pop(bisect.bisect_left(self.starts, start))

    def _drop_slab(self, slab: _Slab) -> None:
        self._unplace(slab.start)
        self.slabs_of[slab.span].remove(slab)
        self.cached_blocks -= slab.slots
        self.cached_bytes -= slab.slots * slab.span

    def _slot_freed(self, slab: _Slab) -> None:
        """A slot of ``slab`` became free: an emptied slab goes back unless it is its class's last with room."""
        self.cached_blocks += 1
        self.cached_bytes += slab.span
        if not slab.used and not slab.held and any(
                other is not slab and other.free_slots for other in self.slabs_of[slab.span]):
            self._drop_slab(slab)

    def _release(self, entry: _Entry) -> None:
        """A block leaves use or the quarantine: a slot waits in its span's cache while that has room."""
        if entry.slab is None:
            del self.entries[entry.offset]
            self._unplace(entry.offset)
            return
        k = (entry.offset - entry.slab.start) // entry.span
        entry.slab.used.discard(k)
        entry.slab.held.add(k)
        entry.quarantined = False
        stack = self.cache.setdefault(entry.span, [])
        if len(stack) < CACHE_DEPTH:
            entry.cached = True
            stack.append(entry)
            self.cached_blocks += 1
            self.cached_bytes += entry.span
            return
        self._uncache(entry)

    def _uncache(self, entry: _Entry) -> None:
        """A held slot goes back to its slab for good."""
        del self.entries[entry.offset]
        entry.slab.held.remove((entry.offset - entry.slab.start) // entry.span)
        self._slot_freed(entry.slab)

    def _release_oldest(self) -> None:
        entry = self.entries[self.quarantine.popleft()]
        self.quarantined_bytes -= entry.span
        self._release(entry)

    def _flush(self) -> None:
        while self.quarantine:
            self._release_oldest()
        for stack in self.cache.values():
            while stack:
                self.cached_blocks -= 1
                self.cached_bytes -= stack[-1].span
                self._uncache(stack.pop())
        for slabs in self.slabs_of.values():
            for slab in [s for s in slabs if not s.used and not s.held]:
                self._drop_slab(slab)
        self.flushes += 1

    def _take_slot(self, offset: int, span: int) -> _Slab:
        i = bisect.bisect_right(self.starts, offset) - 1
        slab = self.ranges.get(self.starts[i]) if i >= 0 else None
        if not isinstance(slab, _Slab) or slab.span != span or not slab.start <= offset < slab.start + slab.slots * span:
            raise ReferenceMismatch(f"a {span}-byte request went to offset {offset}, not to a slot of a slab of its "
                                    "span although one had a free slot")
        k, rem = divmod(offset - slab.start, span)
        if rem or k in slab.used or k in slab.held:
            raise ReferenceMismatch(f"offset {offset} is not a free slot of the slab at {slab.start}")
        slab.used.add(k)
        self.cached_blocks -= 1
        self.cached_bytes -= span
        return slab

    def on_alloc(self, nbytes: int, alignment: int, result, flushes_after: int) -> None:
        """Check an alloc's outcome: ``result`` is (offset, span, serial, check) or the exception raised."""
        valid_args = isinstance(nbytes, int) and nbytes > 0 and alignment > 0 and not alignment & (alignment - 1)
        if isinstance(result, BaseException):
            if not valid_args:
                if not isinstance(result, InvalidRequest):
                    raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) raised {result!r}, expected InvalidRequest")
                return
            if not isinstance(result, ArenaExhausted):
                raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) raised {result!r}")
            span, align = self.span_of(nbytes), self.align_of(alignment)
            eligible = span <= SLAB_MAX_SPAN and span % align == 0
            if span <= self.capacity and self._fits_after_flush(span, align, eligible):
                raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) reported exhaustion but a gap fits it")
            if flushes_after != self.flushes:
                raise ReferenceMismatch("a failed alloc released the quarantine")
            return
        if not valid_args:
            raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) succeeded; expected InvalidRequest")
        offset, span, serial, check = result
        want_span, align = self.span_of(nbytes), self.align_of(alignment)
        if span != want_span:
            raise ReferenceMismatch(f"alloc({nbytes}) spans {span}, expected {want_span}")
        eligible = span <= SLAB_MAX_SPAN and span % align == 0
        if flushes_after == self.flushes + 1:
            if self._fits_now(span, align, eligible):
                raise ReferenceMismatch("the quarantine and empty slabs were released although the request fitted")
            self._flush()
        elif flushes_after != self.flushes:
            raise ReferenceMismatch(f"quarantine flush count jumped from {self.flushes} to {flushes_after}")
        if offset % align:
            raise ReferenceMismatch(f"offset {offset} is not aligned to {alignment}")
        # Serials are (allocation count << 32 | the allocator's index): the count must grow.
        if serial >> 32 <= self.max_serial >> 32:
            raise ReferenceMismatch(f"serial {serial:#x} was not fresh (last {self.max_serial:#x})")
        entry = _Entry(offset, span, nbytes, serial)
        stack = self.cache.get(span) if eligible else None
        if stack:
            if offset != stack[-1].offset:
                raise ReferenceMismatch(f"alloc({nbytes}, {alignment}) gave {offset}, not the cached slot at "
                                        f"{stack[-1].offset}")
            entry.slab = stack.pop().slab
            k = (offset - entry.slab.start) // span
            entry.slab.held.remove(k)
            entry.slab.used.add(k)
            self.cached_blocks -= 1
            self.cached_bytes -= span
        elif eligible and self._slot_free(span):
            entry.slab = self._take_slot(offset, span)
        elif eligible and self._slab_fits(span):
            nbytes_slab = slab_bytes(span)
            if offset % min(nbytes_slab, self.align_cap):
                raise ReferenceMismatch(f"a new slab starts at {offset}, not a multiple of {nbytes_slab}")
            entry.slab = _Slab(offset, span, nbytes_slab // span, nbytes=nbytes_slab)
            self._place(offset, entry.slab)
            self.slabs_of.setdefault(span, []).append(entry.slab)
            self.cached_blocks += entry.slab.slots
            self.cached_bytes += entry.slab.slots * span
            self._take_slot(offset, span)
        else:
            self._place(offset, entry)
        self.entries[offset] = entry
        self.handles[serial] = (offset, nbytes, check)
        self.max_serial = serial
        self.allocated += span
        self.requested += nbytes
        self.alloc_count += 1
        self.peak = max(self.peak, self.allocated)

    def expected_free_error(self, block) -> type[Exception] | None:
        """The exception freeing ``block`` (a ``Block``) must raise, or None when it must succeed."""
        offset, nbytes = block.offset, block.nbytes
        for value in (offset, nbytes, block.serial, block.check):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                return InvalidFree
        entry = self.entries.get(offset)
        live = entry is not None and not entry.quarantined and not entry.cached
        if block.arena_key:  # from alloc, perhaps altered: it must be exactly a handle the arena gave out
            if self.handles.get(block.serial) != (offset, nbytes, block.check):
                return InvalidFree
            return None if live and entry.serial == block.serial else DoubleFree
        if entry is None:  # made by hand: judged by what starts at its offset, and its size unless 0
            return InvalidFree
        if not live:
            return DoubleFree
        return None if nbytes in (0, entry.nbytes) else InvalidFree

    def reject_free(self, arena, block) -> None:
        """Free ``block`` in the real ``arena`` expecting a rejection: the error must be the one this model
        predicts, and the arena's statistics must not move."""
        from memopt.errors import AllocatorError

        before = arena.stats()
        error = None
        try:
            arena.free(block)
        except AllocatorError as exc:
            error = exc
        self.on_free(block, error)
        if error is None or arena.stats() != before:
            raise ReferenceMismatch(f"free({block.offset}) should have been rejected and left the arena as it was")

    def on_free(self, block, error: BaseException | None) -> None:
        """Check the outcome of freeing ``block`` (``error`` is the exception raised, or None) and apply it."""
        offset = block.offset
        expected = self.expected_free_error(block)
        if expected is None:
            if error is not None:
                raise ReferenceMismatch(f"free({offset}) raised {error!r}; the block is live")
        else:
            if not isinstance(error, expected):
                raise ReferenceMismatch(f"free({offset}, {block.nbytes!r} bytes, serial {block.serial!r}) gave "
                                        f"{error!r}, expected {expected.__name__}")
            return
        entry = self.entries[offset]
        self.allocated -= entry.span
        self.requested -= entry.nbytes
        self.free_count += 1
        if self.quarantine_len == 0:
            self._release(entry)
            return
        entry.quarantined = True
        if entry.slab is not None:
            k = (offset - entry.slab.start) // entry.span
            entry.slab.used.remove(k)
            entry.slab.held.add(k)
        if len(self.quarantine) == self.quarantine_len:
            self._release_oldest()
        self.quarantine.append(offset)
        self.quarantined_bytes += entry.span
