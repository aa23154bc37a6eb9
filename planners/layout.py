"""Buffer layout (dynamic storage allocation): offsets in one arena for tensors with known lifetimes.

A step whose tensors get planned offsets cannot fragment: the arena is reserved once and replayed.
Tensors are ``(bytes, start, end)`` with lifetimes ``[start, end)`` in phase or event indices; two
tensors whose lifetimes overlap must not overlap in address. The lower bound on the arena is the
largest sum of bytes live at one time; every layout reports its gap to that bound.

- ``plan_layout``: greedy by size with best fit (largest tensor first, into the tightest gap among
  the tensors it meets in time), then an exact MIP when the instance is tiny, warm-started by greedy.
- ``plan_layout_blocks``: the bi-level scheme for repeated blocks (MEMO): lay out one block once, reuse
  it for every identical block, then place the blocks as pseudo-tensors with the step's other tensors.
- ``layout_for_plan``: the device tensors of a plan's phases (as the simulator counts them) laid out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from memopt.graph import Plan, TrainingGraph

from ._cbc import cbc_solver
from .simulator import head_change, unit_amounts

__all__ = ["Layout", "layout_for_plan", "lower_bound_bytes", "plan_layout", "plan_layout_blocks", "plan_tensors"]

Tensor = tuple[int, int, int]  # (bytes, start, end): lifetime [start, end)


@dataclass
class Layout:
    """Offsets for a set of tensors in one arena.

    Args:
        tensors (list[tuple[int, int, int]]): ``(bytes, start, end)`` per tensor.
        offsets (list[int]): byte offset of each tensor in the arena.
        arena_bytes (int): arena size, bytes (the highest tensor end).
        lower_bound_bytes (int): most bytes live at one time, bytes.
        method (str): ``"greedy-by-size"``, ``"mip"`` or ``"bi-level"``.
        labels (list[str]): optional name per tensor.
    """

    tensors: list[Tensor]
    offsets: list[int]
    arena_bytes: int
    lower_bound_bytes: int
    method: str
    labels: list[str] = field(default_factory=list)

    @property
    def gap(self) -> float:
        """Relative excess of the arena over the lower bound (0 is optimal)."""
        return self.arena_bytes / self.lower_bound_bytes - 1.0 if self.lower_bound_bytes else 0.0

    def to_dict(self) -> dict:
        """JSON-ready form for ``Plan.layout``: figures plus ``[bytes, start, end, offset, label]`` rows."""
        labels = self.labels or [""] * len(self.tensors)
        return {
            "method": self.method,
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "gap": self.gap,
            "tensors": [[b, s, e, o, name] for (b, s, e), o, name in zip(self.tensors, self.offsets, labels)],
        }


def _check(tensors: Sequence[Tensor]) -> list[Tensor]:
    out = []
    for i, t in enumerate(tensors):
        if len(t) != 3:
            raise ValueError(f"tensor {i} is {t!r}; give (bytes, start, end) triples")
        nbytes, start, end = (int(v) for v in t)
        if nbytes < 0 or end < start:
            raise ValueError(f"tensor {i} is {t!r}: bytes must be >= 0 and end >= start (lifetime [start, end))")
        out.append((nbytes, start, end))
    return out


def lower_bound_bytes(tensors: Sequence[Tensor]) -> int:
    """Most bytes live at once: no layout of these tensors fits a smaller arena."""
    events: list[tuple[int, int]] = []
    for nbytes, start, end in tensors:
        if nbytes and end > start:
            events += [(start, nbytes), (end, -nbytes)]
    live = best = 0
    for _, delta in sorted(events):  # at equal times frees (negative) sort first: [start, end) lifetimes
        live += delta
        best = max(best, live)
    return best


ORDERS = ("size", "start", "peak")


def _placement_order(tensors: Sequence[Tensor], order: str) -> list[int]:
    """The order tensors are placed in: ``size`` largest first (among equals the longer-lived, since it
    constrains more of the others), ``start`` by birth (as an allocator meets them), ``peak`` those alive at
    the busiest moment first (greedy by breadth), each group largest first."""
    n = len(tensors)
    if order == "size":
        return sorted(range(n), key=lambda i: (-tensors[i][0], -(tensors[i][2] - tensors[i][1]), i))
    if order == "start":
        return sorted(range(n), key=lambda i: (tensors[i][1], i))
    times = sorted({t for _, s, e in tensors for t in (s, e)})
    at = {t: k for k, t in enumerate(times)}
    live = np.zeros(len(times) + 1, dtype=np.int64)
    for b, s, e in tensors:
        live[at[s]] += b
        live[at[e]] -= b
    live = np.cumsum(live)
    busiest = [int(live[at[s]:at[e]].max()) if e > s else 0 for _, s, e in tensors]
    return sorted(range(n), key=lambda i: (-busiest[i], -tensors[i][0], i))


def _greedy_offsets(tensors: Sequence[Tensor], order: str = "size", fixed: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Greedy in ``order`` (see ``_placement_order``), best fit among the tensors already placed that overlap in
    time and the ``fixed`` ``(offset, bytes)`` blocks, which occupy their place at every time."""
    n = len(tensors)
    first = min((t[1] for t in tensors), default=0) - 1
    last = max((t[2] for t in tensors), default=0) + 1
    sizes = np.array([t[0] for t in tensors] + [b for _, b in fixed], dtype=np.int64)
    starts = np.array([t[1] for t in tensors] + [first] * len(fixed), dtype=np.int64)
    ends = np.array([t[2] for t in tensors] + [last] * len(fixed), dtype=np.int64)
    offsets = np.array([0] * n + [o for o, _ in fixed], dtype=np.int64)
    placed = np.array([False] * n + [True] * len(fixed), dtype=bool)
    for i in _placement_order(tensors, order):
        size = int(sizes[i])
        if size == 0 or ends[i] == starts[i]:
            placed[i] = True
            continue
        meets = np.flatnonzero(placed & (starts < ends[i]) & (starts[i] < ends) & (sizes > 0))
        best_offset, best_gap = None, math.inf
        top = 0
        for j in meets[np.argsort(offsets[meets], kind="stable")]:
            lo = int(offsets[j])
            free = lo - top
            if free >= size and free < best_gap:
                best_offset, best_gap = top, free
            top = max(top, lo + int(sizes[j]))
        offsets[i] = top if best_offset is None else best_offset
        placed[i] = True
    return [int(o) for o in offsets[:n]]


