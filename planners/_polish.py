"""Polish a fitting plan: single-unit moves that make the simulated step faster while it still fits.

CBC stops once its incumbent is within the relative gap (0.5 % by default) of the bound, so of two plans
whose step times differ by less than that it may return either; which one depends on the last digits of the
measured times, and a user would see a different plan on every run. Polishing the solver's answer with the
simulator removes that freedom: from either plan, the same single moves (a unit kept instead of selectively
recomputed, one row step or tensor moved, a unit switched to keep, recompute or selective recompute) are
taken, best first, until none makes the step faster (or, as fast, swaps and recomputes less: the MIP's
keep preference), so near-equal inputs end in the same plan. The moves
are the realisable decisions of ``_choices``; each is checked by the simulator, so a polished plan fits as
simulated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from memopt.graph import Decision, TrainingGraph

from ._choices import UnitChoices
from .simulator import simulate_amounts, unit_amounts

__all__ = ["polish"]

#: A move must make the step faster by this fraction to be taken (float noise is no improvement).
_MIN_GAIN = 1e-9


def _moves(choice: UnitChoices, decision: Decision) -> list[Decision]:
    """Decisions one move from ``decision``: its neighbours, and the unit kept, recomputed or selective."""
    out = list(choice.neighbours(decision))
    out.append(choice.prefix(0) if not choice.step else choice.rows(choice.n_steps, 0))
    if choice.allow_recompute:
        out.append(choice.recompute())
    if choice.allow_selective:
        out.append(choice.selective())
    return out


def polish(graph: TrainingGraph, decisions: Sequence[Decision], choices: Sequence[UnitChoices], *,
           budget_bytes: int, host_budget_bytes: int, lookahead: int = 1,
           max_rounds: int | None = None, time_limit_s: float = 2.0, head_chunks: int = 1) -> list[Decision]:
    """The fitting plan reached from ``decisions`` by always taking the single move that speeds the step most
    (or that, as fast, swaps and recomputes least).

    Args:
        graph (TrainingGraph): the step.
        decisions (Sequence[Decision]): realised decisions that fit, one per unit.
        choices (Sequence[UnitChoices]): each unit's realisable decisions.
        budget_bytes (int): device budget, bytes.
        host_budget_bytes (int): host budget, bytes.
        lookahead (int, default 1): prefetch distance, as in ``simulate``.
        head_chunks (int, default 1): the plan's head chunks (kept as they are), as in ``simulate``.
        max_rounds (int | None, default None): moves to take at most; None is twice the unit count plus 8.
        time_limit_s (float, default 2.0): seconds after which no further move is searched (a round over a
            few hundred units takes a second).

    Returns:
        list[Decision]: decisions that fit and whose simulated step is no slower than the given ones'.
    """
    current = list(decisions)
    amounts = [unit_amounts(u, d) for u, d in zip(graph.units, current)]
    keep_all = simulate_amounts(graph, [unit_amounts(u, Decision(u.name)) for u in graph.units], lookahead=lookahead,
                                timeline=False)
    mem_scale, time_scale = max(keep_all.peak_bytes, 1), max(keep_all.step_s, 1e-12)

    def key(result, trial_amounts) -> tuple[float, float]:
        # The step first; among equally fast plans the one that keeps most and recomputes least, as the MIP's
        # keep-preference term says (a selective recompute measured as free must not beat keeping).
        work = sum((u.saved_bytes - a.kept_bytes - a.held_input_bytes) / mem_scale + a.recompute * u.forward_s / time_scale
                   for a, u in zip(trial_amounts, graph.units))
        return result.step_s, work

    now = key(simulate_amounts(graph, amounts, lookahead=lookahead, timeline=False, head_chunks=head_chunks), amounts)
    deadline = time.perf_counter() + time_limit_s
    for _ in range(max_rounds if max_rounds is not None else 2 * len(current) + 8):
        if time.perf_counter() > deadline:
            break
        best: tuple[tuple[float, float], int, Decision] | None = None
        for u, choice in enumerate(choices):
            kept = amounts[u]
            for candidate in _moves(choice, current[u]):
                if candidate == current[u]:
                    continue
                amounts[u] = unit_amounts(graph.units[u], candidate)
                trial = simulate_amounts(graph, amounts, lookahead=lookahead, timeline=False, head_chunks=head_chunks)
                if trial.peak_bytes > budget_bytes or trial.host_peak_bytes > host_budget_bytes:
                    continue
                score = key(trial, amounts)
                if _better(score, now) and (best is None or _better(score, best[0])):
                    best = (score, u, candidate)
            amounts[u] = kept
        if best is None:
            break
        now, u, candidate = best
        current[u] = candidate
        amounts[u] = unit_amounts(graph.units[u], candidate)
    return current


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` is faster than ``b``, or as fast (within float noise) with less work."""
    if a[0] < b[0] * (1 - _MIN_GAIN):
        return True
    return a[0] <= b[0] * (1 + _MIN_GAIN) and a[1] < b[1] - _MIN_GAIN
