"""``memopt demo``: the whole pipeline on a small built-in model, with before/after figures.

Profiles a ``TinyGPT`` training step, plans it for a few budgets, trains a few steps under each plan,
and prints, per budget: the plan's mix of decisions, predicted and measured activation peak, the step
time against no saving, and whether the parameters match training without memopt bit for bit.
"""

from __future__ import annotations

import argparse
import time

import torch

from .config import MemoptConfig
from .meter import MemoryMeter
from .testing import TinyGPT, max_difference, snapshot
from .units import format_bytes

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.75,0.5,0.25",
                        help="fractions of the activation peak, comma separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4,
                        help="training steps per budget; the first is metered, the rest timed (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets must be comma-separated fractions like 0.75,0.5, got {args.budgets!r}")
    if args.steps < 2 or args.seq < 2 or args.batch < 1 or args.layers < 2:
        parser.error("--steps must be >= 2, --batch >= 1, --seq >= 2 and --layers >= 2")
    return args


def _run(model, batches, device) -> tuple[list[torch.Tensor], float, int]:
    """Train over batches; returns final params, median step seconds and peak activation bytes.

    The first step runs under the memory meter (which slows it down) and is not timed; the others are
    timed without it.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    times, peak = [], 0
    for step, batch in enumerate(batches):
        opt.zero_grad(set_to_none=False)
        if step == 0:
            with MemoryMeter() as meter:
                model(batch).backward()
            peak = meter.peak_bytes
        else:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(batch).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        opt.step()
    return snapshot(model), sorted(times)[len(times) // 2], peak


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every plan trained bit-exactly within its budget."""
    import memopt

    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def make_model() -> TinyGPT:
        torch.manual_seed(0)
        return TinyGPT(hidden=args.hidden, layers=args.layers, max_tokens=args.seq).to(device)

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1024, (args.batch, args.seq), generator=generator).to(device)
               for _ in range(args.steps)]
    print(f"memopt {memopt.__version__} demo: TinyGPT {args.layers} layers x {args.hidden} hidden, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} SGD steps per run, on {device}")

    reference, base_s, base_peak = _run(make_model(), batches, device)
    rows = [("none (no memopt)", "-", "-", base_peak, base_s, True, "")]
    ckpt = make_model()
    handle = memopt.apply(ckpt, _recompute_all_plan(ckpt, batches[0]))
    params, ckpt_s, ckpt_peak = _run(ckpt, batches, device)
    handle.remove()
    rows.append(("recompute every layer", "-", "-", ckpt_peak, ckpt_s, max_difference(reference, params) == 0.0, ""))

    ok = rows[-1][5]
    # On a GPU, swapping to host memory frees device memory; on a CPU the "host" is the same RAM, so the
    # recompute-only plans are the ones that save memory a CPU run can feel. Both are shown.
    variants = [("", MemoptConfig()), (" recompute", MemoptConfig(allow_swap=False))]
    for budget in args.budgets:
        for suffix, config in variants:
            model = make_model()
            name = f"memopt {budget:.0%}{suffix}"
            start = time.perf_counter()
            try:
                handle = memopt.optimize(model, batches[0], budget, config)
            except memopt.BudgetError as error:
                rows.append((name, "infeasible", "-", 0, 0.0, True, str(error).split(";")[0]))
                continue
            plan_s = time.perf_counter() - start
            plan = handle.plan
            params, step_s, peak = _run(model, batches, device)
            handle.remove()
            exact = max_difference(reference, params) == 0.0
            mix = ", ".join(f"{n} {m}" for m, n in _count(d.mode for d in plan.decisions))
            predicted = plan.predicted_peak_bytes - _resident_bytes(handle)
            rows.append((name, mix, format_bytes(predicted), peak, step_s, exact, f"planned in {plan_s:.2f} s"))
            ok = ok and exact

    print()
    width = max([32] + [len(row[1]) for row in rows])  # the plan column fits its longest mix of modes
    print(f"{'run':<24} {'plan':<{width}} {'predicted':>11} {'measured peak':>14} {'step':>9} {'x none':>7}  exact")
    for name, mix, predicted, peak, step_s, exact, note in rows:
        if mix == "infeasible":
            print(f"{name:<24} {note}")
            continue
        print(f"{name:<24} {mix:<{width}} {predicted:>11} {format_bytes(peak):>14} {step_s * 1e3:>7.0f}ms"
              f" {step_s / base_s:>7.2f}  {'yes' if exact else 'NO'}  {note}")
    print("\nmeasured peak: activation bytes alive during the step (memopt.meter.MemoryMeter);"
          " exact: parameters after training equal the run without memopt bit for bit.")
    return 0 if ok else 1


def _resident_bytes(handle) -> int:
    graph = handle.graph
    return graph.resident_bytes if graph is not None else 0


def _count(items) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return sorted(counts.items())


def _recompute_all_plan(model, sample):
    import memopt
    from memopt.planners import baseline_plan

    return baseline_plan(memopt.profile(model, sample), "checkpoint-all")


if __name__ == "__main__":
    raise SystemExit(main())
