"""The MIP on graphs profiled from real tiny models: never slower than a baseline that fits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memopt
from memopt.planners import BASELINES, baseline_plan, simulate
from memopt.testing import TinyGPT, TinyMLP, hf_causal_lm, hf_sample

MODELS = {
    "llama": (lambda: hf_causal_lm("llama", attn_implementation="sdpa", num_hidden_layers=8), lambda: hf_sample(seq=128)),
    "tinygpt": (lambda: TinyGPT(vocab=256, hidden=64, layers=8, max_tokens=256), lambda: torch.randint(0, 256, (2, 256))),
    "mlp": (lambda: TinyMLP(depth=12), lambda: torch.randn(2, 256, 64)),
}
_graphs: dict[str, memopt.TrainingGraph] = {}


def _graph(name: str, hardware: str) -> memopt.TrainingGraph:
    if name not in _graphs:
        torch.manual_seed(0)
        make, sample = MODELS[name]
        _graphs[name] = memopt.profile(make(), sample())
    graph = _graphs[name]
    if hardware == "measured":
        return graph
    # The same measured step planned for a GPU's copy engines (asynchronous, overlapping compute), or
    # for a host link so slow that swapping costs as much as recomputing.
    figures = (memopt.Hardware.preset(hardware) if hardware != "slow-copies" else
               dataclasses.replace(memopt.Hardware.preset("cpu"), name="slow-copies", h2d_bytes_per_s=5e8,
                                   d2h_bytes_per_s=5e8))
    return memopt.TrainingGraph.from_dict({**graph.to_dict(), "hardware": figures.to_dict()})


@pytest.mark.parametrize("hardware", ["measured", "l4", "slow-copies"])
@pytest.mark.parametrize("budget", [0.8, 0.6, 0.4])
@pytest.mark.parametrize("name", list(MODELS))
def test_mip_beats_or_ties_every_feasible_baseline(name, budget, hardware):
    graph = _graph(name, hardware)
    plan = memopt.plan(graph, budget)
    result = simulate(graph, plan.decisions)
    assert result.peak_bytes <= plan.budget_bytes
    assert result.step_s == pytest.approx(plan.predicted_step_s)
    for baseline in BASELINES:
        other = baseline_plan(graph, baseline, plan.budget_bytes)
        if other.status != "infeasible":
            assert plan.predicted_step_s <= other.predicted_step_s * (1 + 1e-6), (baseline, plan.summary())


@pytest.mark.parametrize("hardware", ["slow-copies", "l4"])
@pytest.mark.parametrize("budget", [0.75, 0.5])
def test_no_single_unit_change_improves_the_plan(hardware, budget):
    """Local optimality: changing any one unit's decision never gives a faster plan that fits."""
    from memopt.planners._choices import UnitChoices

    graph = _graph("tinygpt", hardware)
    plan = memopt.plan(graph, budget)
    best = simulate(graph, plan.decisions).step_s
    for u, unit in enumerate(graph.units):
        choice = UnitChoices(unit, 64, True, True)
        options = [choice.recompute()] + [choice.prefix(j) for j in range(len(choice.prefix_bytes))]
        if choice.step:
            n = choice.n_steps
            options += [choice.rows(k, r) for k in range(n + 1) for r in range(n + 1 - k)]
        for option in options:
            decisions = list(plan.decisions)
            decisions[u] = option
            result = simulate(graph, decisions)
            if result.peak_bytes <= plan.budget_bytes and result.host_peak_bytes <= graph.hardware.host_bytes:
                # Within the solver's relative gap (MemoptConfig.mip_gap, 0.5 %) a plan counts as optimal.
                assert result.step_s >= best * (1 - 0.005), (unit.name, option, plan.summary())
