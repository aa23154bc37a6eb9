"""DeepSpeed on CPU with gloo: memopt through the "memopt" config section, on 2 ranks (ZeRO-2 and ZeRO-3, each
rank a fresh process started by memopt.distributed.launch, so torch.distributed state never leaks), trains to
the same weights as plain DeepSpeed; the section's checks run in this process."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

pytest.importorskip("deepspeed")

def test_zero_sharding_of_model_states():
    from memopt.integrations.deepspeed import shard_model_states
    from memopt.planners import random_graph

    graph = dataclasses.replace(random_graph(4, seed=0), optimizer_step_bytes=4001, optimizer_step_s=0.2)
    ceil = lambda n, k: -(-n // k)  # noqa: E731
    for stage, (opt, grads) in {0: (1, 1), 1: (4, 1), 2: (4, 4)}.items():
        sharded = shard_model_states(graph, stage, 4)
        assert sharded.optimizer_bytes == ceil(graph.optimizer_bytes, opt)
        assert sharded.grad_bytes == ceil(graph.grad_bytes, grads)
        assert sharded.param_bytes == graph.param_bytes
        # the optimizer steps over its partition: its temporaries and time shrink with it
        assert sharded.optimizer_step_bytes == ceil(4001, opt) and sharded.optimizer_step_s == pytest.approx(0.2 / opt)
    # Stage 3: a quarter of the parameters, plus what ZeRO-3 keeps gathered: all the rest for a model within
    # DeepSpeed's reuse distance (1e9 parameters by default), else the two largest groups (units, the rest).
    units = [dataclasses.replace(u, param_grad_bytes=1000 * (i + 1)) for i, u in enumerate(graph.units)]
    graph = dataclasses.replace(graph, units=units, param_bytes=12_000)  # groups 1000..4000 and 2000 outside
    small = shard_model_states(graph, 3, 4, n_params=6_000)
    assert small.param_bytes == 3000 and small.gathered_param_bytes == 9000
    assert small.resident_bytes == small.model_state_bytes + 9000
    large = shard_model_states(graph, 3, 4, n_params=6_000, max_reuse_distance=5_000)
    assert large.gathered_param_bytes == 4000 + 3000 and large.grad_bytes == ceil(graph.grad_bytes, 4)
    assert shard_model_states(graph, 3, 1).gathered_param_bytes == 0
    assert shard_model_states(graph, 2, 4).gathered_param_bytes == 0
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        shard_model_states(graph, 4, 4)


def test_bad_memopt_section_is_rejected():
    import torch

    from memopt.integrations.deepspeed import initialize
    from memopt.testing import TinyMLP

    model = TinyMLP(depth=2)
    with pytest.raises(ValueError, match="budget"):
        initialize(model=model, config={"train_batch_size": 2, "memopt": {"allow_swap": False}}, sample=torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="needs a budget \\(or a plan made before\\)"):
        initialize(model=model, config={"train_batch_size": 2, "memopt": {"budget": 0.5, "plan": {}}},
                   sample=torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="unknown keys"):
        initialize(model=model, config={"train_batch_size": 2, "memopt": {"budget": 0.5, "speed": "max"}},
                   sample=torch.randn(2, 8, 64))
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("made_for, config, named", [
    ((1, "zero3"), {"zero_optimization": {"stage": 2}}, "world size 1 with ZeRO-3 sharding and is applied at world "
                                                        "size 1 with ZeRO-2 sharding"),
    ((2, "zero2"), {"zero_optimization": {"stage": 2}}, "world size 2 with ZeRO-2 sharding and is applied at world "
                                                        "size 1 with ZeRO-2 sharding"),
    ((1, "none"), {"zero_optimization": {"stage": 1}}, "world size 1 with no sharding and is applied at world size 1 "
                                                       "with ZeRO-1 sharding"),
])
def test_plan_made_for_another_stage_or_world_size_is_refused(monkeypatch, tmp_path, made_for, config, named):
    """A plan given in the "memopt" section (as a dict or a JSON file) must be made for this world size and ZeRO
    stage: its budget and model states are one rank's share there."""
    import memopt.integrations.deepspeed as ds
    from memopt.graph import Decision, Plan
    from memopt.testing import TinyMLP

    monkeypatch.setattr(ds.deepspeed, "initialize", lambda **_: pytest.fail("deepspeed.initialize was reached"))
    world, sharding = made_for
    plan = Plan([Decision(f"blocks.{i}", 0.0, 0.0, 1.0, "recompute") for i in range(2)], 1, 1, 0, 0.0, 0.0, 0,
                world_size=world, sharding=sharding)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    for given in (plan.to_dict(), str(path)):
        model = TinyMLP(depth=2)
        with pytest.raises(ValueError, match=named):
            ds.initialize(model=model, config={"train_batch_size": 2, **config, "memopt": {"plan": given}})
        assert all("forward" not in m.__dict__ for m in model.modules())