def _exact_offsets(tensors: Sequence[Tensor], upper_bytes: int, warm: Sequence[int],
                   time_limit_s: float) -> list[int] | None:
    """Smallest arena by MIP (one order binary per pair that meets in time); None if not solved."""
    import pulp

    n = len(tensors)
    scale = float(max(upper_bytes, 1))
    prob = pulp.LpProblem("memopt_layout", pulp.LpMinimize)
    arena = prob.add_variable("arena", 0)
    offs = [prob.add_variable(f"offset_{i}", 0, upper_bytes / scale) for i in range(n)]
    prob += arena
    for i, (b, _, _) in enumerate(tensors):
        prob += offs[i] + b / scale <= arena
    for i in range(n):
        for j in range(i + 1, n):
            (bi, si, ei), (bj, sj, ej) = tensors[i], tensors[j]
            if bi and bj and si < ej and sj < ei:
                below = prob.add_variable(f"below_{i}_{j}", cat="Binary")  # 1: i sits below j
                big = upper_bytes / scale + max(bi, bj) / scale
                prob += offs[i] + bi / scale <= offs[j] + big * (1 - below)
                prob += offs[j] + bj / scale <= offs[i] + big * below
                below.setInitialValue(1.0 if warm[i] < warm[j] else 0.0)
    for var, value in zip(offs, warm):
        var.setInitialValue(value / scale)
    prob.solve(cbc_solver(time_limit_s=time_limit_s, gap_rel=0.0, warm_start=True))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None
    return [int(round((v.varValue or 0.0) * scale)) for v in offs]


def _arena(tensors: Sequence[Tensor], offsets: Sequence[int]) -> int:
    return max((o + b for (b, _, _), o in zip(tensors, offsets) if b), default=0)


def _valid(tensors: Sequence[Tensor], offsets: Sequence[int]) -> bool:
    for i, (bi, si, ei) in enumerate(tensors):
        for j in range(i + 1, len(tensors)):
            bj, sj, ej = tensors[j]
            if bi and bj and si < ej and sj < ei and offsets[i] < offsets[j] + bj and offsets[j] < offsets[i] + bi:
                return False
    return True


