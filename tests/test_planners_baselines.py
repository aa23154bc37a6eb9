"""Baselines and synthetic graphs: what each baseline decides, and that the generator is sane."""

from __future__ import annotations

import pytest

from memopt.graph import TrainingGraph
from memopt.hardware import Hardware
from memopt.planners import BASELINES, baseline_plan, random_graph, row_step
from memopt.planners.baselines import baseline_decisions


@pytest.mark.parametrize("n_units, kept", [(1, {0}), (4, {1, 3}), (9, {2, 5, 8}), (10, {3, 7})])
def test_sqrt_n_keeps_one_unit_per_segment(n_units: int, kept: set[int]) -> None:
    graph = random_graph(n_units, 0)
    decisions = baseline_decisions(graph, "sqrt-n")
    assert {u for u, d in enumerate(decisions) if d.mode == "keep"} == kept
    assert all(d.mode == "recompute" for u, d in enumerate(decisions) if u not in kept)


@pytest.mark.parametrize("name, mode", [("none", "keep"), ("checkpoint-all", "recompute"), ("offload-all", "swap")])
def test_uniform_baselines(name: str, mode: str) -> None:
    graph = random_graph(8, 2)
    assert {d.label for d in baseline_decisions(graph, name)} == {mode}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_baseline_figures_are_ordered(seed: int) -> None:
    graph = random_graph(16, seed)
    plans = {name: baseline_plan(graph, name) for name in BASELINES}
    none = plans["none"]
    assert none.overhead == 1.0 and none.host_bytes == 0
    for name in ("checkpoint-all", "sqrt-n", "offload-all"):
        assert plans[name].predicted_peak_bytes < none.predicted_peak_bytes
        assert plans[name].predicted_step_s > none.predicted_step_s
    assert plans["checkpoint-all"].predicted_peak_bytes <= plans["sqrt-n"].predicted_peak_bytes
    assert plans["offload-all"].host_bytes == sum(u.saved_bytes for u in graph.units)


def test_baseline_status_follows_the_budget() -> None:
    graph = random_graph(8, 3)
    none = baseline_plan(graph, "none")
    assert baseline_plan(graph, "none", none.predicted_peak_bytes).status == "heuristic"
    tight = baseline_plan(graph, "none", none.predicted_peak_bytes - 1)
    assert tight.status == "infeasible" and tight.solver == "none"
    assert baseline_plan(graph, "offload-all", host_budget_bytes=1).status == "infeasible"


def test_unknown_baseline() -> None:
    with pytest.raises(ValueError, match="checkpoint-all"):
        baseline_plan(random_graph(2, 0), "everything")


@pytest.mark.parametrize("seed", [0, 7])
def test_random_graph_is_deterministic_and_round_trips(seed: int) -> None:
    graph = random_graph(12, seed)
    assert graph.to_json() == random_graph(12, seed).to_json()
    assert TrainingGraph.from_json(graph.to_json()).to_json() == graph.to_json()
    assert graph.to_json() != random_graph(12, seed + 1).to_json()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_separable_fraction_extremes(fraction: float) -> None:
    graph = random_graph(20, 4, separable_fraction=fraction)
    assert all(u.token_separable == bool(fraction) for u in graph.units)
    if fraction:
        assert all(row_step(u, 64) == 64 for u in graph.units)


def test_random_graph_ratios() -> None:
    graph = random_graph(32, 5, hardware=Hardware.preset("a100-80g"))
    assert graph.hardware.name == "a100-80g"
    assert graph.model_state_bytes <= graph.hardware.device_bytes // 4
    for unit in graph.units:
        assert 1.9 <= unit.backward_s / unit.forward_s <= 2.1
        assert len(unit.tensor_bytes) >= 5 and len(set(unit.tensor_bytes)) >= 2
        assert unit.tokens % 64 == 0 and unit.saved_bytes > unit.input_bytes
    # A few heterogeneous units: not every unit of a kind has the same saved bytes.
    by_kind: dict[bool, set[int]] = {}
    for unit in graph.units:
        by_kind.setdefault(unit.token_separable, set()).add(unit.saved_bytes)
    assert any(len(sizes) > 1 for sizes in by_kind.values())


@pytest.mark.parametrize("kwargs, match", [(dict(n_units=0, seed=0), "n_units"),
                                           (dict(n_units=3, seed=0, separable_fraction=1.5), "separable_fraction")])
def test_random_graph_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        random_graph(**kwargs)
