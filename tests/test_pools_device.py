"""Device pools (``memopt.pools._device``): stream-ordered frees, on host memory with fake streams.

A GPU runs the work queued on a stream after the CPU moved on, so a freed block may still be read by it.
These fakes queue work that runs only when the test says so: a block freed on one stream must not reach
another stream's allocation before the marker recorded at (or after) its free is done.
"""

from __future__ import annotations

import ctypes
import random
from collections import defaultdict

import pytest

from memopt.errors import ArenaExhausted, DoubleFree, InvalidFree
from memopt.pools._device import DevicePool

MIB = 1 << 20


class FakeStreams:
    """Markers on streams whose queued work runs only on ``run(stream)`` (or a wait on one of its markers)."""

    def __init__(self) -> None:
        self.queued: dict[int, int] = defaultdict(int)
        self.done: dict[int, int] = defaultdict(int)
        self.markers: dict[int, tuple[int, int]] = {}
        self.next_marker = 1
        self.waits = 0
        self.records = 0

    def record(self, stream: int) -> int:
        self.queued[stream] += 1
        marker, self.next_marker = self.next_marker, self.next_marker + 1
        self.markers[marker] = (stream, self.queued[stream])
        self.records += 1
        return marker

    def query(self, marker: int) -> int:
        stream, at = self.markers[marker]
        return int(self.done[stream] >= at)

    def wait(self, marker: int) -> int:
        stream, at = self.markers[marker]
        self.done[stream] = max(self.done[stream], at)
        self.waits += 1
        return 0

    def release(self, marker: int) -> None:
        del self.markers[marker]

    def launch(self, stream: int) -> None:
        self.queued[stream] += 1

    def run(self, stream: int) -> None:
        self.done[stream] = self.queued[stream]


