"""The plans memopt is compared against: keep everything, checkpoint every unit, sqrt(n), offload all.

Each baseline is a list of realised decisions, simulated like any plan, so the comparison with the MIP
is made under one model.
"""

from __future__ import annotations

import math
import time

from memopt.graph import Decision, Plan, TrainingGraph

from .layout import layout_for_plan
from .realize import realize
from .simulator import simulate

__all__ = ["BASELINES", "baseline_decisions", "baseline_plan"]

#: Names accepted by ``baseline_plan``.
BASELINES = ("none", "checkpoint-all", "sqrt-n", "offload-all")


def _sqrt_n_kept(n_units: int) -> set[int]:
    """Units kept by sqrt(n) checkpointing: the last of every segment of ceil(sqrt(n)) units."""
    segment = max(1, math.ceil(math.sqrt(n_units)))
    return {u for u in range(n_units) if u % segment == segment - 1}


def baseline_decisions(graph: TrainingGraph, name: str, *, row_multiple: int = 64) -> list[Decision]:
    """Realised decisions of one baseline.

    Args:
        graph (TrainingGraph): the step.
        name (str): one of ``BASELINES``.
        row_multiple (int, default 64): row granularity passed to ``realize``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    kept = _sqrt_n_kept(len(graph.units)) if name == "sqrt-n" else set()
    out = []
    for u, unit in enumerate(graph.units):
        if name == "none" or u in kept:
            fractions = (1.0, 0.0, 0.0)
        elif name == "offload-all":
            fractions = (0.0, 1.0, 0.0)
        else:
            fractions = (0.0, 0.0, 1.0)
        out.append(realize(unit, *fractions, row_multiple=row_multiple))
    return out


def baseline_plan(graph: TrainingGraph, name: str, budget_bytes: int | None = None, *,
                  host_budget_bytes: int | None = None, row_multiple: int = 64, lookahead: int = 1) -> Plan:
    """A baseline as a simulated ``Plan``.

    Args:
        graph (TrainingGraph): the step.
        name (str): one of ``BASELINES``.
        budget_bytes (int | None, default None): device budget, bytes; None is the device's memory.
        host_budget_bytes (int | None, default None): host budget, bytes; None is ``graph.hardware.host_bytes``.
        row_multiple (int, default 64): row granularity passed to ``realize``.
        lookahead (int, default 1): prefetch distance in units, as in ``simulate``.

    Returns:
        Plan: ``solver`` is the baseline's name; ``status`` is ``"infeasible"`` when the simulated peak or
        host bytes exceed their budgets, else ``"heuristic"``; ``layout`` is its buffer layout.

    Example:
        >>> from memopt.planners import random_graph
        >>> g = random_graph(8, seed=0)
        >>> baseline_plan(g, "checkpoint-all").overhead > 1.0
        True
    """
    started = time.perf_counter()
    budget = graph.hardware.device_bytes if budget_bytes is None else budget_bytes
    host_budget = graph.hardware.host_bytes if host_budget_bytes is None else host_budget_bytes
    decisions = baseline_decisions(graph, name, row_multiple=row_multiple)
    result = simulate(graph, decisions, lookahead=lookahead)
    keep_all = simulate(graph, [Decision(u.name) for u in graph.units], lookahead=lookahead)
    fits = result.peak_bytes <= budget and result.host_peak_bytes <= host_budget
    plan = Plan(decisions=decisions, budget_bytes=budget, budget_spec=budget if budget_bytes is None else budget_bytes,
                predicted_peak_bytes=result.peak_bytes, predicted_step_s=result.step_s,
                baseline_step_s=keep_all.step_s, baseline_peak_bytes=keep_all.peak_bytes,
                host_bytes=result.host_peak_bytes, solver=name, status="heuristic" if fits else "infeasible",
                gap=0.0, solve_time_s=0.0, graph_meta={**graph.meta, "resident_bytes": graph.resident_bytes})
    plan.layout = layout_for_plan(graph, plan, lookahead=lookahead)
    plan.solve_time_s = time.perf_counter() - started
    return plan
