"""The MIP planner: per unit keep / swap / recompute, token-wise where the unit allows, within a budget.

The program models exactly the simulator's memory and time rules (see ``planners.simulator``) over the
decisions ``realize`` can produce (``planners._choices``): a token-separable unit with a row step gets
integer counts of kept and recomputed row steps (the rest is swapped), any other unit picks one option
among "swap the first j saved tensors" and "recompute the whole unit". Memory is constrained at every
phase of the step; time is a fixed-order schedule of continuous start and end times on the three
streams, so minimising the final end time gives the earliest-start schedule, i.e. the simulated step.
A tiny second term prefers keeping over swapping or recomputing that costs no time.

The solution is realised, re-simulated (the returned figures are the simulator's), repaired if the
solver's tolerances left it a few bytes over, never slower than a baseline that fits, and polished by
single moves the simulator finds faster (``_polish``), so that the solver's freedom within its gap does not
show as a different plan for near-equal inputs.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memopt.errors import MemoptError
from memopt.graph import Decision, Plan, TrainingGraph
from memopt.units import format_bytes

from ._cbc import cbc_solver
from ._choices import UnitChoices
from ._infeasible import budget_error
from ._polish import polish
from ._repair import repair
from .baselines import BASELINES, baseline_decisions
from .layout import layout_for_plan
from .simulator import SimResult, assembly_bytes, simulate

__all__ = ["min_feasible_bytes", "solve"]

# Weight of the keep-preference term, in units of the nothing-saved step: small enough to never trade
# step time (at most ~1e-6 relative), large enough for the solver to see.
_PREFER_KEEP = 1e-6
# Plan.gap when no bound is known (a fallback plan): "up to 100 %", and still valid JSON.
_UNKNOWN_GAP = 1.0


@dataclass(frozen=True)
class _Options:
    """Validated planner switches shared by ``solve`` and ``min_feasible_bytes``."""

    host_budget_bytes: int
    time_limit_s: float
    mip_gap: float
    row_multiple: int
    allow_swap: bool
    allow_recompute: bool
    lookahead: int

    def __post_init__(self) -> None:
        if not isinstance(self.host_budget_bytes, int) or self.host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be an int >= 0, got {self.host_budget_bytes!r}; "
                             "None uses the graph's hardware.host_bytes")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, got {self.time_limit_s!r}; e.g. 10.0")
        if not 0 <= self.mip_gap < 1:
            raise ValueError(f"mip_gap must be in [0, 1), got {self.mip_gap!r}; e.g. 0.005")
        if not isinstance(self.row_multiple, int) or self.row_multiple < 1:
            raise ValueError(f"row_multiple must be a positive int, got {self.row_multiple!r}; 64 is a good choice")
        if not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {self.lookahead!r}")
        if not (self.allow_swap or self.allow_recompute):
            raise ValueError("allow_swap and allow_recompute are both False; nothing could save memory")

    def choices(self, graph: TrainingGraph) -> list[UnitChoices]:
        # Where host memory is the device memory (a CPU), a swap frees nothing and costs a copy: never offered.
        swap = self.allow_swap and not graph.hardware.unified_memory
        return [UnitChoices(u, self.row_multiple, swap, self.allow_recompute) for u in graph.units]


@dataclass
class _Outcome:
    """What one CBC run returned."""

    decisions: list[Decision] | None
    status: str  # "optimal", "time-limit", "infeasible", "no-solution" or "solver-error"
    gap: float


def _options(graph: TrainingGraph, host_budget_bytes: int | None, **kwargs: Any) -> _Options:
    host = graph.hardware.host_bytes if host_budget_bytes is None else host_budget_bytes
    return _Options(host_budget_bytes=host, **kwargs)


@dataclass
class _UnitTerms:
    """One unit's part of the program: scaled linear terms and how to read its decision back."""

    held: Any  # bytes held from the end of forward to the end of backward
    swapped: Any  # bytes copied to host
    working: Any  # bytes the forward holds for the unit, workspace included (checkpoint workspace when wholly recomputed)
    backward_extra: Any  # bytes beyond saved + workspace in backward (rebuilding a token-wise split from rows)
    recompute: Any  # fraction of the forward recomputed
    decode: Callable[[], Decision]
    drops: Any = 0.0  # 1 when the forward saves nothing (whole or selective recompute): it holds shared inputs


