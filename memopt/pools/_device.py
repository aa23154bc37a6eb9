"""``DevicePool``: the C core's device pool (``mo_dev_*``), over host memory or a CUDA region.

A device pool hands out addresses and knows streams: a block freed on a stream waits for the work queued
there before it (a marker, i.e. a CUDA event), and the allocations of one step can be recorded, laid out
(``memopt.pools._replay``) and replayed at planned offsets. ``cuda.py`` drives the pool of a CUDA region;
over host memory, with markers from Python (``ops``), the same code runs on any machine.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields
from typing import Any, Protocol, Sequence

from memopt.errors import AllocatorError

from . import _lib
from .arena import ArenaStats, _stats_from

__all__ = ["DEPARTURE_REASONS", "Departure", "DevicePool", "DeviceStats", "StreamOps"]


class StreamOps(Protocol):
    """Markers on streams, as a GPU's events: what a pool needs to order frees against queued work."""

    def record(self, stream: int) -> int:
        """A marker after the work queued on ``stream`` so far (non-zero); 0 when none could be recorded."""

    def query(self, marker: int) -> int:
        """1 when the marker's work is done, 0 while pending, negative on an error."""

    def wait(self, marker: int) -> int:
        """Block until the marker's work is done; 0 on success."""

    def release(self, marker: int) -> None:
        """The pool is done with the marker."""


@dataclass(frozen=True)
class DeviceStats:
    """Counters of a device pool (``mo_dev_stats_t``): a block's bytes are the bytes asked for rounded up to the
    pool's alignment (as torch counts allocated bytes).

    Attributes:
        capacity_bytes (int): bytes of the region.
        live_bytes (int): bytes of the live allocations (heap, planned region and overflow).
        peak_live_bytes (int): highest ``live_bytes`` since creation or ``reset_peaks``.
        live_blocks (int): live allocations.
        reserved_bytes (int): end of the highest region byte in use (live, pending, held back, planned) plus
            the overflow bytes: what the region must hold.
        peak_reserved_bytes (int): highest ``reserved_bytes`` since creation or ``reset_peaks``.
        pending_bytes (int): bytes freed but waiting for their streams' work.
        pending_blocks (int): blocks waiting so.
        peak_pending_bytes (int): highest ``pending_bytes``.
        deferred_frees (int): frees that waited for a stream.
        stream_reuses (int): allocations given a block freed on their own stream while it waited.
        markers_recorded (int): markers (events) recorded.
        marker_waits (int): times an allocation blocked on a marker to find room.
        marker_errors (int): markers whose record, query or wait failed.
        sync_frees (int): frees done by waiting at once (no host memory to defer them).
        overflow_allocs (int): allocations served outside the region (it was full).
        overflow_bytes (int): bytes live outside the region now.
        failed_allocs (int): allocations refused.
        plan_bytes (int): bytes of the planned region (0 without a plan).
        plan_positions (int): allocations in the plan.
        replay_steps (int): steps begun with a plan.
        planned_allocs (int): allocations served at their planned offset.
        fallback_allocs (int): allocations of replayed steps that departed from the plan (another size than
            the plan's next ones, past its end, or its range still in use), served by the heap.
        unplanned_allocs (int): allocations the plan leaves to the heap (they outlive the recorded step).
        stream_conflicts (int): fallbacks because the planned range waited for another stream's work.
        recorded_allocs (int): allocations in the last recorded step.
        recording (int): 1 while a step is being recorded.
        lowest_first (int): 1 while the heap places blocks lowest first (``set_lowest_first``).
        size_departures (int): fallbacks asking bytes no plan position near the cursor asks, or past its end.
        busy_departures (int): fallbacks whose planned range still held a live planned block (a tensor kept
            longer than in the recorded step).
    """

    capacity_bytes: int
    live_bytes: int
    peak_live_bytes: int
    live_blocks: int
    reserved_bytes: int
    peak_reserved_bytes: int
    pending_bytes: int
    pending_blocks: int
    peak_pending_bytes: int
    deferred_frees: int
    stream_reuses: int
    markers_recorded: int
    marker_waits: int
    marker_errors: int
    sync_frees: int
    overflow_allocs: int
    overflow_bytes: int
    failed_allocs: int
    plan_bytes: int
    plan_positions: int
    replay_steps: int
    planned_allocs: int
    fallback_allocs: int
    unplanned_allocs: int
    stream_conflicts: int
    recorded_allocs: int
    recording: int
    lowest_first: int
    size_departures: int
    busy_departures: int


