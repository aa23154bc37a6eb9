"""Host memory for swapped activations, with asynchronous copies on CUDA.

A tensor put into the store is copied into host memory (page-locked on CUDA, on a side stream so the copy
overlaps compute); ``fetch`` brings it back to the device, and ``prefetch`` starts that copy early on its
own stream. Nothing here ever waits on the CPU for the GPU: a host block whose copies may still run is
freed later, once its events say they are done (``reclaim``). The device memory of a tensor being copied out
is held by the store until the end of the next unit's forward (``end_unit``), when the compute stream waits
for the copy (on the GPU, not the CPU) and lets it go: freed then, in the allocator's order of events, as the
simulator has it ("swap in flight"), not whenever the CPU, running ahead, next sees the copy done (which is
what ``record_stream`` would do). On CPU the same path runs with synchronous
copies, so it is tested without a GPU; the CUDA calls go through one object (``CudaOps``) that a test can
replace with fakes to run the asynchronous path on CPU tensors.
"""

from __future__ import annotations

import collections
import weakref

import torch

from .._warn import warn

__all__ = ["CudaOps", "HostEntry", "HostStore"]


class HostEntry:
    """One swapped tensor: its host copy, the copy events, and (after a prefetch) its device copy."""

    __slots__ = ("store", "host", "block", "dtype", "shape", "device", "d2h_event", "device_copy", "h2d_event",
                 "fetched")

    def __init__(self, store: HostStore, host: torch.Tensor, block, dtype, shape, device) -> None:
        self.store, self.host, self.block = store, host, block
        self.dtype, self.shape, self.device = dtype, shape, device
        self.d2h_event = self.device_copy = self.h2d_event = None
        self.fetched = False

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store._release(self)


