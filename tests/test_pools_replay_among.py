"""Replay laid out among the blocks alive when it is armed (MEMO's layout in the gaps a run's first steps left).

A CUDA arena records its first steps on the heap, where the parameters, gradients and optimizer state end up
scattered among the activations' holes. A replayed layout placed in one region above them all reserves the
holes too (1.73x the live bytes on a recorded from-start trace); laid out around them, it fills them.
"""

from __future__ import annotations

import pytest
import torch

from memopt.pools._device import DevicePool
from memopt.errors import ArenaExhausted
from memopt.pools._lib import InvalidRequest
from memopt.pools._replay import plan_replay
from memopt.planners.layout import plan_layout
from memopt.testing import TinyGPT
from test_pools_replay import BENCH, STEP, Replayer, allocations_after

MIB = 1 << 20


@pytest.fixture(scope="module")
def from_start():
    """A TinyGPT run recorded from the model's creation: setup and a first step, then three marked steps."""
    state = {}

    def setup():
        torch.manual_seed(0)
        state["model"] = TinyGPT(vocab=256, hidden=64, layers=3, heads=4, max_tokens=128)
        state["opt"] = torch.optim.AdamW(state["model"].parameters(), lr=1e-3)

    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))

    def step():
        state["model"](ids).backward()
        state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)

    return BENCH.record_steps(step, 3, setup_fn=setup)


def replay(records, among: bool, lowest_first: bool = False, capacity: int = 64 * MIB) -> DevicePool:
    """Records into a host pool whose blocks are checked for overlap (Replayer); the step after the first
    mark is recorded and laid out at the second, among the live blocks or in one region. ``lowest_first``:
    the heap places blocks lowest first until then, as a CUDA arena does."""
    pool = DevicePool.host(capacity, quarantine=16)
    pool.set_lowest_first(lowest_first)

    def on_step(mark):
        if mark == 1:
            pool.record_begin()
        elif mark == 2:
            trace = pool.record_end()
            if among:
                plan = plan_replay(trace, pool.alignment, free_runs=pool.free_runs())
                pool.plan_at(plan.nbytes, plan.offsets, plan.regions)
                assert len(plan.regions) > 1  # the gaps between the live blocks are used
            else:
                plan = plan_replay(trace, pool.alignment)
                pool.collect(wait=True)
                pool.plan(plan.nbytes, plan.offsets, plan.region_bytes)
            pool.set_lowest_first(False)
            pool.reset_peaks()
        if mark >= 2:
            pool.step()
        pool.check()

    Replayer(pool).run(records, on_step)
    pool.check()
    stats = pool.stats()  # every later allocation from the plan, none overlapping (Replayer checks)
    assert stats.planned_allocs == allocations_after(records, 2) and stats.fallback_allocs == 0
    return pool


def test_a_step_laid_out_among_the_live_blocks_reserves_what_it_uses(from_start):
    steady_live = BENCH.peak_live_bytes(from_start, from_step=2)
    packed = replay(from_start, among=True, lowest_first=True)
    among, region = replay(from_start, among=True), replay(from_start, among=False)
    packed_ratio, among_ratio, region_ratio = (p.stats().peak_reserved_bytes / steady_live for p in (packed, among, region))
    print(f"reserved / live: lowest first and among {packed_ratio:.3f}, among {among_ratio:.3f}, "
          f"one region {region_ratio:.3f}")
    # Small blocks (slab slots) scatter what stays alive in a model this tiny: a few per cent stay unusable.
    assert packed_ratio <= 1.05 and among_ratio <= 1.05, (packed_ratio, among_ratio)
    assert region_ratio > among_ratio + 0.1, (region_ratio, among_ratio)


def test_placed_lowest_first_before_arming_a_replayed_llama_reserves_at_most_2_percent_more():
    """A tiny Llama recorded from its creation (setup and a first step, then marked steps): the heap placing
    lowest first until the replay is armed packs the parameters and AdamW state low, and the layout among
    them then reserves at most 1.02x the live bytes; without it (best fit) and in one region, more."""
    trace = BENCH.recorded_trace(128, 2, 256, steps=4, min_ops=0, from_start=True)
    steady_live = BENCH.peak_live_bytes(trace, from_step=2)
    capacity = 4 * BENCH.peak_live_bytes(trace) // 512 * 512
    ratios = {(lowest_first, among): replay(trace, among, lowest_first, capacity).stats().peak_reserved_bytes / steady_live
              for lowest_first, among in ((True, True), (False, True), (False, False))}
    print(f"reserved / live: {ratios}")
    assert ratios[True, True] <= 1.02, ratios
    assert ratios[False, True] > ratios[True, True] and ratios[False, False] > 1.5, ratios


