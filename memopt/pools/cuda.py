"""A CUDA memory backend for torch over one reserved region, with the C core's checks and statistics.

``cuda_allocator(...)`` reserves ``capacity_bytes`` of device memory with ``cuMemAlloc`` (without
initialising torch's CUDA state) and serves torch's allocations out of it through
``torch.cuda.memory.CUDAPluggableAllocator``, in one of two ways:

- ``install()``: every CUDA tensor of the process comes from the region. It must run before torch
  initialises CUDA (the first CUDA tensor, ``torch.cuda.current_device()``, ...), which is checked. Under a
  pluggable allocator torch checks no NULL, ignores ``Tensor.record_stream`` and has no memory statistics,
  so the backend: orders every free by its stream (a block is reused by another stream only once a CUDA
  event recorded at its free is done), takes ``record_stream`` through ``record_stream()`` here, overflows
  to ``cuMemAlloc`` when the region is full and stops the process with a message when even that fails
  (a NULL would become an illegal memory access), and reports memory through ``memory_stats()`` and the
  functions of this module. ``step()`` records one training step and replays its layout (MEMO).
- ``pool()``: a ``torch.cuda.MemPool`` over the region; torch's caching allocator splits and caches the
  segments it takes from it, handles streams itself and raises ``OutOfMemoryError`` when the region is
  full. ``torch.cuda.use_mem_pool`` routes only the calling thread, and autograd runs backward on a
  thread of its own, so backward's tensors would bypass the pool: use ``use_pool()``, which routes every
  thread's allocations on the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any, Iterator

import torch

from memopt.errors import AllocatorError, CorruptionError

from . import _lib
from ._device import Departure, DevicePool, DeviceStats
from .arena import DEFAULT_QUARANTINE_BLOCKS, ArenaStats

__all__ = ["CudaArenaAllocator", "cuda_allocator", "max_memory_allocated", "max_memory_reserved", "memory_allocated",
           "memory_reserved", "memory_stats", "record_stream", "reset_peak_memory_stats"]

ALIGNMENT_BYTES = 512
_active: dict[int, CudaArenaAllocator] = {}
_installed: dict[int, CudaArenaAllocator] = {}
_active_lock = threading.Lock()


class CudaArenaAllocator:
    """The region of one CUDA device and the pluggable allocator over it. Create with ``cuda_allocator``.

    Attributes:
        device (int): CUDA device index.
        capacity_bytes (int): bytes reserved.
        base_address (int): device address of the region's first byte.
        replay_warmup_steps (int): steps ``step()`` runs on the heap before it records one.
        max_replans (int): times ``step()`` records again after a step that departed from the plan.
        replay_plan (memopt.pools._replay.ReplayPlan | None): the layout being replayed.
        replay_note (str): why there is no plan, when there is none after a recorded step.
    """

    def __init__(self, device: int, capacity_bytes: int, handle: int, base_address: int, *,
                 replay_warmup_steps: int = 1, max_replans: int = 2) -> None:
        self.device = device
        self.capacity_bytes = capacity_bytes
        self.base_address = base_address
        self.replay_warmup_steps = replay_warmup_steps
        self.max_replans = max_replans
        self.replay_plan: Any = None  # a memopt.pools._replay.ReplayPlan
        self.replay_note = ""
        self._lib = _lib.library()
        self._pool = DevicePool(handle, base_address, capacity_bytes, ALIGNMENT_BYTES, owned=False,
                                name=f"CUDA arena of device {device}")
        self._pluggable: Any = None
        self._closed = False
        self._steps = 0
        self._replans = 0

    # -- torch's side ------------------------------------------------------------------------------------
    def allocator(self) -> Any:
        """The ``torch.cuda.memory.CUDAPluggableAllocator`` whose malloc and free are this arena's."""
        self._open("make an allocator")
        if self._pluggable is None:
            self._pluggable = torch.cuda.memory.CUDAPluggableAllocator(
                str(_lib.library_path()), "mo_cuda_malloc", "mo_cuda_free")
        return self._pluggable

    def pool(self) -> Any:
        """A new ``torch.cuda.MemPool`` over this arena; use it with ``use_pool(pool)``."""
        return torch.cuda.MemPool(self.allocator().allocator())

    @contextlib.contextmanager
    def use_pool(self, pool: Any) -> Iterator[Any]:
        """Route every thread's allocations on this device into ``pool`` while the block runs.

        ``torch.cuda.use_mem_pool`` routes the calling thread only; autograd's backward runs on a thread
        of its own per device, so its gradients and temporaries would bypass the pool. This routes them
        too (torch's device-wide routing, as CUDA graph capture uses), and so also any other thread's
        allocations on the device meanwhile.

        Args:
            pool (torch.cuda.MemPool): a pool from ``pool()``.
        """
        self._open("route allocations")
        torch._C._cuda_beginAllocateToPool(self.device, pool.id)
        try:
            yield pool
        finally:
            torch._C._cuda_endAllocateToPool(self.device, pool.id)
            torch._C._cuda_releasePool(self.device, pool.id)

    def install(self) -> None:
        """Serve every CUDA allocation of this process from the arena.

        Raises:
            RuntimeError: torch has initialised CUDA already (then its caching allocator is in use and
                torch refuses the switch).
        """
        self._open("install")
        if torch.cuda.is_initialized():
            raise RuntimeError(
                f"memopt's CUDA allocator of device {self.device} cannot be installed: torch has initialised CUDA "
                "already, so its caching allocator is in use and torch refuses to switch. Call "
                "cuda_allocator(...).install() first thing, before any CUDA tensor, torch.cuda.current_device(), "
                "torch.cuda.set_device() or model.cuda(); or use backend.pool() with backend.use_pool(pool)")
        self._call("install", "mo_cuda_set_process_wide", self.device, 1)
        try:
            torch.cuda.memory.change_current_allocator(self.allocator())
        except RuntimeError as exc:
            self._call("install", "mo_cuda_set_process_wide", self.device, 0)
            raise RuntimeError(f"memopt's CUDA allocator of device {self.device} cannot be installed: {exc}; install "
                               "it before anything touches CUDA") from exc
        with _active_lock:
            _installed[self.device] = self
        # Until a replay is armed the heap places blocks lowest first (see step()): from here, so that what
        # lives long from before the first step (a profile's cuBLAS workspaces, which a best fit can place
        # above the profile's activations) sits low too. A process that never calls step() keeps it: an
        # allocation then costs O(blocks) instead of a size-class lookup.
        self._pool.set_lowest_first(True)

    @property
    def installed(self) -> bool:
        """Whether the arena serves every CUDA allocation of the process."""
        return _installed.get(self.device) is self

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """``tensor.record_stream(stream)`` that holds under this allocator (torch's is a no-op there): the
        tensor's memory is not reused before the work queued on ``stream`` up to its free is done.

        Raises:
            AllocatorError: the tensor's memory is not a live block of this arena, or already names four
                other streams.
        """
        self._open("record a stream")
        handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
        rc = self._lib.mo_cuda_record_stream(tensor.data_ptr(), self.device, handle)
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"CUDA arena of device {self.device}: record_stream: {_lib.last_error()}")

    # -- record and replay -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Mark one training step (installed arenas). After ``replay_warmup_steps`` steps on the heap, one
        step is recorded and laid out (planners/layout.py); the following steps' allocations are served at
        the planned offsets, those that depart from the plan from the heap (counted in ``device_stats()``).
        After a step with more fallbacks than planned allocations (another shape), the next is recorded
        again, at most ``max_replans`` times. A recorded step that raises is not laid out; the next records.

        Raises:
            AllocatorError: the arena is not installed (a MemPool's allocator sees torch's segments, not its
                tensors, so there is no step to replay).
        """
        self._open("run a step")
        if not self.installed:
            raise AllocatorError(f"CUDA arena of device {self.device}: step() replays the tensors of a step, which "
                                 "only an installed arena sees; call install() first thing in the process")
        stats = self._pool.stats()
        armed = stats.plan_bytes > 0
        record = not armed and self._steps == self.replay_warmup_steps
        # The steps before a replay is armed place heap blocks lowest first: what they leave alive (optimizer
        # state made in the first step) packs low, and the layout among it (_arm) reserves little above it.
        self._pool.set_lowest_first(not armed and self._steps <= self.replay_warmup_steps)
        if armed:
            self._pool.step()
        elif record:
            self._pool.record_begin()
        try:
            yield
        except BaseException:
            if record:
                self._pool.record_end()
            raise
        self._steps += 1
        if record:
            self._arm(self._pool.record_end())
        elif armed:
            self._after_replay(stats)

    def restart_replay(self) -> None:
        """Drop the step layout being replayed and start over: the next ``replay_warmup_steps`` steps run on the
        heap, then one is recorded. For a new workload in the same process (another model, batch shape or
        plan), whose steps would otherwise fall back to the heap until ``max_replans`` is spent.

        Raises:
            AllocatorError: blocks placed by the layout are still live (free the last step's tensors first).
        """
        self._open("restart the replay")
        if self._pool.stats().plan_bytes > 0:
            self._pool.unplan()
        self._pool.set_lowest_first(True)  # as from install(): what the new workload keeps (its profile's) packs low
        self.replay_plan = None
        self.replay_note = ""
        self._steps = 0
        self._replans = 0

    def _arm(self, trace: list[tuple[int, int, int | None]]) -> None:
        from ._replay import plan_replay  # the planners (numpy) only when a step is laid out

        # Laid out among the blocks alive now (parameters, gradients, optimizer state), in the gaps between
        # them; one region placed by the heap when that layout does not fit or the heap changed meanwhile.
        plan = plan_replay(trace, ALIGNMENT_BYTES, free_runs=self._pool.free_runs())
        if plan is not None:
            try:
                self._pool.plan_at(plan.nbytes, plan.offsets, plan.regions)
            except AllocatorError:
                plan = None
        if plan is None:
            plan = plan_replay(trace, ALIGNMENT_BYTES)
            if plan is None:
                self.replay_note = "the recorded step freed none of its allocations; nothing to replay"
                return
            self._pool.collect(wait=True)  # pending frees could hold the room the region needs
            try:
                self._pool.plan(plan.nbytes, plan.offsets, plan.region_bytes)
            except AllocatorError as exc:
                self.replay_note = f"the planned region could not be placed: {exc}"
                return
        self._pool.set_lowest_first(False)  # armed: the heap serves what departs from the plan, at its own speed
        self.replay_plan = plan
        self.replay_note = ""

    def _after_replay(self, before: DeviceStats) -> None:
        now = self._pool.stats()
        planned = now.planned_allocs - before.planned_allocs
        fallbacks = now.fallback_allocs - before.fallback_allocs
        if fallbacks <= planned or self._replans >= self.max_replans:
            return
        try:
            self._pool.unplan()
        except AllocatorError:
            return  # planned blocks outlive the step: keep the plan rather than wait for them
        self.replay_plan = None
        self._replans += 1
        self._steps = self.replay_warmup_steps  # the next step is recorded

    # -- statistics --------------------------------------------------------------------------------------
    def stats(self) -> ArenaStats:
        """The heap arena's counters (torch.cuda.memory_stats() does not see a pluggable allocator)."""
        self._open("report stats")
        return self._pool.arena_stats()

    def device_stats(self) -> DeviceStats:
        """The pool's counters: live and reserved bytes with their peaks, pending frees, replay."""
        self._open("report stats")
        return self._pool.stats()

    def departures(self) -> list[Departure]:
        """The first allocations of the replayed steps that the plan could not serve, and why (at most 64; see
        ``DevicePool.departures``); empty while no plan is armed."""
        self._open("list the departures from the plan")
        return self._pool.departures()

    def memory_stats(self) -> dict[str, int]:
        """torch.cuda.memory_stats()'s main keys, from this arena (torch raises under a pluggable allocator).

        ``allocated_bytes`` are requested bytes of live tensors; ``reserved_bytes`` the part of the region in
        use (up to its highest live, pending or planned byte) plus memory taken outside it.
        """
        s = self.device_stats()
        return {
            "allocated_bytes.all.current": s.live_bytes, "allocated_bytes.all.peak": s.peak_live_bytes,
            "reserved_bytes.all.current": s.reserved_bytes, "reserved_bytes.all.peak": s.peak_reserved_bytes,
            "active.all.current": s.live_blocks, "num_alloc_retries": s.marker_waits, "num_ooms": s.failed_allocs,
            "inactive_split_bytes.all.current": s.pending_bytes,
        }

    def reset_peak_stats(self) -> None:
        """Peaks restart from the current values (as torch.cuda.reset_peak_memory_stats)."""
        self._open("reset peaks")
        self._pool.reset_peaks()

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
        self._open("check")
        self._pool.check()
        count, message = self.rejected_frees()
        if count:
            raise CorruptionError(f"CUDA arena of device {self.device}: {count} free(s) were refused; last: {message}")

    def close(self) -> None:
        """Give the region back to the driver. Every tensor from the arena must be gone (and its MemPool).

        Raises:
            AllocatorError: blocks are still live, or the arena is installed process-wide.
        """
        if self._closed:
            return
        self._call("close", "mo_cuda_shutdown", self.device)
        self._closed = True
        with _active_lock:
            _active.pop(self.device, None)

    def _open(self, what: str) -> None:
        if self._closed:
            raise AllocatorError(f"CUDA arena of device {self.device} is closed; it can no longer {what}")

    def _call(self, what: str, fn: str, *args: Any) -> None:
        rc = getattr(self._lib, fn)(*args)
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"CUDA arena of device {self.device}: {what}: {_lib.last_error()}")


