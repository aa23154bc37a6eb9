"""Robust times from several profiled steps: bytes from one, times from clean repeats, identical blocks pooled.

One profiled step is a poor clock. The memory meter, the expensive-op recorder and the separability probe
add Python work to every op (ten times the step on a small model), the first step pays for lazy
initialisation (allocator growth, thread pools, kernel selection), and on a busy machine any step can be
several times slower than the next. The planner trades recompute seconds against each other, so noise
becomes a different plan from run to run. ``robust_times`` combines a full profile (bytes, and the seconds
of each unit's expensive ops, timed one by one) with repeated timing-only profiles of the same step:

- each unit's forward and backward seconds, and the time outside the units, are the median over the
  repeats; a selective recompute's seconds are the forward less the expensive ops' seconds;
- units that do identical work (same saved, input and output bytes and token layout: the repeated blocks of
  a transformer) get the median of their medians: they differ only by noise;
- how far the median step is from the fastest, ``(median - fastest) / fastest``, is recorded in
  ``graph.meta["timing_spread"]``: one slow step does not move the median, but when at least half of them
  are slow the times are the machine's load, not the model's, and a spread above ``SPREAD_WARNING`` is
  flagged (``meta["timing_note"]`` and a warning).
"""

from __future__ import annotations

import dataclasses
import statistics

from ._warn import warn
from .graph import TrainingGraph, Unit

__all__ = ["SPREAD_WARNING", "robust_times"]

#: ``(median - fastest) / fastest`` of the profiled step times above which the profile is flagged.
SPREAD_WARNING = 0.25

_TIMES = ("forward_s", "backward_s", "selective_s")


def _work(unit: Unit) -> tuple:
    """What a unit computes, as far as the profile tells: equal for the repeated blocks of a model."""
    return (tuple(unit.tensor_bytes), tuple(unit.token_dims), unit.input_bytes, unit.output_bytes, unit.tokens,
            unit.selective_bytes, unit.param_grad_bytes)


def _step_s(graph: TrainingGraph) -> float:
    return (sum(u.forward_s + u.backward_s for u in graph.units) + graph.other_forward_s
            + graph.other_backward_s)


def robust_times(full: TrainingGraph, timed: list[TrainingGraph], *, warn_spread: bool = True) -> TrainingGraph:
    """``full`` with robust times from ``timed`` (see the module docstring).

    Args:
        full (TrainingGraph): a full profile: its bytes, and its expensive ops' seconds, are kept.
        timed (list[TrainingGraph]): timing-only profiles of the same step (same units), at least one.
        warn_spread (bool, default True): warn when the median step is more than ``SPREAD_WARNING`` slower than
            the fastest.
    """
    if not timed:
        raise ValueError("robust_times needs at least one timed profile; pass MemoptConfig(profile_repeats>=1)")
    if [u.name for u in full.units] != [u.name for u in timed[0].units]:
        raise ValueError("the timed profiles saw other units than the full one; the model's forward must call "
                         "the same blocks on the same sample every time")
    medians = []
    for i, unit in enumerate(full.units):
        forward = statistics.median(g.units[i].forward_s for g in timed)
        expensive = unit.forward_s - unit.selective_s if unit.selective_bytes else 0.0
        medians.append({"forward_s": forward, "backward_s": statistics.median(g.units[i].backward_s for g in timed),
                        "selective_s": max(0.0, forward - expensive) if unit.selective_bytes else 0.0})
    groups: dict[tuple, list[int]] = {}
    for i, unit in enumerate(full.units):
        groups.setdefault(_work(unit), []).append(i)
    pooled = [dict(m) for m in medians]
    for members in groups.values():
        for key in _TIMES:
            value = statistics.median(medians[i][key] for i in members)
            for i in members:
                pooled[i][key] = value
    units = [dataclasses.replace(unit, **times) for unit, times in zip(full.units, pooled)]
    steps = [_step_s(g) for g in timed]
    fastest = min(steps)
    spread = (statistics.median(steps) - fastest) / fastest if fastest > 0 else 0.0
    meta = {**full.meta, "profiled_steps": len(timed), "timing_spread": spread}
    if len(timed) > 1 and spread > SPREAD_WARNING:
        note = (f"the {len(timed)} profiled steps took {', '.join(f'{s * 1e3:.1f}' for s in steps)} ms ("
                f"median {spread:.0%} above the fastest): the machine looks busy, so the plan's time estimates are uncertain; profile on a "
                "quiet machine or raise MemoptConfig(profile_repeats=...)")
        meta["timing_note"] = note
        if warn_spread:
            warn(f"memopt: {note}")
    return dataclasses.replace(
        full, units=units, meta=meta,
        other_forward_s=statistics.median(g.other_forward_s for g in timed),
        other_backward_s=statistics.median(g.other_backward_s for g in timed))
