"""memopt under FSDP2: a small Llama sharded with fully_shard on several ranks, one plan for all.

    python examples/fsdp_train.py [--ranks 2] [--layers 4] [--seq 256] [--steps 3] [--budget 0.5]

Starts --ranks processes (gloo on CPUs; NCCL with one GPU each when there are enough GPUs). Each shards a tiny
Llama (built from a config; nothing is downloaded) as torchtitan does, fully_shard on every decoder layer and
then on the root, and calls memopt.integrations.fsdp.optimize: every rank profiles its own micro-batch, the
ranks agree on one plan from the slowest rank's times, and every rank applies it. Then each trains --steps
steps on its own data and reports its memory: the model states it holds (a shard of the parameters, gradients
and optimizer states, and the parameters FSDP holds unsharded), the plan's predicted peak, and the activation
bytes measured during a step under the plan.
"""

from __future__ import annotations

import argparse

import torch

import memopt
from memopt.distributed import launch, rank_table


def train_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from memopt.integrations.fsdp import optimize
    from memopt.meter import MemoryMeter
    from memopt.testing import hf_causal_lm, hf_sample

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = hf_causal_lm("llama", num_hidden_layers=args.layers, attn_implementation="sdpa")
    model.to(device)
    # bf16 compute on GPUs, with the sharded parameters and the gradient reduction in fp32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    policy = policy or MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    batches = [{k: v.to(device) for k, v in hf_sample(seq=args.seq, seed=step + 1000 * rank).items()}
               for step in range(args.steps)]
    handle = optimize(model, batches[0], args.budget, memopt.MemoptConfig(allow_swap=cuda))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, activation_peak = [], 0
    for batch in batches:
        with MemoryMeter() as meter:  # the tensors a step creates: activations and their gradients
            loss = model(**batch).loss
            loss.backward()
        activation_peak = max(activation_peak, meter.peak_bytes)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    graph, plan = handle.graph, handle.plan
    out = {"rank": rank, "plan": plan.to_json(), "report": handle.report() if rank == 0 else "",
           "params": graph.param_bytes, "grads": graph.grad_bytes, "optimizer": graph.optimizer_bytes,
           "gathered": graph.gathered_param_bytes, "predicted_peak": plan.predicted_peak_bytes,
           "activation_peak": activation_peak, "recomputes": handle.stats()["recomputes"], "losses": losses,
           "device_peak": torch.cuda.max_memory_allocated(device) if cuda else None}
    handle.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget", default="0.5", help="one rank's budget: bytes like '2GiB', or a fraction of "
                                                        "the activation peak")
    args = parser.parse_args()
    results = launch(train_rank, args.ranks, (args,), timeout_s=600)
    print(results[0]["report"])
    try:
        print("\n" + rank_table(results, held="unsharded"))
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
