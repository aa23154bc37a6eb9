"""The discrete decisions the MIP searches, and the repair that fixes a plan a few bytes over budget."""

from __future__ import annotations

import pytest

from memopt.graph import Decision
from memopt.planners import baseline_plan, random_graph, simulate
from memopt.planners._choices import UnitChoices
from memopt.planners._repair import repair


@pytest.mark.parametrize("allow_swap, allow_recompute", [(True, True), (False, True), (True, False)])
def test_choices_count_and_neighbours(allow_swap: bool, allow_recompute: bool) -> None:
    graph = random_graph(6, 1)
    for unit in graph.units:
        choice = UnitChoices(unit, unit.tokens // 4, allow_swap, allow_recompute)
        every = choice.all()
        if choice.step:
            n = choice.n_steps
            expected = {(True, True): (n + 1) * (n + 2) // 2, (False, True): n + 1, (True, False): n + 1}
            assert len(every) == expected[(allow_swap, allow_recompute)]
            # Row cuts; keeping every row is a keep, recomputing every row a recompute.
            assert all(d.mode in ("token-wise", "keep", "recompute") for d in every)
            assert sum(d.mode == "keep" for d in every) == 1
        else:
            prefixes = len(choice.prefix_bytes)
            assert prefixes == (1 + sum(1 for b in unit.tensor_bytes if b) if allow_swap else 1)
            assert len(every) == prefixes + allow_recompute
        assert len({(d.keep, d.swap, d.recompute) for d in every}) == len(every)
        for d in every:
            assert (allow_swap or d.swap == 0) and (allow_recompute or d.recompute == 0)
            for near in choice.neighbours(d):
                assert near in every and near != d


def test_prefix_round_trip() -> None:
    unit = random_graph(1, 0, separable_fraction=0.0).units[0]
    choice = UnitChoices(unit, 64, True, True)
    for j in range(len(choice.prefix_bytes)):
        assert choice.prefix_of(choice.prefix(j)) == j
    # Swapping tensor 1 without tensor 0 is no prefix.
    assert choice.prefix_of(Decision(unit.name, keep=0.9, swap=0.1, swap_tensors=[1])) is None


def test_repair_fixes_a_small_overshoot() -> None:
    graph = random_graph(8, 2)
    keep_all = baseline_plan(graph, "none")
    budget = keep_all.predicted_peak_bytes - 1
    choices = [UnitChoices(u, 64, True, True) for u in graph.units]
    fixed = repair(graph, keep_all.decisions, choices, budget_bytes=budget, host_budget_bytes=graph.hardware.host_bytes)
    assert fixed is not None and fixed != keep_all.decisions
    assert simulate(graph, fixed).peak_bytes <= budget
    # Each move is one step, so one move is enough for a one-byte overshoot.
    assert sum(a != b for a, b in zip(fixed, keep_all.decisions)) == 1


def test_repair_gives_up_on_an_impossible_budget() -> None:
    graph = random_graph(6, 3)
    choices = [UnitChoices(u, 64, True, True) for u in graph.units]
    keep_all = baseline_plan(graph, "none")
    assert repair(graph, keep_all.decisions, choices, budget_bytes=graph.model_state_bytes,
                  host_budget_bytes=graph.hardware.host_bytes) is None
