"""The BudgetError for a budget no plan fits: the smallest budget that does, and only the fixes that would help.

Each fix is checked, not assumed: a switch the user turned off (swap, recompute) or a host budget is suggested
only when re-solving the lowest-peak program with it relaxed lowers the minimum; when the model states alone
exceed the budget no activation plan can help, so only the levers on model states are named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from memopt.errors import BudgetError
from memopt.graph import TrainingGraph
from memopt.units import format_budget, format_bytes

from .simulator import SimResult

__all__ = ["budget_error"]

def budget_error(graph: TrainingGraph, opts: Any, budget_bytes: int, minimum_bytes: int, dominated_by: str,
                 lowest_peak: Callable[[Any], SimResult]) -> BudgetError:
    """The error for ``budget_bytes`` when ``minimum_bytes`` (set by ``dominated_by``) is the smallest that fits.

    Args:
        graph (TrainingGraph): the step.
        opts (PlannerOptions): the planner's switches the minimum was found under (host budget resolved).
        budget_bytes (int): the budget asked for, bytes.
        minimum_bytes (int): the smallest feasible budget under ``opts``, bytes.
        dominated_by (str): what sets it, in words (``"model states"`` when they alone exceed the budget).
        lowest_peak (Callable): the lowest-peak plan's simulation under other switches (``mip._min_peak``).
    """
    if dominated_by == "model states":
        fixes, detail = _model_state_fixes(graph, minimum_bytes)
    else:
        fixes, detail = _activation_fixes(graph, opts, minimum_bytes, lowest_peak), ""
    extra = f" ({detail})" if detail else ""
    return BudgetError(
        f"no plan fits a budget of {format_bytes(budget_bytes)} ({budget_bytes} bytes): the smallest feasible budget "
        f"is {minimum_bytes} bytes, set by {dominated_by}{extra}. To fit, " + "; or ".join(fixes),
        budget_bytes=budget_bytes, min_feasible_bytes=minimum_bytes, dominated_by=dominated_by)


def _raise_budget(minimum_bytes: int) -> str:
    return f"raise the budget to at least {format_budget(minimum_bytes)!r}"


def _model_state_fixes(graph: TrainingGraph, minimum_bytes: int) -> tuple[list[str], str]:
    """Model states alone exceed the budget: swap and recompute act on activations and cannot help."""
    gathered = (f" and {format_bytes(graph.gathered_param_bytes)} of gathered ZeRO-3 parameters"
                if graph.gathered_param_bytes else "")
    detail = (f"model states alone take {format_bytes(graph.model_state_bytes)}: parameters "
              f"{format_bytes(graph.param_bytes)}, gradients {format_bytes(graph.grad_bytes)}, optimizer state "
              f"{format_bytes(graph.optimizer_bytes)}{gathered}")
    now = f", now divided by {graph.sharding_degree}" if graph.sharding_degree > 1 else ""
    fixes = [_raise_budget(minimum_bytes),
             f"shard the model states over more data-parallel ranks (DeepSpeed ZeRO or FSDP{now})"]
    if graph.optimizer_bytes:
        fixes.append("use an optimizer with less state (e.g. 8-bit Adam, Adafactor or SGD)")
    return fixes, detail


def _activation_fixes(graph: TrainingGraph, opts: Any, minimum_bytes: int,
                      lowest_peak: Callable[[Any], SimResult]) -> list[str]:
    """Activations set the minimum: each switch that is off, and the host budget, if relaxing it lowers it."""
    fixes = [_raise_budget(minimum_bytes)]
    for switch, what in (("allow_swap", "swapping to host memory"), ("allow_recompute", "recompute")):
        if not getattr(opts, switch):
            relaxed = lowest_peak(dataclasses.replace(opts, **{switch: True}))
            if relaxed.peak_bytes < minimum_bytes:
                fixes.append(f"allow {what} ({switch}=True), which lowers the minimum to "
                             f"{format_budget(relaxed.peak_bytes)!r}")
    # Nothing swaps more than every saved byte, so a host budget that large cannot bind.
    swappable = sum(u.saved_bytes for u in graph.units)
    if opts.allow_swap and opts.host_budget_bytes < swappable:
        relaxed = lowest_peak(dataclasses.replace(opts, host_budget_bytes=swappable))
        if relaxed.peak_bytes < minimum_bytes:
            fixes.append(f"raise the host budget (host_budget, now {format_bytes(opts.host_budget_bytes)}) to "
                         f"{format_budget(relaxed.host_peak_bytes)!r}, which lowers the minimum to "
                         f"{format_budget(relaxed.peak_bytes)!r}")
    fixes.append("shrink the step's activations (a smaller micro-batch or shorter sequences)")
    return fixes