def _unit_terms(prob: Any, u: int, choice: UnitChoices, mem_scale: float) -> _UnitTerms:
    """Variables for one unit's realisable decisions (see ``_choices``) and the terms they make."""
    import pulp

    unit = choice.unit
    saved = unit.saved_bytes / mem_scale
    inp = unit.input_bytes / mem_scale
    if choice.step:
        # Token-wise: integer row steps kept and recomputed, the rest swapped; ``full`` marks a unit
        # recomputed whole, whose intermediates the forward frees at once.
        n_steps = choice.n_steps
        keep = prob.add_variable(f"keep_steps_{u}", 0, n_steps, cat="Integer")
        rec = prob.add_variable(f"recompute_steps_{u}", 0, n_steps if choice.allow_recompute else 0, cat="Integer")
        full = prob.add_variable(f"full_recompute_{u}", 0, 1 if choice.allow_recompute else 0, cat="Integer")
        if choice.allow_swap:
            prob += keep + rec <= n_steps, f"rows_{u}"
        else:
            prob += keep + rec == n_steps, f"rows_{u}"
        prob += n_steps * full <= rec, f"full_{u}"
        keep_frac, rec_frac = keep * (1.0 / n_steps), rec * (1.0 / n_steps)

        # ``split`` is 1 when at least two of kept, swapped and recomputed rows are non-empty: backward then
        # rebuilds each tensor from its parts, and one tensor's parts and whole coexist.
        has = [prob.add_variable(f"has_{part}_{u}", 0, 1, cat="Binary") for part in ("keep", "swap", "rec")]
        split = prob.add_variable(f"split_{u}", 0, 1)
        prob += keep <= n_steps * has[0], f"has_keep_{u}"
        prob += n_steps - keep - rec <= n_steps * has[1], f"has_swap_{u}"
        prob += rec <= n_steps * has[2], f"has_rec_{u}"
        prob += split >= has[0] + has[1] + has[2] - 1, f"split_{u}"


        workspace = unit.forward_workspace_bytes / mem_scale
        return _UnitTerms(
            held=saved * keep_frac + inp * rec_frac,
            swapped=saved - saved * keep_frac - saved * rec_frac,
            working=(saved + workspace) - (saved + workspace) * full + unit.checkpoint_workspace_bytes / mem_scale * full,
            backward_extra=assembly_bytes(unit) / mem_scale * split,
            recompute=rec_frac,
            decode=lambda: choice.rows(int(round(keep.varValue or 0)), int(round(rec.varValue or 0))),
            drops=full,
        )
    # Otherwise one option: swap the first j saved tensors (j = 0 keeps all), recompute the unit, or recompute
    # only its cheap ops. Each option: (held, swapped, forward working set, recomputed share of forward, decision).
    workspace = unit.forward_workspace_bytes / mem_scale
    checkpoint = unit.checkpoint_workspace_bytes / mem_scale
    options: list[tuple[float, float, float, float, Callable[[], Decision], float]] = [
        ((unit.saved_bytes - p) / mem_scale, p / mem_scale, saved + workspace, 0.0, lambda j=j: choice.prefix(j), 0.0)
        for j, p in enumerate(choice.prefix_bytes)]
    if choice.allow_recompute:
        options.append((inp, 0.0, checkpoint, 1.0, choice.recompute, 1.0))
    if choice.allow_selective:
        kept = unit.selective_bytes / mem_scale
        share = min(1.0, unit.selective_s / unit.forward_s) if unit.forward_s > 0 else 0.0
        options.append((kept + inp, 0.0, checkpoint + kept, share, choice.selective, 1.0))
    picks = [prob.add_variable(f"option_{u}_{j}", 0, 1, cat="Binary") for j in range(len(options))]
    prob += pulp.lpSum(picks) == 1, f"one_option_{u}"

    def decode_option() -> Decision:
        j = max(range(len(picks)), key=lambda i: picks[i].varValue or 0.0)
        return options[j][4]()

    def term(k: int) -> Any:
        return pulp.lpSum(o[k] * y for o, y in zip(options, picks) if o[k])

    return _UnitTerms(
        held=term(0),
        swapped=term(1),
        working=term(2),
        backward_extra=0.0,
        recompute=term(3),
        decode=decode_option,
        drops=term(5),
    )


