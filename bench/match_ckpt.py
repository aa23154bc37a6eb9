"""match_ckpt: memopt at Hugging Face gradient checkpointing's own activation bytes, against checkpointing, on CPU.

    python bench/match_ckpt.py [--rounds 5] [--cases llama-8192,t5]

The language models whose LM head set a floor no plan could go under before the head was planned: a Llama of 8
layers (hidden 256, vocab 8192, 2 x 1024 tokens) and a small T5 (vocab 4096, 2 x 512 tokens). For each, the
activation bytes checkpointing really holds are metered (``memopt.testing.metered_step``: an independent
meter, AdamW's step included), memopt plans at exactly those bytes (model states added), and the two train
with AdamW next to a model that saves nothing, one step each per round, the order rotating every round so
machine noise hits all alike. Figures: median step seconds as a ratio to nothing saved, memopt's step over
checkpointing's per round (min, median, max), the metered activation bytes of each, the plan's head chunks
and the load average seen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_rows  # noqa: E402

import memopt  # noqa: E402
from memopt.testing import hf_causal_lm, hf_sample, hf_t5, hf_t5_sample, metered_step  # noqa: E402


def _llama():
    return hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=8192, num_hidden_layers=8, hidden_size=256,
                        intermediate_size=512)


CASES = {"llama-8192": (_llama, lambda: hf_sample(vocab_size=8192, seq=1024)), "t5": (hf_t5, hf_t5_sample)}


def measure(name: str, rounds: int) -> list[dict]:
    make, sample = CASES[name]
    batch = sample()
    models = {"none": make(), "hf-ckpt": make()}
    models["hf-ckpt"].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    held = {"hf-ckpt": metered_step(models["hf-ckpt"], batch), "none": metered_step(models["none"], batch)}
    models["memopt"] = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = memopt.profile(models["memopt"], batch)
        plan = memopt.plan(graph, graph.states_without_grads_bytes + held["hf-ckpt"])
        handle = memopt.apply(models["memopt"], plan, graph=graph)
    held["memopt"] = metered_step(models["memopt"], batch)
    optimizers = {m: torch.optim.AdamW(model.parameters(), lr=1e-4) for m, model in models.items()}
    order = list(models)
    times: dict[str, list[float]] = {m: [] for m in models}
    loads = []
    for round_ in range(rounds + 1):  # round 0 warms every method up and is not counted
        for method in order[round_ % len(order):] + order[:round_ % len(order)]:
            start = time.perf_counter()
            models[method](**batch).loss.backward()
            optimizers[method].step()
            optimizers[method].zero_grad(set_to_none=True)
            if round_:
                times[method].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    handle.remove()
    base = statistics.median(times["none"])
    versus = sorted(m / c for m, c in zip(times["memopt"], times["hf-ckpt"]))
    rows = []
    for method in models:
        rows.append({
            "case": name, "method": method, "step_s": round(statistics.median(times[method]), 4),
            "step_vs_none": round(statistics.median(times[method]) / base, 3),
            "memopt_vs_ckpt_min_median_max": (f"{versus[0]:.3f}/{statistics.median(versus):.3f}/{versus[-1]:.3f}"
                                              if method == "memopt" else ""),
            "activation_bytes": held[method], "activation_vs_ckpt": round(held[method] / held["hf-ckpt"], 3),
            "head_chunks": plan.head_chunks if method == "memopt" else "",
            "decisions": " ".join(sorted({d.label for d in plan.decisions})) if method == "memopt" else "",
            "rounds": rounds, "load": f"{min(loads):.1f}-{max(loads):.1f}",
        })
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-write", action="store_true", help="print the rows without filing them")
    args = parser.parse_args(argv)
    rows = [row for name in args.cases.split(",") if name for row in measure(name, args.rounds)]
    if not args.no_write:
        write_rows("match_ckpt", rows)
    return rows


if __name__ == "__main__":
    main()
