"""Planners: torch-free pure functions of a TrainingGraph that return a Plan.

``solve`` is the MIP planner (pulp is imported only when it runs), ``simulate`` the ground truth it is
checked against, ``baseline_plan`` the plans it is compared with, ``plan_layout`` the buffer layout,
``random_graph`` synthetic graphs for tests and benchmarks.
"""

from .baselines import BASELINES, baseline_plan
from .layout import Layout, layout_for_plan, plan_layout, plan_layout_blocks
from .mip import min_feasible_bytes, solve
from .options import PlannerOptions
from .realize import realize, row_step
from .simulator import SimResult, simulate
from .synthetic import random_graph

__all__ = sorted([
    "BASELINES",
    "Layout",
    "PlannerOptions",
    "SimResult",
    "baseline_plan",
    "layout_for_plan",
    "min_feasible_bytes",
    "plan_layout",
    "plan_layout_blocks",
    "random_graph",
    "realize",
    "row_step",
    "simulate",
    "solve",
])
