"""The ``memopt`` command: ``plan`` a model for a GPU offline, re-render a saved ``report``, run the ``demo``.

``memopt plan llama-7b --seq 4096 --batch 1 --budget 40GiB --gpu h100`` traces the model with fake
tensors (no weights, no GPU), times it with a roofline model of the GPU, solves the plan and prints
the memory breakdown, the plan per unit and how it compares with keeping or recomputing everything.
Every printed plan is replayed by the simulator first. User errors print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from .errors import BudgetError, MemoptError
from .hardware import Hardware
from .units import format_budget, format_bytes, parse_budget, parse_bytes

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class UsageError(MemoptError):
    """A request the CLI cannot carry out; its message is the one line the user sees."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Progress:
    """Status lines on stderr: rewritten in place on a terminal, one per stage otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()
        self.stage = ""

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.started:6.1f} s] {message}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
            return
        stage = message.split(":")[0]
        if stage != self.stage:
            self.stage = stage
            sys.stderr.write(line + "\n")

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _budget(text: str) -> str:
    try:
        parse_budget(text, what="--budget")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpu(text: str) -> Hardware:
    try:
        return Hardware.preset(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .fake_profile import ATTN_IMPLEMENTATIONS, preset_names
    from .precision import OPTIMIZERS
    from .precision import PRECISIONS

    parser = _Parser(prog="memopt", description="Plan activation memory (keep / swap / recompute) for training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser(
        "plan", help="plan a model for a GPU, offline (fake tensors + roofline model)",
        description="Trace MODEL with fake tensors, model its step on a GPU and plan which activations to keep, "
                    "swap to host memory or recompute so the step fits the budget.",
        epilog=f"model presets: {', '.join(preset_names())}. GPU presets: {', '.join(Hardware.preset_names())}.",
    )
    plan.add_argument("model", help="a preset name or a Hugging Face config.json (or a folder holding one)")
    plan.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    plan.add_argument("--batch", type=int, default=1, help="sequences per step on one GPU (default 1)")
    plan.add_argument("--budget", type=_budget, default=None,
                      help="whole-step device memory, model states included, e.g. 40GiB; or a fraction of the "
                           "activation peak, e.g. 0.5 or 50%%; default: the GPU's memory (then the fastest plan that "
                           "fits the GPU)")
    plan.add_argument("--gpu", type=_gpu, default=Hardware.preset("h100"), help="GPU preset (default h100)")
    plan.add_argument("--precision", choices=list(PRECISIONS), default=None,
                      help="precision convention: bf16-mixed (bf16 params and grads, fp32 optimizer states and master "
                           "copy), bf16-true (everything bf16), fp16-mixed, 32-true (default: from --dtype)")
    plan.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                      help="training dtype when no --precision: bf16-mixed, fp16-mixed or 32-true (default bf16)")
    plan.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help="optimizer (default adamw)")
    plan.add_argument("--grad-accum", type=int, default=1, metavar="N",
                      help="micro-batches per optimizer step; above 1 gradients are held all step (default 1)")
    plan.add_argument("--lora", type=int, default=0, metavar="R",
                      help="train LoRA adapters of rank R on every linear but the LM head, the base frozen")
    plan.add_argument("--qlora", action="store_true", help="with --lora: the base weights in 4-bit NF4 (bitsandbytes)")
    plan.add_argument("--qst", action="store_true",
                      help="Quantized Side Tuning (memopt.qst): the model frozen in NF4, a side network trains")
    plan.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0, help="ZeRO stage (default 0)")
    plan.add_argument("--world-size", type=int, default=1, help="GPUs ZeRO shards over (default 1)")
    plan.add_argument("--attn-impl", choices=ATTN_IMPLEMENTATIONS, default=None,
                      help="attention implementation to model (default: sdpa where the model's class supports it, "
                           "else eager, as transformers picks)")
    custom = plan.add_argument_group("custom GPU figures (override the preset's)")
    custom.add_argument("--gpu-memory", type=_size, help="device memory, e.g. 48GiB")
    custom.add_argument("--host-memory", type=_size, help="host memory for swapped activations, e.g. 256GiB")
    custom.add_argument("--tflops", type=_positive, help="dense matmul TFLOP/s at the training dtype")
    custom.add_argument("--hbm-tbps", type=_positive, help="device memory bandwidth, TB/s")
    custom.add_argument("--pcie-gbps", type=_positive, help="pinned host<->device copy bandwidth, GB/s")
    plan.add_argument("--time-limit", type=_positive, default=10.0, help="solver time limit, seconds (default 10)")
    plan.add_argument("--json", metavar="FILE", help="save the plan report as JSON (re-render with memopt report)")
    plan.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with a memory plot")
    plan.add_argument("--quiet", action="store_true", help="no progress on stderr")
    plan.set_defaults(run=_cmd_plan)

    report = sub.add_parser("report", help="re-render a plan saved with memopt plan --json",
                            description="Print a saved plan report again, re-checked by the simulator.")
    report.add_argument("path", help="plan JSON written by memopt plan --json")
    report.add_argument("--html", metavar="FILE", help="write the HTML report")
    report.set_defaults(run=_cmd_report)
    sub.add_parser("demo", help="run the whole pipeline on a small built-in model (memopt demo --help)", add_help=False)
    return parser


def _hardware(args: argparse.Namespace) -> Hardware:
    changes: dict[str, Any] = {}
    if args.gpu_memory:
        changes["device_bytes"] = args.gpu_memory
    if args.host_memory:
        changes["host_bytes"] = args.host_memory
    if args.tflops:
        changes["peak_flops_per_s"] = args.tflops * 1e12
    if args.hbm_tbps:
        changes["mem_bytes_per_s"] = args.hbm_tbps * 1e12
    if args.pcie_gbps:
        changes["h2d_bytes_per_s"] = changes["d2h_bytes_per_s"] = args.pcie_gbps * 1e9
    if not changes:
        return args.gpu
    return dataclasses.replace(args.gpu, name=f"{args.gpu.name} (custom)", **changes)


def _zero_options(graph, n_params: int, setup, activation_floor_bytes: int, budget_bytes: int,
                  options) -> list[tuple[int, int, int]]:
    """(GPUs, ZeRO stage, bytes) of the smallest world size per stage whose step fits: a first guess from the
    model states (with the parameters ZeRO-3 gathers) plus this step's activation floor, then the planner's own
    minimum on the resharded step, halving the world while it still fits, so the budget quoted is one a plan
    fits in as written."""
    from .planners import min_feasible_bytes

    from .fake_profile import model_states, resharded, zero3_gathered

    def need(stage: int, world: int) -> int:
        return min_feasible_bytes(resharded(graph, stage, world), options)[0]

    found = []
    for stage in (3, 2, 1):
        world = 2
        while world <= 4096:
            trial = dataclasses.replace(setup, zero_stage=stage, world_size=world)
            gathered = zero3_gathered(graph, n_params, setup.dtype, world) if stage == 3 else 0
            if model_states(n_params, trial).total_bytes + gathered + activation_floor_bytes <= budget_bytes:
                break
            world *= 2
        if world > 4096:
            continue
        bytes_needed = need(stage, world)
        while bytes_needed > budget_bytes and world < 4096:  # the guess was short
            world *= 2
            bytes_needed = need(stage, world)
        if bytes_needed > budget_bytes:
            continue
        while world > 2:
            smaller = need(stage, world // 2)
            if smaller > budget_bytes:
                break
            world, bytes_needed = world // 2, smaller
        found.append((world, stage, bytes_needed))
    return sorted(found)


def _budget_message(graph, setup, exc: BudgetError, budget_bytes: int, budget_text: str,
                    planner_options=None) -> str:
    states = graph.model_state_bytes
    floor = max(0, exc.min_feasible_bytes - graph.resident_bytes)
    minimum = format_budget(exc.min_feasible_bytes)
    shards = f"ZeRO-{setup.zero_stage} over {setup.world_size} GPUs" if setup.zero_stage else "no ZeRO sharding"
    if exc.dominated_by == "model states" or graph.resident_bytes > budget_bytes:
        gathered = (f", plus {format_bytes(graph.gathered_param_bytes)} of parameters ZeRO-3 gathers for a block"
                    if graph.gathered_param_bytes else "")
        head = (f"budget {budget_text} is below the model states: parameters {format_bytes(graph.param_bytes)} + "
                f"gradients {format_bytes(graph.grad_bytes)} + optimizer {format_bytes(graph.optimizer_bytes)} = "
                f"{format_bytes(states)} per GPU ({setup.dtype}, {setup.optimizer}, {shards}){gathered}; with its "
                f"leanest activation plan the step needs {minimum}")
    else:
        head = f"no plan fits budget {budget_text}: the step needs at least {minimum}, set by {exc.dominated_by}"
    n_params = graph.meta.get("n_params")
    options = (_zero_options(graph, n_params, setup, floor, budget_bytes, planner_options)
               if isinstance(n_params, int) and "unsharded_states" in graph.meta else [])
    options = [o for o in options if (o[1], o[0]) != (setup.zero_stage, setup.world_size)]
    if options:
        fixes = " or ".join(f"ZeRO-{stage} over {world} GPUs (--zero-stage {stage} --world-size {world}, needs "
                            f"--budget {format_budget(need)} or more)" for world, stage, need in options[:2])
        return f"{head}. It would fit with {fixes}, or with --budget {minimum}"
    return f"{head}. Raise --budget to at least {minimum} or shorten --seq/--batch"


def _cmd_plan(args: argparse.Namespace) -> int:
    from .api import plan as solve_plan
    from .api import resolve_budget
    from .config import MemoptConfig
    from .fake_profile import TrainingSetup, fake_profile
    from .report import PlanReport, render_breakdown, render_html, render_text

    try:
        setup = TrainingSetup(seq_len=args.seq, batch_size=args.batch, dtype=args.dtype, optimizer=args.optimizer,
                              zero_stage=args.zero_stage, world_size=args.world_size, precision=args.precision,
                              grad_accumulation=args.grad_accum, lora_rank=args.lora, qlora=args.qlora,
                              qst=args.qst)
        hardware = _hardware(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    budget = args.budget if args.budget is not None else hardware.device_bytes
    request = {"model": args.model, "seq": args.seq, "batch": args.batch, "dtype": setup.dtype,
               "precision": setup.precision, "grad_accum": setup.grad_accumulation, "lora": setup.lora_rank,
               "qlora": setup.qlora, "qst": setup.qst,
               "optimizer": args.optimizer, "zero_stage": args.zero_stage, "world_size": args.world_size,
               "gpu": hardware.name, "budget": args.budget, "attn_impl": args.attn_impl}
    progress = _Progress(enabled=not args.quiet)
    _quiet_transformers()
    graph = fake_profile(args.model, setup, hardware, attn_implementation=args.attn_impl, progress=progress)
    spec = parse_budget(budget)
    budget_bytes = resolve_budget(graph, spec)
    if args.budget is None:
        budget_text = f"{format_bytes(hardware.device_bytes)} ({hardware.name})"
    elif isinstance(spec, float):
        budget_text = f"{args.budget} of the activation peak ({format_bytes(budget_bytes)})"
    else:
        budget_text = args.budget
    progress(f"solving the plan (time limit {args.time_limit:g} s)")
    try:
        config = MemoptConfig(time_limit_s=args.time_limit)
        plan = solve_plan(graph, budget, config)
        # Made for these ranks: memopt.integrations.deepspeed takes it as {"memopt": {"plan": "plan.json"}}.
        plan = dataclasses.replace(plan, world_size=args.world_size,
                                   sharding=f"zero{args.zero_stage}" if args.zero_stage else "none")
    except BudgetError as exc:
        progress(f"finding the ZeRO sharding that fits {budget_text}")
        message = _budget_message(graph, setup, exc, budget_bytes, budget_text, config.planner_options())
        progress.done()
        print(render_breakdown(graph, request))
        raise UsageError(message) from None
    progress("checking the plan with the simulator")
    report = PlanReport(graph, plan, request)
    text = render_text(report)
    progress.done()
    print(text)
    _write_outputs(report, args.json, args.html, render_html)
    if not report.verified:
        print(f"memopt: internal error: the simulator finds peak {format_bytes(report.simulated.peak_bytes)} for a "
              f"plan that claims {format_bytes(plan.predicted_peak_bytes)} within {format_bytes(plan.budget_bytes)}; "
              "please report this with the --json file", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


def _write_outputs(report, json_path: str | None, html_path: str | None, render_html) -> None:
    try:
        if json_path:
            report.save(json_path)
            print(f"wrote {json_path}")
        if html_path:
            with open(html_path, "w") as f:
                f.write(render_html(report))
            print(f"wrote {html_path}")
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename!r}: {exc.strerror}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import PlanReport, render_html, render_text

    try:
        report = PlanReport.load(args.path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(render_text(report))
    _write_outputs(report, None, args.html, render_html)
    return EXIT_OK if report.verified else EXIT_INTERNAL


def _cmd_demo(argv: list[str]) -> int:
    try:
        from . import demo
    except ImportError as exc:
        print(f"memopt demo: error: the demo is not available in this installation ({exc})", file=sys.stderr)
        return EXIT_USAGE
    return int(demo.main(argv) or 0)


def _quiet_transformers() -> None:
    # Config-validation chatter (e.g. special token ids of a shrunken vocabulary) would bury the report.
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the ``memopt`` command; returns the exit code (0 ok, 2 a user error, 1 an internal error).

    Args:
        argv (list[str] | None, default None): arguments after the program name; ``sys.argv[1:]`` when None.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _cmd_demo(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return args.run(args)
    except MemoptError as exc:
        # ModelConfigError, BudgetError turned into UsageError, bad report files: one line, exit 2.
        print(f"memopt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
