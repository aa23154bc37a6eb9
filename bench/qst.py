"""Quantized Side Tuning against QLoRA and LoRA on the same model, batch and sequence; and an ablation of
the side network's downsamples, their norm and the learning rate on a copy task.

Default scenario (``qst``): for each method one training step (forward, backward, AdamW step) is
measured for:

- trainable parameters (a 4-bit weight counts as the elements it stands for);
- activation bytes held for backward: every tensor autograd saves during the forward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, distinct storages counted once, parameters, buffers
  and 4-bit quantization state excluded;
- peak memory of the step above its start, from ``torch.profiler`` memory events (CPU) or
  ``torch.cuda.max_memory_allocated`` (CUDA);
- step time in ``--rounds`` rounds: each round runs every method for ``--steps`` timed steps, one method
  after another in one process, so that load from other processes falls on every method alike. A
  round's figure is the median of its steps; ``step_vs_qlora`` is computed round by round against
  QLoRA's figure of the same round, and min, median and max over the rounds are reported. The 1-minute load
  average at the start and end of the timing goes into every row.

Every figure is also given as a ratio to QLoRA (peft LoRA r=16 on all linears of the same NF4
backbone), measured in the same run.

``--ablation`` (scenario ``qst_ablation``): the side network of ``examples/qst_finetune.py`` (tiny random
Llama, r=4, NF4) learns the example's copy task for ``--ablation-steps`` AdamW steps (batch 32, constant
learning rate, gradients clipped at 1.0), once for each downsample with and without its LayerNorm at the
example's learning rate, for the default downsample at other learning rates, and for maxpool with and
without its norm at 2e-2. Rows give the loss
averaged over each ``CURVE_WINDOW`` steps and the last window's loss against the default configuration's.

Run: ``python bench/qst.py`` (``--help`` for the model shape), ``python bench/qst.py --ablation``.
"""

from __future__ import annotations

import argparse
import os
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
QST_METHODS = {
    "qst": {},
    "qst-linear": {"downsample": "linear"},
    "qst-maxpool": {"downsample": "maxpool"},
    "qst-avgpool": {"downsample": "avgpool"},
    "qst-nonorm": {"downsample_norm": False},
    "qst-fp32side": {"side_dtype": "float32"},
}
CURVE_WINDOW = 60


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build(method: str, shape: dict, device: torch.device) -> torch.nn.Module:
    """A fresh model for ``method``, all from the same seed and shape."""
    dtype = getattr(torch, shape["dtype"])
    model = tiny_causal_lm(shape["family"], seed=0, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                           heads=shape["heads"], intermediate_size=shape["intermediate_size"],
                           vocab_size=shape["vocab_size"], max_positions=shape["seq"]).to(device, dtype)
    if method in QST_METHODS:
        return apply_qst(model, QSTConfig(**QST_METHODS[method])).train()
    if method.startswith("qlora"):
        quantize_nf4(model, double_quant=True, compute_dtype=dtype)
        if method == "qlora+ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method != "lora":
        raise ValueError(f"unknown method {method!r}; choose among qlora, qlora+ckpt, lora, {', '.join(QST_METHODS)}")
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
        self.round_s: list[float] = []  # median step time of each round

    def step(self) -> None:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_round(self, steps: int) -> None:
        times_s = []
        for _ in range(steps):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times_s.append(time.perf_counter() - start)
        self.round_s.append(statistics.median(times_s))

    def memory(self) -> dict:
        trainable, total = count_parameters(self.model)
        return {
            "method": self.method,
            "trainable_params": trainable,
            "trainable_pct": 100.0 * trainable / total,
            "held_activation_bytes": held_activation_bytes(self.model, self.batch),
            "peak_bytes": step_peak_bytes(self.step, self.device),
        }


def measure(methods: list[str], shape: dict, device: torch.device, rounds: int, steps: int) -> list[dict]:
    """Memory of every method, then ``rounds`` timing rounds; ``methods[0]`` is the baseline."""
    cases = [Case(m, shape, device) for m in methods]
    results = []
    for case in cases:
        for _ in range(2):  # warm-up: optimizer state allocated, kernels chosen
            case.step()
        results.append(case.memory())
    load_start = os.getloadavg()[0]
    for _ in range(rounds):
        for case in cases:
            case.timed_round(steps)
    load_end = os.getloadavg()[0]
    base = cases[0].round_s
    for result, case in zip(results, cases):
        ratios = [s / b for s, b in zip(case.round_s, base)]
        result.update({
            "step_s_min": min(case.round_s), "step_s_max": max(case.round_s),
            "step_s_rounds": "/".join(f"{t:.3g}" for t in case.round_s),
            "step_vs_qlora_min": min(ratios), "step_vs_qlora_max": max(ratios),
            "step_vs_qlora_median": statistics.median(ratios),
            "rounds": rounds, "steps_per_round": steps, "load_1m_start": load_start, "load_1m_end": load_end,
        })
    return results


# -- ablation on the example's copy task -------------------------------------------------------------


