"""The simulator against peaks and times worked out by hand on two- and three-unit graphs."""

from __future__ import annotations

import pytest

from memopt.graph import Decision, TrainingGraph, Unit
from memopt.hardware import Hardware
from memopt.planners import simulate
from memopt.planners.simulator import CATEGORIES


def toy_graph(*, async_copies: bool, copy_bytes_per_s: float, three: bool = False) -> TrainingGraph:
    """base 100 B of model states, 6 B fixed, 9 B head workspace, head 1 s; units of 1 s forward, 2 s backward."""
    hw = Hardware("toy", 10**6, 10**6, copy_bytes_per_s, copy_bytes_per_s, 1.0, 1.0, async_copies=async_copies)
    units = [
        Unit("u0", 1.0, 2.0, input_bytes=10, output_bytes=10, tensor_bytes=[30, 20], token_dims=[None, None],
             forward_workspace_bytes=5, backward_workspace_bytes=7),
        Unit("u1", 1.0, 2.0, input_bytes=10, output_bytes=10, tensor_bytes=[40], token_dims=[None],
             forward_workspace_bytes=3, backward_workspace_bytes=4),
    ]
    if three:
        units.append(Unit("u2", 1.0, 2.0, input_bytes=10, output_bytes=10, tensor_bytes=[16, 16], token_dims=[0, 0],
                          tokens=4, token_separable=True))
    return TrainingGraph(units, hw, param_bytes=100, fixed_activation_bytes=6, head_workspace_bytes=9,
                         other_forward_s=0.5, other_backward_s=0.5)


KEEP0, KEEP1, KEEP2 = Decision("u0"), Decision("u1"), Decision("u2")
SWAP_FIRST0 = Decision("u0", keep=0.4, swap=0.6, swap_tensors=[0])  # 30 of 50 bytes to host
SWAP_ALL0 = Decision("u0", keep=0.0, swap=1.0, swap_tensors=[0, 1])
SWAP_ALL1 = Decision("u1", keep=0.0, swap=1.0, swap_tensors=[0])
RECOMPUTE1 = Decision("u1", keep=0.0, swap=0.0, recompute=1.0)
# u2 token-wise: rows [0, 2) kept, [2, 3) swapped, [3, 4) recomputed: 16 B kept, 8 B swapped, 2.5 B of input.
ROWS2 = Decision("u2", keep=0.5, swap=0.25, recompute=0.25, keep_rows=2, swap_rows=1, rows=4, token_dims=[0, 0])

