"""train_gpu: the reference run (a 953M-parameter Llama, bf16, AdamW, batch 1) under memopt and the usual
alternatives, on whatever accelerator is there.

    python bench/train_gpu.py                    # GPU: seq 16384, methods none, hf-ckpt, memopt at hf-ckpt's peak
    python bench/train_gpu.py --tiny            # any machine: a 2-layer model at seq 256 (checks the script)

Methods: ``none``; ``hf-ckpt`` (Hugging Face gradient checkpointing, non-reentrant); ``memopt-match`` (memopt
with a byte budget equal to hf-ckpt's measured peak, so the comparison is speed at equal memory);
``memopt-50`` (half the activation peak). Figures per method: median step seconds and its ratio to none,
peak allocated and reserved GiB, reserved/allocated. DESIGN's target: memopt's peak at or below
hf-ckpt's, its step within 1.08x of none, reserved/allocated <= 1.02. The rows go to
bench/results/train_gpu.csv and the table in bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_rows  # noqa: E402

import memopt  # noqa: E402


def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512, max_position_embeddings=4096)
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=65536)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(method: str, args, device, dtype, budget=None) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(args, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device)
    sample = {"input_ids": ids, "labels": ids}
    handle = None
    plan_s = 0.0
    if method == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method.startswith("memopt"):
        start = time.perf_counter()
        handle = memopt.optimize(model, sample, budget)
        plan_s = time.perf_counter() - start
    times = []
    for step in range(args.steps + 1):
        sync(device)
        start = time.perf_counter()
        loss = model(**sample).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step:
            times.append(time.perf_counter() - start)
    row = {"method": method, "seq": args.seq, "step_s": round(statistics.median(times), 4), "loss": round(loss.item(), 4),
           "plan_s": round(plan_s, 2), "decisions": "", "predicted_overhead": ""}
    if device.type == "cuda":
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        row.update(peak_alloc_gib=round(alloc / 2**30, 2), peak_reserved_gib=round(reserved / 2**30, 2),
                   reserved_vs_alloc=round(reserved / alloc, 3))
    if handle is not None:
        row["decisions"] = " ".join(f"{n}x{m}" for m, n in sorted(
            {m: sum(d.mode == m for d in handle.plan.decisions) for m in {d.mode for d in handle.plan.decisions}}.items()))
        row["predicted_overhead"] = round(handle.plan.overhead, 3)
        handle.remove()
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model at seq 256, on any device")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    args = parser.parse_args()
    args.seq = args.seq or (256 if args.tiny else 16384)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [run("none", args, device, dtype), run("hf-ckpt", args, device, dtype)]
    match = int(rows[1]["peak_alloc_gib"] * 2**30) if device.type == "cuda" else 0.5
    rows.append(run("memopt-match", args, device, dtype, budget=match))
    rows.append(run("memopt-50", args, device, dtype, budget=0.5))
    base = rows[0]["step_s"]
    for row in rows:
        row["step_vs_none"] = round(row["step_s"] / base, 3)
    write_rows("train_gpu", rows)


if __name__ == "__main__":
    main()
