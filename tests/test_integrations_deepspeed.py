"""DeepSpeed (CPU, gloo, one process, ZeRO-2): memopt through the "memopt" config section trains to the
same weights as plain DeepSpeed. Each run is a subprocess, so torch.distributed state never leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

SCRIPT = r'''
import json, os, sys, torch
import memopt
from memopt.testing import TinyMLP, snapshot
import deepspeed
from memopt.integrations.deepspeed import initialize
use_memopt, port = sys.argv[1] == "1", sys.argv[2]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
torch.manual_seed(0)
model = TinyMLP(depth=8)
config = {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
if use_memopt:
    config["memopt"] = {"budget": 0.4, "allow_swap": False}
batches = [torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
init = initialize if use_memopt else deepspeed.initialize
engine, *_ = init(model=model, model_parameters=model.parameters(), config=config,
                  **({"sample": batches[0]} if use_memopt else {}))
for x in batches:
    loss = engine(x)
    engine.backward(loss)
    engine.step()
handle = getattr(engine, "memopt_handle", None)
stats = handle.stats() if handle else {}
modes = sorted({d.mode for d in handle.plan.decisions}) if handle else []
params = [p.tolist() for p in snapshot(model)]
print("RESULT" + json.dumps({"params": params, "recomputes": stats.get("recomputes", 0), "modes": modes,
                             "states": handle.graph.optimizer_bytes if handle else 0}))
'''


def _run(use_memopt: bool, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if use_memopt else "0", str(port)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_deepspeed_zero2_with_memopt_is_exact():
    plain = _run(False, 29611)
    planned = _run(True, 29612)
    assert planned["recomputes"] > 0 and planned["modes"] != ["keep"]
    assert planned["params"] == plain["params"]


def test_zero_sharding_of_model_states_and_stage3_refused():
    from memopt.integrations.deepspeed import shard_model_states
    from memopt.planners import random_graph

    graph = random_graph(4, seed=0)
    for stage, (opt, grads) in {0: (1, 1), 1: (4, 1), 2: (4, 4)}.items():
        sharded = shard_model_states(graph, stage, 4)
        assert sharded.optimizer_bytes == graph.optimizer_bytes // opt and sharded.grad_bytes == graph.grad_bytes // grads
        assert sharded.param_bytes == graph.param_bytes
    with pytest.raises(ValueError, match="stage 3"):
        shard_model_states(graph, 3, 4)


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