CHECKPOINTING_DEFAULTS = {"partition_activations": False, "contiguous_memory_optimization": False,
                          "cpu_checkpointing": False, "number_checkpoints": None,
                          "synchronize_checkpoint_boundary": False, "profile": False}


@pytest.mark.parametrize("section, quoted", [
    ({"partition_activations": True}, "{'partition_activations': True}"),
    ({**CHECKPOINTING_DEFAULTS, "cpu_checkpointing": True}, "{'cpu_checkpointing': True}"),
    ({"number_checkpoints": 4, "profile": False}, "{'number_checkpoints': 4}"),
])
def test_deepspeed_activation_checkpointing_beside_memopt_is_refused(monkeypatch, section, quoted):
    import torch

    import memopt.integrations.deepspeed as ds
    from memopt.testing import TinyMLP

    monkeypatch.setattr(ds.deepspeed, "initialize", lambda **_: pytest.fail("deepspeed.initialize was reached"))
    model = TinyMLP(depth=2)
    config = {"train_batch_size": 2, "activation_checkpointing": section, "memopt": {"budget": 0.5}}
    with pytest.raises(ValueError) as info:
        ds.initialize(model=model, config=config, sample=torch.randn(2, 8, 64))
    message = str(info.value)
    assert f'"activation_checkpointing" section ({quoted}) and a "memopt" section' in message
    assert 'Remove DeepSpeed\'s "activation_checkpointing" section' in message
    assert 'or remove the "memopt" section' in message
    assert all("forward" not in m.__dict__ for m in model.modules())  # refused before memopt touched the model


@pytest.mark.parametrize("section", [{}, CHECKPOINTING_DEFAULTS, {"partition_activations": False}])
def test_deepspeed_activation_checkpointing_at_its_defaults_is_accepted(monkeypatch, section):
    """A section that only restates DeepSpeed's defaults (as config templates carry it) changes nothing."""
    import torch

    import memopt.integrations.deepspeed as ds
    from memopt.testing import TinyMLP

    passed = {}

    def fake_initialize(**kwargs):
        passed.update(kwargs)
        return types.SimpleNamespace(), None, None, None

    monkeypatch.setattr(ds.deepspeed, "initialize", fake_initialize)
    config = {"train_batch_size": 2, "activation_checkpointing": section, "memopt": {"budget": 0.5}}
    engine, *_ = ds.initialize(model=TinyMLP(depth=4), config=config, sample=torch.randn(2, 64, 64))
    try:
        assert engine.memopt_handle is not None and engine.memopt_handle.plan.decisions
        assert passed["config"] == {"train_batch_size": 2, "activation_checkpointing": section}
    finally:
        engine.memopt_handle.remove()


