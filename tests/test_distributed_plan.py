"""One plan for all ranks (memopt.distributed): graphs merged to the slowest rank's figures, solved once,
broadcast; a plan refused at another world size or sharding; errors of rank 0 raised on every rank."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import memopt
from memopt.distributed import check_plan_fits, launch, merge_graphs
from memopt.graph import Decision, Plan
from memopt.planners.synthetic import random_graph
from memopt.testing import TinyMLP


def _slower(graph, units: set[int], factor: float = 50.0):
    """``graph`` with the recompute of ``units`` made ``factor`` times as slow (the profile of a slow rank)."""
    slow = [dataclasses.replace(u, forward_s=u.forward_s * factor, selective_s=u.selective_s * factor)
            if i in units else u for i, u in enumerate(graph.units)]
    return dataclasses.replace(graph, units=slow)


def test_merge_takes_each_largest_time_and_byte():
    graph = random_graph(6, seed=3)
    other = _slower(graph, {1, 4})
    other = dataclasses.replace(other, other_backward_s=graph.other_backward_s * 2,
                                units=[dataclasses.replace(other.units[0],
                                                           tensor_bytes=[b + 8 for b in other.units[0].tensor_bytes]),
                                       *other.units[1:]])
    merged = merge_graphs([graph, other])
    assert [u.forward_s for u in merged.units] == [max(a.forward_s, b.forward_s)
                                                  for a, b in zip(graph.units, other.units)]
    assert merged.units[1].forward_s == other.units[1].forward_s > graph.units[1].forward_s
    assert merged.units[0].tensor_bytes == other.units[0].tensor_bytes
    assert merged.other_backward_s == other.other_backward_s
    assert merged.meta["ranks"] == 2 and merged.hardware == graph.hardware
    renamed = dataclasses.replace(other, units=[dataclasses.replace(u, name=f"x{i}")
                                                for i, u in enumerate(other.units)])
    with pytest.raises(memopt.MemoptError, match="rank 0 profiled units .* and rank 1"):
        merge_graphs([graph, renamed])


def test_plan_for_other_world_size_or_sharding_is_refused():
    """At world size 1 (no process group) a plan made for 2 ranks, or for another sharding than the model
    shows, is refused before any hook is installed, the message naming both."""
    model = TinyMLP(depth=2)
    two = Plan([Decision("blocks.0"), Decision("blocks.1")], 1, 1, 0, 0.0, 0.0, 0, world_size=2, sharding="zero3")
    with pytest.raises(ValueError) as info:
        memopt.apply(model, two)
    message = str(info.value)
    assert "made for world size 2 with ZeRO-3 sharding and is applied at world size 1" in message
    assert "memopt.integrations.deepspeed.initialize" in message
    assert all("forward" not in m.__dict__ for m in model.modules()) and not hasattr(model, "_memopt_handle")
    one = dataclasses.replace(two, world_size=1)
    with pytest.raises(ValueError, match="made for world size 1 with ZeRO-3 sharding and is applied at world size 1 "
                                         "with ZeRO-2 sharding"):
        memopt.apply(model, one, sharding="zero2")
    fsdp = dataclasses.replace(two, world_size=1, sharding="fsdp")
    with pytest.raises(ValueError, match="with FSDP2 sharding and is applied at world size 1 with no sharding"):
        memopt.apply(model, fsdp)
    assert check_plan_fits(one, model) == "zero3"  # ZeRO-3 not applied yet: the plan says how it will run
    memopt.apply(model, dataclasses.replace(two, world_size=1, sharding="none")).remove()
    old = Plan.from_json(json.dumps({k: v for k, v in json.loads(one.to_json()).items()
                                     if k not in ("world_size", "sharding")}))
    assert (old.world_size, old.sharding) == (1, "none")  # plans written before these fields load as 1 rank


def _different_times_rank(rank: int, world: int) -> dict:
    """Each rank's profile makes other units slow to recompute; plain memopt.optimize must agree anyway."""
    import memopt.api

    torch.set_num_threads(1)
    profile = memopt.api.profile
    graphs = {}

    def skewed(*args, **kwargs):
        graph = _slower(profile(*args, **kwargs), {0, 1} if rank == 0 else {2, 3})
        graphs["local"] = graph
        return graph

    memopt.api.profile = skewed
    config = memopt.MemoptConfig(profile_repeats=1, profile_warmup=0, allow_swap=False, head="off")
    torch.manual_seed(0)
    model = TinyMLP(depth=4)
    x = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(rank))
    handle = memopt.optimize(model, x, 0.5, config)
    alone = memopt.plan(graphs["local"], 0.5, config)
    model(x).backward()
    out = {"plan": handle.plan.to_dict(), "alone": [d.mode.value for d in alone.decisions],
           "forward_s": [u.forward_s for u in handle.graph.units] if handle.graph else None,
           "local_forward_s": [u.forward_s for u in graphs["local"].units],
           "recomputes": handle.stats()["recomputes"]}
    # replan agrees again; a budget no plan fits raises BudgetError on every rank, not only where it was solved
    handle.replan(x, 0.4)
    out["replanned"] = handle.plan.to_dict()
    try:
        handle.replan(x, 1)
    except memopt.BudgetError as error:
        out["budget_error"] = (error.budget_bytes, error.min_feasible_bytes)
    out["kept_plan"] = handle.plan.to_dict() == out["replanned"]
    handle.remove()
    return out


def test_ranks_with_different_profiled_times_apply_one_plan():
    """Rank 0 measures units 0-1 slow to recompute, rank 1 units 2-3: alone they would recompute other units
    (and under ZeRO-3 issue other all-gathers, a hang); memopt.optimize plans once from the slowest times
    and both apply that plan."""
    first, second = launch(_different_times_rank, 2, timeout_s=120)
    assert first["alone"] != second["alone"], (first["alone"], second["alone"])
    assert first["plan"] == second["plan"]
    assert first["plan"]["world_size"] == 2 and first["plan"]["sharding"] == "none"
    assert any(d["mode"] != "keep" for d in first["plan"]["decisions"])
    assert first["recomputes"] == second["recomputes"] > 0
    slowest = [max(a, b) for a, b in zip(first["local_forward_s"], second["local_forward_s"])]
    assert first["forward_s"] is not None and first["forward_s"] == pytest.approx(slowest)
    assert first["replanned"] == second["replanned"] and first["replanned"]["budget_spec"] == 0.4
    assert first["budget_error"] == second["budget_error"] and first["budget_error"][1] > first["budget_error"][0]
    assert first["kept_plan"] and second["kept_plan"]
