"""``memopt demo``: the whole pipeline on a small built-in model, with before/after figures.

Profiles a ``TinyGPT`` training step once (a warm-up and three profiled steps, see ``memopt.timing``), plans
it for a few budgets, applies each plan to its own copy of the model and trains all copies on the same
batches, one step of each per round so that machine noise hits every run alike. It prints, per budget: the
plan's mix of decisions, predicted and measured activation peak, the step time against no saving (median of
the timed rounds), and whether the parameters match training without memopt bit for bit.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

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


class _Run:
    """One model trained on the demo's batches: the reference, or a copy under a plan."""

    def __init__(self, name: str, model, handle=None, mix: str = "-", predicted: str = "-", note: str = "") -> None:
        self.name, self.model, self.handle, self.mix, self.predicted, self.note = name, model, handle, mix, predicted, note
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []
        self.peak = 0
        self.host = 0

    def step(self, batch, device: torch.device, metered: bool) -> None:
        """One training step; the metered one (the first) is not timed: the meter slows it down."""
        self.opt.zero_grad()
        if metered:
            with MemoryMeter() as meter:
                self.model(batch).backward()
            self.peak = meter.peak_bytes
            self.host = self.handle.stats().get("host_peak_bytes", 0) if self.handle is not None else 0
        else:
            _sync(device)
            start = time.perf_counter()
            self.model(batch).backward()
            _sync(device)
            self.times.append(time.perf_counter() - start)
        self.opt.step()

    @property
    def step_s(self) -> float:
        return sorted(self.times)[len(self.times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every plan trained bit-exactly within its budget."""
    import memopt
    from memopt.planners import baseline_plan

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

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="memopt: the .* profiled steps took")  # printed below as a note
        profiled = make_model()
        graph = memopt.profile(profiled, batches[0],
                               optimizer=torch.optim.SGD(profiled.parameters(), lr=0.01, momentum=0.9))
    profile_s = time.perf_counter() - start
    runs = [_Run("none (no memopt)", make_model())]
    ckpt = make_model()
    runs.append(_Run("recompute every layer", ckpt, memopt.apply(ckpt, baseline_plan(graph, "checkpoint-all"))))
    # On a GPU, swapping to host memory frees device memory, and plans with and without it are shown. On a
    # CPU the "host" is the same memory, so the planner never swaps there: one plan per budget.
    variants = [("", MemoptConfig())]
    if not graph.hardware.unified_memory:
        variants.append((" recompute", MemoptConfig(allow_swap=False)))
    infeasible = []
    for budget in args.budgets:
        for suffix, config in variants:
            name = f"memopt {budget:.0%}{suffix}"
            start = time.perf_counter()
            try:
                plan = memopt.plan(graph, budget, config)
            except memopt.BudgetError as error:
                infeasible.append((len(runs), name, str(error).split(";")[0].split(". To fit")[0]))
                continue
            model = make_model()
            mix = ", ".join(f"{n} {m}" for m, n in _count(d.label for d in plan.decisions))
            predicted = format_bytes(plan.predicted_peak_bytes - graph.states_without_grads_bytes)
            runs.append(_Run(name, model, memopt.apply(model, plan, config, graph), mix, predicted,
                             f"planned in {time.perf_counter() - start:.2f} s"))

    for step, batch in enumerate(batches):
        for run in runs:
            run.step(batch, device, metered=step == 0)
    reference = snapshot(runs[0].model)
    exact = [max_difference(reference, snapshot(run.model)) == 0.0 for run in runs]
    for run in runs:
        if run.handle is not None:
            run.handle.remove()

    print(f"profiled once in {profile_s:.1f} s ({graph.meta.get('profiled_steps', 1)} timed steps); step times are "
          f"medians of {args.steps - 1} rounds, every run one step per round")
    if graph.hardware.unified_memory:
        print("on a CPU host memory is the device memory: swapping would save nothing, so plans only recompute")
    if graph.meta.get("timing_note"):
        print(f"note: {graph.meta['timing_note']}")
    print()
    base_s = runs[0].step_s
    width = max([32] + [len(run.mix) for run in runs])  # the plan column fits its longest mix of modes
    # On a GPU, swapped bytes leave the device for the host: shown beside the device peak.
    host = device.type == "cuda"
    print(f"{'run':<24} {'plan':<{width}} {'predicted':>11} {'measured peak':>14} " + (f"{'host':>11} " if host else "")
          + f"{'step':>9} {'x none':>7}  exact")
    lines = []
    for run, same in zip(runs, exact):
        lines.append(f"{run.name:<24} {run.mix:<{width}} {run.predicted:>11} {format_bytes(run.peak):>14} "
                     + (f"{format_bytes(run.host):>11} " if host else "")
                     + f"{run.step_s * 1e3:>7.0f}ms {run.step_s / base_s:>7.2f}  {'yes' if same else 'NO'}  {run.note}")
    for position, name, message in reversed(infeasible):
        lines.insert(position, f"{name:<24} {message}")
    print("\n".join(lines))
    note = noise_note(runs)
    if note:
        print(f"\nnote: {note}")
    print("\nmeasured peak: bytes the step allocates on the device (memopt.meter.MemoryMeter): activations and the"
          " gradients backward makes; predicted: the plan's peak less the parameters and optimizer states;"
          " exact: parameters after training equal the run without memopt bit for bit.")
    return 0 if all(exact) else 1


def noise_note(runs: list[_Run]) -> str:
    """What to make of the step times when the machine was noisy: a run faster than no saving (impossible but
    for noise: memopt only adds work), or rounds of the run without memopt spread over 10 %; "" otherwise."""
    base = runs[0]
    if len(base.times) < 2:
        return ""
    spread = (max(base.times) - min(base.times)) / base.step_s
    faster = [run.name for run in runs[1:] if run.times and run.step_s < base.step_s]
    if not faster and spread <= 0.10:
        return ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    said = f"{', '.join(faster)} measured faster than no saving, which only noise can do; " if faster else ""
    return (f"{said}the run without memopt varied by {spread:.0%} between rounds (load average {load:.1f} on "
            f"{os.cpu_count()} cores): step ratios within that are noise here; run the demo on a quiet machine "
            "for step figures (the peaks and exactness do not depend on it)")


def _count(items) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return sorted(counts.items())


if __name__ == "__main__":
    raise SystemExit(main())
