"""cuda_memory_trace: where a memopt step's device memory goes on a GPU, unit by unit, against the plan.

    python bench/cuda_memory_trace.py --out DIR     # on a GPU: DIR/memory_trace.json (+ a snapshot pickle)

The case of tests/test_runtime_cuda.py::test_cuda_peak_within_budget (a TinyGPT of 8 layers, 4 x 1024 tokens,
budget 0.5: a plan of mostly swapped units), once with every unit kept and once with memopt's plan. For each
run it writes the allocator's allocated bytes at every unit's forward start and end and backward start (read
in hooks, no synchronisation: the caching allocator's own count), the step's peak, and the plan's predicted
peak; with ``--snapshot`` also ``torch.cuda.memory._dump_snapshot`` of the memopt step (every allocation with
its stack), for reading what is live at the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import memopt
from memopt.testing import TinyGPT


def timeline(model) -> tuple[list, list]:
    """Forward pre/post and backward hooks on every layer, each logging ``memory_allocated``."""
    events, handles = [], []
    for index, layer in enumerate(model.layers):
        def log(tag, i=index):
            events.append((tag, i, torch.cuda.memory_allocated()))

        handles.append(layer.register_forward_pre_hook(lambda m, a, log=log: log("forward")))
        handles.append(layer.register_forward_hook(lambda m, a, o, log=log: log("forward_end")))
        handles.append(layer.register_full_backward_pre_hook(lambda m, g, log=log: log("backward")))
    return events, handles


def run(use_memopt: bool, snapshot: Path | None) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(vocab=1024, hidden=256, layers=8, max_tokens=1024).cuda()
    ids = torch.randint(0, 1024, (4, 1024), device="cuda")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    handle = memopt.optimize(model, ids, 0.5) if use_memopt else None
    model(ids).backward()  # a warm-up step: streams, events, the allocator's first blocks
    torch.cuda.synchronize()
    events, hooks = timeline(model)
    if snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=200000)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(ids).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    if snapshot is not None:
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    for hook in hooks:
        hook.remove()
    out = {"memopt": use_memopt, "allocated_before_step": base, "peak": peak,
           "events": [{"at": tag, "unit": i, "allocated": n} for tag, i, n in events]}
    if handle is not None:
        out.update(predicted_peak=handle.plan.predicted_peak_bytes, budget=handle.plan.budget_bytes,
                   plan=handle.plan.summary(), stats={k: v for k, v in handle.stats().items()
                                                      if isinstance(v, (int, float, bool))})
        handle.remove()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--snapshot", action="store_true", help="dump the memopt step's allocator history")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_memory_trace measures a GPU; none here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(False, None), run(True, args.out / "memopt_step_snapshot.pickle" if args.snapshot else None)]
    (args.out / "memory_trace.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(f"memopt={row['memopt']}: peak {row['peak'] / 2**20:.1f} MiB, before the step "
              f"{row['allocated_before_step'] / 2**20:.1f} MiB"
              + (f", predicted {row['predicted_peak'] / 2**20:.1f} MiB" if row["memopt"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
