"""Host memory for swapped activations, with asynchronous copies on CUDA.

A tensor put into the store is copied into host memory (pinned on CUDA, on a side stream so the copy
overlaps compute); ``fetch`` brings it back to the device, and ``prefetch`` starts that copy early on
its own stream. On CPU the same path runs with synchronous copies, so it is tested without a GPU.
"""

from __future__ import annotations

import torch

__all__ = ["HostEntry", "HostStore"]


class HostEntry:
    """One swapped tensor: its host copy, the copy events, and (after a prefetch) its device copy."""

    __slots__ = ("store", "host", "block", "dtype", "shape", "device", "d2h_event", "device_copy", "h2d_event")

    def __init__(self, store: HostStore, host: torch.Tensor, block, dtype, shape, device) -> None:
        self.store, self.host, self.block = store, host, block
        self.dtype, self.shape, self.device = dtype, shape, device
        self.d2h_event = self.device_copy = self.h2d_event = None

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store._release(self)


class HostStore:
    """Host buffers for one model's swapped activations.

    Args:
        device (torch.device): the compute device the activations live on.
        capacity_bytes (int): size of the host arena; a put that does not fit is refused (returns None)
            and the caller keeps the tensor on the device, so a surprise never costs correctness.
    """

    def __init__(self, device: torch.device, capacity_bytes: int) -> None:
        from memopt.pools import Arena

        self.device = device
        self.cuda = device.type == "cuda"
        self.arena = Arena(max(int(capacity_bytes), 1 << 16), device="cpu", pin_memory=self.cuda,
                           hardened=True, canaries=False)
        self.d2h_stream = torch.cuda.Stream(device) if self.cuda else None
        self.h2d_stream = torch.cuda.Stream(device) if self.cuda else None
        self.put_bytes = 0
        self.fetched_bytes = 0
        self.refused_bytes = 0

    def put(self, tensor: torch.Tensor) -> HostEntry | None:
        """Copy a contiguous tensor to host memory; None when the arena is full."""
        from memopt.errors import ArenaExhausted

        nbytes = tensor.numel() * tensor.element_size()
        try:
            block = self.arena.alloc(max(nbytes, 1), alignment=64)
        except ArenaExhausted:
            self.refused_bytes += nbytes
            return None
        host = self.arena.tensor(block, tensor.dtype, tuple(tensor.shape))
        entry = HostEntry(self, host, block, tensor.dtype, tuple(tensor.shape), tensor.device)
        if self.cuda:
            self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h_stream):
                host.copy_(tensor, non_blocking=True)
                entry.d2h_event = torch.cuda.Event()
                entry.d2h_event.record(self.d2h_stream)
            # The device memory must not be reused by the caching allocator before the copy reads it.
            tensor.record_stream(self.d2h_stream)
        else:
            host.copy_(tensor)
        self.put_bytes += nbytes
        return entry

    def prefetch(self, entry: HostEntry) -> None:
        """Start copying an entry back to the device (on the H2D stream on CUDA; at once on CPU)."""
        if entry.device_copy is not None:
            return
        self.fetched_bytes += entry.host.numel() * entry.host.element_size()
        if not self.cuda:
            entry.device_copy = entry.host.clone()
            return
        with torch.cuda.stream(self.h2d_stream):
            self.h2d_stream.wait_event(entry.d2h_event)
            entry.device_copy = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
            entry.device_copy.copy_(entry.host, non_blocking=True)
            entry.h2d_event = torch.cuda.Event()
            entry.h2d_event.record(self.h2d_stream)

    def fetch(self, entry: HostEntry) -> torch.Tensor:
        """The entry's data on the device, ready on the current stream."""
        if not self.cuda:
            self.prefetch(entry)
            out, entry.device_copy = entry.device_copy, None
            return out
        self.prefetch(entry)
        current = torch.cuda.current_stream(entry.device)
        current.wait_event(entry.h2d_event)
        out, entry.device_copy = entry.device_copy, None
        out.record_stream(current)
        return out

    def _release(self, entry: HostEntry) -> None:
        if entry.block is None:
            return
        # A copy may still be reading or writing the host block; wait before it can be reused.
        for event in (entry.d2h_event, entry.h2d_event):
            if event is not None:
                event.synchronize()
        block, entry.block, entry.host = entry.block, None, None
        if not self.arena.closed:  # closed by handle.remove() while autograd still held the entry
            self.arena.free(block)

    def stats(self) -> dict:
        stats = self.arena.stats()
        return {"host_peak_bytes": stats.peak_bytes, "host_live_bytes": stats.allocated_bytes,
                "swapped_bytes_total": self.put_bytes, "fetched_bytes_total": self.fetched_bytes,
                "refused_bytes": self.refused_bytes, "host_pinned": bool(self.cuda)}

    def close(self) -> None:
        self.arena.close()