def _device_index(device: int | str | torch.device | None) -> int:
    """The device's index, without initialising torch's CUDA state (which would make install() impossible)."""
    if device is None:
        # Before initialisation torch's current device is 0 (set_device initialises).
        return torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise ValueError(f"device must be a CUDA device index or name such as 'cuda:0', got {device!r}")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device!r}")
    if dev.index is None:
        return _device_index(None)
    return dev.index


def cuda_allocator(capacity_bytes: int | str, device: int | str | torch.device | None = None,
                   hardened: bool = True, quarantine: int | None = None) -> CudaArenaAllocator:
    """Reserve device memory and make a torch allocator backend over it. Initialises no torch CUDA state.

    Args:
        capacity_bytes (int | str): bytes of device memory to reserve, e.g. ``"8GiB"`` (rounded down to 512).
        device (int | str | torch.device | None, default None): the CUDA device; None is the current one
            (device 0 while torch has not initialised CUDA).
        hardened (bool, default True): quarantine freed blocks (canaries and poison need host memory
            and are not available here). Double, unknown and interior frees are detected either way.
        quarantine (int | None, default None): freed blocks held back from reuse; None: 16 if hardened.

    Returns:
        CudaArenaAllocator: use ``.install()`` first thing in the process, or ``.pool()`` with ``.use_pool``.

    Raises:
        ValueError: an option is invalid, or CUDA is not available.
        AllocatorError: the device already has an arena, or the driver refused the reservation.

    Example:
        >>> backend = memopt.pools.cuda_allocator("1GiB")  # doctest: +SKIP
        >>> pool = backend.pool()  # doctest: +SKIP
        >>> with backend.use_pool(pool):  # doctest: +SKIP
        ...     x = torch.empty(1 << 20, device="cuda")
    """
    from memopt.units import parse_bytes

    capacity = parse_bytes(capacity_bytes, what="capacity_bytes")
    if not torch.cuda.is_available():
        raise ValueError("cuda_allocator needs a CUDA device and none is available; use Arena(..., device='cpu')")
    index = _device_index(device)
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device {device!r} is not one of the {count} CUDA device(s) here; pass 0 to {count - 1}")
    if capacity < ALIGNMENT_BYTES:
        raise ValueError(f"capacity_bytes must be at least {ALIGNMENT_BYTES}, got {capacity_bytes!r}; e.g. '8GiB'")
    if quarantine is None:
        quarantine = DEFAULT_QUARANTINE_BLOCKS if hardened else 0
    if isinstance(quarantine, bool) or not isinstance(quarantine, int) or not 0 <= quarantine < 2**31:
        raise ValueError(f"quarantine must be a block count in [0, 2**31), got {quarantine!r}; e.g. 16")
    lib = _lib.library()
    handle, base = ctypes.c_uint64(), ctypes.c_uint64()
    seed = int.from_bytes(os.urandom(8), "little") or 1
    capacity -= capacity % ALIGNMENT_BYTES
    with _active_lock:
        rc = lib.mo_cuda_init(index, capacity, quarantine, seed, ctypes.byref(handle), ctypes.byref(base))
        if rc != _lib.OK:
            raise _lib.error_for(rc)(f"CUDA arena of device {index}: reserving {capacity} bytes failed: "
                                     f"{_lib.last_error()}")
        backend = CudaArenaAllocator(index, capacity, handle.value, base.value)
        _active[index] = backend
    return backend


