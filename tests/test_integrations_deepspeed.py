"""DeepSpeed (CPU, gloo, one process, ZeRO-2 and ZeRO-3): memopt through the "memopt" config section trains
to the same weights as plain DeepSpeed. Each run is a subprocess, so torch.distributed state never leaks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("deepspeed")

SCRIPT = r'''
import json, os, sys, torch
import memopt
from memopt.testing import TinyMLP, hf_causal_lm, hf_sample
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from memopt.integrations.deepspeed import initialize
use_memopt, port, stage, kind, swap = sys.argv[1] == "1", sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
if kind == "mlp":
    model = TinyMLP(depth=8)
    batches = [torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
elif kind == "llama":
    model = hf_causal_lm("llama", num_hidden_layers=4)
    batches = [hf_sample(seq=128, seed=i) for i in range(3)]
elif kind == "gpt2-selective":  # every layer selective (keep matmul/attention outputs, replay the rest), by hand
    model = hf_causal_lm("gpt2", attn_implementation="sdpa", n_layer=3)
    batches = [hf_sample(seq=128, seed=i) for i in range(3)]
else:  # "view-tokenwise": units that save a view of a weight (x @ w.t(), which ZeRO-3 does not patch), split by rows
    class ProjT(torch.nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(o, i) / i ** 0.5)

        def forward(self, x):
            return torch.matmul(x, self.weight.t())

    class Net(torch.nn.Module):
        def __init__(self, h=64):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(h), ProjT(h, 4 * h), torch.nn.GELU(),
                                                                  ProjT(4 * h, h)) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return x.square().mean()

    model = Net()
    batches = [torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
config = {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": stage}}
handle = None
if use_memopt and (kind in ("gpt2-selective", "view-tokenwise") or swap):
    # Forced plans: on a CPU the planner never swaps (host memory is the device memory), so a swap plan
    # is given as a GPU would get it.
    from memopt.graph import Decision, Plan
    from memopt.planners import realize
    graph = memopt.profile(model, batches[0])
    if kind == "gpt2-selective":
        decisions = [Decision(u.name, 0.0, 0.0, 1.0, "selective") for u in graph.units]
    elif kind == "llama":  # swap every other layer whole, recompute the rest
        decisions = [realize(u, 0.0, 1.0, 0.0) if i % 2 else realize(u, 0.0, 0.0, 1.0)
                     for i, u in enumerate(graph.units)]
    else:  # keep the first 128 of 256 rows, swap 64, recompute 64
        assert all(u.token_separable for u in graph.units)
        decisions = [realize(u, 0.5, 0.25, 0.25) for u in graph.units]
    handle = memopt.apply(model, Plan(decisions, 1, 1, 0, 0.0, 0.0, 0, host_bytes=1 << 22))
elif use_memopt:
    config["memopt"] = {"budget": 0.4, "allow_swap": swap}
init = initialize if use_memopt and handle is None else deepspeed.initialize
engine, *_ = init(model=model, model_parameters=model.parameters(), config=config,
                  **({"sample": batches[0]} if init is initialize else {}))
for x in batches:
    out = engine(**x) if isinstance(x, dict) else engine(x)
    engine.backward(out.loss if hasattr(out, "loss") else out)
    engine.step()
handle = handle or getattr(engine, "memopt_handle", None)
stats = handle.stats() if handle else {}
modes = sorted({d.mode for d in handle.plan.decisions}) if handle else []
# The optimizer's fp32 copy of every parameter, whole (ZeRO-3 keeps only a shard of each in the model).
params = [safe_get_full_fp32_param(p).tolist() for p in model.parameters()]
print("RESULT" + json.dumps({"params": params, "recomputes": stats.get("recomputes", 0), "modes": modes,
                             "swapped": stats.get("swapped_bytes_total", 0)}))
'''


def _run(use_memopt: bool, port: int, stage: int = 2, kind: str = "mlp", swap: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["1" if use_memopt else "0", str(port), str(stage), kind, "1" if swap else "0"]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_deepspeed_zero2_with_memopt_is_exact():
    plain = _run(False, 29611)
    planned = _run(True, 29612)
    assert planned["recomputes"] > 0 and planned["modes"] != ["keep"]
    assert planned["params"] == plain["params"]


@pytest.mark.parametrize(("kind", "swap", "ports"), [("mlp", False, (29613, 29614)), ("llama", True, (29615, 29616)),
                                                   ("gpt2-selective", False, (29617, 29618)),
                                                   ("view-tokenwise", True, (29619, 29620))])
def test_deepspeed_zero3_with_memopt_is_exact(kind, swap, ports):
    """ZeRO-3 gathers each module's parameters before it runs and releases them after, in backward too:
    recompute (token-wise included), selective and swap plans train to the same weights as plain ZeRO-3."""
    plain = _run(False, ports[0], stage=3, kind=kind)
    planned = _run(True, ports[1], stage=3, kind=kind, swap=swap)
    assert planned["modes"] != ["keep"]
    assert planned["swapped"] > 0 if swap else planned["recomputes"] > 0
    if kind == "view-tokenwise":
        assert planned["recomputes"] > 0  # rows recomputed too
    assert planned["params"] == plain["params"]


def test_zero_sharding_of_model_states():
    from memopt.integrations.deepspeed import shard_model_states
    from memopt.planners import random_graph

    graph = random_graph(4, seed=0)
    ceil = lambda n, k: -(-n // k)  # noqa: E731
    for stage, (opt, grads) in {0: (1, 1), 1: (4, 1), 2: (4, 4)}.items():
        sharded = shard_model_states(graph, stage, 4)
        assert sharded.optimizer_bytes == ceil(graph.optimizer_bytes, opt)
        assert sharded.grad_bytes == ceil(graph.grad_bytes, grads)
        assert sharded.param_bytes == graph.param_bytes
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
    with pytest.raises(ValueError, match="unknown keys"):
        initialize(model=model, config={"train_batch_size": 2, "memopt": {"budget": 0.5, "speed": "max"}},
                   sample=torch.randn(2, 8, 64))
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