# Each case: graph options, decisions, lookahead, then the expected peak bytes, phase at the peak, step
# seconds, stall seconds, recompute seconds, host bytes and every phase's bytes (forward..., head, backward...).
CASES = {
    # Keep all: F0 = 106+50+5, F1 = 106+50+40+3, T = 106+90+9, B1 = 106+50+40+4, B0 = 106+50+7.
    "keep-all": (dict(async_copies=True, copy_bytes_per_s=100.0), [KEEP0, KEEP1], 1,
                 205, "head", 7.0, 0.0, 0.0, 0, [161, 199, 205, 200, 163]),
    # u0 swaps 30 B (0.3 s each way, hidden), u1 recomputed (holds its 10 B input, eff 0, and its
    # checkpoint workspace of 0 B instead of the forward workspace): F1 = 106+20+30 in flight, T = 106+20+10+9, B1 = 106+20+40+4+30 prefetch.
    # Time: F 0-2, head 2-3, B1 3-6 (1 s recompute + 2 s), H2D0 3-3.3, B0 6-8.
    "swap-hidden+recompute": (dict(async_copies=True, copy_bytes_per_s=100.0), [SWAP_FIRST0, RECOMPUTE1], 1,
                              200, "backward u1", 8.0, 0.0, 1.0, 30, [161, 156, 145, 200, 163]),
    # u0 swaps 50 B at 20 B/s (2.5 s each way): D2H 1-3.5 stalls F1's end by 1.5 s; head 3.5-4.5;
    # B1 4.5-6.5; H2D0 starts with B1 at 4.5, ends 7.0, so B0 waits 0.5 s: 7-9.
    "swap-stalls": (dict(async_copies=True, copy_bytes_per_s=20.0), [SWAP_ALL0, KEEP1], 1,
                    200, "backward u1", 9.0, 2.0, 0.0, 50, [161, 199, 155, 200, 163]),
    # Same without async copies: copies are synchronous (2.5 s after F0, 2.5 s before B0) and never in flight.
    "swap-sync": (dict(async_copies=False, copy_bytes_per_s=20.0), [SWAP_ALL0, KEEP1], 1,
                  163, "backward u0", 12.0, 5.0, 0.0, 50, [161, 149, 155, 150, 163]),
    # Three units, u0 and u1 swapped whole, u2 token-wise. F2 = 106+40 in flight+32, T = 106+18.5+8+9,
    # B2 = 106+32+40 prefetch+16 (rebuilding its largest tensor from rows), B1 = 106+40+4+50. Time: D2H2 ends 3.08 so the head waits 0.08 s; H2D2
    # 4.08-4.16 delays B2 (0.25 s recompute + 2 s) to 4.16-6.41; B1 6.41-8.41; B0 8.41-10.41.
    "three-lookahead-1": (dict(async_copies=True, copy_bytes_per_s=100.0, three=True), [SWAP_ALL0, SWAP_ALL1, ROWS2],
                          1, 200, "backward u1", 10.41, 0.16, 0.25, 98, [161, 199, 178, 141.5, 194, 200, 163]),
    # Lookahead 2: u2's backward also holds u0's prefetch: B2 = 106+32+40+50+16.
    "three-lookahead-2": (dict(async_copies=True, copy_bytes_per_s=100.0, three=True), [SWAP_ALL0, SWAP_ALL1, ROWS2],
                          2, 244, "backward u2", 10.41, 0.16, 0.25, 98, [161, 199, 178, 141.5, 244, 200, 163]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_computed(case: str) -> None:
    graph_kw, decisions, lookahead, peak, phase, step_s, stall_s, recompute_s, host, phases = CASES[case]
    result = simulate(toy_graph(**graph_kw), decisions, lookahead=lookahead)
    assert result.peak_bytes == peak
    assert result.peak_phase == phase
    assert result.step_s == pytest.approx(step_s)
    assert result.stall_s == pytest.approx(stall_s)
    assert result.recompute_s == pytest.approx(recompute_s)
    assert result.host_peak_bytes == host
    totals = [sum(cats.values()) for _, _, cats in result.timeline]
    assert totals == pytest.approx(phases, abs=1.0)  # categories are rounded to whole bytes


def test_timeline_shape() -> None:
    result = simulate(toy_graph(async_copies=True, copy_bytes_per_s=20.0), [SWAP_ALL0, KEEP1])
    labels = [label for _, label, _ in result.timeline]
    assert labels == ["forward u0", "forward u1", "head", "backward u1", "backward u0"]
    times = [t for t, _, _ in result.timeline]
    assert times == pytest.approx([0.0, 1.0, 3.5, 4.5, 7.0])
    for _, _, cats in result.timeline:
        assert set(cats) == set(CATEGORIES)
        assert cats["model states"] == 100 and cats["fixed"] == 6
    assert result.timeline[1][2]["swap in flight"] == 50  # u0's swap is copied during u1's forward
    assert result.timeline[3][2]["swap in flight"] == 50  # and copied back during u1's backward


@pytest.mark.parametrize("decisions, match", [
    ([KEEP0], "2 units"),
    ([KEEP1, KEEP0], "unit order"),
    ([Decision("u0", keep=0.0, swap=1.0, swap_tensors=[5]), KEEP1], "pack-order"),
])
def test_rejects_bad_decisions(decisions: list[Decision], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate(toy_graph(async_copies=True, copy_bytes_per_s=1.0), decisions)


def test_rejects_bad_lookahead() -> None:
    with pytest.raises(ValueError, match="lookahead"):
        simulate(toy_graph(async_copies=True, copy_bytes_per_s=1.0), [KEEP0, KEEP1], lookahead=0)


def test_gathered_parameters_are_held_like_model_states() -> None:
    """ZeRO-3's gathered parameters raise every phase by their bytes, in the model-states category."""
    import dataclasses

    graph = toy_graph(async_copies=True, copy_bytes_per_s=100.0)
    gathered = dataclasses.replace(graph, gathered_param_bytes=25)
    assert gathered.resident_bytes == graph.model_state_bytes + 25 == 125
    plain = simulate(graph, [KEEP0, RECOMPUTE1])
    more = simulate(gathered, [KEEP0, RECOMPUTE1])
    assert more.peak_bytes == plain.peak_bytes + 25 and more.step_s == plain.step_s
    assert [cats["model states"] for _, _, cats in more.timeline] == [125] * len(plain.timeline)
    assert TrainingGraph.from_json(gathered.to_json()) == gathered
    with pytest.raises(ValueError, match="gathered_param_bytes"):
        dataclasses.replace(graph, gathered_param_bytes=-1)