def plan_layout(tensors: Sequence[Tensor], *, exact_max_tensors: int = 12, time_limit_s: float = 5.0,
                labels: Sequence[str] | None = None, order: str = "size",
                fixed: Sequence[tuple[int, int]] = ()) -> Layout:
    """Offsets for tensors with lifetimes: greedy by size, exact MIP on tiny instances.

    Args:
        tensors (Sequence[tuple[int, int, int]]): ``(bytes, start, end)`` per tensor, lifetime ``[start, end)``.
        exact_max_tensors (int, default 12): solve exactly (pulp/CBC) when there are at most this many
            tensors and greedy is above the lower bound; 0 never does.
        time_limit_s (float, default 5.0): time limit of the exact solve, seconds.
        labels (Sequence[str] | None, default None): names carried into ``Layout.labels``.
        order (str, default "size"): the greedy's placement order: ``"size"`` (largest first), ``"start"``
            (by birth) or ``"peak"`` (those alive at the busiest moment first); none wins on every instance,
            so a caller that can afford it tries each.
        fixed (Sequence[tuple[int, int]], default ()): ``(offset, bytes)`` blocks that hold their place at every
            time (memory alive before and after the tensors): the tensors are laid out around them, greedily.

    Returns:
        Layout: offsets, arena, lower bound and gap (method ``"greedy-by-<order>"``, or ``"mip"``).

    Raises:
        ValueError: a tensor is not a valid ``(bytes, start, end)`` triple, labels do not match, or the order
            is unknown.

    Example:
        >>> lay = plan_layout([(4, 0, 2), (4, 1, 3), (8, 2, 4)])
        >>> lay.arena_bytes, lay.lower_bound_bytes
        (12, 12)
    """
    items = _check(tensors)
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} tensors; give one per tensor or None")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    bound = lower_bound_bytes(items)
    offsets = _greedy_offsets(items, order, fixed)
    arena = _arena(items, offsets)
    method = f"greedy-by-{order}"
    if arena > bound and 0 < len(items) <= exact_max_tensors and not fixed:
        exact = _exact_offsets(items, arena, offsets, time_limit_s)
        if exact is not None and _valid(items, exact) and _arena(items, exact) < arena:
            offsets, arena, method = exact, _arena(items, exact), "mip"
    return Layout(items, offsets, arena, bound, method, list(labels) if labels is not None else [])


def plan_layout_blocks(block_tensors: Sequence[Tensor], n_blocks: int, *, block_duration: int | None = None,
                       step_tensors: Sequence[Tensor] = (), exact_max_tensors: int = 12,
                       fixed: Sequence[tuple[int, int]] = ()) -> Layout:
    """Bi-level layout for a block repeated ``n_blocks`` times back to back, plus the step's other tensors.

    Level 1 lays out one block's tensors (lifetimes local to the block) once; every copy of the block
    reuses it. Level 2 places each block copy as one pseudo-tensor of the block's arena size, living
    ``[i * block_duration, (i + 1) * block_duration)``, together with ``step_tensors`` (global lifetimes,
    e.g. activations held from forward to backward). Run it once for the forward block and once for the
    backward block when their temporaries differ.

    Args:
        block_tensors (Sequence[tuple[int, int, int]]): one block's ``(bytes, start, end)``, local times.
        n_blocks (int): how many identical blocks run in sequence (>= 1).
        block_duration (int | None, default None): local time units one block spans; None is the
            latest end among ``block_tensors``.
        step_tensors (Sequence[tuple[int, int, int]], default ()): other tensors, global times.
        exact_max_tensors (int, default 12): as in ``plan_layout``, for each level.
        fixed (Sequence[tuple[int, int]], default ()): as in ``plan_layout``, for level 2 (block copies and
            step tensors are placed around them).

    Returns:
        Layout: every tensor expanded (blocks first, in order, then ``step_tensors``), method ``"bi-level"``.

    Example:
        >>> lay = plan_layout_blocks([(4, 0, 1), (2, 0, 2)], n_blocks=3)
        >>> lay.arena_bytes, len(lay.tensors)
        (6, 6)
    """
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be an int >= 1, got {n_blocks!r}")
    block = _check(block_tensors)
    duration = block_duration if block_duration is not None else max((e for _, _, e in block), default=1)
    if duration < max((e for _, _, e in block), default=0):
        raise ValueError(f"block_duration {duration!r} ends before the block's last tensor; omit it or raise it")
    level1 = plan_layout(block, exact_max_tensors=exact_max_tensors)
    others = _check(step_tensors)
    pseudo = [(level1.arena_bytes, i * duration, (i + 1) * duration) for i in range(n_blocks)] + others
    level2 = plan_layout(pseudo, exact_max_tensors=exact_max_tensors, fixed=fixed)
    tensors: list[Tensor] = []
    offsets: list[int] = []
    for i in range(n_blocks):
        for (b, s, e), o in zip(block, level1.offsets):
            tensors.append((b, i * duration + s, i * duration + e))
            offsets.append(level2.offsets[i] + o)
    tensors += others
    offsets += level2.offsets[n_blocks:]
    return Layout(tensors, offsets, _arena(tensors, offsets), lower_bound_bytes(tensors), "bi-level")


