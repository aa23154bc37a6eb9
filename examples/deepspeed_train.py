"""memopt under DeepSpeed ZeRO: a "memopt" section in the DeepSpeed config, one plan for every rank.

    python examples/deepspeed_train.py [--config examples/ds_config.json] [--ranks 2] [--stage 3]
                                       [--layers 4] [--seq 256] [--steps 3]

Starts --ranks processes (gloo on CPUs; DeepSpeed's default backend with one GPU each when there are enough
GPUs). Each builds a tiny Llama (from a config; nothing is downloaded) and calls
memopt.integrations.deepspeed.initialize with the config (ds_config.json beside this script: ZeRO-3, AdamW and
"memopt": {"budget": 0.5}); --stage overrides its ZeRO stage. Every rank profiles its own micro-batch, the
ranks agree on one plan from the slowest rank's times, and every rank applies it before DeepSpeed wraps the
model. Each rank then trains --steps steps on its own data and reports its memory: the model states it holds
under the ZeRO stage, the plan's predicted peak, and the activation bytes measured during a step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memopt.distributed import launch, rank_table


def train_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    import deepspeed

    from memopt.integrations.deepspeed import initialize
    from memopt.meter import MemoryMeter
    from memopt.testing import hf_causal_lm, hf_sample

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend=None if cuda else "gloo", verbose=False)
    config = json.loads(Path(args.config).read_text())
    if args.stage is not None:
        config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": args.stage}
    model = hf_causal_lm("llama", num_hidden_layers=args.layers, attn_implementation="sdpa")
    batches = [hf_sample(seq=args.seq, seed=step + 1000 * rank) for step in range(args.steps)]
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config, sample=batches[0])
    handle = engine.memopt_handle
    losses, activation_peak = [], 0
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        with MemoryMeter() as meter:  # the tensors a step creates: activations, their gradients, ZeRO's buffers
            loss = engine(**batch).loss
            engine.backward(loss)
        activation_peak = max(activation_peak, meter.peak_bytes)
        engine.step()
        losses.append(loss.item())
    graph, plan = handle.graph, handle.plan
    out = {"rank": rank, "plan": plan.to_json(), "report": handle.report() if rank == 0 else "",
           "params": graph.param_bytes, "grads": graph.grad_bytes, "optimizer": graph.optimizer_bytes,
           "gathered": graph.gathered_param_bytes, "predicted_peak": plan.predicted_peak_bytes,
           "activation_peak": activation_peak, "recomputes": handle.stats()["recomputes"], "losses": losses,
           "device_peak": torch.cuda.max_memory_allocated() if cuda else None}
    handle.remove()
    engine.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("ds_config.json")),
                        help="DeepSpeed config with a \"memopt\" section")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=None, help="override the ZeRO stage")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = launch(train_rank, args.ranks, (args,), timeout_s=600)
    print(results[0]["report"])
    try:
        print("\n" + rank_table(results, held="gathered"))
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
