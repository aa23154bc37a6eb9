"""head: the LM head and its loss, chunked over token rows against the unchunked head, in one process.

    python bench/head.py [--tokens 4096] [--hidden 1024] [--vocabs 32000,128256,256000] [--rounds 3]
                         [--chunks 16] [--weights frozen,trained] [--scenario head]

For each vocabulary size and head weight (frozen, as under LoRA, QLoRA and QST; or trained):
``F.cross_entropy(F.linear(h, W).float(), target)`` forward and backward (the hidden states, and a trained weight,
get gradients), and the same through ``chunked_linear_cross_entropy`` at the given number of chunks (rows cut
at multiples of 64). Rounds interleave the two methods, in alternating order, so machine noise hits both
alike. Figures: the head+loss transient (peak bytes the step allocates beyond its inputs, memopt.meter.
MemoryMeter, in an untimed run, less a trained weight's gradient: a model state both hold, counted with the
model states by memopt, ``weight_grad_mib``) and the median seconds over the rounds, each as a ratio to the
unchunked head; the range of the per-round time ratios; the load average seen.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_rows  # noqa: E402

from memopt.meter import MemoryMeter  # noqa: E402
from memopt.runtime.chunked_loss import ChunkSpec, chunked_linear_cross_entropy  # noqa: E402


def _unchunked(h, w, target):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits, target)


def _step(method: str, h, w, target, chunk_rows: int) -> None:
    hidden = h.detach().requires_grad_(True)
    if method == "unchunked":
        loss = _unchunked(hidden, w, target)
    else:
        loss = chunked_linear_cross_entropy(hidden, w, None, target, ChunkSpec(chunk_rows, (lambda x: x.float(),)))
    torch.autograd.grad(loss, [hidden, w] if w.requires_grad else [hidden])


def _peak(method, h, w, target, chunk_rows) -> int:
    with MemoryMeter() as meter:
        _step(method, h, w, target, chunk_rows)
    return meter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocabs", default="32000,128256,256000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--weights", default="frozen,trained")
    parser.add_argument("--scenario", default="head")
    args = parser.parse_args()
    rows = []
    chunk_rows = math.ceil(args.tokens / args.chunks / 64) * 64
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for weight in args.weights.split(","):
            generator = torch.Generator().manual_seed(0)
            h = torch.randn(args.tokens, args.hidden, generator=generator)
            w = (torch.randn(vocab, args.hidden, generator=generator) / args.hidden ** 0.5)
            w.requires_grad_(weight == "trained")
            target = torch.randint(0, vocab, (args.tokens,), generator=generator)
            weight_grad = w.numel() * w.element_size() if w.requires_grad else 0
            peaks = {m: _peak(m, h, w, target, chunk_rows) - weight_grad for m in ("unchunked", "chunked")}
            times: dict[str, list[float]] = {"unchunked": [], "chunked": []}
            loads = []
            for round_ in range(args.rounds):
                for method in ("unchunked", "chunked")[:: 1 if round_ % 2 == 0 else -1]:
                    start = time.perf_counter()
                    _step(method, h, w, target, chunk_rows)
                    times[method].append(time.perf_counter() - start)
                loads.append(os.getloadavg()[0])
            base = statistics.median(times["unchunked"])
            ratios = [c / u for c, u in zip(times["chunked"], times["unchunked"])]
            for method in ("unchunked", "chunked"):
                seconds = statistics.median(times[method])
                rows.append({
                    "vocab": vocab, "tokens": args.tokens, "hidden": args.hidden, "weight": weight, "method": method,
                    "chunks": args.chunks if method == "chunked" else 1,
                    "transient_mib": round(peaks[method] / 2**20, 1), "weight_grad_mib": round(weight_grad / 2**20, 1),
                    "transient_x": round(peaks[method] / peaks["unchunked"], 3),
                    "step_s": round(seconds, 3), "step_x": round(seconds / base, 3),
                    "step_x_range": (f"{min(ratios):.3f}-{max(ratios):.3f}" if method == "chunked" else "1.000"),
                    "rounds": args.rounds, "load": f"{min(loads):.1f}-{max(loads):.1f}",
                })
                print(rows[-1], flush=True)
    path = write_rows(args.scenario, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