def test_unplan_gives_every_region_back():
    pool = DevicePool.host(8 * MIB)
    blocks = [pool.alloc(n) for n in (100_000, 300_000, 50_000, 700_000, 20_000)]
    for b in blocks[::2]:
        pool.free(b)
    before = pool.free_runs()
    trace = [(90_000, 0, 2), (40_000, 1, 3), (200_000, 2, 4)]
    plan = plan_replay(trace, pool.alignment, free_runs=before)
    assert plan.offsets[0] == before[0][0]  # the lowest hole, below the live blocks
    pool.plan_at(plan.nbytes, plan.offsets, plan.regions)
    pool.check()
    assert pool.stats().plan_bytes == sum(b for _, b in plan.regions) == plan.region_bytes
    pool.step()
    got = [pool.alloc(n) for n, _, _ in trace]
    assert [a - pool.base_address for a in got] == plan.offsets
    for a in got:
        pool.free(a)
    pool.unplan()
    pool.check()
    assert pool.free_runs() == before
    for b in blocks[1::2]:
        pool.free(b)


@pytest.mark.parametrize("nbytes", [8192, 1 << 20, 3 << 20])
def test_lowest_first_takes_the_lowest_hole_that_fits(nbytes):
    pool = DevicePool.virtual(64 * MIB)
    hole = pool.alloc(nbytes)
    wall = pool.alloc(4096)
    pool.free(hole)  # a hole of exactly nbytes below a live block, the rest of the pool free above it
    above = pool.alloc(nbytes)
    assert above > wall  # the arena's own fit looks among larger blocks first: above the live block
    pool.free(above)
    pool.set_lowest_first(True)
    assert pool.alloc(nbytes) == hole  # lowest first: the hole
    pool.check()


def test_free_runs_are_what_the_live_blocks_leave():
    pool = DevicePool.virtual(4 * MIB, quarantine=4)
    live = {pool.alloc(n): n for n in (5_000, 70_000, 1_000, 300_000, 9_000, 40_000)}
    for a in list(live)[1::2]:
        pool.free(a)  # quarantined: released (and merged) by free_runs
        del live[a]
    runs = pool.free_runs()
    assert runs == sorted(runs) and all(b > 0 for _, b in runs)
    assert all(o1 + b1 < o2 for (o1, b1), (o2, _) in zip(runs, runs[1:]))  # disjoint, merged
    for a, n in live.items():
        x = a - pool.base_address
        assert not any(o < x + n and x < o + b for o, b in runs)
    assert runs[-1][0] + runs[-1][1] == pool.capacity_bytes


@pytest.mark.parametrize("regions, offsets, match", [
    ([], [0], "0 regions"),
    ([(0, 1000)], [0], "multiples of the alignment"),
    ([(4096, 4096), (0, 4096)], [0], "sorted, disjoint"),
    ([(0, 8192), (4096, 8192)], [0], "sorted, disjoint"),
    ([(0, 4096)], [4096], "ends past the region"),
    ([(0, 4096)], [1 << 40], "starts in none"),
    ([(0, 1 << 40)], [0], "inside the capacity"),
])
def test_a_bad_layout_among_live_blocks_is_refused_and_keeps_the_pool(regions, offsets, match):
    pool = DevicePool.host(MIB)
    before = pool.free_runs()
    with pytest.raises(InvalidRequest, match=match):
        pool.plan_at([4096], offsets, regions)
    pool.check()
    assert pool.free_runs() == before and pool.stats().plan_bytes == 0


def test_a_region_the_heap_took_meanwhile_is_refused_and_nothing_stays_reserved():
    pool = DevicePool.host(MIB)
    runs = pool.free_runs()
    plan = plan_replay([(4096, 0, 2), (4096, 1, 3), (8192, 3, 4)], pool.alignment, free_runs=runs)
    taken = pool.alloc(4096)  # the heap moved on after the layout saw it
    with pytest.raises(ArenaExhausted, match="not free"):
        pool.plan_at(plan.nbytes, plan.offsets, plan.regions)
    pool.check()
    assert pool.stats().plan_bytes == 0 and pool.stats().live_bytes == 4096
    pool.free(taken)
    assert pool.free_runs() == runs


