"""The MIP planner's policy: what ``solve`` returns for a graph and a budget, and the smallest feasible budget.

``planners.program`` builds and solves the program. Its answer is realised, re-simulated (the returned
figures are the simulator's), repaired if the solver's tolerances left it a few bytes over, never slower
than a baseline that fits, and polished by single moves the simulator finds faster (``_polish``), so that
the solver's freedom within its gap does not show as a different plan for near-equal inputs. Keeping
everything is returned without a solve when it fits; an infeasible budget raises ``BudgetError`` naming
the smallest that fits and only the fixes that would lower it (``_infeasible``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from memopt.errors import MemoptError
from memopt.graph import Decision, Plan, TrainingGraph
from memopt.units import format_bytes

from ._infeasible import budget_error
from ._polish import polish
from ._repair import repair
from .baselines import BASELINES, baseline_decisions
from .layout import layout_for_plan
from .options import PlannerOptions
from .program import run_mip
from .simulator import SimResult, simulate

__all__ = ["min_feasible_bytes", "solve"]

# Plan.gap when no bound is known (a fallback plan): "up to 100 %", and still valid JSON.
_UNKNOWN_GAP = 1.0


def _resolve(options: PlannerOptions | None, switches: dict[str, Any]) -> PlannerOptions:
    """``options`` with keyword switches applied, validated once by ``PlannerOptions``."""
    options = options if options is not None else PlannerOptions()
    if not isinstance(options, PlannerOptions):
        raise ValueError(f"options must be a memopt.planners.PlannerOptions, got {type(options).__name__}; "
                         "MemoptConfig.planner_options() makes one")
    return dataclasses.replace(options, **switches) if switches else options


def _describe(phase: str) -> str:
    """What a peak phase means, for error messages."""
    kind, _, name = phase.partition(" ")
    if kind == "forward":
        return f"the forward working set of unit {name!r}"
    if kind == "backward":
        return f"the backward working set of unit {name!r}"
    return "the head (logits and loss workspace at the turn from forward to backward)"


def _min_peak(graph: TrainingGraph, opts: PlannerOptions) -> tuple[list[Decision], int, SimResult, str]:
    """The lowest-peak realisable plan (its decisions and head chunks), its simulation and the solver status
    ("optimal" unless cut short)."""
    outcome = run_mip(graph, opts, budget_bytes=None, mip_gap=0.0)
    if outcome.decisions is not None:
        result = simulate(graph, outcome.decisions, lookahead=opts.lookahead, head_chunks=outcome.head_chunks)
        return outcome.decisions, outcome.head_chunks, result, outcome.status
    # Keeping everything always satisfies this program, so no answer means the solver was cut short:
    # fall back to the lowest-peak baseline the switches allow.
    allowed = ["none"] + (["checkpoint-all", "sqrt-n"] if opts.allow_recompute else []) + (
        ["offload-all"] if opts.allow_swap else [])
    candidates = []
    for name in allowed:
        for head in _heads(graph, opts):
            decisions = baseline_decisions(graph, name, row_multiple=opts.row_multiple)
            result = simulate(graph, decisions, lookahead=opts.lookahead, head_chunks=head)
            if result.host_peak_bytes <= opts.host_budget_bytes:
                candidates.append((result.peak_bytes, decisions, head, result))
    _, decisions, head, result = min(candidates, key=lambda item: item[0])
    return decisions, head, result, "time-limit"


def _heads(graph: TrainingGraph, opts: PlannerOptions) -> list[int]:
    """The head chunk counts a plan may use (1 when the head was not profiled)."""
    return [o.chunks for o in opts.head_options(graph)] or [1]


def min_feasible_bytes(graph: TrainingGraph, options: PlannerOptions | None = None,
                       **switches: Any) -> tuple[int, str]:
    """The smallest device budget any realisable plan fits, and what sets it.

    Solves the planner's program with the peak as objective (no gap), realises and simulates the answer.

    Args:
        graph (TrainingGraph): the step.
        options (PlannerOptions | None, default None): the planner's switches; None is the defaults.
        **switches: fields of ``PlannerOptions`` to change (``allow_swap=False``, ``host_budget_bytes=...``).

    Returns:
        tuple[int, str]: the budget in bytes (model states included) and the phase whose memory sets it,
        in words.

    Raises:
        ValueError: a switch out of range.
    """
    opts = _resolve(options, switches)
    opts = dataclasses.replace(opts, host_budget_bytes=opts.host_bytes(graph), mip_gap=0.0)
    _, _, result, _ = _min_peak(graph, opts)
    return result.peak_bytes, _describe(result.peak_phase)


def _fits(result: SimResult, budget_bytes: int, host_budget_bytes: int) -> bool:
    return result.peak_bytes <= budget_bytes and result.host_peak_bytes <= host_budget_bytes


def solve(graph: TrainingGraph, budget_bytes: int, options: PlannerOptions | None = None, *,
          budget_spec: Any = None, **switches: Any) -> Plan:
    """The fastest plan whose simulated peak fits the budget.

    Args:
        graph (TrainingGraph): the profiled (or modelled) step.
        budget_bytes (int): whole-step device budget, model states included, bytes.
        options (PlannerOptions | None, default None): the planner's switches (what it may do, how long it
            searches); None is the defaults. ``MemoptConfig.planner_options()`` makes one.
        budget_spec (Any, default None): the budget as the user gave it, recorded in the plan; None
            records ``budget_bytes``.
        **switches: fields of ``PlannerOptions`` to change (``allow_swap=False``, ``mip_gap=0.0``, ...).

    Returns:
        Plan: realised decisions with the simulator's predicted peak, step time and host bytes.

    Raises:
        BudgetError: no plan fits; the message names the smallest budget that does and what sets it.
        MemoptError: the solver found no plan within the time limit and no baseline fits.
        ValueError: an argument is out of range.

    Example:
        >>> from memopt.planners import baseline_plan, random_graph, solve
        >>> g = random_graph(6, seed=3)
        >>> low, high = (baseline_plan(g, b).predicted_peak_bytes for b in ("checkpoint-all", "none"))
        >>> plan = solve(g, (low + high) // 2)
        >>> plan.predicted_peak_bytes <= plan.budget_bytes < high
        True
        >>> plan.overhead < baseline_plan(g, "checkpoint-all").overhead
        True
    """
    started = time.perf_counter()
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}; parse strings like '12GiB' "
                         "with memopt.units.parse_bytes")
    opts = _resolve(options, switches)
    opts = dataclasses.replace(opts, host_budget_bytes=opts.host_bytes(graph))
    lookahead, row_multiple = opts.lookahead, opts.row_multiple
    heads = _heads(graph, opts)
    keep_all = baseline_decisions(graph, "none", row_multiple=row_multiple)
    # The reference every plan is compared with: nothing saved, the model's own head.
    baseline = simulate(graph, keep_all, lookahead=lookahead)

    def lowest_peak(switches: PlannerOptions) -> SimResult:
        return _min_peak(graph, switches)[2]

    def simulated(decisions: list[Decision], head: int) -> SimResult:
        return simulate(graph, decisions, lookahead=lookahead, head_chunks=head)

    def plan(decisions: list[Decision], head: int, result: SimResult, status: str, gap: float) -> Plan:
        polished = polish(graph, decisions, opts.choices(graph), budget_bytes=budget_bytes,
                          host_budget_bytes=opts.host_budget_bytes, lookahead=lookahead,
                          time_limit_s=min(2.0, 0.25 * opts.time_limit_s), head_chunks=head)
        if polished != decisions:
            decisions, result = polished, simulated(polished, head)
        out = Plan(decisions=decisions, budget_bytes=budget_bytes,
                   budget_spec=budget_bytes if budget_spec is None else budget_spec,
                   predicted_peak_bytes=result.peak_bytes, predicted_step_s=result.step_s,
                   baseline_step_s=baseline.step_s, baseline_peak_bytes=baseline.peak_bytes,
                   host_bytes=result.host_peak_bytes, solver="mip", status=status, gap=gap,
                   solve_time_s=0.0, graph_meta={**graph.meta, "resident_bytes": graph.resident_bytes},
                   head_chunks=head, head_chunk_rows=graph.head.option(head).chunk_rows if head > 1 else 0)
        out.layout = layout_for_plan(graph, out, lookahead=lookahead)
        out.solve_time_s = time.perf_counter() - started
        return out

    # Keeping everything is the fastest plan there is (no copies, no recompute): done if it fits.
    quickest = simulated(keep_all, heads[0])
    if _fits(quickest, budget_bytes, opts.host_budget_bytes):
        return plan(keep_all, heads[0], quickest, "optimal", 0.0)
    if graph.resident_bytes > budget_bytes:
        minimum, _ = min_feasible_bytes(graph, opts)
        raise budget_error(graph, opts, budget_bytes, minimum, "model states", lowest_peak)

    # The fastest fitting baseline bounds what the solver may return. It is not given to CBC as a MIP
    # start: CBC 2.10 has been seen to return such a start as "optimal" when a plan 4 % faster existed,
    # to lose it in preprocessing and call the problem infeasible, and to crash on it at a time limit.
    fitting: list[tuple[float, list[Decision], int, SimResult]] = []
    for name in BASELINES:
        if (name in ("checkpoint-all", "sqrt-n") and not opts.allow_recompute) or \
                (name == "offload-all" and not opts.allow_swap):
            continue
        decisions = baseline_decisions(graph, name, row_multiple=row_multiple)
        for head in heads:
            result = simulated(decisions, head)
            if _fits(result, budget_bytes, opts.host_budget_bytes):
                fitting.append((result.step_s, decisions, head, result))
    fitting.sort(key=lambda item: item[0])

    outcome = run_mip(graph, opts, budget_bytes=budget_bytes)
    if outcome.decisions is not None:
        decisions, head = outcome.decisions, outcome.head_chunks
        result = simulated(decisions, head)
        if not _fits(result, budget_bytes, opts.host_budget_bytes):
            repaired = repair(graph, decisions, opts.choices(graph), budget_bytes=budget_bytes,
                              host_budget_bytes=opts.host_budget_bytes, lookahead=lookahead, head_chunks=head)
            decisions = repaired if repaired is not None else decisions
            result = simulated(decisions, head)
        if _fits(result, budget_bytes, opts.host_budget_bytes):
            if fitting and fitting[0][0] < result.step_s:
                # Only a solver stopped early can trail a baseline; never return the slower plan.
                _, decisions, head, result = fitting[0]
            return plan(decisions, head, result, outcome.status, outcome.gap)
    if fitting:
        # The solver stopped without a usable answer although a baseline fits: return the fastest one.
        _, decisions, head, result = fitting[0]
        stopped = outcome.status in ("time-limit", "no-solution", "solver-error")
        return plan(decisions, head, result, "time-limit" if stopped else "heuristic", _UNKNOWN_GAP)

    # Infeasible (or the repair failed): the lowest-peak plan either fits after all or names the minimum.
    lowest, head, result, status = _min_peak(graph, opts)
    if _fits(result, budget_bytes, opts.host_budget_bytes):
        return plan(lowest, head, result, "heuristic", _UNKNOWN_GAP)
    if status != "optimal":
        raise MemoptError(f"the solver found no plan within time_limit_s={opts.time_limit_s} and could not prove the "
                          f"budget {format_bytes(budget_bytes)} infeasible; raise time_limit_s")
    raise budget_error(graph, opts, budget_bytes, result.peak_bytes, _describe(result.peak_phase), lowest_peak)