# -- torch.cuda's memory functions, answered by an installed arena ---------------------------------------
def _installed_for(device: int | str | torch.device | None) -> CudaArenaAllocator | None:
    if not _installed or (isinstance(device, torch.device) and device.type != "cuda"):
        return None
    return _installed.get(_device_index(device))


def memory_stats(device: int | str | torch.device | None = None) -> dict[str, Any]:
    """``torch.cuda.memory_stats``, or the installed memopt arena's figures for its device (torch raises there)."""
    backend = _installed_for(device)
    return backend.memory_stats() if backend is not None else torch.cuda.memory_stats(device)


def memory_allocated(device: int | str | torch.device | None = None) -> int:
    """Bytes of live tensors on the device (``torch.cuda.memory_allocated`` where no arena is installed)."""
    backend = _installed_for(device)
    return backend.device_stats().live_bytes if backend is not None else torch.cuda.memory_allocated(device)


def max_memory_allocated(device: int | str | torch.device | None = None) -> int:
    """Peak bytes of live tensors on the device since the last reset."""
    backend = _installed_for(device)
    return backend.device_stats().peak_live_bytes if backend is not None else torch.cuda.max_memory_allocated(device)


def memory_reserved(device: int | str | torch.device | None = None) -> int:
    """Bytes the allocator holds on the device (an installed arena: the part of its region in use)."""
    backend = _installed_for(device)
    return backend.device_stats().reserved_bytes if backend is not None else torch.cuda.memory_reserved(device)


def max_memory_reserved(device: int | str | torch.device | None = None) -> int:
    """Peak of ``memory_reserved`` since the last reset."""
    backend = _installed_for(device)
    return backend.device_stats().peak_reserved_bytes if backend is not None else torch.cuda.max_memory_reserved(device)


def reset_peak_memory_stats(device: int | str | torch.device | None = None) -> None:
    """Peaks restart from the current values."""
    backend = _installed_for(device)
    if backend is not None:
        backend.reset_peak_stats()
    else:
        torch.cuda.reset_peak_memory_stats(device)


def record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """``tensor.record_stream(stream)``, made to hold when the tensor's memory is an installed memopt arena's
    (torch's own is a no-op under a pluggable allocator). Code that may run under either calls this."""
    backend = _installed_for(tensor.device) if tensor.device.type == "cuda" else None
    if backend is None:
        tensor.record_stream(stream)
        return
    backend.record_stream(tensor, stream)