def test_the_layout_fills_the_holes_between_fixed_blocks_best_fit_first():
    # Holes of 4 at [4, 8) and 8 at [12, 20), the live blocks' top at 24.
    fixed = [(0, 4), (8, 4), (20, 4)]
    tensors = [(8, 0, 2), (4, 1, 3), (4, 2, 4), (6, 0, 4)]
    layout = plan_layout(tensors, exact_max_tensors=0, fixed=fixed)
    for (b, s, e), o in zip(tensors, layout.offsets):
        assert not any(fo < o + b and o < fo + fb for fo, fb in fixed), (o, b)
    for i, ((b1, s1, e1), o1) in enumerate(zip(tensors, layout.offsets)):
        for (b2, s2, e2), o2 in list(zip(tensors, layout.offsets))[i + 1:]:
            assert not (s1 < e2 and s2 < e1 and o1 < o2 + b2 and o2 < o1 + b1)
    assert layout.offsets[0] == 12  # the 8 fills the 8-hole
    assert layout.offsets[1] == 4  # the first 4 fills the 4-hole, the best fit
    assert layout.offsets[2] == 12  # the second 4 takes the 8's place once it is freed
    assert layout.offsets[3] == 24 and layout.arena_bytes == 30  # the 6 fits no hole: above the top block


def test_a_memopt_profile_before_the_first_step_still_lets_the_replay_fit_the_gaps():
    """memopt.optimize profiles and plans the model before its first step (bench/train_gpu.py's memopt-match):
    the profile's steps leave blocks of their own among the parameters. The replayed layout among them still
    reserves at most 1.04x the live bytes, whether the heap placed lowest first or by best fit until armed
    (lowest first is not the better one here: 1.028 against 1.013 when this test was written; it holds only the
    1.04 bound)."""
    pytest.importorskip("transformers")
    trace = BENCH.recorded_trace(128, 2, 256, steps=4, min_ops=0, from_start=True, memopt_budget=0.5)
    steady_live = BENCH.peak_live_bytes(trace, from_step=2)
    capacity = 4 * BENCH.peak_live_bytes(trace) // 512 * 512
    ratios = {lowest_first: replay(trace, True, lowest_first, capacity).stats().peak_reserved_bytes / steady_live
              for lowest_first in (True, False)}
    print(f"reserved / live, lowest first: {ratios}")
    assert max(ratios.values()) <= 1.04, ratios


def test_a_memopt_budget_is_recorded_from_the_models_creation_only():
    with pytest.raises(ValueError, match="from_start=True"):
        BENCH.recorded_trace(64, 1, 64, steps=1, min_ops=0, memopt_budget=0.5)


def test_placing_lowest_first_keeps_the_quarantine():
    """A hardened pool's quarantine holds a freed block back from reuse; placing lowest first (a CUDA arena from
    install() until its replay is armed) used to release it on every allocation, handing the block straight back."""
    pool = DevicePool.virtual(64 * MIB, quarantine=16)
    pool.set_lowest_first(True)
    first = pool.alloc(8192)
    pool.free(first)
    again = pool.alloc(8192)
    assert again != first and pool.stats().lowest_first == 1
    pool.free(again)
    # Only when nothing fits without them are the held blocks released.
    big = pool.alloc(64 * MIB - 16384)
    pool.free(big)
    pool.check()


def test_a_position_whose_bytes_overflow_its_span_is_refused():
    pool = DevicePool.host(MIB)
    with pytest.raises(InvalidRequest, match="position 0"):
        pool.plan_at([(1 << 64) - 1], [0], [(0, 4096)])
    pool.check()
    assert pool.stats().plan_bytes == 0


def test_with_canaries_a_region_filling_a_free_run_still_fits():
    from memopt.pools import _lib

    pool = DevicePool.host(MIB, flags=_lib.F_CANARIES)
    wall = pool.alloc(4096)
    top = pool.alloc(MIB // 2)
    pool.free(wall)  # a run below a live block, the top run above it
    runs = pool.free_runs()
    plan = plan_replay([(runs[0][1] // 512 * 512, 0, 2)], pool.alignment, free_runs=runs)
    pool.plan_at(plan.nbytes, plan.offsets, plan.regions)  # refused as "not free" when a run counted its canary
    pool.check()
    pool.step()
    block = pool.alloc(plan.nbytes[0])
    pool.free(block)
    pool.unplan()
    pool.free(top)
    pool.check()