#: Departures from a plan the C core logs (MO_DEV_DEPARTURES in moalloc.h).
DEPARTURES_LOGGED = 64

#: Why an allocation of a replayed step left the plan (``Departure.reason``), as moalloc.h's MO_DEPART_*.
DEPARTURE_REASONS = {1: "size", 2: "busy", 3: "stream", 4: "nomem"}


@dataclass(frozen=True)
class Departure:
    """One allocation of a replayed step served by the heap instead of the plan.

    Attributes:
        step (int): the replayed step it happened in (``DeviceStats.replay_steps`` then, from 1).
        position (int): the plan position the cursor was at (for ``busy`` and ``stream``, the position taken).
        nbytes (int): bytes asked for.
        planned_nbytes (int): bytes that position was planned for (0 past the plan's end).
        reason (str): ``"size"`` (no position within the lookahead asks these bytes), ``"busy"`` (the range
            still held a live planned block), ``"stream"`` (freed on another stream, whose work may still use
            it) or ``"nomem"`` (no host memory to split the planned ranges).
    """

    step: int
    position: int
    nbytes: int
    planned_nbytes: int
    reason: str


def _make_ops(ops: Any) -> tuple[_lib.MoDevOps, list]:
    """The C ops struct of a Python ops object, and the callbacks ctypes must keep alive."""

    def record(_ctx, stream):
        return int(ops.record(int(stream)))

    def query(_ctx, marker):
        return int(ops.query(int(marker)))

    def wait(_ctx, marker):
        return int(ops.wait(int(marker)))

    def release(_ctx, marker):
        ops.release(int(marker))

    cbs = [_lib.RECORD_FN(record), _lib.QUERY_FN(query), _lib.QUERY_FN(wait), _lib.RELEASE_FN(release)]
    if hasattr(ops, "overflow_alloc"):
        cbs += [_lib.OVERFLOW_ALLOC_FN(lambda _ctx, n: int(ops.overflow_alloc(int(n)))),
                _lib.RELEASE_FN(lambda _ctx, a: ops.overflow_free(int(a)))]
    else:
        cbs += [_lib.OVERFLOW_ALLOC_FN(), _lib.RELEASE_FN()]
    return _lib.MoDevOps(None, *cbs), cbs


def _ops_pointer(ops: StreamOps | None, keep: list) -> Any:
    """A pointer to the C callbacks of ``ops`` (None: frees at once), what they need kept alive added to ``keep``."""
    if ops is None:
        return None
    struct, callbacks = _make_ops(ops)
    keep += [struct, callbacks, ops]
    return ctypes.byref(struct)


