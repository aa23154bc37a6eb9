"""Record and replay (MEMO) in device pools, on host memory, against recorded CPU training traces.

A step of a tiny GPT is recorded with torch's profiler (bench/alloc.py's ``record_steps``); the pool records
the first step, ``plan_replay`` lays it out (planners/layout.py), and the following steps are replayed. Every
block is filled with its own byte while live and checked at its free, so two live blocks that overlap are
caught; ``check()`` walks every invariant after each step.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import pytest
import torch

from memopt.errors import AllocatorError, DoubleFree, InvalidFree
from memopt.pools._device import Departure, DevicePool
from memopt.pools._lib import InvalidRequest
from memopt.pools._replay import find_repeated_block, plan_replay
from memopt.testing import TinyGPT

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _bench_alloc():
    spec = importlib.util.spec_from_file_location("memopt_bench_alloc", ROOT / "bench" / "alloc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench_alloc()
STEP = BENCH.STEP


def gpt_steps(seq: int, steps: int = 3) -> list[tuple]:
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, hidden=64, layers=3, heads=4, max_tokens=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, seq))

    def step():
        model(ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return BENCH.record_steps(step, steps)


@pytest.fixture(scope="module")
def trace64():
    return gpt_steps(64)


@pytest.fixture(scope="module")
def trace48():
    return gpt_steps(48)


class Replayer:
    """Replays ``(id, kind, nbytes)`` records into a host pool, each live block filled with its own byte."""

    def __init__(self, pool: DevicePool) -> None:
        self.pool = pool
        self.live: dict[int, tuple[int, int, int]] = {}  # id -> (address, nbytes, fill)
        self.serial = 0

    def alloc(self, ident: int, nbytes: int, stream: int = 0) -> int:
        address = self.pool.alloc(nbytes, stream)
        self.serial += 1
        fill = self.serial % 251 + 1
        ctypes.memset(address, fill, nbytes)
        self.live[ident] = (address, nbytes, fill)
        return address

    def free(self, ident: int, stream: int = 0) -> None:
        address, nbytes, fill = self.live.pop(ident)
        assert ctypes.string_at(address, nbytes) == bytes([fill]) * nbytes, f"block {ident} was overwritten: blocks overlap"
        self.pool.free(address, stream)

    def run(self, records, on_step=None) -> None:
        marks = 0
        for ident, kind, nbytes in records:
            if kind == STEP:
                marks += 1
                if on_step:
                    on_step(marks)
            elif kind:
                self.free(ident)
            else:
                self.alloc(ident, nbytes)


def record_and_replay(pool: DevicePool, records) -> Replayer:
    """Mark 1 starts the recording, mark 2 lays the step out and arms it, every later mark starts a step."""
    replayer = Replayer(pool)

    def on_step(mark):
        if mark == 1:
            pool.record_begin()
        elif mark == 2:
            plan = plan_replay(pool.record_end(), pool.alignment)
            pool.collect(wait=True)
            pool.plan(plan.nbytes, plan.offsets, plan.region_bytes)
            pool.reset_peaks()
        if mark >= 2:
            pool.step()
        pool.check()

    replayer.run(records, on_step)
    pool.check()
    return replayer


def allocations_after(records, mark: int) -> int:
    marks = count = 0
    for _, kind, _ in records:
        marks += kind == STEP
        count += kind == 0 and marks >= mark
    return count


def test_replayed_steps_come_from_the_plan_and_reserve_what_they_use(trace64):
    pool = DevicePool.host(64 * MIB, quarantine=16)
    record_and_replay(pool, trace64)
    stats = pool.stats()
    replayed = allocations_after(trace64, 2)
    assert stats.planned_allocs == replayed and stats.fallback_allocs == 0
    steady_live = BENCH.peak_live_bytes(trace64, from_step=2)
    assert stats.peak_reserved_bytes <= 1.02 * steady_live, (stats.peak_reserved_bytes, steady_live)
    # The same steps on the heap alone (what a CUDA arena did before) reserve more for the same tensors.
    heap = DevicePool.host(64 * MIB, quarantine=16)
    Replayer(heap).run(trace64, lambda mark: heap.reset_peaks() if mark == 2 else None)
    assert heap.stats().peak_reserved_bytes > 1.05 * steady_live
    assert stats.peak_reserved_bytes < heap.stats().peak_reserved_bytes


def test_another_shape_falls_back_to_the_heap_and_stays_correct(trace64, trace48):
    pool = DevicePool.host(64 * MIB, quarantine=4)
    first = [r for r in trace64 if True]
    cut = [i for i, r in enumerate(first) if r[1] == STEP][1]  # the second mark: the first step is recorded
    replayer = Replayer(pool)
    pool.record_begin()
    replayer.run(first[1:cut])
    plan = plan_replay(pool.record_end(), pool.alignment)
    pool.collect(wait=True)
    pool.plan(plan.nbytes, plan.offsets, plan.region_bytes)
    for ident in list(replayer.live):
        replayer.free(ident)
    other = Replayer(pool)
    other.run(trace48, lambda mark: (pool.step(), pool.check()))
    stats = pool.stats()
    assert stats.fallback_allocs > stats.planned_allocs  # sequence lengths differ: most sizes never match
    assert stats.fallback_allocs + stats.planned_allocs + stats.unplanned_allocs == allocations_after(trace48, 0)
    assert stats.size_departures + stats.busy_departures + stats.stream_conflicts == stats.fallback_allocs
    log = pool.departures()  # the first 64, in order: each asked bytes its position was not planned for
    assert len(log) == 64 < stats.fallback_allocs
    assert [d.step for d in log] == sorted(d.step for d in log) and log[0].step == 1
    assert all(d.nbytes != d.planned_nbytes for d in log if d.reason == "size")
    pool.check()


def test_one_allocation_more_or_less_does_not_end_the_replay(trace64):
    pool = DevicePool.host(64 * MIB)
    marks = [i for i, r in enumerate(trace64) if r[1] == STEP]
    step1, step2 = trace64[marks[0]:marks[1]], trace64[marks[1]:marks[2]]
    # Other control flow in step 2: one extra temporary early on, one allocation (and its free) skipped later.
    allocs = [i for i, r in enumerate(step2) if r[1] == 0]
    skipped = step2[allocs[len(allocs) // 2]][0]
    skip_at = allocs[len(allocs) // 2]
    free_at = next(i for i in range(skip_at + 1, len(step2)) if step2[i][:2] == (skipped, 1))
    changed = [r for i, r in enumerate(step2) if i not in (skip_at, free_at)]
    changed[5:5] = [(10_000, 0, 12345), (10_000, 1, 0)]
    record_and_replay(pool, step1 + changed + [(0, STEP, 0)])
    stats = pool.stats()
    assert stats.fallback_allocs <= 3 and stats.planned_allocs >= len(allocs) - 4, stats


def test_a_planned_block_kept_past_its_step_is_never_overwritten():
    pool = DevicePool.host(4 * MIB)
    replayer = Replayer(pool)
    pool.record_begin()
    a = replayer.alloc(1, 4096)
    replayer.free(1)
    replayer.alloc(2, 4096)
    replayer.free(2)
    plan = plan_replay(pool.record_end(), pool.alignment)
    assert plan.offsets == [0, 0] and plan.region_bytes == 4096
    pool.plan(plan.nbytes, plan.offsets, plan.region_bytes)
    pool.step()
    kept = replayer.alloc(1, 4096)  # planned; not freed in this step
    second = replayer.alloc(2, 4096)  # planned at the same offset, which is still in use: the heap
    assert second != kept and pool.stats().fallback_allocs == pool.stats().busy_departures == 1
    assert pool.departures() == [Departure(step=1, position=1, nbytes=4096, planned_nbytes=4096, reason="busy")]
    pool.step()
    again = replayer.alloc(3, 4096)
    assert again != kept  # position 0's range is still live: the heap again
    for ident in (2, 3, 1):
        replayer.free(ident)  # each checks its bytes
    pool.check()


def test_a_planned_range_waits_for_the_stream_that_freed_it():
    from test_pools_device import FakeStreams

    fake = FakeStreams()
    pool = DevicePool.host(4 * MIB, ops=fake)
    pool.plan([4096, 4096], [0, 0], 4096)  # two positions, one after the other at the same offset
    pool.step()
    a = pool.alloc(4096, stream=1)
    pool.free(a, stream=1)
    b = pool.alloc(4096, stream=2)  # stream 1 may still be using the range: the heap
    assert b != a and pool.stats().stream_conflicts == 1
    pool.free(b, stream=2)
    fake.run(1)
    pool.step()
    c = pool.alloc(4096, stream=2)  # stream 1's work is done now
    pool.free(c, stream=2)
    d = pool.alloc(4096, stream=2)  # freed on its own stream: at once
    pool.free(d, stream=2)
    assert c == d == a
    stats = pool.stats()
    assert stats.planned_allocs == 3 and stats.fallback_allocs == 1 and stats.stream_conflicts == 1
    assert pool.departures() == [Departure(step=1, position=1, nbytes=4096, planned_nbytes=4096, reason="stream")]
    pool.collect()
    fake.run(2)
    pool.collect()
    pool.check()


def test_what_a_same_stream_allocation_leaves_of_a_freed_range_still_waits_for_that_stream():
    """Found by the C fuzz: a freed planned range that an allocation on its own stream overlaps only in part
    used to be dropped whole, so its remainder went to another stream while the first might still use it."""
    from test_pools_device import FakeStreams

    fake = FakeStreams()
    pool = DevicePool.host(MIB, ops=fake)
    pool.plan([2048, 512, 1024], [0, 0, 1024], 2048)
    pool.step()
    a = pool.alloc(2048, stream=1)
    pool.free(a, stream=1)
    b = pool.alloc(512, stream=1)  # stream 1's own range: at once, at offset 0
    c = pool.alloc(1024, stream=2)  # offset 1024: still in what stream 1 freed, and stream 1 has not run
    assert b == a and not a <= c < a + 2048
    assert pool.stats().stream_conflicts == 1
    pool.check()
    pool.free(b, stream=1)
    pool.free(c, stream=2)


def test_the_trace_gives_each_allocation_its_lifetime():
    pool = DevicePool.host(MIB)
    pool.record_begin()
    a = pool.alloc(100)
    b = pool.alloc(2000)
    pool.free(a)
    c = pool.alloc(300)
    trace = pool.record_end()
    assert trace == [(100, 0, 2), (2000, 1, None), (300, 3, None)]
    pool.free(b)
    pool.free(c)


@pytest.mark.parametrize("nbytes, offsets, region, match", [
    ([4096], [100], 8192, "not aligned"),
    ([4096], [8192], 8192, "ends past"),
    ([0], [0], 8192, "asks for 0 bytes"),
    ([4096], [0], 1000, "multiple of the alignment"),
    ([4096], [0], 1 << 40, "at most the capacity"),
])
def test_a_bad_plan_is_refused_and_says_why(nbytes, offsets, region, match):
    pool = DevicePool.host(MIB)
    with pytest.raises(InvalidRequest, match=match):
        pool.plan(nbytes, offsets, region)
    pool.check()


def test_plan_and_record_refuse_calls_out_of_order():
    pool = DevicePool.host(MIB)
    pool.record_begin()
    with pytest.raises(InvalidRequest, match="being recorded"):
        pool.plan([512], [0], 512)
    pool.record_end()
    pool.plan([512], [0], 512)
    with pytest.raises(InvalidRequest, match="unplan"):
        pool.record_begin()
    pool.step()
    a = pool.alloc(512)
    with pytest.raises(InvalidRequest, match="live"):
        pool.unplan()
    pool.free(a)
    with pytest.raises(DoubleFree):
        pool.free(a)
    with pytest.raises(InvalidFree, match="planned region"):
        pool.free(a + 16)
    pool.unplan()
    pool.check()
    with pytest.raises(AllocatorError, match="no plan"):
        pool.unplan()


def _valid(trace, plan) -> bool:
    items = [(plan.offsets[i], -(-n // 512) * 512, s, e) for i, (n, s, e) in enumerate(trace) if plan.offsets[i] is not None]
    for i, (o1, b1, s1, e1) in enumerate(items):
        for o2, b2, s2, e2 in items[i + 1:]:
            if s1 < e2 and s2 < e1 and o1 < o2 + b2 and o2 < o1 + b1:
                return False
    return all(o + b <= plan.region_bytes for o, b, _, _ in items)


def test_the_layout_of_a_recorded_step_uses_its_repeated_layers(trace64):
    pool = DevicePool.virtual(64 * MIB)
    marks = [i for i, r in enumerate(trace64) if r[1] == STEP]
    pool.record_begin()
    Replayer_addresses: dict[int, int] = {}
    for ident, kind, nbytes in trace64[marks[0] + 1:marks[1]]:
        if kind:
            pool.free(Replayer_addresses.pop(ident))
        else:
            Replayer_addresses[ident] = pool.alloc(nbytes)
    trace = pool.record_end()
    block = find_repeated_block(trace)
    assert block is not None and block[2] >= 2  # the three layers (forward or backward) repeat
    plan = plan_replay(trace, 512)
    assert _valid(trace, plan)
    assert plan.region_bytes <= 1.02 * plan.lower_bound_bytes
    assert plan.planned == sum(e is not None for _, _, e in trace)


def test_each_placement_order_gives_a_valid_layout_and_a_bad_one_is_named():
    from memopt.planners.layout import ORDERS, plan_layout

    tensors = [(4, 0, 2), (4, 1, 3), (8, 2, 4), (2, 0, 4), (6, 3, 5)]
    for order in ORDERS:
        layout = plan_layout(tensors, exact_max_tensors=0, order=order)
        assert layout.method == f"greedy-by-{order}" and layout.arena_bytes >= layout.lower_bound_bytes
        for i, (b1, s1, e1) in enumerate(tensors):
            for j, (b2, s2, e2) in enumerate(tensors[i + 1:], i + 1):
                o1, o2 = layout.offsets[i], layout.offsets[j]
                assert not (s1 < e2 and s2 < e1 and o1 < o2 + b2 and o2 < o1 + b1), (order, i, j)
    with pytest.raises(ValueError, match="'widest'"):
        plan_layout(tensors, order="widest")


def test_a_size_departure_names_the_position_and_the_bytes_planned_there():
    pool = DevicePool.host(4 * MIB)
    pool.plan([4096, 8192], [0, 4096], 12288)
    pool.step()
    a = pool.alloc(4096)  # position 0
    b = pool.alloc(512)  # no position within the lookahead asks 512 bytes
    c = pool.alloc(8192)  # position 1
    d = pool.alloc(8192)  # past the plan's end
    stats = pool.stats()
    assert stats.planned_allocs == 2 and stats.fallback_allocs == stats.size_departures == 2
    assert pool.departures() == [Departure(1, 1, 512, 8192, "size"), Departure(1, 2, 8192, 0, "size")]
    for x in (a, b, c, d):
        pool.free(x)
    pool.unplan()
    assert pool.departures() == []  # the log goes with its plan
    pool.check()
