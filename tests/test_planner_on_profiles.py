"""The MIP on graphs profiled from real tiny models: never slower than a baseline that fits."""

from __future__ import annotations

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
    # The same measured step, planned for a GPU's copy engines too (asynchronous, overlapping compute).
    return graph if hardware == "measured" else memopt.TrainingGraph.from_dict(
        {**graph.to_dict(), "hardware": memopt.Hardware.preset(hardware).to_dict()})


@pytest.mark.parametrize("hardware", ["measured", "l4"])
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
