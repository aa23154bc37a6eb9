"""Laying out a recorded step for replay (MEMO): the recorded allocations become tensors with lifetimes,
and ``planners/layout.py`` gives each an offset in one region.

The allocations freed inside the recorded step are planned; those still live when it ended (optimizer
state made in the first step, a loss the caller keeps) outlive any one step and are left to the heap.
When the step repeats a block of allocations (the layers of a model, forward or backward), the bi-level
layout lays out one copy of the block and reuses it for every copy (``plan_layout_blocks``); the
whole step is also laid out greedily in each placement order ``plan_layout`` knows, and the smallest
region wins (candidates are ranked by region bytes, ties to the first tried: bi-level).

Given the heap's free runs at arming time (``DevicePool.free_runs()``), the step is laid out among the
blocks alive then (parameters, gradients, optimizer state: whatever the first steps left scattered) instead
of in one region above them all: the tensors fill the gaps between those blocks, and the plan's regions are
the parts of the free runs its tensors use. A region above every live block, the only choice otherwise,
leaves the gaps below it to the heap, where they stay reserved and mostly unused (reserved / live bytes
1.73 on a recorded from-start trace, bench/alloc.py).
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from memopt.planners.layout import ORDERS, Layout, lower_bound_bytes, plan_layout, plan_layout_blocks

__all__ = ["ReplayPlan", "find_repeated_block", "plan_replay"]

# Beyond this many planned tensors the greedy layout of the whole step (quadratic) is skipped when the
# bi-level one applies.
GREEDY_MAX_TENSORS = 20_000


@dataclass(frozen=True)
class ReplayPlan:
    """Offsets for the positions of a recorded step.

    Attributes:
        nbytes (list[int]): bytes each position asks for.
        offsets (list[int | None]): its offset in the region, None for the heap.
        region_bytes (int): bytes of the region (a multiple of the alignment).
        lower_bound_bytes (int): most planned bytes live at once (rounded to the alignment).
        method (str): ``"bi-level"`` or ``"greedy-by-<order>"`` (see ``plan_layout``).
        block (tuple[int, int, int] | None): the repeated block used, ``(first event, events, copies)``.
        regions (list[tuple[int, int]] | None): ``(offset, bytes)`` in the pool per region, for a layout among
            the live blocks (``offsets`` are then pool offsets, each inside one region); None for one region
            placed by the pool (``offsets`` in it).
    """

    nbytes: list[int]
    offsets: list[int | None]
    region_bytes: int
    lower_bound_bytes: int
    method: str
    block: tuple[int, int, int] | None
    regions: list[tuple[int, int]] | None = None

    @property
    def planned(self) -> int:
        """Positions served from the region."""
        return sum(o is not None for o in self.offsets)


def _round(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _events(trace: Sequence[tuple[int, int, int | None]]) -> list[tuple]:
    """One token per event of the step: an allocation's size, or a free's size and the age of its block.
    Two stretches of events with equal tokens allocate and free alike."""
    horizon = max((max(s, e if e is not None else s) for _, s, e in trace), default=-1) + 1
    tokens: list[tuple] = [("-",)] * horizon
    for nbytes, start, end in trace:
        tokens[start] = ("a", nbytes)
        if end is not None:
            tokens[end] = ("f", nbytes, end - start)
    return tokens


def find_repeated_block(trace: Sequence[tuple[int, int, int | None]], *, min_events: int = 4) -> tuple[int, int, int] | None:
    """The longest stretch of the step made of one block of events repeated back to back.

    Candidate periods are the distances between consecutive allocations of the same size (the layers of a
    model allocate alike); for each of the most common ones, the longest run of events equal to the event
    one period later gives the copies.

    Args:
        trace (Sequence[tuple[int, int, int | None]]): ``(nbytes, start, end)`` per allocation, times in events.
        min_events (int, default 4): shortest block considered, events.

    Returns:
        tuple[int, int, int] | None: ``(first event, events per copy, copies)`` covering the most events, or
        None when no block repeats.

    Example:
        >>> find_repeated_block([(8, 0, 1), (4, 2, 3), (8, 4, 5), (4, 6, 7), (8, 8, 9), (4, 10, 11)])
        (0, 4, 3)
    """
    tokens = _events(trace)
    last: dict[int, int] = {}
    periods: Counter[int] = Counter()
    for nbytes, start, _ in sorted(trace, key=lambda t: t[1]):
        if nbytes in last and start - last[nbytes] >= min_events:
            periods[start - last[nbytes]] += 1
        last[nbytes] = start
    best: tuple[int, int, int] | None = None
    for period, _ in periods.most_common(8):
        t, stop = 0, len(tokens) - period
        while t < stop:
            if tokens[t] != tokens[t + period]:
                t += 1
                continue
            first = t
            while t < stop and tokens[t] == tokens[t + period]:
                t += 1
            copies = (t - first) // period + 1  # copy i equals copy i + 1 while (i + 1) * period <= the run
            if copies >= 2 and (best is None or copies * period > best[1] * best[2]):
                best = (first, period, copies)
    return best


def _bi_level(tensors: list[tuple[int, int, int]], block: tuple[int, int, int],
              fixed: Sequence[tuple[int, int]] = ()) -> tuple[list[int], Layout] | None:
    """Offsets of ``tensors`` by the bi-level layout of ``block``; None when its copies do not match up."""
    first, period, copies = block
    local: list[list[int]] = [[] for _ in range(copies)]  # per copy, its tensors living inside it, by start
    others: list[int] = []
    for i, (_, s, e) in enumerate(tensors):
        k = (s - first) // period if s >= first else -1
        if 0 <= k < copies and e <= first + (k + 1) * period:
            local[k].append(i)
        else:
            others.append(i)
    for k in range(copies):
        local[k].sort(key=lambda i: tensors[i][1])
    shape = [(tensors[i][0], tensors[i][1] - first, tensors[i][2] - first) for i in local[0]]
    for k in range(1, copies):
        moved = [(tensors[i][0], tensors[i][1] - first - k * period, tensors[i][2] - first - k * period) for i in local[k]]
        if moved != shape:
            return None
    if not shape:
        return None
    step = [(tensors[i][0], tensors[i][1] - first, tensors[i][2] - first) for i in others]
    layout = plan_layout_blocks(shape, copies, block_duration=period, step_tensors=step, exact_max_tensors=0,
                                fixed=fixed)
    offsets = [0] * len(tensors)
    for k in range(copies):
        for j, i in enumerate(local[k]):
            offsets[i] = layout.offsets[k * len(shape) + j]
    for j, i in enumerate(others):
        offsets[i] = layout.offsets[copies * len(shape) + j]
    return offsets, layout


def _obstacles(free_runs: Sequence[tuple[int, int]], alignment: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The gaps (free runs trimmed to the alignment) and what lies between them, both ``(offset, bytes)``."""
    gaps = [(lo, hi - lo) for lo, hi in ((_round(o, alignment), (o + n) // alignment * alignment) for o, n in free_runs)
            if hi > lo]
    fixed, top = [], 0
    for lo, n in sorted(gaps):
        if lo > top:
            fixed.append((top, lo - top))
        top = lo + n
    return gaps, fixed


def _regions(tensors: list[tuple[int, int, int]], offsets: list[int],
             gaps: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """Per gap its tensors use, the span from their lowest offset to their highest end; None when a tensor
    lies in no gap (the layout ran past the pool's end)."""
    starts = [g[0] for g in gaps]
    used: dict[int, list[int]] = {}
    for (b, _, _), o in zip(tensors, offsets):
        k = bisect.bisect_right(starts, o) - 1
        if k < 0 or o + b > gaps[k][0] + gaps[k][1]:
            return None
        lo_hi = used.setdefault(k, [o, o + b])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], o), max(lo_hi[1], o + b)
    return [(lo, hi - lo) for _, (lo, hi) in sorted(used.items())]


def plan_replay(trace: Sequence[tuple[int, int, int | None]], alignment: int = 512,
                free_runs: Sequence[tuple[int, int]] | None = None) -> ReplayPlan | None:
    """Lay out a recorded step: an offset per allocation freed inside it, the heap for the others.

    Args:
        trace (Sequence[tuple[int, int, int | None]]): ``DevicePool.record_end()``'s ``(nbytes, start, end)``.
        alignment (int, default 512): the pool's alignment; sizes are rounded up to it.
        free_runs (Sequence[tuple[int, int]] | None, default None): ``DevicePool.free_runs()``, to lay the
            step out in the gaps between the blocks alive now (for ``DevicePool.plan_at``); None lays it out
            in one region (for ``DevicePool.plan``).

    Returns:
        ReplayPlan | None: the plan, or None when no allocation was freed inside the step or, with free runs,
        the layout does not fit in them.

    Example:
        >>> plan = plan_replay([(1000, 0, 2), (1000, 1, 3), (24, 4, 5), (7, 6, None)], alignment=512)
        >>> plan.offsets, plan.region_bytes
        ([0, 1024, 0, None], 2048)
        >>> among = plan_replay([(1000, 0, 2), (1000, 1, 3)], 512, free_runs=[(512, 1024), (2048, 1 << 20)])
        >>> among.offsets, among.regions
        ([512, 2048], [(512, 1024), (2048, 1024)])
    """
    planned = [i for i, (_, _, e) in enumerate(trace) if e is not None]
    if not planned:
        return None
    tensors = [(_round(trace[i][0], alignment), trace[i][1], trace[i][2]) for i in planned]
    gaps, fixed = _obstacles(free_runs, alignment) if free_runs is not None else ([], [])
    floor = fixed[-1][0] + fixed[-1][1] if fixed else 0  # the live blocks' extent: no layout ends below it
    candidates: list[tuple[int, int, str, list[int], tuple | None]] = []
    block = find_repeated_block([trace[i] for i in planned] + [t for t in trace if t[2] is None])
    if block is not None:
        bi = _bi_level(tensors, block, fixed)
        if bi is not None:
            offsets, layout = bi
            candidates.append((max(layout.arena_bytes, floor), layout.arena_bytes, "bi-level", offsets, block))
    if not candidates or len(tensors) <= GREEDY_MAX_TENSORS:
        for order in ORDERS:  # none of the orders wins on every step; each costs a greedy pass
            greedy = plan_layout(tensors, exact_max_tensors=0, order=order, fixed=fixed)
            candidates.append((max(greedy.arena_bytes, floor), greedy.arena_bytes, greedy.method, greedy.offsets, None))
    _, arena_bytes, method, offsets, used = min(candidates, key=lambda c: c[:2])
    regions = None
    if free_runs is not None:
        regions = _regions(tensors, offsets, gaps)
        if regions is None:
            return None
    by_position: list[int | None] = [None] * len(trace)
    for j, i in enumerate(planned):
        by_position[i] = offsets[j]
    region_bytes = sum(n for _, n in regions) if regions else max(_round(arena_bytes, alignment), alignment)
    return ReplayPlan([t[0] for t in trace], by_position, region_bytes, lower_bound_bytes(tensors), method, used,
                      regions)
