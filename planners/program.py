"""The MIP: per unit keep / swap / recompute, token-wise where the unit allows, as one program for CBC.

The program models exactly the simulator's memory and time rules (see ``planners.simulator``) over the
decisions ``realize`` can produce (``planners._choices``): a token-separable unit with a row step gets
integer counts of kept and recomputed row steps (the rest is swapped), any other unit picks one option
among "swap the first j saved tensors", "recompute the whole unit" and "recompute it selectively". Memory
is constrained at every phase of the step; time is a fixed-order schedule of continuous start and end
times on the three streams, so minimising the final end time gives the earliest-start schedule, i.e. the
simulated step. A tiny second term prefers keeping over swapping or recomputing that costs no time.
``planners.mip`` decides what to do with the answer.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memopt.graph import Decision, TrainingGraph

from ._cbc import cbc_solver
from ._choices import UnitChoices
from .options import PlannerOptions
from .simulator import assembly_bytes, models_optimizer_step, replay_bytes, simulate
from .simulator import head_change as _head_change

__all__ = ["Outcome", "run_mip"]

# Weight of the keep-preference term, in units of the nothing-saved step: small enough to never trade
# step time (at most ~1e-6 relative), large enough for the solver to see.
_PREFER_KEEP = 1e-6


@dataclass
class _HeadTerms:
    """The head's part of the program: its options' extra bytes and seconds, and the option picked."""

    extra_bytes: Any
    extra_s: Any
    decode: Callable[[], int]


def _head_terms(prob: Any, graph: TrainingGraph, opts: PlannerOptions, mem_scale: float,
                time_scale: float) -> _HeadTerms:
    """One binary per allowed head option (``PlannerOptions.head_options``): bytes and seconds beside the
    unchunked head's, which the graph's head workspace and other seconds already hold."""
    import pulp

    options = opts.head_options(graph)
    if len(options) <= 1:
        chunks = options[0].chunks if options else 1
        extra = _head_change(graph, chunks)
        return _HeadTerms(extra[0] / mem_scale, extra[1] / time_scale, lambda: chunks)
    picks = [prob.add_variable(f"head_{o.chunks}", 0, 1, cat="Binary") for o in options]
    prob += pulp.lpSum(picks) == 1, "head_option"
    changes = [_head_change(graph, o.chunks) for o in options]

    def decode() -> int:
        return options[max(range(len(picks)), key=lambda i: picks[i].varValue or 0.0)].chunks

    return _HeadTerms(pulp.lpSum(c[0] / mem_scale * y for c, y in zip(changes, picks)),
                      pulp.lpSum(c[1] / time_scale * y for c, y in zip(changes, picks)), decode)


@dataclass
class Outcome:
    """What one CBC run returned."""

    decisions: list[Decision] | None
    status: str  # "optimal", "time-limit", "infeasible", "no-solution" or "solver-error"
    gap: float
    head_chunks: int = 1


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
            backward_extra=assembly_bytes(unit) / mem_scale * split + replay_bytes(unit) / mem_scale * has[2],
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
        backward_extra=replay_bytes(unit) / mem_scale * term(5) if replay_bytes(unit) else 0.0,
        recompute=term(3),
        decode=decode_option,
        drops=term(5),
    )


def _add_memory(prob: Any, graph: TrainingGraph, terms: list[_UnitTerms], head: _HeadTerms, cap: Any,
                mem_scale: float, lookahead: int) -> bool:
    """Memory at every phase of the step <= cap (the simulator's rules); False if a fixed phase exceeds it."""
    import pulp

    units = graph.units
    n = len(units)
    is_async = graph.hardware.async_copies
    swapped = [t.swapped for t in terms]
    held = graph.states_without_grads_bytes + graph.fixed_activation_bytes

    def const(phase: str, unit: int = 0) -> float:
        """Model states (gradients as they exist in the phase) and the activations saved outside the units."""
        return (held + graph.grad_bytes_at(phase, unit)) / mem_scale
    # held_before[u] = bytes held by the units before u; one variable each keeps the program linear in size.
    held_before: list[Any] = [0.0]
    for u in range(n):
        var = prob.add_variable(f"held_before_{u + 1}", 0)
        prob += var == held_before[u] + terms[u].held, f"held_prefix_{u}"
        held_before.append(var)
    # Tensors passed to several units: held through the forward, and after it once any unit drops its
    # forward (whole or selective recompute), whose recompute holds them (``holds_shared``: 1 then).
    shared = graph.shared_input_bytes / mem_scale
    shared_after: Any = shared if graph.shared_saved else 0.0
    if shared and not graph.shared_saved:
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
        limit(const("forward") + shared + held_before[u] + inflight + terms[u].working, f"mem_F_{u}")
        prefetch = pulp.lpSum(swapped[max(0, u - lookahead):u]) if is_async and u else 0.0
        limit(const("backward", u) + shared_after + held_before[u]
              + (unit.saved_bytes + unit.backward_workspace_bytes) / mem_scale + prefetch + terms[u].backward_extra,
              f"mem_B_{u}")
    last_swap = swapped[n - 1] if is_async and n else 0.0
    limit(const("head") + shared_after + held_before[n] + last_swap + graph.head_workspace_bytes / mem_scale
          + head.extra_bytes, "mem_T")
    if models_optimizer_step(graph):
        limit((graph.states_without_grads_bytes + graph.grad_bytes_at("step") + graph.optimizer_step_bytes) / mem_scale,
              "mem_step")
    return fits


def _add_time(prob: Any, graph: TrainingGraph, terms: list[_UnitTerms], head_terms: _HeadTerms, mem_scale: float,
              time_scale: float, lookahead: int) -> Any:
    """The step's schedule on three streams in the simulator's fixed order; returns the step-end variable."""
    import pulp

    units = graph.units
    n = len(units)
    hw = graph.hardware
    swapped = [t.swapped for t in terms]
    recompute = [t.recompute for t in terms]
    fwd = [u.forward_s / time_scale for u in units]
    bwd = [u.backward_s / time_scale for u in units]
    head = (graph.other_forward_s + graph.other_backward_s) / time_scale + head_terms.extra_s
    d2h = mem_scale / hw.d2h_bytes_per_s / time_scale  # scaled seconds per scaled byte
    h2d = mem_scale / hw.h2d_bytes_per_s / time_scale
    step = prob.add_variable("step", 0)
    if not hw.async_copies:
        # Synchronous copies add to compute; nothing overlaps.
        optimizer = graph.optimizer_step_s / time_scale if models_optimizer_step(graph) else 0.0
        prob += step >= (sum(fwd) + head + sum(bwd) + (d2h + h2d) * pulp.lpSum(swapped) + optimizer
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
    optimizer = graph.optimizer_step_s / time_scale if models_optimizer_step(graph) else 0.0
    prob += step >= (bs[0] + recompute[0] * fwd[0] + bwd[0] if n else backward_start) + optimizer, "t_step"
    return step


def run_mip(graph: TrainingGraph, opts: PlannerOptions, *, budget_bytes: int | None,
             mip_gap: float | None = None) -> Outcome:
    """Build and solve the program: fastest step within ``budget_bytes``, or the lowest peak when None."""
    import pulp

    keep_all = simulate(graph, [Decision(u.name) for u in graph.units])
    # Scale bytes and seconds to O(1) so CBC's absolute tolerances mean the same on every model.
    mem_scale = float(max(keep_all.peak_bytes, 1))
    time_scale = max(keep_all.step_s, 1e-12)
    prob = pulp.LpProblem("memopt_plan", pulp.LpMinimize)
    terms = [_unit_terms(prob, u, choice, mem_scale) for u, choice in enumerate(opts.choices(graph))]
    head = _head_terms(prob, graph, opts, mem_scale, time_scale)
    cap: Any = prob.add_variable("peak", 0) if budget_bytes is None else budget_bytes / mem_scale
    if not _add_memory(prob, graph, terms, head, cap, mem_scale, opts.lookahead):
        return Outcome(None, "infeasible", math.inf)
    prob += pulp.lpSum(t.swapped for t in terms) <= opts.host_budget_bytes / mem_scale, "host"
    step = _add_time(prob, graph, terms, head, mem_scale, time_scale, opts.lookahead)
    if budget_bytes is None:
        prob += cap
    else:
        # Among equally fast plans, the one that keeps most (bytes neither held nor swapped are dropped)
        # and recomputes least.
        free_work = pulp.lpSum(u.saved_bytes / mem_scale - t.held + t.recompute * (u.forward_s / time_scale)
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
            return Outcome(None, "solver-error", math.inf)
        with open(log_path, errors="replace") as f:
            log = f.read()
    finally:
        os.unlink(log_path)
    status, gap = _parse_log(log, prob)
    if status in ("infeasible", "no-solution"):
        return Outcome(None, status, math.inf)
    return Outcome([t.decode() for t in terms], status, gap, head.decode())


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
