"""train_cpu: a small Llama trained on this machine's CPU under each memory-saving method, interleaved.

    python bench/train_cpu.py [--layers 8] [--hidden 256] [--seq 512] [--batch 2] [--rounds 7]

Methods: nothing saved; Hugging Face gradient checkpointing (every layer recomputed); memopt at 75, 50
and 25 % of the activation peak. On a CPU "host memory" is the same RAM, so memopt never plans a swap
there: its plans recompute (whole units or their cheap ops). Every method's model is built and planned
first; then each round times one training step of every method in turn (a different order each round),
so a slow spell of a shared machine hits them all alike, and each round's step time is divided by
nothing-saved's of the same round. Figures: the median and the range of those per-round ratios, and the
bytes a step allocates (activations and the gradients backward makes, measured by memopt.meter.MemoryMeter
in a separate, untimed step) as a ratio to nothing saved, with the plan's prediction over the measurement.
Steps make their gradients afresh (``zero_grad(set_to_none=True)``), as the plans assume.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_rows  # noqa: E402

import memopt  # noqa: E402
from memopt.meter import MemoryMeter  # noqa: E402
from memopt.testing import hf_causal_lm, hf_sample  # noqa: E402

BUDGETS = (0.75, 0.5, 0.25)


def build(args):
    torch.manual_seed(0)
    return hf_causal_lm("llama", attn_implementation="sdpa", hidden_size=args.hidden,
                        intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                        vocab_size=2048, max_position_embeddings=args.seq)


def step(model, batch) -> float:
    """One training step's forward and backward, gradients made afresh as a user's loop makes them
    (``zero_grad(set_to_none=True)``, what the plans assume); returns the loss."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def activation_peak(model, batch) -> int:
    """Peak bytes a step allocates (an untimed step under the meter): activations, and the gradients
    backward makes."""
    model.zero_grad(set_to_none=True)
    with MemoryMeter() as meter:
        model(**batch).loss.backward()
    return meter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, one timed step per method each")
    args = parser.parse_args()
    batches = [hf_sample(vocab_size=2048, batch=args.batch, seq=args.seq, seed=i) for i in range(args.rounds + 1)]

    methods: dict[str, tuple] = {}  # name -> (model, plan or None)
    methods["none"] = (build(args), None)
    checkpointed = build(args)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    methods["hf-gradient-checkpointing"] = (checkpointed, None)
    handles = []
    for budget in BUDGETS:
        model = build(args)
        try:
            handle = memopt.optimize(model, batches[0], budget)
        except memopt.BudgetError as error:
            print(f"memopt {budget}: {error}")
            continue
        handles.append(handle)
        methods[f"memopt-{int(budget * 100)}%"] = (model, handle)

    peaks = {name: activation_peak(model, batches[0]) for name, (model, _) in methods.items()}
    losses = {name: step(model, batches[0]) for name, (model, _) in methods.items()}  # warm-up, untimed
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    shuffle = random.Random(0)
    for round_index in range(args.rounds):
        shuffle.shuffle(order)
        batch = batches[round_index + 1]
        this_round = {}
        for name in order:
            start = time.perf_counter()
            losses[name] = step(methods[name][0], batch)
            this_round[name] = time.perf_counter() - start
        for name, s in this_round.items():
            seconds[name].append(s)
            ratios[name].append(s / this_round["none"])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    rows = []
    for name, (model, handle) in methods.items():
        plan = handle.plan if handle is not None else None
        rows.append({
            "method": name, "layers": args.layers, "hidden": args.hidden, "seq": args.seq, "batch": args.batch,
            "rounds": args.rounds, "step_s": round(statistics.median(seconds[name]), 4),
            "step_vs_none": round(statistics.median(ratios[name]), 3),
            "step_vs_none_range": f"{min(ratios[name]):.3f}-{max(ratios[name]):.3f}",
            "activation_bytes": peaks[name], "activation_vs_none": round(peaks[name] / peaks["none"], 3),
            # What the step allocates, predicted: the peak less what exists before it (parameters, optimizer
            # state; the plan counts AdamW's, which this loop never makes).
            "predicted_vs_measured": (round((plan.predicted_peak_bytes - handle.graph.states_without_grads_bytes)
                                            / peaks[name], 3) if plan else ""),
            "decisions": " ".join(f"{n}x{m}" for m, n in _count(d.label for d in plan.decisions)) if plan else "",
            "loss": round(losses[name], 4), "load_avg": round(load, 2) if load != "" else "",
        })
        print(rows[-1])
    for handle in handles:
        handle.remove()
    write_rows("train_cpu", rows, table_columns=["method", "step_vs_none", "step_vs_none_range", "activation_vs_none",
                                                  "predicted_vs_measured", "decisions", "seq", "load_avg", "device",
                                                  "date"])


def _count(items):
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return sorted(counts.items())


if __name__ == "__main__":
    main()
