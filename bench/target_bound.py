"""target_bound: the fastest step any plan has at a budget, on graphs profiled on a GPU, and what would move it.

    python bench/target_bound.py [--graphs G.json ...] [--budget-gib 12.51 ...] [--no-write]

By default it reads the memopt-match graphs of the latest filed GPU session (``results/gpu_session-*/``,
profiled on that GPU by bench/train_gpu.py) and, as each one's budget, Hugging Face checkpointing's measured
peak allocated bytes at the same sequence length (the latest ``torch`` row of ``results/train_gpu.csv``).

For each graph the MIP is solved (its optimum is the fastest step memopt's options give under the calibrated
step model, which predicted the measured steps within 2.2 %):
  * ``as_profiled``: the step as it runs (gradients appear through backward, AdamW's states held all step);
  * ``grads_freed_as_made``: each gradient gone as soon as its unit's backward makes it (an optimizer step
    inside backward), the optimizer step's temporaries gone too;
  * ``no_grads_no_states``: that and no optimizer state on the device either, moved at no cost: an optimistic
    bound for offloading them.
and the budget at which the step first reaches each ``--targets`` ratio is found by bisection (0.05 GiB).
Figures are predicted ratios to the step that saves nothing, on the same graph; no timing is taken here.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, latest_session_files, write_rows  # noqa: E402

import memopt  # noqa: E402
from memopt.graph import TrainingGraph  # noqa: E402
from memopt.planners import baseline_plan  # noqa: E402

GiB = 1 << 30


def variants(graph: TrainingGraph) -> dict[str, TrainingGraph]:
    """The graph as profiled, with gradients freed as made, and with neither gradients nor optimizer states."""
    per_unit = max((u.param_grad_bytes for u in graph.units), default=0)
    freed = dataclasses.replace(graph, grads_resident=False, grad_bytes=min(graph.grad_bytes, per_unit),
                                optimizer_step_bytes=0)
    return {"as_profiled": graph, "grads_freed_as_made": freed,
            "no_grads_no_states": dataclasses.replace(freed, optimizer_bytes=0)}


def step_ratio(graph: TrainingGraph, budget_bytes: int) -> float | None:
    """The optimal plan's predicted step over the step saving nothing; None when no plan fits."""
    try:
        plan = memopt.plan(graph, budget_bytes)
    except memopt.BudgetError:
        return None
    return plan.predicted_step_s / baseline_plan(graph, "none").predicted_step_s


def budget_for(graph: TrainingGraph, target: float, low_gib: float, tolerance_gib: float = 0.05) -> float | None:
    """The smallest budget (GiB, within ``tolerance_gib``) whose optimal step is at most ``target`` times the
    step saving nothing; None when even saving everything is slower."""
    high = baseline_plan(graph, "none").predicted_peak_bytes / GiB
    if (step_ratio(graph, int(high * GiB)) or float("inf")) > target:
        return None
    while high - low_gib > tolerance_gib:
        mid = (low_gib + high) / 2
        ratio = step_ratio(graph, int(mid * GiB))
        low_gib, high = (mid, high) if ratio is None or ratio > target else (low_gib, mid)
    return high


def bound_rows(graph: TrainingGraph, budget_gib: float, targets: list[float], label: str) -> dict:
    """One row: the optimal step of each variant at ``budget_gib``, and the budget each target ratio needs."""
    row = {"graph": label, "budget_gib": round(budget_gib, 2),
           "model_state_gib": round(graph.model_state_bytes / GiB, 2)}
    for name, g in variants(graph).items():
        ratio = step_ratio(g, int(budget_gib * GiB))
        row[f"{name}_vs_none"] = round(ratio, 3) if ratio is not None else "no plan"
    for target in targets:
        found = budget_for(graph, target, budget_gib / 2)
        row[f"gib_for_{target:g}x"] = round(found, 2) if found is not None else "none"
    return row


def checkpoint_peak_gib(seq: int) -> float:
    """Hugging Face checkpointing's measured peak allocated GiB at ``seq`` (the latest torch-allocator row)."""
    with (RESULTS_DIR / "train_gpu.csv").open() as f:
        rows = [r for r in csv.DictReader(f)
                if r["method"] == "hf-ckpt" and r["allocator"] == "torch" and int(r["seq"]) == seq]
    if not rows:
        raise SystemExit(f"no hf-ckpt row at seq {seq} in results/train_gpu.csv: pass --budget-gib")
    return float(rows[-1]["peak_alloc_gib"])


def _seq(path: Path) -> int:
    """The sequence length in a filed graph's name (``train_gpu_<seq>_graph_<method>.json``)."""
    return int(path.name.split("_")[2])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", nargs="*", type=Path, help="profiled graphs (TrainingGraph JSON)")
    parser.add_argument("--budget-gib", nargs="*", type=float, help="one budget per graph")
    parser.add_argument("--targets", default="1.10,1.08", help="step ratios to find the budget of")
    parser.add_argument("--no-write", action="store_true", help="print the rows only")
    args = parser.parse_args(argv)
    graphs = args.graphs or latest_session_files("train_gpu_[0-9]*_graph_memopt-match.json")
    budgets = args.budget_gib or [checkpoint_peak_gib(_seq(p)) for p in graphs]
    if len(budgets) != len(graphs):
        parser.error(f"{len(graphs)} graphs but {len(budgets)} budgets: give one --budget-gib per graph")
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, budget in zip(graphs, budgets):
            graph = TrainingGraph.from_json(path.read_text())
            label = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
            rows.append({**bound_rows(graph, budget, targets, label),
                         "profiled_on": graph.hardware.name})
    for row in rows:
        print(row)
    if not args.no_write:
        write_rows("target_bound", rows)
    return rows


if __name__ == "__main__":
    main()
