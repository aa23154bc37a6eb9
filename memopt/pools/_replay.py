"""Laying out a recorded step for replay (MEMO): the recorded allocations become tensors with lifetimes,
and ``planners/layout.py`` gives each an offset in one region.

The allocations freed inside the recorded step are planned; those still live when it ended (optimizer
state made in the first step, a loss the caller keeps) outlive any one step and are left to the heap.
When the step repeats a block of allocations (the layers of a model, forward or backward), the bi-level
layout lays out one copy of the block and reuses it for every copy (``plan_layout_blocks``); the
whole step is also laid out greedily in each placement order ``plan_layout`` knows, and the smallest
region wins (candidates are ranked by region bytes, ties to the first tried: bi-level).
"""

from __future__ import annotations

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
    """

    nbytes: list[int]
    offsets: list[int | None]
    region_bytes: int
    lower_bound_bytes: int
    method: str
    block: tuple[int, int, int] | None

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


def _bi_level(tensors: list[tuple[int, int, int]], block: tuple[int, int, int]) -> tuple[list[int], Layout] | None:
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
    layout = plan_layout_blocks(shape, copies, block_duration=period, step_tensors=step, exact_max_tensors=0)
    offsets = [0] * len(tensors)
    for k in range(copies):
        for j, i in enumerate(local[k]):
            offsets[i] = layout.offsets[k * len(shape) + j]
    for j, i in enumerate(others):
        offsets[i] = layout.offsets[copies * len(shape) + j]
    return offsets, layout


def plan_replay(trace: Sequence[tuple[int, int, int | None]], alignment: int = 512) -> ReplayPlan | None:
    """Lay out a recorded step: an offset per allocation freed inside it, the heap for the others.

    Args:
        trace (Sequence[tuple[int, int, int | None]]): ``DevicePool.record_end()``'s ``(nbytes, start, end)``.
        alignment (int, default 512): the pool's alignment; sizes are rounded up to it.

    Returns:
        ReplayPlan | None: the plan, or None when no allocation was freed inside the step.

    Example:
        >>> plan = plan_replay([(1000, 0, 2), (1000, 1, 3), (24, 4, 5), (7, 6, None)], alignment=512)
        >>> plan.offsets, plan.region_bytes
        ([0, 1024, 0, None], 2048)
    """
    planned = [i for i, (_, _, e) in enumerate(trace) if e is not None]
    if not planned:
        return None
    tensors = [(_round(trace[i][0], alignment), trace[i][1], trace[i][2]) for i in planned]
    candidates: list[tuple[int, str, list[int], tuple | None]] = []
    block = find_repeated_block([trace[i] for i in planned] + [t for t in trace if t[2] is None])
    if block is not None:
        bi = _bi_level(tensors, block)
        if bi is not None:
            offsets, layout = bi
            candidates.append((layout.arena_bytes, "bi-level", offsets, block))
    if not candidates or len(tensors) <= GREEDY_MAX_TENSORS:
        for order in ORDERS:  # none of the orders wins on every step; each costs a greedy pass
            greedy = plan_layout(tensors, exact_max_tensors=0, order=order)
            candidates.append((greedy.arena_bytes, greedy.method, greedy.offsets, None))
    arena_bytes, method, offsets, used = min(candidates, key=lambda c: c[0])
    by_position: list[int | None] = [None] * len(trace)
    for j, i in enumerate(planned):
        by_position[i] = offsets[j]
    return ReplayPlan([t[0] for t in trace], by_position, max(_round(arena_bytes, alignment), alignment),
                      lower_bound_bytes(tensors), method, used)