def _add_memory(prob: Any, graph: TrainingGraph, terms: list[_UnitTerms], cap: Any, mem_scale: float,
                lookahead: int) -> bool:
    """Memory at every phase of the step <= cap (the simulator's rules); False if a fixed phase exceeds it."""
    import pulp

    units = graph.units
    n = len(units)
    is_async = graph.hardware.async_copies
    swapped = [t.swapped for t in terms]
    const = (graph.resident_bytes + graph.fixed_activation_bytes) / mem_scale
    # held_before[u] = bytes held by the units before u; one variable each keeps the program linear in size.
    held_before: list[Any] = [0.0]
    for u in range(n):
        var = prob.add_variable(f"held_before_{u + 1}", 0)
        prob += var == held_before[u] + terms[u].held, f"held_prefix_{u}"
        held_before.append(var)
    # Tensors passed to several units: held through the forward, and after it once any unit drops its
    # forward (whole or selective recompute), whose recompute holds them (``holds_shared``: 1 then).
    shared = graph.shared_input_bytes / mem_scale
    shared_after: Any = 0.0
    if shared:
        holds = prob.add_variable("holds_shared", 0, 1)
        for u, t in enumerate(terms):
            if not isinstance(t.drops, (int, float)):
                prob += holds >= t.drops, f"holds_shared_{u}"
        shared_after = shared * holds
    fits = True

    def limit(lhs: Any, name: str) -> None:
        nonlocal fits
        if isinstance(lhs, (int, float)) and not isinstance(cap, pulp.LpVariable):
            fits = fits and lhs * mem_scale <= cap * mem_scale + 1e-3  # no decision changes this phase
        else:
            prob.addConstraint(lhs <= cap, name)

    for u, unit in enumerate(units):
        inflight = swapped[u - 1] if is_async and u else 0.0
        limit(const + shared + held_before[u] + inflight + terms[u].working, f"mem_F_{u}")
        prefetch = pulp.lpSum(swapped[max(0, u - lookahead):u]) if is_async and u else 0.0
        limit(const + shared_after + held_before[u] + (unit.saved_bytes + unit.backward_workspace_bytes) / mem_scale
              + prefetch + terms[u].backward_extra, f"mem_B_{u}")
    last_swap = swapped[n - 1] if is_async and n else 0.0
    limit(const + shared_after + held_before[n] + last_swap + graph.head_workspace_bytes / mem_scale, "mem_T")
    return fits


def _add_time(prob: Any, graph: TrainingGraph, terms: list[_UnitTerms], mem_scale: float, time_scale: float,
              lookahead: int) -> Any:
    """The step's schedule on three streams in the simulator's fixed order; returns the step-end variable."""
    import pulp

    units = graph.units
    n = len(units)
    hw = graph.hardware
    swapped = [t.swapped for t in terms]
    recompute = [t.recompute for t in terms]
    fwd = [u.forward_s / time_scale for u in units]
    bwd = [u.backward_s / time_scale for u in units]
    head = (graph.other_forward_s + graph.other_backward_s) / time_scale
    d2h = mem_scale / hw.d2h_bytes_per_s / time_scale  # scaled seconds per scaled byte
    h2d = mem_scale / hw.h2d_bytes_per_s / time_scale
    step = prob.add_variable("step", 0)
    if not hw.async_copies:
        # Synchronous copies add to compute; nothing overlaps.
        prob += step >= (sum(fwd) + head + sum(bwd) + (d2h + h2d) * pulp.lpSum(swapped)
                         + pulp.lpSum(r * f for r, f in zip(recompute, fwd))), "t_step"
        return step
    # Every event >= each predecessor's end: minimising the last end gives the earliest-start schedule.
    fe = [prob.add_variable(f"forward_end_{u}", 0) for u in range(n)]
    de = [prob.add_variable(f"d2h_end_{u}", 0) for u in range(n)]
    he = [prob.add_variable(f"h2d_end_{u}", 0) for u in range(n)]
    bs = [prob.add_variable(f"backward_start_{u}", 0) for u in range(n)]
    head_start = prob.add_variable("head_start", 0)
    for u in range(n):
        prob += fe[u] >= (fe[u - 1] if u else 0.0) + fwd[u], f"t_fwd_{u}"
        if u:
            prob += fe[u] >= de[u - 1], f"t_fwd_wait_{u}"  # the previous swap must be off the device
        prob += de[u] >= fe[u] + d2h * swapped[u], f"t_d2h_{u}"
    if n:
        prob += head_start >= fe[n - 1], "t_head"
        prob += head_start >= de[n - 1], "t_head_wait"
    backward_start = head_start + head
    for u in range(n - 1, -1, -1):
        gate = bs[u + lookahead] if u + lookahead < n else backward_start
        copy = h2d * swapped[u]
        prob += he[u] >= gate + copy, f"t_h2d_gate_{u}"
        prob += he[u] >= de[u] + copy, f"t_h2d_after_d2h_{u}"
        if u < n - 1:
            prob += he[u] >= he[u + 1] + copy, f"t_h2d_order_{u}"
        prev_end = bs[u + 1] + recompute[u + 1] * fwd[u + 1] + bwd[u + 1] if u < n - 1 else backward_start
        prob += bs[u] >= prev_end, f"t_bwd_{u}"
        prob += bs[u] >= he[u], f"t_bwd_wait_{u}"
    prob += step >= (bs[0] + recompute[0] * fwd[0] + bwd[0] if n else backward_start), "t_step"
    return step


