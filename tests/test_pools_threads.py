"""Threads allocating and freeing on one arena at once: no overlap, no lost block.

Each thread fills every block it gets with a byte of its own and verifies it before freeing: a block
handed to two threads at once would show the other thread's byte. The allocator calls and the fills
run outside the GIL (ctypes releases it), so threads really are inside the C library together.
"""

from __future__ import annotations

import ctypes
import random
import threading
import time

import pytest

from memopt.pools import Arena

THREADS = 8


def _worker(arena: Arena, index: int, seconds: float, results: list, barrier: threading.Barrier) -> None:
    rng = random.Random(index)
    base = arena.buffer.data_ptr()
    live: list[tuple] = []
    allocs = frees = 0
    barrier.wait()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if len(live) < 48 and (not live or rng.random() < 0.55):
                nbytes = max(1, int(2 ** rng.uniform(0, 14)))
                block = arena.alloc(nbytes, alignment=rng.choice((16, 64, 256)))
                tag = (index * 37 + allocs) % 255 + 1
                ctypes.memset(base + block.offset, tag, nbytes)
                live.append((block, tag))
                allocs += 1
            else:
                block, tag = live.pop(rng.randrange(len(live)))
                if ctypes.string_at(base + block.offset, block.nbytes) != bytes([tag]) * block.nbytes:
                    raise AssertionError(f"thread {index}: block at {block.offset} was overwritten: overlap")
                arena.free(block)
                frees += 1
        results[index] = (allocs, frees, live)
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        results[index] = exc


def run_threads(seconds: float) -> None:
    arena = Arena("64MiB", hardened=True)
    results: list = [None] * THREADS
    barrier = threading.Barrier(THREADS)
    threads = [threading.Thread(target=_worker, args=(arena, i, seconds, results, barrier)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    errors = [r for r in results if isinstance(r, BaseException) or r is None]
    assert not errors, errors
    stats = arena.stats()
    live = [block for _, _, blocks in results for block, _ in blocks]
    assert stats.live_blocks == len(live), "a block was lost or counted twice"
    assert stats.alloc_count == sum(r[0] for r in results)
    assert stats.free_count == sum(r[1] for r in results)
    spans = sorted((b.offset, b.offset + b.span_bytes) for b in live)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "live blocks overlap"
    arena.check()
    for block in live:
        arena.free(block)
    stats = arena.stats()
    assert stats.allocated_bytes == 0 and stats.live_blocks == 0
    assert sum(r[0] for r in results) > 1000, "the threads hardly ran; the test proved nothing"
    arena.check()
    arena.close()


def test_threads_short():
    run_threads(seconds=2.0)


@pytest.mark.slow
def test_threads_ten_seconds():
    run_threads(seconds=10.0)
