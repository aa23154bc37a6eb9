"""Robust profile times: warm-up, medians over repeats, identical blocks pooled, a busy machine flagged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memopt
from memopt.planners import random_graph
from memopt.testing import TinyMLP
from memopt.timing import SPREAD_WARNING, robust_times


def _scaled(graph, factors):
    """The graph with each unit's times multiplied by its factor."""
    units = [dataclasses.replace(u, forward_s=u.forward_s * f, backward_s=u.backward_s * f, selective_s=u.selective_s * f)
             for u, f in zip(graph.units, factors)]
    return dataclasses.replace(graph, units=units)


def test_medians_over_repeats_and_pooled_over_identical_blocks():
    base = random_graph(4, seed=0)
    # Units 1, 2 and 3 do identical work; unit 0 differs.
    same = dataclasses.replace(base.units[1], name="x")
    units = [base.units[0]] + [dataclasses.replace(same, name=f"b{i}", forward_s=1.0, backward_s=2.0) for i in range(3)]
    graph = dataclasses.replace(base, units=units)
    runs = [_scaled(graph, f) for f in ([1, 1, 1, 9], [3, 2, 1, 1], [2, 3, 1, 1])]
    merged = robust_times(graph, runs, warn_spread=False)
    assert merged.units[0].forward_s == pytest.approx(2 * units[0].forward_s)  # its own median
    # Medians per unit: 1, 2, 1 -> pooled median 1 for every identical block (unit 1's noise is gone).
    assert [u.forward_s for u in merged.units[1:]] == [1.0, 1.0, 1.0]
    assert [u.backward_s for u in merged.units[1:]] == [2.0, 2.0, 2.0]
    assert [u.tensor_bytes for u in merged.units] == [u.tensor_bytes for u in graph.units]
    assert merged.meta["profiled_steps"] == 3


def test_selective_seconds_are_the_clean_forward_less_the_expensive_ops():
    base = random_graph(1, seed=2)
    unit = dataclasses.replace(base.units[0], forward_s=10.0, selective_s=4.0, selective_bytes=1024)
    full = dataclasses.replace(base, units=[unit])  # expensive ops: 6 s (timed one by one in the full profile)
    clean = dataclasses.replace(full, units=[dataclasses.replace(unit, forward_s=7.0, selective_s=0.0)])
    merged = robust_times(full, [clean])
    assert merged.units[0].forward_s == 7.0 and merged.units[0].selective_s == pytest.approx(1.0)


def test_timed_profiles_of_other_units_are_refused():
    graph = random_graph(3, seed=1)
    with pytest.raises(ValueError, match="same blocks"):
        robust_times(graph, [random_graph(4, seed=1)])
    with pytest.raises(ValueError, match="at least one"):
        robust_times(graph, [])


def test_a_busy_profile_is_flagged():
    graph = random_graph(3, seed=1)
    one_slow = robust_times(graph, [graph, _scaled(graph, [9, 9, 9]), graph])
    assert one_slow.meta["timing_spread"] == 0.0 and "timing_note" not in one_slow.meta
    runs = [graph, _scaled(graph, [3, 3, 3]), _scaled(graph, [2, 2, 2])]
    with pytest.warns(UserWarning, match="machine looks busy"):
        merged = robust_times(graph, runs)
    assert merged.meta["timing_spread"] > SPREAD_WARNING and "timing_note" in merged.meta
    steady = robust_times(graph, [graph, graph, graph])
    assert steady.meta["timing_spread"] == 0.0 and "timing_note" not in steady.meta


def test_profile_measures_bytes_once_then_times_clean_repeats(monkeypatch):
    import memopt.profiler

    calls = []
    real = memopt.profiler.profile_model

    def counting(*args, timing_only=False, **kwargs):
        calls.append(timing_only)
        return real(*args, timing_only=timing_only, **kwargs)

    monkeypatch.setattr(memopt.profiler, "profile_model", counting)
    model, x = TinyMLP(depth=3), torch.randn(2, 128, 64)
    config = memopt.MemoptConfig(profile_repeats=2, profile_warmup=1)
    graph = memopt.profile(model, x, config)
    assert calls == [False, True, True, True] and graph.meta["profiled_steps"] == 2
    full = real(model, x, config)
    assert [u.tensor_bytes for u in graph.units] == [u.tensor_bytes for u in full.units]
    assert graph.meta["peak_activation_bytes_safe_mode"] == full.meta["peak_activation_bytes_safe_mode"]
    # Identical blocks carry identical times.
    assert len({(u.forward_s, u.backward_s) for u in graph.units}) == 1


@pytest.mark.parametrize("kwargs", [{"profile_repeats": 0}, {"profile_warmup": -1}, {"profile_warmup": 0.5}])
def test_bad_profile_counts_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        memopt.MemoptConfig(**kwargs)