def _copy_batch(generator: torch.Generator, batch: int = 32, half: int = 8, vocab: int = 32) -> dict:
    """``a SEP a`` with the loss on the copy only, as examples/qst_finetune.py; chance is ln(30) ~ 3.4."""
    tokens = torch.randint(2, vocab, (batch, half), generator=generator)
    ids = torch.cat([tokens, torch.ones(batch, 1, dtype=torch.long), tokens], dim=1)
    labels = ids.clone()
    labels[:, : half + 1] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def copy_curve(downsample: str, norm: bool, lr: float, steps: int, seed: int = 0) -> tuple[list[float], int]:
    """Mean loss of each ``CURVE_WINDOW`` steps, and the trainable parameter count."""
    torch.manual_seed(seed)
    model = tiny_causal_lm("llama", vocab_size=32, hidden_size=128, heads=8)
    qst = apply_qst(model, QSTConfig(r=4, downsample=downsample, downsample_norm=norm)).train()
    params = [p for p in qst.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = qst(**_copy_batch(generator)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    windows = range(0, steps, CURVE_WINDOW)
    return [statistics.fmean(losses[i:i + CURVE_WINDOW]) for i in windows], sum(p.numel() for p in params)


def ablation(steps: int, default_lr: float, other_lrs: list[float]) -> list[dict]:
    runs = [(d, n, default_lr) for d in ("adapter", "linear", "maxpool", "avgpool") for n in (True, False)]
    runs += [("adapter", True, lr) for lr in other_lrs]
    # The previous example's rate: without a norm the pooled states reach the side network unscaled.
    runs += [("maxpool", norm, 2e-2) for norm in (True, False)]
    rows = []
    for downsample, norm, lr in runs:
        start = time.perf_counter()
        curve, params = copy_curve(downsample, norm, lr, steps)
        rows.append({
            "downsample": downsample, "norm": norm, "lr": lr, "steps": steps, "trainable_params": params,
            "loss_last": curve[-1], "curve": "/".join(f"{x:.2f}" for x in curve),
            "run_s": time.perf_counter() - start, "load_1m": os.getloadavg()[0],
        })
        print(rows[-1])
    base = rows[0]["loss_last"]  # adapter with its norm at the default learning rate
    for row in rows:
        row["loss_vs_default"] = row["loss_last"] / base
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", help="model family of the tiny backbone (default llama)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="backbone dtype (the side network follows it)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1376)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (min and max reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 resists load from other "
                        "processes best: a thread descheduled by them stalls the others at every op")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method and round (median kept)")
    parser.add_argument("--methods", default="qlora+ckpt,lora,qst,qst-linear,qst-maxpool,qst-avgpool",
                        help="comma-separated; qlora is the baseline and always runs")
    parser.add_argument("--ablation", action="store_true", help="run the copy-task ablation instead")
    parser.add_argument("--ablation-steps", type=int, default=300)
    parser.add_argument("--ablation-lr", type=float, default=1e-3, help="the example's default for its tiny model")
    parser.add_argument("--ablation-other-lrs", default="1e-4,2e-4,5e-4,2e-2")
    parser.add_argument("--curve", default=None, metavar="LRS",
                        help="long copy-task curves of the example's side network at these learning rates "
                             "(comma-separated; --ablation-steps steps each), scenario qst_curve")
    parser.add_argument("--no-write", action="store_true", help="print rows without writing results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.curve:
        rows = []
        for lr in (float(x) for x in args.curve.split(",") if x):
            start = time.perf_counter()
            curve, params = copy_curve("adapter", True, lr, args.ablation_steps)
            below = next((i * CURVE_WINDOW for i, x in enumerate(curve) if x < 0.5), None)
            rows.append({"lr": lr, "steps": args.ablation_steps, "trainable_params": params, "loss_last": curve[-1],
                         "first_window_below_0.5": below if below is not None else "",
                         "curve_every_window": "/".join(f"{x:.2f}" for x in curve),
                         "run_s": time.perf_counter() - start, "load_1m": os.getloadavg()[0]})
            print(rows[-1])
        if not args.no_write:
            write_rows("qst_curve", rows)
        return rows
    if args.ablation:
        other = [float(x) for x in args.ablation_other_lrs.split(",") if x]
        rows = ablation(args.ablation_steps, args.ablation_lr, other)
        if not args.no_write:
            write_rows("qst_ablation", rows, table_columns=[
                "downsample", "norm", "lr", "steps", "trainable_params", "loss_last", "loss_vs_default", "curve",
                "load_1m", "device", "date",
            ])
        return rows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = {"family": args.family, "hidden_size": args.hidden_size, "num_layers": args.num_layers,
             "heads": args.heads, "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size,
             "batch": args.batch, "seq": args.seq, "dtype": args.dtype}
    methods = [m for m in args.methods.split(",") if m and m != "qlora"]
    results = measure(["qlora", *methods], shape, device, args.rounds, args.steps)
    base = results[0]
    model_name = f"{args.family} d={args.hidden_size} L={args.num_layers} V={args.vocab_size} {args.dtype}"
    rows = []
    for r in results:
        rows.append({
            "model": model_name,
            "batch": args.batch,
            "seq": args.seq,
            **r,
            "held_vs_qlora": r["held_activation_bytes"] / base["held_activation_bytes"],
            "peak_vs_qlora": r["peak_bytes"] / base["peak_bytes"],
        })
    for row in rows:
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    if not args.no_write:
        write_rows("qst", rows, table_columns=[
            "method", "model", "trainable_params", "trainable_pct", "held_activation_bytes", "held_vs_qlora",
            "peak_vs_qlora", "step_s_min", "step_s_max", "step_vs_qlora_min", "step_vs_qlora_median", "step_vs_qlora_max",
            "load_1m_start", "load_1m_end", "device", "date",
        ])
    return rows


if __name__ == "__main__":
    main()