class DevicePool:
    """A device pool: addresses in ``[base_address, base_address + capacity_bytes)``, frees ordered by stream,
    record and replay. Create one over host memory with ``DevicePool.host``; a CUDA backend wraps its own.

    Attributes:
        base_address (int): address of the region's first byte.
        capacity_bytes (int): bytes of the region.
        alignment (int): every block's alignment, bytes.
    """

    def __init__(self, handle: int, base_address: int, capacity_bytes: int, alignment: int, *, owned: bool,
                 name: str, keep: Sequence[Any] = ()) -> None:
        self._handle = handle
        self._lib = _lib.library()
        self._owned = owned
        self._keep = list(keep)  # the host buffer and ctypes callbacks the C side points at
        self.base_address = base_address
        self.capacity_bytes = capacity_bytes
        self.alignment = alignment
        self.name = name
        self.closed = False

    @classmethod
    def host(cls, capacity_bytes: int, *, alignment: int = 512, quarantine: int = 0, flags: int = 0,
             ops: StreamOps | None = None, seed: int = 1, name: str = "host pool") -> DevicePool:
        """A pool over a fresh host buffer (the allocator may write it when ``flags`` ask for canaries etc.).

        Args:
            capacity_bytes (int): bytes of the region, a multiple of ``alignment``.
            alignment (int, default 512): alignment of every block, bytes.
            quarantine (int, default 0): freed blocks held back from reuse.
            flags (int, default 0): ``_lib.F_CANARIES`` etc., as for an arena.
            ops (StreamOps | None, default None): markers for stream-ordered frees; None frees at once.
            seed (int, default 1): seed of the arena's keys.
            name (str, default "host pool"): the pool's name in error messages.
        """
        buffer = ctypes.create_string_buffer(capacity_bytes + alignment)
        base = (ctypes.addressof(buffer) + alignment - 1) // alignment * alignment
        keep: list[Any] = [buffer]
        ops_ptr = _ops_pointer(ops, keep)
        handle = ctypes.c_uint64()
        lib = _lib.library()
        rc = lib.mo_dev_create(capacity_bytes, base, base, alignment, quarantine, flags, seed, ops_ptr,
                               ctypes.byref(handle))
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"{name}: create: {_lib.last_error()}")
        return cls(handle.value, base, capacity_bytes, alignment, owned=True, name=name, keep=keep)

    @classmethod
    def virtual(cls, capacity_bytes: int, *, base_address: int = 1 << 40, alignment: int = 512, quarantine: int = 0,
                ops: StreamOps | None = None, name: str = "virtual pool") -> DevicePool:
        """A pool of addresses nobody reads or writes, as a GPU region's are from the host: for planning and
        for tests of the bookkeeping alone. Arguments as for ``host``."""
        keep: list[Any] = []
        ops_ptr = _ops_pointer(ops, keep)
        handle = ctypes.c_uint64()
        rc = _lib.library().mo_dev_create(capacity_bytes, base_address, None, alignment, quarantine, 0, 1, ops_ptr,
                                          ctypes.byref(handle))
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"{name}: create: {_lib.last_error()}")
        return cls(handle.value, base_address, capacity_bytes, alignment, owned=True, name=name, keep=keep)

    def _call(self, what: str, fn: str, *args: Any) -> None:
        if self.closed:
            raise AllocatorError(f"{self.name} is closed; it can no longer {what}")
        rc = getattr(self._lib, fn)(self._handle, *args)
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"{self.name}: {what}: {_lib.last_error()}")

    def alloc(self, nbytes: int, stream: int = 0) -> int:
        """The address of a new block of ``nbytes`` bytes used on ``stream``."""
        out = ctypes.c_uint64()
        self._call(f"allocate {nbytes} bytes", "mo_dev_alloc", nbytes, stream, ctypes.byref(out))
        return out.value

    def free(self, address: int, stream: int = 0) -> None:
        """Free the block at ``address``, whose work was queued on ``stream``."""
        self._call(f"free 0x{address:x}", "mo_dev_free", address, stream)

    def record_stream(self, address: int, stream: int) -> None:
        """The live block at ``address`` is used on ``stream`` as well: its free waits for that stream too."""
        self._call(f"record stream {stream:#x} for 0x{address:x}", "mo_dev_record_stream", address, stream)

    def collect(self, wait: bool = False) -> None:
        """Mark every pending free (a marker on each stream that has unmarked ones) and give back those whose
        streams are done; with ``wait``, wait for all of them."""
        self._call("collect", "mo_dev_collect", int(wait))

    def record_begin(self) -> None:
        """Record the allocations from now on (one step)."""
        self._call("begin recording", "mo_dev_record_begin")

    def record_end(self) -> list[tuple[int, int, int | None]]:
        """Stop recording; the step's allocations as ``(nbytes, start, end)``, end None if still live."""
        count = ctypes.c_uint64()
        self._call("end recording", "mo_dev_record_end", ctypes.byref(count))
        n = count.value
        arrays = [(ctypes.c_uint64 * max(n, 1))() for _ in range(3)]
        self._call("read the trace", "mo_dev_trace", n, *arrays)
        nbytes, starts, ends = arrays
        return [(nbytes[i], starts[i], None if ends[i] == _lib.UNPLANNED else ends[i]) for i in range(n)]

    def plan(self, nbytes: Sequence[int], offsets: Sequence[int | None], region_bytes: int) -> None:
        """Arm replay: position i is served at ``offsets[i]`` of a region of ``region_bytes`` (None: the heap)."""
        n = len(nbytes)
        if len(offsets) != n:
            raise ValueError(f"got {len(offsets)} offsets for {n} positions; give one per position (None: the heap)")
        sizes = (ctypes.c_uint64 * n)(*nbytes)
        offs = (ctypes.c_uint64 * n)(*(_lib.UNPLANNED if o is None else o for o in offsets))
        self._call(f"arm a plan of {n} positions in {region_bytes} bytes", "mo_dev_plan", n, sizes, offs, region_bytes)

    def free_runs(self) -> list[tuple[int, int]]:
        """The heap's free runs ``(offset, bytes)`` by offset, once the pending frees are done (waits for them):
        the room ``plan_at`` may reserve; the rest is live."""
        count = ctypes.c_uint64()
        cap = 256
        while True:
            offs, sizes = (ctypes.c_uint64 * cap)(), (ctypes.c_uint64 * cap)()
            self._call("list the free runs", "mo_dev_free_runs", cap, offs, sizes, ctypes.byref(count))
            if count.value <= cap:
                return [(offs[i], sizes[i]) for i in range(count.value)]
            cap = count.value

    def plan_at(self, nbytes: Sequence[int], offsets: Sequence[int | None], regions: Sequence[tuple[int, int]]) -> None:
        """Arm replay with pool offsets inside ``regions`` (``(offset, bytes)``, sorted, free now), each reserved
        at its place: a layout among the live blocks (``plan_replay(..., free_runs=pool.free_runs())``)."""
        n = len(nbytes)
        if len(offsets) != n:
            raise ValueError(f"got {len(offsets)} offsets for {n} positions; give one per position (None: the heap)")
        sizes = (ctypes.c_uint64 * n)(*nbytes)
        offs = (ctypes.c_uint64 * n)(*(_lib.UNPLANNED if o is None else o for o in offsets))
        r = len(regions)
        at = (ctypes.c_uint64 * max(r, 1))(*(o for o, _ in regions))
        spans = (ctypes.c_uint64 * max(r, 1))(*(b for _, b in regions))
        self._call(f"arm a plan of {n} positions in {r} regions of {sum(b for _, b in regions)} bytes",
                   "mo_dev_plan_at", n, sizes, offs, r, at, spans)

    def set_lowest_first(self, on: bool) -> None:
        """Place heap blocks at the lowest address that fits (on), or by the arena's own fit (off, the default):
        on for the steps before a replay is armed, so that what they leave alive packs low. O(blocks) an
        allocation, no slab slots: not for every step."""
        self._call("set the heap's placement", "mo_dev_set_lowest_first", int(bool(on)))

    def unplan(self) -> None:
        """Disarm replay and give the planned region back to the heap."""
        self._call("unplan", "mo_dev_unplan")

    def departures(self) -> list[Departure]:
        """The first departures from the armed plan, in order (at most 64; ``stats()`` counts them all); empty
        without a plan."""
        raw = (_lib.MoDeparture * DEPARTURES_LOGGED)()
        count = ctypes.c_uint64()
        self._call("list the departures from the plan", "mo_dev_departures", DEPARTURES_LOGGED, raw,
                   ctypes.byref(count))
        return [Departure(r.step, r.position, r.nbytes, r.planned_nbytes, DEPARTURE_REASONS.get(r.reason, str(r.reason)))
                for r in raw[:count.value]]

    def step(self) -> None:
        """A step begins: the next allocation is the plan's first."""
        self._call("begin a step", "mo_dev_step")

    def check(self) -> None:
        """Walk every invariant of the pool and its heap.

        Raises:
            CorruptionError: one is broken.
        """
        self._call("check", "mo_dev_check")

    def stats(self) -> DeviceStats:
        """The pool's counters."""
        raw = _lib.MoDevStats()
        self._call("stats", "mo_dev_stats", ctypes.byref(raw))
        return DeviceStats(**{f.name: int(getattr(raw, f.name)) for f in fields(DeviceStats)})

    def arena_stats(self) -> ArenaStats:
        """The heap arena's counters (the planned region counts as one live block; metadata includes the pool's)."""
        raw = _lib.MoStats()
        self._call("stats", "mo_dev_arena_stats", ctypes.byref(raw))
        return _stats_from(raw)

    def reset_peaks(self) -> None:
        """Peaks (live, reserved, pending) restart from the current values."""
        self._call("reset peaks", "mo_dev_reset_peaks")

    def close(self) -> None:
        """Destroy the pool (one this object created); waits for its pending frees.

        Raises:
            AllocatorError: blocks are still live.
        """
        if self.closed or not self._owned:
            return
        self._call("close", "mo_dev_destroy")
        self.closed = True