def _run_mip(graph: TrainingGraph, opts: _Options, *, budget_bytes: int | None,
             mip_gap: float | None = None) -> _Outcome:
    """Build and solve the program: fastest step within ``budget_bytes``, or the lowest peak when None."""
    import pulp

    keep_all = simulate(graph, [Decision(u.name) for u in graph.units])
    # Scale bytes and seconds to O(1) so CBC's absolute tolerances mean the same on every model.
    mem_scale = float(max(keep_all.peak_bytes, 1))
    time_scale = max(keep_all.step_s, 1e-12)
    prob = pulp.LpProblem("memopt_plan", pulp.LpMinimize)
    terms = [_unit_terms(prob, u, choice, mem_scale) for u, choice in enumerate(opts.choices(graph))]
    cap: Any = prob.add_variable("peak", 0) if budget_bytes is None else budget_bytes / mem_scale
    if not _add_memory(prob, graph, terms, cap, mem_scale, opts.lookahead):
        return _Outcome(None, "infeasible", math.inf)
    prob += pulp.lpSum(t.swapped for t in terms) <= opts.host_budget_bytes / mem_scale, "host"
    step = _add_time(prob, graph, terms, mem_scale, time_scale, opts.lookahead)
    if budget_bytes is None:
        prob += cap
    else:
        free_work = pulp.lpSum(t.swapped + t.recompute * (u.forward_s / time_scale)
                               for t, u in zip(terms, graph.units))
        prob += step + _PREFER_KEEP * free_work

    handle, log_path = tempfile.mkstemp(prefix="memopt_cbc_", suffix=".log")
    os.close(handle)
    try:
        solver = cbc_solver(time_limit_s=opts.time_limit_s, gap_rel=opts.mip_gap if mip_gap is None else mip_gap,
                            log_path=log_path)
        try:
            prob.solve(solver)
        except pulp.PulpSolverError:
            # CBC 2.10 can crash when its time limit strikes while it works on a MIP start.
            return _Outcome(None, "solver-error", math.inf)
        with open(log_path, errors="replace") as f:
            log = f.read()
    finally:
        os.unlink(log_path)
    status, gap = _parse_log(log, prob)
    if status in ("infeasible", "no-solution"):
        return _Outcome(None, status, math.inf)
    return _Outcome([t.decode() for t in terms], status, gap)


def _parse_log(log: str, prob: Any) -> tuple[str, float]:
    """Status and relative gap of a CBC run, read off its log (pulp reports no bound)."""
    import pulp

    result = re.search(r"^Result - (.*)$", log, re.M)
    text = result.group(1).lower() if result else ""
    if "infeasible" in text or prob.status == pulp.LpStatusInfeasible:
        return "infeasible", math.inf
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return "no-solution", math.inf
    objective = re.search(r"^Objective value:\s*(\S+)", log, re.M)
    bound = re.search(r"^(?:Lower|Upper) bound:\s*(\S+)", log, re.M)
    gap = 0.0
    if objective and bound:
        obj, low = float(objective.group(1)), float(bound.group(1))
        gap = max(0.0, abs(obj - low) / max(abs(obj), 1e-12))
    return ("time-limit" if "time" in text else "optimal"), gap


def _describe(phase: str) -> str:
    """What a peak phase means, for error messages."""
    kind, _, name = phase.partition(" ")
    if kind == "forward":
        return f"the forward working set of unit {name!r}"
    if kind == "backward":
        return f"the backward working set of unit {name!r}"
    return "the head (logits and loss workspace at the turn from forward to backward)"


