"""Repair a realised plan that breaks its budget by a sliver (solver tolerances), with simulator checks.

The MIP enumerates exactly the decisions ``realize`` produces, so its plans fit as solved; only the
solver's feasibility tolerance (about 1e-7 of the scaled budget) can leave a realised plan a few bytes
over. The repair moves one row step or one tensor at a time, always the move that cuts the overshoot
most (then the fastest), and stops when the plan fits or no move helps.
"""

from __future__ import annotations

from collections.abc import Sequence

from memopt.graph import Decision, TrainingGraph

from ._choices import UnitChoices
from .simulator import simulate_amounts, unit_amounts

__all__ = ["repair"]


def _violation(peak_bytes: float, host_bytes: float, budget_bytes: int, host_budget_bytes: int) -> float:
    return max(0.0, peak_bytes - budget_bytes) / budget_bytes + max(0.0, host_bytes - host_budget_bytes) / max(
        host_budget_bytes, 1)


def repair(graph: TrainingGraph, decisions: Sequence[Decision], choices: Sequence[UnitChoices], *,
           budget_bytes: int, host_budget_bytes: int, lookahead: int = 1,
           max_rounds: int | None = None, head_chunks: int = 1) -> list[Decision] | None:
    """Move decisions one step at a time until the simulated plan fits device and host budgets.

    Args:
        graph (TrainingGraph): the step.
        decisions (Sequence[Decision]): realised decisions, one per unit.
        choices (Sequence[UnitChoices]): each unit's realisable decisions.
        budget_bytes (int): device budget, bytes.
        host_budget_bytes (int): host budget, bytes.
        lookahead (int, default 1): prefetch distance, as in ``simulate``.
        head_chunks (int, default 1): the plan's head chunks (kept as they are), as in ``simulate``.
        max_rounds (int | None, default None): moves to try at most; None is twice the unit count plus 8.

    Returns:
        list[Decision] | None: fitting decisions, or None when no sequence of single moves found one.
    """
    current = list(decisions)
    amounts = [unit_amounts(u, d) for u, d in zip(graph.units, current)]
    result = simulate_amounts(graph, amounts, lookahead=lookahead, timeline=False, head_chunks=head_chunks)
    violation = _violation(result.peak_bytes, result.host_peak_bytes, budget_bytes, host_budget_bytes)
    rounds = max_rounds if max_rounds is not None else 2 * len(current) + 8
    for _ in range(rounds):
        if violation <= 0.0:
            return current
        best: tuple[float, float, int, Decision] | None = None
        for u, choice in enumerate(choices):
            saved = amounts[u]
            for candidate in choice.neighbours(current[u]):
                amounts[u] = unit_amounts(graph.units[u], candidate)
                trial = simulate_amounts(graph, amounts, lookahead=lookahead, timeline=False, head_chunks=head_chunks)
                key = (_violation(trial.peak_bytes, trial.host_peak_bytes, budget_bytes, host_budget_bytes),
                       trial.step_s)
                if best is None or key < best[:2]:
                    best = (*key, u, candidate)
            amounts[u] = saved
        if best is None or best[0] >= violation:
            return None
        violation, _, u, candidate = best
        current[u] = candidate
        amounts[u] = unit_amounts(graph.units[u], candidate)
    return current if violation <= 0.0 else None