def plan_tensors(graph: TrainingGraph, plan: Plan, *, lookahead: int = 1) -> tuple[list[Tensor], list[str]]:
    """The device tensors of a plan, with lifetimes in phase indices, as the simulator counts bytes.

    Phases: forward of unit u is ``u``, the head is ``n``, backward of unit u is ``2n - u``. At every
    phase the live bytes equal the simulator's figure minus the resident bytes (model states, and the
    parameters ZeRO-3 gathers), so the lower bound of their layout is the simulated peak less those.
    """
    units = graph.units
    n = len(units)
    is_async = graph.hardware.async_copies
    if len(plan.decisions) != n:
        raise ValueError(f"plan has {len(plan.decisions)} decisions for {n} units; it was made for another graph")
    out: list[Tensor] = []
    names: list[str] = []

    def add(nbytes: float, start: int, end: int, label: str) -> None:
        size = int(math.ceil(nbytes - 1e-6))
        if size > 0 and end > start:
            out.append((size, start, end))
            names.append(label)

    add(graph.fixed_activation_bytes, 0, 2 * n + 1, "fixed")
    add(graph.head_workspace_bytes + head_change(graph, plan.head_chunks)[0], n, n + 1, "head workspace")
    for u, (unit, decision) in enumerate(zip(units, plan.decisions)):
        a = unit_amounts(unit, decision)
        back = 2 * n - u
        rest = 0.0 if a.drops_forward else max(0.0, a.forward_bytes - a.kept_bytes - a.swapped_bytes)
        add(a.kept_bytes, u, back + 1, f"kept {unit.name}")
        add(rest, u, u + 1, f"forward intermediates {unit.name}")
        add(a.swapped_bytes, u, u + 2 if is_async else u + 1, f"swap out {unit.name}")
        add(a.held_input_bytes, u + 1, back, f"recompute input {unit.name}")
        add(a.swapped_bytes, max(n + 1, back - lookahead) if is_async else back, back + 1, f"swap in {unit.name}")
        add(max(0.0, a.backward_bytes - a.kept_bytes - a.swapped_bytes), back, back + 1, f"recomputed {unit.name}")
        add(unit.forward_workspace_bytes, u, u + 1, f"forward workspace {unit.name}")
        add(unit.backward_workspace_bytes, back, back + 1, f"backward workspace {unit.name}")
    return out, names


def layout_for_plan(graph: TrainingGraph, plan: Plan, *, lookahead: int = 1) -> dict:
    """Lay out a plan's activation tensors (model states excluded) and return ``Layout.to_dict()``.

    Args:
        graph (TrainingGraph): the step the plan was made for.
        plan (Plan): the plan.
        lookahead (int, default 1): prefetch distance the plan was simulated with.

    Returns:
        dict: ``method``, ``arena_bytes``, ``lower_bound_bytes``, ``gap`` and the tensor rows.
    """
    tensors, labels = plan_tensors(graph, plan, lookahead=lookahead)
    return plan_layout(tensors, labels=labels, exact_max_tensors=0).to_dict()
