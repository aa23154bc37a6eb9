"""memopt on a Hugging Face causal LM: profile, plan, save the plan, apply it, train.

    python examples/hf_causal_lm.py [--family llama] [--budget 0.4] [--seq 256] [--plan-json plan.json]

Builds a tiny model from a config (nothing is downloaded), plans it with recompute only (the choice on a
CPU, where "host memory" is the same RAM), prints the plan and the measured activation peak.
"""

from __future__ import annotations

import argparse

import torch

import memopt
from memopt.meter import MemoryMeter
from memopt.testing import HF_FAMILIES, hf_causal_lm, hf_sample
from memopt.units import format_bytes


def peak_activation_bytes(model, batch) -> int:
    """Bytes the step allocates beyond the model states (gradients exist beforehand, as after step one)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with MemoryMeter() as meter:
        model(**batch).loss.backward()
    model.zero_grad()
    return meter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", choices=sorted(HF_FAMILIES))
    parser.add_argument("--budget", type=float, default=0.4, help="fraction of the activation peak")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--plan-json", default=None, help="also write the plan here")
    args = parser.parse_args()

    layers = {"gpt2": "n_layer"}.get(args.family, "num_hidden_layers")
    model = hf_causal_lm(args.family, attn_implementation="sdpa", **{layers: args.layers})
    batch = hf_sample(seq=args.seq)
    before = peak_activation_bytes(model, batch)

    config = memopt.MemoptConfig(allow_swap=False)
    graph = memopt.profile(model, batch, config)
    plan = memopt.plan(graph, args.budget, config)
    if args.plan_json:
        with open(args.plan_json, "w") as f:
            f.write(plan.to_json())
    handle = memopt.apply(model, plan, config)
    print(plan.summary())
    after = peak_activation_bytes(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = model(**hf_sample(seq=args.seq, seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    handle.remove()
    print(f"\nactivation peak: {format_bytes(before)} without memopt, {format_bytes(after)} with "
          f"({after / before:.0%}); predicted {format_bytes(plan.predicted_peak_bytes - graph.resident_bytes)}")


if __name__ == "__main__":
    main()
