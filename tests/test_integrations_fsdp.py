"""FSDP2 (``fully_shard`` per decoder layer and on the root, as torchtitan applies it) on 2 CPU ranks with gloo:
memopt's recompute, selective, token-wise and swap plans train a small Llama to the same parameters, bit for
bit on every rank, as the same run without memopt; one plan for all ranks; model states as one rank holds
them; ``torch.distributed.checkpoint`` unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memopt.distributed import launch

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")

# Fast profiles: the plans here are given by hand, or made from a profile whose times do not matter.
FAST = dict(profile_repeats=1, profile_warmup=0)


def _llama(mp_dtype: torch.dtype | None = None, nested: bool = False, layers: int = 4):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from memopt.testing import hf_causal_lm

    model = hf_causal_lm("llama", num_hidden_layers=layers, attn_implementation="sdpa")  # use_cache=True, as the config builds it
    policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32 if mp_dtype else None)
    for layer in model.model.layers:
        if nested:
            fully_shard(layer.mlp, mp_policy=policy)
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _batches(rank: int) -> list[dict]:
    from memopt.testing import hf_sample

    return [hf_sample(seq=128, seed=step + 10 * rank) for step in range(3)]


def _train(model, batches) -> list[torch.Tensor]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor() for p in model.parameters()]


def _plans(rank: int) -> dict:
    """One hand-made plan per mode, for 2 ranks under FSDP; token-wise on the MLPs (token-separable)."""
    import memopt
    from memopt.graph import Decision, Plan
    from memopt.integrations.fsdp import profile
    from memopt.planners import realize

    batch = _batches(rank)[0]
    layers = profile(_llama(), batch, memopt.MemoptConfig(**FAST))
    mlps = profile(_llama(), batch, memopt.MemoptConfig(**FAST, units=["model.layers.*.mlp"]))
    assert all(u.token_separable and u.tokens == 256 for u in mlps.units)

    def plan(decisions):
        return Plan(decisions, 1, 1, 0, 0.0, 0.0, 0, host_bytes=1 << 22, world_size=2, sharding="fsdp")

    return {
        "recompute": plan([realize(u, 0.0, 0.0, 1.0) for u in layers.units]),
        "selective": plan([Decision(u.name, 0.0, 0.0, 1.0, "selective") for u in layers.units]),
        # keep rows 0-127, swap 128-191, recompute 192-255 of each MLP
        "token-wise": plan([realize(u, 0.5, 0.25, 0.25) for u in mlps.units]),
        "swap": plan([realize(u, 0.0, 1.0, 0.0) for u in layers.units]),
    }


def _exactness_rank(rank: int, world: int, checkpoint_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import memopt

    torch.set_num_threads(1)
    batches = _batches(rank)
    reference = _train(_llama(), batches)
    out = {}
    for name, plan in _plans(rank).items():
        model = _llama()
        handle = memopt.apply(model, plan)
        got = _train(model, batches)
        stats = handle.stats()
        if name == "swap":
            # torch.distributed.checkpoint sees the model as without memopt: same keys, and a model without
            # memopt loads what it saved to the same parameters.
            state = get_model_state_dict(model)
            dcp.save(state, checkpoint_id=checkpoint_dir)
            fresh = _llama()
            keys_equal = sorted(get_model_state_dict(fresh)) == sorted(state)
            loaded = get_model_state_dict(fresh)
            dcp.load(loaded, checkpoint_id=checkpoint_dir)
            set_model_state_dict(fresh, loaded)
            out["checkpoint"] = keys_equal and all(torch.equal(a.full_tensor(), b)
                                                   for a, b in zip(fresh.parameters(), got))
        handle.remove()
        out[name] = {"equal": all(torch.equal(a, b) for a, b in zip(reference, got)),
                     "recomputes": stats["recomputes"], "swapped": stats.get("swapped_bytes_total", 0)}
    return out


def test_fsdp2_two_ranks_every_mode_is_bitwise_exact(tmp_path):
    """Three steps on 2 ranks with Adam: each mode's parameters equal the plain FSDP run's on every rank, and a
    checkpoint saved under memopt loads unchanged into a model without it."""
    results = launch(_exactness_rank, 2, (str(tmp_path / "checkpoint"),), timeout_s=240)
    for rank, out in enumerate(results):
        for name in ("recompute", "selective", "token-wise", "swap"):
            assert out[name]["equal"], (rank, name, out[name])
        assert out["recompute"]["recomputes"] == 3 * 4 and out["selective"]["recomputes"] == 3 * 4
        assert out["token-wise"]["recomputes"] == 3 * 4 and out["token-wise"]["swapped"] > 0
        assert out["swap"]["swapped"] > 0 and out["swap"]["recomputes"] == 0
        assert out["checkpoint"], rank


def _planned_rank(rank: int, world: int) -> dict:
    import memopt
    from memopt.graph import Decision, Plan
    from memopt.integrations.fsdp import fsdp_states, optimize

    torch.set_num_threads(1)
    batches = _batches(rank)
    out = {}
    # Planned under a budget by every rank at once: one plan, exact.
    reference = _train(_llama(), batches)
    model = _llama()
    # exact=True: the trained LM head unchunked whatever the profiled times (a chunked one regroups its gradient).
    handle = optimize(model, batches[0], 0.5, memopt.MemoptConfig(**FAST, allow_swap=False, exact=True))
    got = _train(model, batches)
    out["plan"] = handle.plan.to_dict()
    out["planned_equal"] = all(torch.equal(a, b) for a, b in zip(reference, got))
    out["graph"] = {k: getattr(handle.graph, k) for k in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                          "gathered_param_bytes", "sharding_degree")}
    out["forward_workspace_bytes"] = max(u.forward_workspace_bytes for u in handle.graph.units)
    handle.replan(batches[1], 0.4)
    out["replanned"] = handle.plan.to_dict()
    handle.remove()
    # memopt.optimize on an FSDP2 model takes the same path
    handle = memopt.optimize(model, batches[0], 0.5, memopt.MemoptConfig(**FAST, allow_swap=False, exact=True))
    out["plain_optimize"] = (handle.plan.sharding, handle.graph.param_bytes, handle.plan.to_dict() == out["plan"])
    handle.remove()
    # What one rank holds, with and without a bf16 mixed precision policy.
    out["states"] = dataclasses.asdict(fsdp_states(_llama()))
    out["states_bf16"] = dataclasses.asdict(fsdp_states(_llama(torch.bfloat16)))
    # Nested fully_shard (each MLP, then its layer): a layer's replay runs the MLP, an FSDP module of its own that
    # is not yet in backward; its pre-forward hook unshards it, and nothing reshards what the backward needs.
    reference = _train(_llama(nested=True), batches)
    model = _llama(nested=True)
    seen = []

    def check(module, args):
        if torch._C._current_graph_task_id() != -1:  # a replay inside backward
            layer = next(m for m in model.model.layers if m.self_attn.q_proj is module)
            seen.append(all(g.is_unsharded for g in layer._get_fsdp_state()._fsdp_param_groups))

    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(check) for layer in model.model.layers]
    plan = Plan([Decision(f"model.layers.{i}", 0.0, 0.0, 1.0, "recompute") for i in range(4)], 1, 1, 0, 0.0, 0.0, 0,
                world_size=2, sharding="fsdp")
    handle = memopt.apply(model, plan)
    got = _train(model, batches)
    out["nested_equal"] = all(torch.equal(a, b) for a, b in zip(reference, got))
    out["nested_replays_unsharded"] = seen
    out["nested_recomputes"] = handle.stats()["recomputes"]
    handle.remove()
    for hook in hooks:
        hook.remove()
    return out


def test_fsdp2_plan_agreed_states_per_rank_and_nested_sharding():
    """integrations.fsdp.optimize: one plan on both ranks (and again after replan), exact; model states divided
    by the mesh, the unsharded parameters counted in the policy's dtype; nested fully_shard exact."""
    first, second = launch(_planned_rank, 2, timeout_s=240)
    assert first["plan"] == second["plan"] and first["replanned"] == second["replanned"]
    assert (first["plan"]["world_size"], first["plan"]["sharding"]) == (2, "fsdp")
    assert any(d["mode"] != "keep" for d in first["plan"]["decisions"]) and first["replanned"]["budget_spec"] == 0.4
    assert first["planned_equal"] and second["planned_equal"]
    # Llama with 4 layers of 36,992 parameters, embeddings and head of 16,384 each, a norm of 64: 180,800 fp32
    # parameters, half on each rank (every dim splits evenly), all trained.
    full = 180_800 * 4
    layer, root = 36_992 * 4, (16_384 * 2 + 64) * 4
    for out in (first, second):
        states, bf16 = out["states"], out["states_bf16"]
        assert states["mesh_size"] == 2 and states["param_bytes"] == full // 2 == states["trainable_param_bytes"]
        # the root stays unsharded through the step; blocks are resharded after forward: the running one and
        # the prefetched one are held at once
        assert states["gathered_param_bytes"] == root + 2 * layer
        assert bf16["param_bytes"] == states["param_bytes"]  # FSDP keeps the sharded parameters in fp32
        assert bf16["gathered_param_bytes"] == states["gathered_param_bytes"] // 2  # and unshards them in bf16
        graph = out["graph"]
        assert graph["param_bytes"] == graph["grad_bytes"] == full // 2 and graph["sharding_degree"] == 2
        assert out["plain_optimize"][:2] == ("fsdp", full // 2)
        assert graph["gathered_param_bytes"] == states["gathered_param_bytes"]
        # the unsharded parameters FSDP allocates once are not counted again as a unit's workspace (their first
        # allocation is before the profiled step): at most one all-gather's buffers in flight beside it
        assert out["forward_workspace_bytes"] < 2 * layer + 600_000
    for out in (first, second):
        assert out["nested_equal"] and out["nested_recomputes"] == 12
        assert out["nested_replays_unsharded"] == [True] * 12