class Overflow(FakeStreams):
    """FakeStreams that also lends memory from outside the region (a process-wide GPU allocator's fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []

    def overflow_alloc(self, nbytes: int) -> int:
        buf = ctypes.create_string_buffer(nbytes + 512)
        address = (ctypes.addressof(buf) + 511) // 512 * 512
        self.buffers[address] = buf
        return address

    def overflow_free(self, address: int) -> None:
        self.freed.append(address)
        del self.buffers[address]


@pytest.fixture
def fake():
    return FakeStreams()


def test_a_block_freed_on_one_stream_waits_for_it_before_another_gets_it(fake):
    pool = DevicePool.host(8 * MIB, ops=fake)
    a = pool.alloc(MIB, stream=1)
    pool.free(a, stream=1)
    others = [pool.alloc(MIB, stream=2) for _ in range(7)]  # all that is left, and not a
    assert a not in others
    assert pool.stats().pending_blocks == 1
    fake.run(1)
    assert pool.alloc(MIB, stream=2) == a
    pool.check()


def test_the_freeing_stream_takes_its_block_back_at_once(fake):
    pool = DevicePool.host(4 * MIB, ops=fake)
    a = pool.alloc(MIB, stream=1)
    pool.free(a, stream=1)
    assert pool.alloc(MIB, stream=1) == a
    stats = pool.stats()
    assert stats.stream_reuses == 1 and stats.pending_blocks == 0
    pool.check()


def test_record_stream_makes_the_free_wait_for_that_stream_too(fake):
    pool = DevicePool.host(4 * MIB, ops=fake)
    a = pool.alloc(MIB, stream=1)
    pool.record_stream(a, stream=2)
    pool.free(a, stream=1)
    fake.run(1)
    pool.collect()
    assert pool.stats().pending_blocks == 1
    assert pool.alloc(MIB, stream=1) != a  # not even the freeing stream: stream 2 may be reading it
    fake.run(2)
    pool.collect()
    assert pool.stats().pending_blocks == 0
    pool.check()


def test_a_full_region_waits_for_pending_frees_before_failing(fake):
    pool = DevicePool.host(4 * MIB, ops=fake)
    blocks = [pool.alloc(MIB, stream=1) for _ in range(4)]
    for b in blocks:
        pool.free(b, stream=1)
    big = pool.alloc(3 * MIB, stream=2)  # fits only once stream 1's work ran: the pool waits for it
    assert fake.waits >= 1 and pool.stats().marker_waits >= 1
    with pytest.raises(ArenaExhausted):
        pool.alloc(2 * MIB, stream=2)
    assert pool.stats().failed_allocs == 1
    pool.free(big, stream=2)
    pool.check()


def test_frees_share_markers_in_batches(fake):
    pool = DevicePool.host(64 * MIB, ops=fake)
    blocks = [pool.alloc(4096 + 512 * i, stream=1) for i in range(96)]
    for b in blocks:
        pool.free(b, stream=1)
    assert 1 <= pool.stats().markers_recorded <= 96 // 32
    pool.collect()  # the last open batch gets its marker
    assert pool.stats().markers_recorded <= 96 // 32 + 1
    fake.run(1)
    pool.collect()
    assert pool.stats().pending_blocks == 0
    pool.check()


def test_double_and_invalid_frees_are_refused_while_pending(fake):
    pool = DevicePool.host(4 * MIB, ops=fake)
    a = pool.alloc(4096, stream=1)
    pool.free(a, stream=1)
    with pytest.raises(DoubleFree, match="already freed"):
        pool.free(a, stream=1)
    with pytest.raises(InvalidFree, match="neither in the region"):
        pool.free(12345, stream=1)
    with pytest.raises(InvalidFree):
        pool.free(pool.base_address + 512, stream=1)
    pool.check()


def test_overflow_memory_is_lent_and_returned_after_its_stream():
    fake = Overflow()
    pool = DevicePool.host(MIB, ops=fake)
    a = pool.alloc(MIB, stream=1)
    b = pool.alloc(4096, stream=1)
    assert not pool.base_address <= b < pool.base_address + MIB
    assert pool.stats().overflow_allocs == 1 and pool.stats().overflow_bytes == 4096
    pool.free(b, stream=1)
    pool.collect()  # marked, not done
    assert fake.freed == []
    fake.run(1)
    pool.collect()
    assert fake.freed == [b] and pool.stats().overflow_bytes == 0
    pool.free(a, stream=1)
    pool.check()


def test_close_waits_for_pending_frees(fake):
    pool = DevicePool.host(MIB, ops=fake)
    a = pool.alloc(4096, stream=3)
    with pytest.raises(Exception, match="live blocks"):
        pool.close()
    pool.free(a, stream=3)
    pool.close()
    assert fake.waits >= 1 and fake.markers == {}


def test_without_ops_frees_are_immediate():
    pool = DevicePool.host(MIB)
    a = pool.alloc(4096, stream=1)
    pool.free(a, stream=1)
    assert pool.stats().pending_blocks == 0 and pool.alloc(4096, stream=2) == a


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_never_hand_out_memory_a_stream_may_use(seed):
    """Random allocations, frees and record_streams on three streams, whose work runs at random: every block
    handed out is checked against the blocks freed before, with the work each stream had queued by then."""
    rng = random.Random(seed)
    fake = FakeStreams()
    pool = DevicePool.host(2 * MIB, quarantine=rng.choice((0, 4)), ops=fake)
    live: dict[int, tuple[int, int, set[int]]] = {}  # address -> (nbytes, stream, other streams)
    freed: list[tuple[int, int, dict[int, int]]] = []  # (address, end, stream -> its work queued at the free)
    memory = (ctypes.c_uint8 * (2 * MIB)).from_address(pool.base_address)
    for step in range(3000):
        op = rng.random()
        stream = rng.randrange(3)
        if op < 0.45 or not live:
            nbytes = rng.choice((16, 512, 4096, 30000, 100_000))
            try:
                address = pool.alloc(nbytes, stream)
            except ArenaExhausted:
                continue
            for f_address, f_end, queued in freed:
                if address < f_end and f_address < address + nbytes:
                    for s, at in queued.items():
                        assert s == stream or fake.done[s] >= at, (
                            f"step {step}: 0x{address:x} reached stream {stream} while stream {s} may still use it")
            for other, (n, _, _) in live.items():
                assert address + nbytes <= other or other + n <= address, "two live blocks overlap"
            live[address] = (nbytes, stream, set())
            offset = address - pool.base_address
            ctypes.memset(ctypes.addressof(memory) + offset, step % 251, nbytes)
        elif op < 0.8:
            address = rng.choice(list(live))
            nbytes, own, others = live.pop(address)
            queued = {own: fake.queued[own]} | {s: fake.queued[s] for s in others}
            fake.launch(own)  # the block's last use, queued before the free
            queued[own] = fake.queued[own]
            pool.free(address, own)
            freed = [f for f in freed if f[0] != address][-200:] + [(address, address + nbytes, queued)]
        elif op < 0.88:
            address = rng.choice(list(live))
            if stream != live[address][1] and len(live[address][2]) < 4:
                pool.record_stream(address, stream)
                live[address][2].add(stream)
                fake.launch(stream)
        else:
            fake.run(rng.randrange(3))
        if step % 97 == 0:
            pool.check()
    for address, (_, own, _) in list(live.items()):
        pool.free(address, own)
    pool.collect()
    for s in range(3):
        fake.run(s)
    pool.collect()
    pool.check()
    stats = pool.stats()
    assert stats.live_blocks == 0 and stats.pending_blocks == 0 and stats.deferred_frees > 0