def _min_peak(graph: TrainingGraph, opts: _Options) -> tuple[list[Decision], SimResult, str]:
    """The lowest-peak realisable plan, its simulation and the solver status ("optimal" unless cut short)."""
    outcome = _run_mip(graph, opts, budget_bytes=None, mip_gap=0.0)
    if outcome.decisions is not None:
        return outcome.decisions, simulate(graph, outcome.decisions, lookahead=opts.lookahead), outcome.status
    # Keeping everything always satisfies this program, so no answer means the solver was cut short:
    # fall back to the lowest-peak baseline the switches allow.
    allowed = ["none"] + (["checkpoint-all", "sqrt-n"] if opts.allow_recompute else []) + (
        ["offload-all"] if opts.allow_swap else [])
    candidates = []
    for name in allowed:
        decisions = baseline_decisions(graph, name, row_multiple=opts.row_multiple)
        result = simulate(graph, decisions, lookahead=opts.lookahead)
        if result.host_peak_bytes <= opts.host_budget_bytes:
            candidates.append((result.peak_bytes, decisions, result))
    _, decisions, result = min(candidates, key=lambda item: item[0])
    return decisions, result, "time-limit"


def min_feasible_bytes(graph: TrainingGraph, *, host_budget_bytes: int | None = None, row_multiple: int = 64,
                       allow_swap: bool = True, allow_recompute: bool = True, lookahead: int = 1,
                       time_limit_s: float = 10.0) -> tuple[int, str]:
    """The smallest device budget any realisable plan fits, and what sets it.

    Solves the planner's program with the peak as objective (no gap), realises and simulates the answer.

    Args:
        graph (TrainingGraph): the step.
        host_budget_bytes (int | None, default None): host bytes for swapped activations; None is
            ``graph.hardware.host_bytes``.
        row_multiple (int, default 64): token-wise cuts fall on multiples of this many rows.
        allow_swap (bool, default True): let plans swap to host memory.
        allow_recompute (bool, default True): let plans recompute.
        lookahead (int, default 1): prefetch distance in units, as in ``simulate``.
        time_limit_s (float, default 10.0): solver time limit, seconds.

    Returns:
        tuple[int, str]: the budget in bytes (model states included) and the phase whose memory sets it,
        in words.

    Raises:
        ValueError: an argument is out of range.
    """
    opts = _options(graph, host_budget_bytes, time_limit_s=time_limit_s, mip_gap=0.0, row_multiple=row_multiple,
                    allow_swap=allow_swap, allow_recompute=allow_recompute, lookahead=lookahead)
    _, result, _ = _min_peak(graph, opts)
    return result.peak_bytes, _describe(result.peak_phase)


def _fits(result: SimResult, budget_bytes: int, host_budget_bytes: int) -> bool:
    return result.peak_bytes <= budget_bytes and result.host_peak_bytes <= host_budget_bytes


