"""Every combination of ``Decision`` fields is either refused by name, or simulated and run with the same bytes.

A decision is JSON a user can edit; one the runtime and the simulator would read differently (fractions that
name no tensors or rows, a row split that does not add up) must never load. Each one that does load is read
by the one decoder (``Decision.effective``) on both sides: the simulator's peak equals what an independent
meter sees while the plan runs, within 1 %.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import memopt
from memopt.graph import Decision, Mode, Plan
from memopt.planners import simulate
from memopt.testing import TinyMLP, metered_step

MODES = [None, *Mode]
FRACTIONS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5),
             (0.5, 0.25, 0.25), (0.25, 0.25, 0.25)]
TENSORS = [[], [0], [0, 1], [1, 1]]
ROWS = [(0, 0, 0), (128, 64, 256), (256, 0, 256), (0, 0, 256), (64, 64, 64)]
DIMS = [False, True]  # without / with the unit's token dims


def _combinations():
    for mode, fractions, tensors, rows, dims in itertools.product(MODES, FRACTIONS, TENSORS, ROWS, DIMS):
        yield mode, fractions, tensors, rows, dims


@pytest.fixture(scope="module")
def profiled():
    torch.manual_seed(0)
    model = TinyMLP(depth=3)
    x = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(0))
    graph = memopt.profile(model, x, memopt.MemoptConfig(profile_repeats=1, profile_warmup=0))
    assert graph.units[1].token_separable and graph.units[1].tokens == 256
    return model, x, graph


def _build(graph, mode, fractions, tensors, rows, dims) -> Decision:
    unit = graph.units[1]
    keep, swap, recompute = fractions
    return Decision(unit.name, keep, swap, recompute, mode, keep_rows=rows[0], swap_rows=rows[1], rows=rows[2],
                    token_dims=list(unit.token_dims) if dims else [], swap_tensors=tensors)


def _run(model, x, graph, decision) -> tuple[int, int]:
    """(simulated activation peak, measured peak: meter plus host arena) of the plan with ``decision`` on unit 1."""
    decisions = [Decision(u.name) for u in graph.units]
    decisions[1] = decision
    result = simulate(graph, decisions)
    handle = memopt.apply(model, Plan(decisions, result.peak_bytes, "test", result.peak_bytes, result.step_s,
                                      result.step_s, result.peak_bytes, host_bytes=result.host_peak_bytes))
    measured = metered_step(model, x)
    host = handle.stats().get("host_peak_bytes", 0)
    handle.remove()
    # On a CPU host memory is the device memory: the simulator holds a swapped copy where the tensor was.
    return result.peak_bytes - graph.states_without_grads_bytes, measured + host


def test_every_combination_is_refused_by_name_or_runs_as_simulated(profiled):
    model, x, graph = profiled
    accepted: dict[tuple, Decision] = {}
    refused = 0
    for combo in _combinations():
        try:
            decision = _build(graph, *combo)
        except ValueError as exc:
            message = str(exc)
            assert message.startswith(f"decision for {graph.units[1].name!r}: "), message
            assert any(word in message for word in ("keep", "swap", "recompute", "rows", "mode", "token_dims",
                                                    "swap_tensors")), message
            refused += 1
            continue
        accepted[(decision.effective, decision.keep_rows, decision.swap_rows, tuple(decision.swap_tensors))] = decision
    # What loads: keep, recompute, selective, swap of tensor 0 or of both, and row splits that add up.
    effective = {key[0] for key in accepted}
    assert effective == {Mode.KEEP, Mode.RECOMPUTE, Mode.SELECTIVE, Mode.SWAP, Mode.TOKEN_WISE}, effective
    assert refused > 10 * len(accepted)
    for decision in accepted.values():
        predicted, measured = _run(model, x, graph, decision)
        assert abs(predicted - measured) <= 0.01 * measured, (decision, predicted, measured)


def test_the_issue_case_is_refused():
    with pytest.raises(ValueError, match=r"keep=0.5, swap=0.5, recompute=0.0 say how much but not which tensors"):
        Decision("layers.0", keep=0.5, swap=0.5)


def test_one_decoder_reads_degenerate_row_splits_as_keep_and_recompute():
    kept = Decision("u", mode="token-wise", keep_rows=4, rows=4, token_dims=[0])
    dropped = Decision("u", 0.0, 0.0, 1.0, "token-wise", rows=4, token_dims=[0])
    assert (kept.effective, dropped.effective) == (Mode.KEEP, Mode.RECOMPUTE)
    assert (kept.label, dropped.label) == ("keep", "recompute")
    from memopt.api import policy_for

    assert policy_for(kept).mode is Mode.KEEP and policy_for(dropped).mode is Mode.RECOMPUTE


def test_json_round_trip_keeps_the_mode():
    decision = Decision("u", 0.5, 0.25, 0.25, "token-wise", keep_rows=2, swap_rows=1, rows=4, token_dims=[0, None])
    assert Decision.from_dict(decision.to_dict()) == decision
    assert decision.to_dict()["mode"] == "token-wise"
