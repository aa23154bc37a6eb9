"""train_gpu: the reference run (a 953M-parameter Llama, bf16, AdamW, batch 1) under memopt and the usual
alternatives, on whatever accelerator is there.

    python bench/train_gpu.py                    # GPU: seq 16384, methods none, hf-ckpt, memopt at hf-ckpt's peak
    python bench/train_gpu.py --tiny            # any machine: a 2-layer model at seq 256 (checks the script)
    python bench/train_gpu.py --out DIR --trace  # rows as JSON and CSV in DIR, a torch.profiler trace beside them

Methods: ``none``; ``hf-ckpt`` (Hugging Face gradient checkpointing, non-reentrant); ``memopt-match`` (memopt
with a byte budget equal to hf-ckpt's measured peak, so the comparison is speed at equal memory);
``memopt-50`` (half the activation peak). Figures per method: median step seconds and its ratio to none,
peak allocated and reserved GiB (for memopt counted from after its profiling: the steps it trains, as a user
would see them), reserved/allocated, and for memopt the plan's predicted peak, the workspace bytes the
profile measured and the host arena's use. DESIGN's target: memopt's peak at or below hf-ckpt's, its step
within 1.08x of none, reserved/allocated <= 1.02. A method that fails (OOM, an error) gets a row with the
error and the others still run.

Output: with ``--out DIR`` (default ``$OUT`` when set, as on the GPU machine) the rows go to
``DIR/train_gpu.json`` and ``DIR/train_gpu.csv`` (and each memopt plan to ``DIR/plan_<method>.json``);
without it, to bench/results/train_gpu.csv and the table in bench/README.md. Prerequisites (transformers,
pulp with a CBC solver, memopt's C allocator built or a C compiler to build it) are checked first.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, write_rows  # noqa: E402

import memopt  # noqa: E402
from memopt.pools import cuda as pools_cuda  # noqa: E402 - torch.cuda's memory figures, or an installed arena's

METHODS = ("none", "hf-ckpt", "memopt-match", "memopt-50")
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[train_gpu {time.perf_counter() - _STARTED:7.1f}s] {message}", flush=True)


def check_prerequisites() -> list[str]:
    """What is missing for a run, one line each with its fix; empty when all is there."""
    missing = []
    try:
        import transformers  # noqa: F401
    except ImportError:
        missing.append("transformers is not installed: pip install 'transformers>=4.44'")
    try:
        from memopt.planners._cbc import cbc_path

        cbc_path()
    except ImportError:
        missing.append("pulp is not installed: pip install 'pulp>=3.3.1,<4'")
    except Exception as exc:  # noqa: BLE001 - MemoptError naming what was looked for
        missing.append(f"no CBC solver for the planner: {exc}")
    try:
        from memopt.pools import _lib

        _lib.library()  # loads the built _moalloc.so, or compiles it with the machine's C compiler
    except ImportError as exc:
        missing.append(f"memopt's C allocator is not built and cannot be: {exc}")
    return missing


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


def step(model, opt, sample) -> torch.Tensor:
    loss = model(**sample).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def optimize_then_reset_peaks(model, sample, budget, device, optimizer=None):
    """``memopt.optimize``, then a fresh start of the allocator's peak figures: memopt's peaks count the steps it
    trains, not its profiling (paid once, and bounded by the leanest plan's memory anyway)."""
    handle = memopt.optimize(model, sample, budget, optimizer=optimizer)
    if device.type == "cuda":
        sync(device)
        pools_cuda.reset_peak_memory_stats()
    return handle


def run(method: str, args, device, dtype, budget=None) -> dict:
    try:
        return _run(method, args, device, dtype, budget)
    except torch.OutOfMemoryError:
        row = {"method": method, "seq": args.seq, "error": "OOM"}
    except Exception as exc:  # noqa: BLE001 - one failing method must not cost the others their figures
        row = {"method": method, "seq": args.seq, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    say(f"{method}: {row['error']}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _run(method: str, args, device, dtype, budget=None) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        pools_cuda.reset_peak_memory_stats()
    say(f"{method}: building the model")
    model = build(args, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device)
    sample = {"input_ids": ids, "labels": ids}
    handle = None
    plan_s = 0.0
    if method == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method.startswith("memopt"):
        say(f"{method}: profiling and planning (budget {budget!r})")
        start = time.perf_counter()
        handle = optimize_then_reset_peaks(model, sample, budget, device, opt)
        plan_s = time.perf_counter() - start
    arena = args.arena
    # Untimed first: one warm-up step, and under the arena the heap steps before it records, and the recording.
    warmups = 1 + (arena.replay_warmup_steps + 1 if arena is not None else 0)
    times = []
    for index in range(args.steps + warmups):
        sync(device)
        start = time.perf_counter()
        with arena.step() if arena is not None else contextlib.nullcontext():
            loss = step(model, opt, sample)
        sync(device)
        if index >= warmups:
            times.append(time.perf_counter() - start)
        elif index == warmups - 1 and arena is not None:
            pools_cuda.reset_peak_memory_stats()  # the replayed steps' peaks, not the heap's or the recording's
    say(f"{method}: {args.steps} timed steps, median {statistics.median(times):.4f} s")
    row = {"method": method, "seq": args.seq, "allocator": allocator_name(arena), "step_s": round(statistics.median(times), 4),
           "loss": round(loss.item(), 4), "plan_s": round(plan_s, 2), "decisions": "", "predicted_overhead": ""}
    if device.type == "cuda":
        alloc, reserved = pools_cuda.max_memory_allocated(), pools_cuda.max_memory_reserved()
        row.update(peak_alloc_gib=round(alloc / 2**30, 2), peak_reserved_gib=round(reserved / 2**30, 2),
                   reserved_vs_alloc=round(reserved / alloc, 3))
    if arena is not None:
        stats = arena.device_stats()
        # The region's extent is what it reserves: where the layout was placed shows in extent - plan bytes.
        plan = arena.replay_plan
        row.update(plan_gib=round(stats.plan_bytes / 2**30, 2),
                   live_gib_after=round(stats.live_bytes / 2**30, 2),
                   extent_gib_after=round(stats.reserved_bytes / 2**30, 2), planned_allocs=stats.planned_allocs,
                   fallback_allocs=stats.fallback_allocs, replay_note=arena.replay_note,
                   replay_method=plan.method if plan is not None else "",
                   # "among": laid out in the gaps between the blocks alive when armed; "region": one region.
                   replay_layout="" if plan is None else "among" if plan.regions else "region",
                   replay_regions=len(plan.regions) if plan is not None and plan.regions else int(plan is not None),
                   departures=departure_summary(stats))
        if args.out is not None:  # which allocations left the plan, and why: the first 64 of them
            (args.out / f"departures_{method}.json").write_text(
                json.dumps([dataclasses.asdict(d) for d in arena.departures()], indent=0))
        arena.restart_replay()
    if args.trace and method == args.trace_method:
        row["trace"] = trace_step(model, opt, sample, device, args.out, method)
    if handle is not None:
        row.update(_memopt_figures(handle, args.out, method))
        handle.remove()
    del model, opt, handle
    say(f"{method}: {row}")
    return row


def departure_summary(stats) -> str:
    """The replayed steps' fallbacks by reason: another size than planned, a planned range still held, a range
    another stream may still use (``memopt.pools._device.Departure``)."""
    if not stats.fallback_allocs:
        return ""
    return f"size {stats.size_departures} / busy {stats.busy_departures} / stream {stats.stream_conflicts}"


def allocator_name(arena) -> str:
    """Which allocator served the run: memopt's replaying arena, or torch's caching allocator as configured."""
    if arena is not None:
        return "memopt-replay"
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    return "torch-expandable" if "expandable_segments:true" in conf.lower().replace(" ", "") else "torch"


def _memopt_figures(handle, out: Path | None, method: str) -> dict:
    plan = handle.plan
    modes = {d.label for d in plan.decisions}
    stats = handle.stats()
    figures = {
        "decisions": " ".join(f"{n}x{m}" for m, n in sorted({m: sum(d.label == m for d in plan.decisions)
                                                             for m in modes}.items())),
        "predicted_overhead": round(plan.overhead, 3),
        "predicted_peak_gib": round(plan.predicted_peak_bytes / 2**30, 2),
        "predicted_step_s": round(plan.predicted_step_s, 4),
        "device_workspace_mib": round(handle.graph.meta.get("device_workspace_bytes", 0) / 2**20, 1),
        "host_peak_gib": round(stats.get("host_peak_bytes", 0) / 2**30, 2),
        "host_capacity_gib": round(stats.get("host_capacity_bytes", 0) / 2**30, 2),
        "refused_mib": round(stats.get("refused_bytes", 0) / 2**20, 1),
    }
    if out is not None:
        (out / f"plan_{method}.json").write_text(plan.to_json())
        (out / f"graph_{method}.json").write_text(handle.graph.to_json())
    return figures


def trace_step(model, opt, sample, device, out: Path | None, method: str) -> str:
    """One more step under ``torch.profiler``; its Chrome trace (gzipped) goes to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    say(f"{method}: tracing one step with torch.profiler")
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        step(model, opt, sample)
        sync(device)
    path = (out or Path(".")) / f"trace_{method}.json.gz"
    prof.export_chrome_trace(str(path))
    table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                      row_limit=25)
    (out or Path(".")).joinpath(f"trace_{method}_top_ops.txt").write_text(table)
    return path.name


def write_out(out: Path, rows: list[dict]) -> None:
    env = environment()
    rows = [{**row, **env} for row in rows]
    (out / "train_gpu.json").write_text(json.dumps(rows, indent=1))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (out / "train_gpu.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model at seq 256, on any device")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for the rows, plans and trace (default $OUT when set; else bench/results)")
    parser.add_argument("--trace", action="store_true", help="trace one more step of --trace-method")
    parser.add_argument("--trace-method", default="memopt-match")
    parser.add_argument("--replay", default=None, metavar="BYTES",
                        help="install memopt's CUDA arena of this size (e.g. 120GiB) first thing and replay each "
                             "method's planned step layout in it (MEMO's replay); a process of its own")
    args = parser.parse_args(argv)
    args.arena = None
    if args.replay:
        if not torch.cuda.is_available():
            parser.error("--replay lays out CUDA memory; this machine has no CUDA device")
        args.arena = pools_cuda.cuda_allocator(args.replay)
        args.arena.install()  # before anything initialises torch's CUDA allocator
    args.seq = args.seq or (256 if args.tiny else 16384)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    missing = check_prerequisites()
    if missing:
        print("train_gpu cannot run; missing:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    say(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), seq {args.seq}, "
        f"methods {', '.join(methods)}")
    rows: list[dict] = []
    for method in methods:
        budget = None
        if method == "memopt-match":
            ckpt = next((r for r in rows if r["method"] == "hf-ckpt" and "peak_alloc_gib" in r), None)
            budget = int(ckpt["peak_alloc_gib"] * 2**30) if ckpt is not None else 0.5
        elif method == "memopt-50":
            budget = 0.5
        rows.append(run(method, args, device, dtype, budget))
        if args.out is not None:
            write_out(args.out, rows)  # after each method: a later crash keeps what was measured
    base = next((r["step_s"] for r in rows if r["method"] == "none" and "step_s" in r), None)
    for row in rows:
        if base and "step_s" in row:
            row["step_vs_none"] = round(row["step_s"] / base, 3)
    if args.out is not None:
        write_out(args.out, rows)
        say(f"rows in {args.out / 'train_gpu.csv'}")
    else:
        write_rows("train_gpu", rows)
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
