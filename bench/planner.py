"""Planner scenario: MIP solve time and simulated step time against the baselines on synthetic graphs.

For each graph size and budget the MIP plan's simulated step is given as a ratio to keeping everything
("none", the fastest possible step), to checkpointing every unit, and to every baseline that fits the
same budget (``-`` when that baseline does not fit). Budgets are 75 / 50 / 25 % of the activation range:
from the smallest budget any plan fits (``min_feasible_bytes``) up to the nothing-saved peak.

Run: ``python bench/planner.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import time

from harness import write_rows

from memopt.hardware import Hardware
from memopt.planners import BASELINES, baseline_plan, min_feasible_bytes, random_graph, solve

_GiB = 1024**3


def run(sizes: list[int], seeds: list[int], fractions: list[float], hardware: str, time_limit_s: float) -> list[dict]:
    rows = []
    for n_units in sizes:
        for seed in seeds:
            graph = random_graph(n_units, seed, hardware=Hardware.preset(hardware))
            baselines = {name: baseline_plan(graph, name) for name in BASELINES}
            none = baselines["none"]
            minimum, _ = min_feasible_bytes(graph, time_limit_s=time_limit_s)
            for fraction in fractions:
                budget = int(minimum + fraction * (none.predicted_peak_bytes - minimum))
                started = time.perf_counter()
                plan = solve(graph, budget, time_limit_s=time_limit_s)
                solve_s = time.perf_counter() - started
                row = {
                    "modelled_gpu": hardware,
                    "units": n_units,
                    "seed": seed,
                    "budget_pct": int(round(fraction * 100)),
                    "budget_gib": round(budget / _GiB, 3),
                    "solve_s": round(solve_s, 3),
                    "status": plan.status,
                    "gap": round(plan.gap, 4),
                    "step_vs_none": round(plan.predicted_step_s / none.predicted_step_s, 4),
                    "step_vs_checkpoint_all": round(
                        plan.predicted_step_s / baselines["checkpoint-all"].predicted_step_s, 4),
                }
                for name in ("checkpoint-all", "sqrt-n", "offload-all"):
                    base = baselines[name]
                    fits = base.predicted_peak_bytes <= budget and base.host_bytes <= graph.hardware.host_bytes
                    row[f"mip_vs_{name}"] = round(plan.predicted_step_s / base.predicted_step_s, 4) if fits else "-"
                row["host_gib"] = round(plan.host_bytes / _GiB, 3)
                rows.append(row)
                print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256], help="units per graph")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="synthetic graph seeds")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25],
                        help="budgets as fractions of the activation range (min feasible .. nothing saved)")
    parser.add_argument("--hardware", default="h100", choices=Hardware.preset_names(), help="GPU preset to model")
    parser.add_argument("--time-limit-s", type=float, default=10.0, help="MIP time limit per solve, seconds")
    args = parser.parse_args()
    rows = run(args.sizes, args.seeds, args.fractions, args.hardware, args.time_limit_s)
    table = ["modelled_gpu", "units", "seed", "budget_pct", "solve_s", "status", "gap", "step_vs_none",
             "step_vs_checkpoint_all", "mip_vs_sqrt-n", "mip_vs_offload-all", "host_gib", "device"]
    path = write_rows("planner", rows, table_columns=table)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