class CudaOps:
    """The CUDA calls of a ``HostStore``: streams, events and pinning its host buffer. No memory crosses streams
    by ``record_stream``: a copy's memory stays the compute stream's, ordered by events (see ``end_unit`` and
    ``prefetch``).

    They need a GPU: tests/test_runtime_store.py runs the store's logic on CPU through fakes of them, and
    tests/test_runtime_cuda.py checks the calls themselves (pinning in place, no synchronisation in a step,
    CPU seeds of attention kept).

    Args:
        device (torch.device): the CUDA device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self):
        return torch.cuda.Stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def pin(self, buffer: torch.Tensor) -> bool:
        """Page-lock ``buffer``'s memory where it lies, at its exact size; False (and a warning) when refused.

        ``torch.empty(pin_memory=True)`` would round the request up to a power of two (its caching host
        allocator does; 26 GiB becomes 32 GiB) and keep it cached after use; registering an ordinary
        allocation pins exactly the bytes the plan needs and is undone with ``unpin``.
        """
        nbytes = buffer.numel() * buffer.element_size()
        # 0 = cudaHostRegisterDefault; torch's own pinned-memory helper (torch.cuda._pin_memory_utils) makes the
        # same call through the same binding.
        status = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if status != 0:
            warn(f"memopt: page-locking the {nbytes} byte host arena for swapped activations failed (cudaError "
                 f"{status}); its copies run synchronously. Lower MemoptConfig(host_budget=...) or raise the "
                 "locked-memory limit (ulimit -l)")
            return False
        return True

    def unpin(self, buffer_ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(buffer_ptr)


class HostStore:
    """Host buffers for one model's swapped activations.

    Args:
        device (torch.device): the compute device the activations live on; only tensors on it are swapped.
        capacity_bytes (int): size of the host arena, allocated (and on CUDA page-locked) at exactly this size;
            a put that does not fit is refused (returns None) and the caller keeps the tensor on the device,
            so a surprise never costs correctness.
        ops (CudaOps | None, default None): the stream, event and pinning calls; None uses CUDA's on a CUDA
            device and copies synchronously elsewhere. Tests pass fakes to run the asynchronous path on CPU.
    """

    def __init__(self, device: torch.device, capacity_bytes: int, ops: CudaOps | None = None) -> None:
        from memopt.pools import Arena

        self.device = device
        self.cuda = device.type == "cuda"
        self.ops = ops if ops is not None else (CudaOps(device) if self.cuda else None)
        self.asynchronous = self.ops is not None
        self.arena = Arena(max(int(capacity_bytes), 1 << 16), device="cpu", hardened=True, canaries=False)
        self.pinned = False
        self._unpin = None
        if self.asynchronous:
            buffer = self.arena.buffer
            self.pinned = bool(self.ops.pin(buffer))
            if self.pinned:
                # As torch's own helper does: unpin when the memory goes, if close() did not already.
                self._unpin = weakref.finalize(buffer.untyped_storage(), self.ops.unpin, buffer.data_ptr())
                self._unpin.atexit = False
        self.d2h_stream = self.ops.stream() if self.asynchronous else None
        self.h2d_stream = self.ops.stream() if self.asynchronous else None
        # Host blocks of dead entries whose copies may still run: (block, events), freed by ``reclaim``.
        self._pending: collections.deque = collections.deque()
        # Device tensors being copied out, with the last copy's event: this unit's, and the unit's before.
        self._copying: list[torch.Tensor] = []
        self._copying_event = None
        self._copied: list[torch.Tensor] = []
        self._copied_event = None
        self.put_bytes = 0
        self.fetched_bytes = 0
        self.refused_bytes = 0
        self.off_device_bytes = 0

    def put(self, tensor: torch.Tensor) -> HostEntry | None:
        """Copy a contiguous tensor to host memory; None when it is not on the store's device (flash
        attention saves its RNG seed and offset as CPU scalars, which take no device memory) or the arena is
        full."""
        from memopt.errors import ArenaExhausted

        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device != self.device:
            self.off_device_bytes += nbytes
            return None
        if self._pending:
            self.reclaim()
        try:
            block = self.arena.alloc(max(nbytes, 1), alignment=64)
        except ArenaExhausted:
            self.refused_bytes += nbytes
            return None
        host = self.arena.tensor(block, tensor.dtype, tuple(tensor.shape))
        entry = HostEntry(self, host, block, tensor.dtype, tuple(tensor.shape), tensor.device)
        if self.asynchronous:
            ops = self.ops
            self.d2h_stream.wait_stream(ops.current_stream())
            with ops.use(self.d2h_stream):
                host.copy_(tensor, non_blocking=True)
                entry.d2h_event = ops.event()
                entry.d2h_event.record(self.d2h_stream)
            # The device memory must not be reused before the copy has read it: held until end_unit.
            self._copying.append(tensor)
            self._copying_event = entry.d2h_event
        else:
            host.copy_(tensor)
        self.put_bytes += nbytes
        return entry

    def end_unit(self) -> None:
        """A unit's forward ended: the tensors the unit before it copied out go (the compute stream waits for
        their copies first, on the GPU); this unit's are held until the next ``end_unit``."""
        self._let_go(self._copied, self._copied_event)
        self._copied, self._copied_event = self._copying, self._copying_event
        self._copying, self._copying_event = [], None

    def end_forward(self) -> None:
        """The forward ended (or backward began): every tensor being copied out goes once its copy is done."""
        self.end_unit()
        self.end_unit()

    def _let_go(self, tensors: list, event) -> None:
        if tensors:
            # Copies on one stream finish in order: the last one's event covers them all.
            self.ops.current_stream().wait_event(event)
            tensors.clear()

    def prefetch(self, entry: HostEntry) -> None:
        """Start copying an entry back to the device (on the H2D stream on CUDA; at once on CPU). A no-op
        when the copy was started or the entry fetched already."""
        if entry.device_copy is not None or entry.fetched or entry.host is None:
            return
        self.fetched_bytes += entry.host.numel() * entry.host.element_size()
        if not self.asynchronous:
            entry.device_copy = entry.host.clone()
            return
        ops = self.ops
        # The copy back lands in memory of the compute stream's own pool: once autograd frees it, the allocator
        # hands it to the next compute-stream tensor at once (stream order makes that safe). Memory taken on
        # the copy stream and lent to the compute stream (record_stream) would stay taken until the CPU, running
        # ahead, saw the GPU done with it, while the next copies took more. The copy waits for the compute
        # stream's work queued so far, which may still use the memory: the gate the simulator gives it.
        current = ops.current_stream()
        entry.device_copy = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
        self.h2d_stream.wait_stream(current)
        with ops.use(self.h2d_stream):
            self.h2d_stream.wait_event(entry.d2h_event)
            entry.device_copy.copy_(entry.host, non_blocking=True)
            entry.h2d_event = ops.event()
            entry.h2d_event.record(self.h2d_stream)

    def fetch(self, entry: HostEntry) -> torch.Tensor:
        """The entry's data on the device, ready on the current stream (the stream waits; the CPU does not).
        A second fetch (a graph backpropagated twice, ``retain_graph=True``) copies back again."""
        if entry.device_copy is None:
            entry.fetched = False  # prefetch skips fetched entries; this one is asked for again
        self.prefetch(entry)
        out, entry.device_copy = entry.device_copy, None
        entry.fetched = True
        if self.asynchronous:
            self.ops.current_stream().wait_event(entry.h2d_event)  # the compute stream's own memory: no record_stream
        return out

    def _release(self, entry: HostEntry) -> None:
        """An entry died (autograd freed it): its host block is free once its copies are done. Never waits:
        a block whose copies may still run is left to ``reclaim``."""
        if entry.device_copy is not None and self.asynchronous:
            # A copy back never fetched: its memory goes back to the compute stream, which must not reuse it
            # before the copy is done.
            self.ops.current_stream().wait_event(entry.h2d_event)
            entry.device_copy = None
        block = entry.block
        if block is None:
            return
        entry.block = entry.host = None
        events = [event for event in (entry.d2h_event, entry.h2d_event) if event is not None]
        if all(event.query() for event in events):
            self._free(block)
        else:
            self._pending.append((block, events))

    def reclaim(self) -> int:
        """Free the host blocks of dead entries whose copies are done (asks each event, never waits); returns
        how many are still pending."""
        for _ in range(len(self._pending)):
            try:
                block, events = self._pending.popleft()
            except IndexError:  # another thread took the last one
                break
            if all(event.query() for event in events):
                self._free(block)
            else:
                self._pending.append((block, events))
        return len(self._pending)

    def _free(self, block) -> None:
        if not self.arena.closed:  # closed by handle.remove() while autograd still held the entry
            self.arena.free(block)

    def stats(self) -> dict:
        stats = self.arena.stats()
        return {"host_peak_bytes": stats.peak_bytes, "host_live_bytes": stats.allocated_bytes,
                "host_capacity_bytes": stats.capacity_bytes, "swapped_bytes_total": self.put_bytes,
                "fetched_bytes_total": self.fetched_bytes, "refused_bytes": self.refused_bytes,
                "off_device_bytes": self.off_device_bytes, "host_pending_blocks": len(self._pending),
                "host_pinned": self.pinned}

    def close(self) -> None:
        """Release the arena. On CUDA the copy streams are drained first, so unpinning the host memory never
        races a copy (a call from ``handle.remove()``, outside any hook: waiting is allowed here)."""
        if self.asynchronous:
            self.end_forward()
        if self._unpin is not None and self._unpin.alive:  # pinned: asynchronous copies
            self.d2h_stream.synchronize()
            self.h2d_stream.synchronize()
            self._unpin()
        self._pending.clear()
        self.arena.close()
