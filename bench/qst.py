"""Quantized Side Tuning against QLoRA and LoRA on the same model, batch and sequence.

For each method one training step (forward, backward, AdamW step) is measured for:

- trainable parameters (a 4-bit weight counts as the elements it stands for);
- activation bytes held for backward: every tensor autograd saves during the forward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, distinct storages counted once, parameters, buffers
  and 4-bit quantization state excluded;
- peak memory of the step above its start, from ``torch.profiler`` memory events (CPU) or
  ``torch.cuda.max_memory_allocated`` (CUDA);
- step time, the median of ``--steps`` timed steps after two warm-up steps, interleaved across methods
  so that load from other processes falls on every method alike.

Every figure is also given as a ratio to QLoRA (peft LoRA r=16 on all linears of the same NF4
backbone), measured in the same run.

Run: ``python bench/qst.py`` (``--help`` for the model shape).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_rows  # noqa: E402

from memopt.qst import QSTConfig, apply_qst  # noqa: E402
from memopt.qst.backbone import count_parameters, non_activation_storages, quantize_nf4  # noqa: E402
from memopt.qst.testing import tiny_causal_lm  # noqa: E402

LORA_RANK = 16


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build(method: str, shape: dict, device: torch.device) -> torch.nn.Module:
    """A fresh model for ``method``, all from the same seed and shape."""
    model = tiny_causal_lm(shape["family"], seed=0, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                           heads=shape["heads"], intermediate_size=shape["intermediate_size"],
                           vocab_size=shape["vocab_size"], max_positions=shape["seq"]).to(device)
    if method.startswith("qst"):
        downsample = "maxpool" if method == "qst-maxpool" else "adapter"
        return apply_qst(model, QSTConfig(downsample=downsample)).train()
    if method.startswith("qlora"):
        quantize_nf4(model, double_quant=True, compute_dtype=torch.float32)
        if method == "qlora+ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _lora(model).train()


def held_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of distinct storages autograd keeps for backward after one forward."""
    excluded = non_activation_storages(model)
    held: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    total = sum(held.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``step`` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each allocation event carries the bytes live since profiling began (``total_allocated``); frees
    # of blocks allocated before the step are unknown to the profiler, so this never underestimates.
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


class Case:
    """One method's model, batch and optimizer, ready to step."""

    def __init__(self, method: str, shape: dict, device: torch.device):
        self.method = method
        self.model = build(method, shape, device)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(2, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=generator).to(device)
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.device = device
        self.times_s: list[float] = []

    def step(self) -> None:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times_s.append(time.perf_counter() - start)

    def result(self) -> dict:
        trainable, total = count_parameters(self.model)
        return {
            "method": self.method,
            "trainable_params": trainable,
            "trainable_pct": 100.0 * trainable / total,
            "held_activation_bytes": held_activation_bytes(self.model, self.batch),
            "peak_bytes": step_peak_bytes(self.step, self.device),
            "step_s": statistics.median(self.times_s),
        }


def measure(methods: list[str], shape: dict, device: torch.device, steps: int) -> list[dict]:
    """Measure every method; timed steps are interleaved across methods so that load from other
    processes on the machine falls on all of them alike."""
    cases = [Case(m, shape, device) for m in methods]
    for case in cases:
        for _ in range(2):  # warm-up: optimizer state allocated, kernels chosen
            case.step()
    for _ in range(steps):
        for case in cases:
            case.timed_step()
    return [case.result() for case in cases]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", help="model family of the tiny backbone (default llama)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1376)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per method (median reported)")
    parser.add_argument("--methods", default="qlora,qlora+ckpt,lora,qst,qst-maxpool",
                        help="comma-separated; qlora is the baseline and always runs")
    parser.add_argument("--no-write", action="store_true", help="print rows without writing results")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = {"family": args.family, "hidden_size": args.hidden_size, "num_layers": args.num_layers,
             "heads": args.heads, "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size,
             "batch": args.batch, "seq": args.seq}
    methods = [m for m in args.methods.split(",") if m and m != "qlora"]
    results = measure(["qlora", *methods], shape, device, args.steps)
    base = results[0]
    model_name = (f"{args.family} d={args.hidden_size} L={args.num_layers} V={args.vocab_size}")
    rows = []
    for r in results:
        rows.append({
            "model": model_name,
            "batch": args.batch,
            "seq": args.seq,
            **r,
            "held_vs_qlora": r["held_activation_bytes"] / base["held_activation_bytes"],
            "peak_vs_qlora": r["peak_bytes"] / base["peak_bytes"],
            "step_vs_qlora": r["step_s"] / base["step_s"],
        })
    for row in rows:
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    if not args.no_write:
        write_rows("qst", rows, table_columns=[
            "method", "model", "batch", "seq", "trainable_params", "trainable_pct", "held_activation_bytes",
            "held_vs_qlora", "peak_bytes", "peak_vs_qlora", "step_s", "step_vs_qlora", "device", "date",
        ])
    return rows


if __name__ == "__main__":
    main()