def test_configured_deepspeed_checkpointing_beside_memopt_is_refused(monkeypatch):
    """A model whose code called deepspeed.checkpointing.configure() uses DeepSpeed's checkpointing, with or
    without a section in the config."""
    import torch
    from deepspeed.runtime.activation_checkpointing import checkpointing

    import memopt.integrations.deepspeed as ds
    from memopt.testing import TinyMLP

    monkeypatch.setattr(checkpointing, "deepspeed_checkpointing_enabled", True)  # what configure() sets
    with pytest.raises(ValueError, match=r"deepspeed.checkpointing.configure\(\) was called.*\"memopt\" section"):
        ds.initialize(model=TinyMLP(depth=2), config={"train_batch_size": 2, "memopt": {"budget": 0.5}},
                      sample=torch.randn(2, 8, 64))


# -- 2 ranks ---------------------------------------------------------------------------------------------------

def _ds_llama():
    from memopt.testing import hf_causal_lm

    return hf_causal_lm("llama", num_hidden_layers=4, attn_implementation="sdpa")  # use_cache=True, as the config builds it


def _ds_config(stage: int, world: int, section: dict | None = None) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}}
    return {**config, "memopt": section} if section is not None else config


def _ds_train(stage: int, world: int, batches: list, section: dict | None = None, model=None,
              replan_after: int | None = None) -> tuple:
    """Three DeepSpeed steps; returns every parameter whole (from the optimizer's fp32 copy), the handle's stats
    and its plans (before and after a replan)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from memopt.integrations.deepspeed import initialize

    model = model if model is not None else _ds_llama()
    init = initialize if section is not None else deepspeed.initialize
    engine, *_ = init(model=model, model_parameters=model.parameters(), config=_ds_config(stage, world, section),
                      **({"sample": batches[0]} if section is not None else {}))
    handle = getattr(engine, "memopt_handle", None)
    plans = [handle.plan.to_dict()] if handle is not None else []
    for step, batch in enumerate(batches):
        engine.backward(engine(**batch).loss)
        engine.step()
        if step == replan_after:
            plans.append(handle.replan(batch, 0.4).to_dict())
    params = [safe_get_full_fp32_param(p) for p in model.parameters()]
    stats = {}
    if handle is not None:
        stats = {k: handle.stats().get(k, 0) for k in ("recomputes", "swapped_bytes_total")}
        handle.remove()
    engine.destroy()
    return params, stats, plans


def _hand_plans(batch: dict, stage: int) -> dict:
    """One plan per mode for 2 ranks under ZeRO ``stage``, from profiles of the bare model; token-wise on the
    MLPs (token-separable)."""
    import memopt
    from memopt.graph import Decision, Plan
    from memopt.planners import realize

    config = memopt.MemoptConfig(profile_repeats=1, profile_warmup=0, head="off")
    layers = memopt.profile(_ds_llama(), batch, config).units
    mlps = memopt.profile(_ds_llama(), batch, dataclasses.replace(config, units=["model.layers.*.mlp"])).units

    def plan(decisions):
        return Plan(decisions, 1, 1, 0, 0.0, 0.0, 0, host_bytes=1 << 22, world_size=2,
                    sharding=f"zero{stage}").to_dict()

    return {"recompute": plan([realize(u, 0.0, 0.0, 1.0) for u in layers]),
            "selective": plan([Decision(u.name, 0.0, 0.0, 1.0, "selective") for u in layers]),
            "token-wise": plan([realize(u, 0.5, 0.25, 0.25) for u in mlps]),  # keep 128 rows, swap 64, recompute 64
            "swap": plan([realize(u, 0.0, 1.0, 0.0) for u in layers])}


def _ds_two_ranks(rank: int, world: int, stage: int) -> dict:
    import deepspeed

    from memopt.testing import hf_sample

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    batches = [hf_sample(seq=128, seed=step + 10 * rank) for step in range(3)]
    reference, _, _ = _ds_train(stage, world, batches)
    out = {}
    for name, plan in _hand_plans(batches[0], stage).items():
        params, stats, _ = _ds_train(stage, world, batches, {"plan": plan})
        out[name] = {"equal": all(torch.equal(a, b) for a, b in zip(reference, params)), **stats}
    # Planned under a budget by both ranks at once, then planned again after DeepSpeed wrapped the model: the
    # replan's profiled steps leave the optimizer's gradients untouched, so training stays exact.
    # exact: the trained LM head unchunked whatever the profiled times (a chunked one regroups its gradient).
    params, stats, plans = _ds_train(stage, world, batches, {"budget": 0.5, "allow_swap": False, "profile_repeats": 1,
                                                             "profile_warmup": 0, "exact": True}, replan_after=0)
    out["planned"] = {"equal": all(torch.equal(a, b) for a, b in zip(reference, params)), "plans": plans, **stats}
    return out


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_deepspeed_two_ranks_every_mode_is_bitwise_exact(stage):
    """ZeRO-2 and ZeRO-3 on 2 ranks, 3 steps of a small Llama: recompute, selective, token-wise and swap plans (given
    through the "memopt" section's "plan") train to the parameters plain DeepSpeed reaches, on both ranks; a plan
    made under a budget is one plan on both ranks, and so is the plan of handle.replan() after DeepSpeed wrapped
    the model, whose profile leaves training exact."""
    from memopt.distributed import launch

    results = launch(_ds_two_ranks, 2, (stage,), timeout_s=300)
    for rank, out in enumerate(results):
        for name in ("recompute", "selective", "token-wise", "swap", "planned"):
            assert out[name]["equal"], (stage, rank, name)
        assert out["recompute"]["recomputes"] == out["selective"]["recomputes"] == 12
        assert out["token-wise"]["recomputes"] == 12 and out["token-wise"]["swapped_bytes_total"] > 0
        assert out["swap"]["swapped_bytes_total"] > 0 and out["swap"]["recomputes"] == 0
        assert out["planned"]["recomputes"] > 0
    first, second = results
    assert first["planned"]["plans"] == second["planned"]["plans"]
    before, after = first["planned"]["plans"]
    assert (before["world_size"], before["sharding"]) == (2, f"zero{stage}") and after["budget_spec"] == 0.4


class _DirectBlock(torch.nn.Module):
    """A unit whose forward uses its own parameters, held by no submodule (``x @ w.t()`` saves views of them, which
    ZeRO-3 does not patch)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.w_in = torch.nn.Parameter(torch.randn(4 * hidden, hidden) / hidden ** 0.5)
        self.w_out = torch.nn.Parameter(torch.randn(hidden, 4 * hidden) / (4 * hidden) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = torch.nn.functional.gelu(torch.matmul(self.norm(x), self.w_in.t()))
        return x + torch.matmul(inner, self.w_out.t())


class _DirectNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(_DirectBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def _ds_zero3_cases(rank: int, world: int) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    import memopt
    from memopt.graph import Decision, Plan
    from memopt.integrations.deepspeed import initialize
    from memopt.planners import realize
    from memopt.testing import hf_causal_lm, hf_sample

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out = {}

    def run(make, batches, section=None) -> tuple[list, dict]:
        model = make()
        init = initialize if section is not None else deepspeed.initialize
        engine, *_ = init(model=model, model_parameters=model.parameters(), config=_ds_config(3, world, section),
                          **({"sample": batches[0]} if section is not None else {}))
        for step, batch in enumerate(batches):
            torch.manual_seed(1000 + step)  # the same dropout masks in both runs, whatever initialize drew
            result = engine(**batch) if isinstance(batch, dict) else engine(batch)
            engine.backward(getattr(result, "loss", result))
            engine.step()
        params = [safe_get_full_fp32_param(p) for p in model.parameters()]
        handle = engine.memopt_handle if section is not None else None
        stats = handle.stats() if handle is not None else {}
        figures = {"recomputes": stats.get("recomputes", 0), "swapped": stats.get("swapped_bytes_total", 0)}
        if handle is not None and handle.graph is not None:
            figures.update(param_bytes=handle.graph.param_bytes, units=[u.tensor_bytes for u in handle.graph.units])
        if handle is not None:
            handle.remove()
        engine.destroy()
        return params, figures

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b))

    # Units whose own direct parameters are partitioned: a replay inside backward reads them gathered.
    xs = [torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(step + 10 * rank)) for step in range(3)]
    reference, _ = run(_DirectNet, xs)
    graph = memopt.profile(_DirectNet(), xs[0], memopt.MemoptConfig(profile_repeats=1, profile_warmup=0))
    assert all(u.token_separable for u in graph.units)
    for name, decide in {"direct-recompute": lambda u: realize(u, 0.0, 0.0, 1.0),
                         "direct-token-wise": lambda u: realize(u, 0.5, 0.25, 0.25)}.items():
        plan = Plan([decide(u) for u in graph.units], 1, 1, 0, 0.0, 0.0, 0, host_bytes=1 << 22, world_size=2,
                    sharding="zero3")
        params, figures = run(_DirectNet, xs, {"plan": plan.to_dict()})
        out[name] = {"equal": same(reference, params), **figures}
    # GPT-2 (Conv1D layers, dropout on as its config has it), every layer selective: the replay redraws the
    # same masks.
    batches = [hf_sample(seq=128, seed=step + 10 * rank) for step in range(3)]
    gpt2 = lambda: hf_causal_lm("gpt2", attn_implementation="sdpa", n_layer=3)  # noqa: E731
    reference, _ = run(gpt2, batches)
    names = [f"transformer.h.{i}" for i in range(3)]
    plan = Plan([Decision(n, 0.0, 0.0, 1.0, "selective") for n in names], 1, 1, 0, 0.0, 0.0, 0, world_size=2,
                sharding="zero3")
    params, figures = run(gpt2, batches, {"plan": plan.to_dict()})
    out["gpt2-selective"] = {"equal": same(reference, params), **figures}
    # A model built under deepspeed.zero.Init: profiled with its parameters gathered, it plans from the shapes
    # the bare model has, and trains exactly.

    def zero_init_llama():
        with deepspeed.zero.Init(config_dict_or_path=_ds_config(3, world)):
            return _ds_llama()

    reference, _ = run(zero_init_llama, batches)
    params, figures = run(zero_init_llama, batches, {"budget": 0.5, "allow_swap": False, "profile_repeats": 1,
                                                     "profile_warmup": 0, "exact": True})
    bare = memopt.profile(_ds_llama(), batches[0], memopt.MemoptConfig(profile_repeats=1, profile_warmup=0))
    out["zero-init"] = {"equal": same(reference, params), **figures,
                        "bare_units": [u.tensor_bytes for u in bare.units], "bare_param_bytes": bare.param_bytes}
    return out


def test_deepspeed_zero3_two_ranks_direct_parameters_zero_init_and_gpt2():
    """ZeRO-3 on 2 ranks: units that use their own partitioned parameters directly (recompute, and token-wise
    with swap), GPT-2 selective, and a model built under deepspeed.zero.Init (profiled gathered: the same saved
    tensors as the bare model, parameters as one rank's share) train to plain DeepSpeed's parameters."""
    from memopt.distributed import launch

    for rank, out in enumerate(launch(_ds_zero3_cases, 2, timeout_s=300)):
        for name in ("direct-recompute", "direct-token-wise", "gpt2-selective", "zero-init"):
            assert out[name]["equal"], (rank, name)
        assert out["direct-recompute"]["recomputes"] == 9 and out["gpt2-selective"]["recomputes"] == 9
        assert out["direct-token-wise"]["recomputes"] == 9 and out["direct-token-wise"]["swapped"] > 0
        init = out["zero-init"]
        assert init["recomputes"] > 0 and init["units"] == init["bare_units"]
        assert init["param_bytes"] == init["bare_param_bytes"] // 2