def solve(graph: TrainingGraph, budget_bytes: int, *, host_budget_bytes: int | None = None,
          time_limit_s: float = 10.0, mip_gap: float = 0.005, row_multiple: int = 64, allow_swap: bool = True,
          allow_recompute: bool = True, budget_spec: Any = None, lookahead: int = 1) -> Plan:
    """The fastest plan whose simulated peak fits the budget.

    Args:
        graph (TrainingGraph): the profiled (or modelled) step.
        budget_bytes (int): whole-step device budget, model states included, bytes.
        host_budget_bytes (int | None, default None): host bytes for swapped activations; None is
            ``graph.hardware.host_bytes``.
        time_limit_s (float, default 10.0): solver time limit, seconds; the incumbent is used after it.
        mip_gap (float, default 0.005): relative gap at which the solver stops.
        row_multiple (int, default 64): token-wise cuts fall on multiples of this many rows.
        allow_swap (bool, default True): let the plan swap to host memory.
        allow_recompute (bool, default True): let the plan recompute.
        budget_spec (Any, default None): the budget as the user gave it, recorded in the plan; None
            records ``budget_bytes``.
        lookahead (int, default 1): prefetch distance in units, as in ``simulate``.

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
    opts = _options(graph, host_budget_bytes, time_limit_s=time_limit_s, mip_gap=mip_gap, row_multiple=row_multiple,
                    allow_swap=allow_swap, allow_recompute=allow_recompute, lookahead=lookahead)
    keep_all = baseline_decisions(graph, "none", row_multiple=row_multiple)
    baseline = simulate(graph, keep_all, lookahead=lookahead)

    def lowest_peak(switches: _Options) -> SimResult:
        return _min_peak(graph, switches)[1]

    def plan(decisions: list[Decision], result: SimResult, status: str, gap: float) -> Plan:
        polished = polish(graph, decisions, opts.choices(graph), budget_bytes=budget_bytes,
                          host_budget_bytes=opts.host_budget_bytes, lookahead=lookahead,
                          time_limit_s=min(2.0, 0.25 * opts.time_limit_s))
        if polished != decisions:
            decisions, result = polished, simulate(graph, polished, lookahead=lookahead)
        out = Plan(decisions=decisions, budget_bytes=budget_bytes,
                    budget_spec=budget_bytes if budget_spec is None else budget_spec,
                    predicted_peak_bytes=result.peak_bytes, predicted_step_s=result.step_s,
                    baseline_step_s=baseline.step_s, baseline_peak_bytes=baseline.peak_bytes,
                    host_bytes=result.host_peak_bytes, solver="mip", status=status, gap=gap,
                    solve_time_s=0.0, graph_meta={**graph.meta, "resident_bytes": graph.resident_bytes})
        out.layout = layout_for_plan(graph, out, lookahead=lookahead)
        out.solve_time_s = time.perf_counter() - started
        return out

    # Keeping everything is the fastest plan there is (no copies, no recompute): done if it fits.
    if _fits(baseline, budget_bytes, opts.host_budget_bytes):
        return plan(keep_all, baseline, "optimal", 0.0)
    if graph.resident_bytes > budget_bytes:
        minimum, _ = min_feasible_bytes(graph, host_budget_bytes=opts.host_budget_bytes, row_multiple=row_multiple,
                                        allow_swap=allow_swap, allow_recompute=allow_recompute, lookahead=lookahead,
                                        time_limit_s=time_limit_s)
        raise budget_error(graph, opts, budget_bytes, minimum, "model states", lowest_peak)

    # The fastest fitting baseline bounds what the solver may return. It is not given to CBC as a MIP
    # start: CBC 2.10 has been seen to return such a start as "optimal" when a plan 4 % faster existed,
    # to lose it in preprocessing and call the problem infeasible, and to crash on it at a time limit.
    fitting: list[tuple[float, list[Decision], SimResult]] = []
    for name in BASELINES:
        if (name in ("checkpoint-all", "sqrt-n") and not allow_recompute) or (name == "offload-all" and not allow_swap):
            continue
        decisions = baseline_decisions(graph, name, row_multiple=row_multiple)
        result = simulate(graph, decisions, lookahead=lookahead)
        if _fits(result, budget_bytes, opts.host_budget_bytes):
            fitting.append((result.step_s, decisions, result))
    fitting.sort(key=lambda item: item[0])

    outcome = _run_mip(graph, opts, budget_bytes=budget_bytes)
    if outcome.decisions is not None:
        decisions = outcome.decisions
        result = simulate(graph, decisions, lookahead=lookahead)
        if not _fits(result, budget_bytes, opts.host_budget_bytes):
            repaired = repair(graph, decisions, opts.choices(graph), budget_bytes=budget_bytes,
                              host_budget_bytes=opts.host_budget_bytes, lookahead=lookahead)
            decisions = repaired if repaired is not None else decisions
            result = simulate(graph, decisions, lookahead=lookahead)
        if _fits(result, budget_bytes, opts.host_budget_bytes):
            if fitting and fitting[0][0] < result.step_s:
                # Only a solver stopped early can trail a baseline; never return the slower plan.
                _, decisions, result = fitting[0]
            return plan(decisions, result, outcome.status, outcome.gap)
    if fitting:
        # The solver stopped without a usable answer although a baseline fits: return the fastest one.
        _, decisions, result = fitting[0]
        stopped = outcome.status in ("time-limit", "no-solution", "solver-error")
        return plan(decisions, result, "time-limit" if stopped else "heuristic", _UNKNOWN_GAP)

    # Infeasible (or the repair failed): the lowest-peak plan either fits after all or names the minimum.
    lowest, result, status = _min_peak(graph, opts)
    if _fits(result, budget_bytes, opts.host_budget_bytes):
        return plan(lowest, result, "heuristic", _UNKNOWN_GAP)
    if status != "optimal":
        raise MemoptError(f"the solver found no plan within time_limit_s={time_limit_s} and could not prove the "
                          f"budget {format_bytes(budget_bytes)} infeasible; raise time_limit_s")
    raise budget_error(graph, opts, budget_bytes, result.peak_bytes, _describe(result.peak_phase), lowest_peak)
