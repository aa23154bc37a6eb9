"""train_cpu: a small Llama trained on this machine's CPU under each memory-saving method.

    python bench/train_cpu.py [--layers 8] [--hidden 256] [--seq 512] [--batch 2] [--steps 5]

Methods: nothing saved; Hugging Face gradient checkpointing (every layer recomputed); memopt at 75, 50
and 25 % of the activation peak, planned freely (swap + recompute) and with recompute only. Figures:
median step time as a ratio to nothing saved, and activation bytes held (peak bytes the step allocates,
measured by memopt.meter.MemoryMeter in a separate, untimed step) as a ratio to nothing saved. On a CPU
"host memory" is the same RAM, so swapped bytes leave the meter's device count but not the machine:
the recompute-only rows are the ones that save real memory here.
"""

from __future__ import annotations

import argparse
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


def build(args):
    torch.manual_seed(0)
    return hf_causal_lm("llama", attn_implementation="sdpa", hidden_size=args.hidden,
                        intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                        vocab_size=2048, max_position_embeddings=args.seq)


def measure(model, batches) -> tuple[float, int, float]:
    """Median step seconds, activation peak bytes and the last loss."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with MemoryMeter() as meter:
        model(**batches[0]).loss.backward()
    times = []
    for batch in batches:
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), meter.peak_bytes, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    batches = [hf_sample(vocab_size=2048, batch=args.batch, seq=args.seq, seed=i) for i in range(args.steps)]
    rows = []

    def row(method, step_s, peak, loss, plan=None):
        base_s, base_peak = rows[0]["step_s"] if rows else step_s, rows[0]["activation_bytes"] if rows else peak
        rows.append({
            "method": method, "layers": args.layers, "hidden": args.hidden, "seq": args.seq, "batch": args.batch,
            "step_s": round(step_s, 4), "step_vs_none": round(step_s / base_s, 3),
            "activation_bytes": peak, "activation_vs_none": round(peak / base_peak, 3),
            "predicted_vs_measured": round((plan.predicted_peak_bytes - plan_state[0]) / peak, 3) if plan else "",
            "decisions": " ".join(f"{n}x{m}" for m, n in _count(d.label for d in plan.decisions)) if plan else "",
            "loss": round(loss, 4),
        })
        print(rows[-1])

    plan_state = [0]
    row("none", *measure(build(args), batches))
    model = build(args)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    row("hf-gradient-checkpointing", *measure(model, batches))
    for allow_swap in (True, False):
        for budget in (0.75, 0.5, 0.25):
            model = build(args)
            config = memopt.MemoptConfig(allow_swap=allow_swap)
            try:
                handle = memopt.optimize(model, batches[0], budget, config)
            except memopt.BudgetError as error:
                print(f"memopt {budget}: {error}")
                continue
            plan_state[0] = handle.graph.resident_bytes
            name = f"memopt-{int(budget * 100)}%" + ("" if allow_swap else "-recompute-only")
            row(name, *measure(model, batches), plan=handle.plan)
            handle.remove()
    write_rows("train_cpu", rows, table_columns=["method", "step_vs_none", "activation_vs_none",
                                                  "predicted_vs_measured", "decisions", "seq", "device", "date"])


def _count(items):
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return sorted(counts.items())


if __name__ == "__main__":
    main()
