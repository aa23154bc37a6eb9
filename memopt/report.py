"""Plan reports: the text the CLI prints and one self-contained HTML page with a memory-over-time plot.

A ``PlanReport`` is a graph, the plan made for it and the request that produced them; it saves to
JSON and loads back, and everything else (the simulator's re-check, the baselines, the memory
timeline) is recomputed from those three, so ``memopt report plan.json`` shows exactly what
``memopt plan`` showed. The HTML page embeds its CSS and an SVG plot: no scripts, nothing fetched.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .graph import Plan, TrainingGraph
from .planners.simulator import head_change
from .units import format_bytes

__all__ = ["CATEGORY_COLORS", "CATEGORY_NOTES", "PlanReport", "breakdown", "memory_svg", "render_breakdown",
           "render_html", "render_text"]

_FORMAT = "memopt-plan-report"
# 2: the graph may carry gathered_param_bytes (ZeRO-3) and shared_input_bytes (a version-1 report has both at 0).
# 3: each decision names its mode (version 2's token_wise and selective flags are read as one).
_VERSION = 3
_READS = (1, 2, 3)

#: Fill colour of each memory category in the plot, in the simulator's stacking order.
CATEGORY_COLORS = {
    "model states": "#8c8c8c",
    "fixed": "#b07aa1",
    "kept": "#4e79a7",
    "recompute input": "#59a14f",
    "swap in flight": "#f28e2b",
    "unit working set": "#76b7b2",
    "workspace": "#edc948",
}
_BUDGET_COLOR = "#d62728"

#: What each memory category of the plot holds, for its tooltip and the caption under the plots.
CATEGORY_NOTES = {
    "model states": "parameters, gradients and optimizer state (and parameters ZeRO-3 gathers), on the device "
                    "all step whatever the plan",
    "fixed": "activations saved outside every planned unit (embeddings, final norm, loss): always kept",
    "kept": "activations the plan keeps on the device from a unit's forward until its backward",
    "recompute input": "inputs a recomputed unit holds to run again in backward, and tensors several units share "
                       "(attention mask, rotary tables)",
    "swap in flight": "activations on their way to or from host memory (copy and prefetch buffers)",
    "unit working set": "the saved activations of the unit at work, or of the one rebuilt for its backward",
    "workspace": "transient memory of the unit at work beyond what it saves (outputs, temporaries, gradients); "
                 "at the turn from forward to backward: logits, loss and their gradients",
}


@dataclass
class PlanReport:
    """A plan with the graph it was made for and the request that asked for it.

    Args:
        graph (TrainingGraph): the profiled or modelled step.
        plan (Plan): the plan; its decisions name the graph's units in order.
        request (dict): what the user asked (model, seq, batch, dtype, optimizer, GPU, budget …), shown
            as given.

    Raises:
        ValueError: the plan's decisions do not match the graph's units.
    """

    graph: TrainingGraph
    plan: Plan
    request: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        units = [u.name for u in self.graph.units]
        planned = [d.unit for d in self.plan.decisions]
        if units != planned:
            raise ValueError(f"the plan decides units {planned[:3]}... but the graph has {units[:3]}...; "
                             "a report needs the graph the plan was made for")

    # -- derived figures ----------------------------------------------------------------------------
    @cached_property
    def simulated(self):
        """The simulator's replay of the plan: the re-check of every figure the plan claims."""
        from .planners import simulate

        return simulate(self.graph, self.plan.decisions, head_chunks=self.plan.head_chunks)

    @cached_property
    def baselines(self) -> dict[str, Plan]:
        """``none`` (keep every activation) and ``checkpoint-all`` (recompute every unit), simulated."""
        from .planners import baseline_plan

        return {name: baseline_plan(self.graph, name, self.plan.budget_bytes) for name in ("none", "checkpoint-all")}

    @property
    def verified(self) -> bool:
        """The simulator agrees with the plan's peak and finds it within the budget."""
        sim = self.simulated
        return sim.peak_bytes == self.plan.predicted_peak_bytes and sim.peak_bytes <= self.plan.budget_bytes

    @property
    def fits_device(self) -> bool:
        return self.simulated.peak_bytes <= self.graph.hardware.device_bytes

    def breakdown(self) -> list[tuple[str, int, str]]:
        """Memory by category as ``(name, bytes, how it was counted)``; see ``breakdown``."""
        return breakdown(self.graph)

    # -- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "request": self.request, "graph": self.graph.to_dict(),
                "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> PlanReport:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError("not a memopt plan report: the JSON lacks \"format\": \"memopt-plan-report\"; write one "
                             "with memopt plan ... --json FILE")
        if data.get("version") not in _READS:
            raise ValueError(f"plan report version {data.get('version')!r} is not supported (this memopt reads "
                             f"versions {', '.join(map(str, _READS))}); make it again with this memopt")
        try:
            graph, plan = TrainingGraph.from_dict(data["graph"]), Plan.from_dict(data["plan"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"plan report is damaged or was edited into a plan memopt cannot carry out "
                             f"({type(exc).__name__}: {exc}); make it again with memopt plan ... --json FILE") from None
        names = [u.name for u in graph.units]
        if [d.unit for d in plan.decisions] != names:
            raise ValueError(f"plan report is damaged: its plan decides for units {[d.unit for d in plan.decisions][:4]}"
                             f"... but its graph has {names[:4]}...; make it again with memopt plan ... --json FILE")
        return cls(graph, plan, dict(data.get("request", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PlanReport:
        """Read a report written by ``save``.

        Raises:
            ValueError: the file is missing, not JSON, or not a plan report.
        """
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read plan report {str(path)!r}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan report {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)


def breakdown(graph: TrainingGraph) -> list[tuple[str, int, str]]:
    """Memory of one step by category, nothing saved, as ``(name, bytes, how it was counted)``.

    Parameters, gradients and optimizer state are per GPU (after sharding); activations are every byte
    saved for backward; logits / loss is the transient where forward turns into backward; workspace the
    largest transient of one unit.
    """
    meta = graph.meta
    dtype = meta.get("dtype", "")
    n_params = meta.get("n_params")
    count = f"{n_params / 1e9:.3f} B parameters" if isinstance(n_params, int) else "as profiled"
    unit_saved = sum(u.saved_bytes for u in graph.units)
    workspace = max([max(u.forward_workspace_bytes, u.backward_workspace_bytes) for u in graph.units] or [0])
    return [
        *_parameter_rows(graph, f"{dtype} {count}".strip()),
        ("gradients", graph.grad_bytes, dtype or "as profiled"),
        ("optimizer state", graph.optimizer_bytes, meta.get("model_states_convention", "as profiled")),
        *([("gathered parameters", graph.gathered_param_bytes,
            "ZeRO-3: full parameters of the unit at work and the next one")] if graph.gathered_param_bytes else []),
        ("activations", unit_saved + graph.fixed_activation_bytes,
         f"saved for backward by {len(graph.units)} units ({format_bytes(unit_saved)}) and outside them"),
        ("logits / loss", graph.head_workspace_bytes, "peak where forward turns to backward: logits, loss, gradients"),
        ("workspace", workspace, "largest transient of one unit beyond what it saves"),
    ]


def _parameter_rows(graph: TrainingGraph, trainable: str) -> list[tuple[str, int, str]]:
    """Parameters as one row, or, for LoRA and QLoRA (not sharded by ZeRO-3), the trainable adapters, the
    frozen weights as built and the 4-bit base apart."""
    meta = graph.meta
    frozen = meta.get("frozen_param_bytes") or 0
    if not frozen or meta.get("zero_stage") == 3:
        return [("parameters", graph.param_bytes, trainable)]
    nf4 = meta.get("nf4_base_bytes") or 0
    what = "QST side network" if meta.get("qst") else f"LoRA rank {meta.get('lora_rank')}"
    rows = [("parameters", graph.param_bytes - frozen, f"{trainable}, trainable ({what})")]
    if frozen - nf4:
        rows.append(("frozen weights", frozen - nf4, "as built: no gradient, no optimizer state"))
    if nf4:
        rows.append(("4-bit base", nf4, "NF4 with double quantisation, as bitsandbytes stores it"))
    return rows


def render_breakdown(graph: TrainingGraph, request: dict[str, Any] | None = None) -> str:
    """The heading and the memory breakdown as text: all the CLI can print when no plan fits."""
    lines = [f"memopt plan: {_title(graph, request or {})}", f"GPU {_hardware_line(graph)}", "",
             "memory breakdown (per GPU)"]
    for name, nbytes, how in breakdown(graph):
        lines.append(f"  {name:<19} {format_bytes(nbytes):>12}   {how}")
    return "\n".join(lines)


# -- text ---------------------------------------------------------------------------------------------
def _title(graph: TrainingGraph, req: dict[str, Any]) -> str:
    meta = graph.meta
    model = req.get("model", meta.get("model", "model"))
    arch = meta.get("architecture", meta.get("model", ""))
    shape = ""
    if "seq_len" in meta:
        shape = f", batch {meta['batch_size']} x seq {meta['seq_len']}, {meta['dtype']}, {meta['optimizer']}"
        if meta.get("zero_stage"):
            shape += f", ZeRO-{meta['zero_stage']} over {meta['world_size']} GPUs"
    if meta.get("attn_implementation"):
        shape += f", {meta['attn_implementation']} attention"
    return f"{model} ({arch}){shape}"


def _hardware_line(graph: TrainingGraph) -> str:
    hw = graph.hardware
    how = graph.meta.get("profiled", "live")
    source = ("fake-tensor trace, times from a roofline model" if how == "fake" else "profiled on this machine")
    return (f"{hw.name}: {format_bytes(hw.device_bytes)}, {hw.peak_flops_per_s / 1e12:.0f} TFLOP/s, "
            f"{hw.mem_bytes_per_s / 1e12:.2f} TB/s; host {format_bytes(hw.host_bytes)} at "
            f"{hw.h2d_bytes_per_s / 1e9:.0f} GB/s ({source})")


def _comparison(report: PlanReport) -> list[tuple[str, Plan | None, int, float, int]]:
    plan, sim = report.plan, report.simulated
    rows = [(name, p, p.predicted_peak_bytes, p.predicted_step_s, p.host_bytes)
            for name, p in (("no saving", report.baselines["none"]),
                            ("full recompute", report.baselines["checkpoint-all"]))]
    rows.append((f"memopt ({plan.solver}, {plan.status})", None, sim.peak_bytes, sim.step_s, sim.host_peak_bytes))
    return rows


def _head_row(report: PlanReport) -> str:
    """The LM head and its loss as a row: chunked or not, and their bytes at the turn before and after."""
    plan, graph = report.plan, report.graph
    head = graph.head
    if head is None:
        note = graph.meta.get("head_note") or "the head was not profiled for chunking"
        return f"  {'lm head + loss':<28} {'whole':<10} {note}"
    before = graph.head_workspace_bytes
    if plan.head_chunks == 1:
        return (f"  {'lm head + loss':<28} {'whole':<10} {format_bytes(before):>11} at the turn (fits unchunked; "
                f"{len(head.options) - 1} chunkings profiled)")
    after = before + head_change(graph, plan.head_chunks)[0]
    exact = "weight gradient within float rounding" if head.trained else "bitwise (frozen head)"
    return (f"  {'lm head + loss':<28} {'chunked':<10} {format_bytes(before):>11} -> {format_bytes(after)} at the "
            f"turn: {plan.head_chunks} chunks of {plan.head_chunk_rows} rows, {exact}")


def _unit_rows(report: PlanReport) -> list[tuple[str, str, int, float, float, float]]:
    from .planners.simulator import unit_amounts

    rows = []
    for unit, decision in zip(report.graph.units, report.plan.decisions):
        amounts = unit_amounts(unit, decision)
        rows.append((unit.name, decision.label, unit.saved_bytes, amounts.kept_bytes, amounts.swapped_bytes,
                     amounts.recompute))
    return rows


def _verdict(report: PlanReport) -> str:
    plan, sim, hw = report.plan, report.simulated, report.graph.hardware
    if sim.peak_bytes > hw.device_bytes:
        return (f"DOES NOT FIT: the plan needs {format_bytes(sim.peak_bytes)}, the {hw.name} has "
                f"{format_bytes(hw.device_bytes)}; omit --budget to plan for the GPU's memory, or shard with ZeRO")
    return (f"FITS: predicted peak {format_bytes(sim.peak_bytes)} <= budget {format_bytes(plan.budget_bytes)} on the "
            f"{hw.name} ({format_bytes(hw.device_bytes)}), step {plan.overhead:.3f}x the no-saving step")


def _budget_text(report: PlanReport) -> str:
    """The budget, split into model states and activations, and where it came from."""
    plan, graph = report.plan, report.graph
    states = "model states and gathered parameters" if graph.gathered_param_bytes else "model states"
    split = (f"{format_bytes(plan.budget_bytes)} = {states} {format_bytes(graph.resident_bytes)} + "
             f"{format_bytes(plan.budget_bytes - graph.resident_bytes)} for activations")
    if "budget" in report.request and report.request["budget"] is None:
        return f"{split} (no --budget given: the GPU's memory, {graph.hardware.name})"
    return f"{split} (given as {plan.budget_spec!r})"


def render_text(report: PlanReport) -> str:
    """The report as the CLI prints it: breakdown, plan per unit, comparison, host, layout, verdict."""
    plan, sim, graph = report.plan, report.simulated, report.graph
    lines = [render_breakdown(graph, report.request)]
    lines.append(f"  {'peak, no saving':<19} {format_bytes(report.baselines['none'].predicted_peak_bytes):>12}   "
                 "simulated, at the step's fullest moment")
    lines += ["", "plan per unit", f"  {'unit':<28} {'mode':<10} {'saved':>11} {'on device':>11} {'to host':>11} "
              f"{'recompute':>9}"]
    for name, mode, saved, kept, swapped, recompute in _unit_rows(report):
        lines.append(f"  {name[-28:]:<28} {mode:<10} {format_bytes(saved):>11} {format_bytes(kept):>11} "
                     f"{format_bytes(swapped):>11} {recompute:>9.0%}")
    lines.append(_head_row(report))
    lines += ["", f"  {'':<30} {'peak':>11} {'step':>11} {'x no saving':>11} {'host':>11}"]
    base_step = report.baselines["none"].predicted_step_s
    for name, _, peak, step_s, host in _comparison(report):
        ratio = step_s / base_step if base_step > 0 else 1.0
        lines.append(f"  {name:<30} {format_bytes(peak):>11} {step_s * 1e3:>8.2f} ms {ratio:>11.3f} "
                     f"{format_bytes(host):>11}")
    lines.append("")
    lines.append(f"budget           {_budget_text(report)}")
    lines.append(f"host memory used {format_bytes(sim.host_peak_bytes)} of {format_bytes(graph.hardware.host_bytes)}")
    if plan.layout:
        lines.append(f"buffer layout    {format_bytes(plan.layout.get('arena_bytes', 0))} arena, lower bound "
                     f"{format_bytes(plan.layout.get('lower_bound_bytes', 0))}, gap {plan.layout.get('gap', 0.0):.2%}")
    lines.append(f"solver           {plan.solver} {plan.status}, gap {plan.gap:.2%}, {plan.solve_time_s:.2f} s")
    check = "ok" if report.verified else "MISMATCH"
    lines.append(f"simulator check  peak {format_bytes(sim.peak_bytes)} <= budget {format_bytes(plan.budget_bytes)}, "
                 f"step {sim.step_s * 1e3:.2f} ms: {check}")
    if graph.meta.get("note"):
        lines.append(f"note             {graph.meta['note']}")
    lines.append(_verdict(report))
    return "\n".join(lines)


# -- SVG plot -------------------------------------------------------------------------------------------
def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    if raw <= 0:
        return 1.0
    magnitude = 10 ** int(f"{raw:e}".split("e")[1])
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def memory_svg(timeline: list, step_s: float, *, budget_bytes: int | None = None, device_bytes: int | None = None,
               y_max_bytes: float | None = None, y_min_bytes: float = 0.0, x_max_s: float | None = None,
               title: str = "", width: int = 880, height: int = 340) -> str:
    """Memory over one step as an SVG: phases stacked by category, the budget drawn as a line.

    Args:
        timeline (list): ``SimResult.timeline``: ``(start_s, label, {category: bytes})`` per phase.
        step_s (float): end of the step, seconds (the last phase ends there).
        budget_bytes (int | None, default None): drawn as a dashed red line when given.
        device_bytes (int | None, default None): the GPU's memory, drawn as a dotted line when in range.
        y_max_bytes (float | None, default None): top of the y axis; from the data when None.
        y_min_bytes (float, default 0.0): bottom of the y axis, bytes. Above 0 (e.g. the model states) the plot
            zooms on what lies above it and a strip at the bottom stands for the bytes below, with their size.
        x_max_s (float | None, default None): end of the time axis, seconds; give plots of steps of different
            lengths the same one so their widths compare. ``step_s`` when None.
        title (str, default ""): caption above the plot.
        width (int, default 880): SVG width, pixels.
        height (int, default 340): SVG height, pixels.
    """
    from .planners.simulator import CATEGORIES

    left, right, top, bottom = 70, 150, 28, 40
    strip = 16 if y_min_bytes > 0 else 0  # the bytes below the axis, drawn as one band
    plot_w, plot_h = width - left - right, height - top - bottom - strip
    totals = [sum(cats.values()) for _, _, cats in timeline]
    peak = max(totals or [0])
    y_max = y_max_bytes or max(peak, budget_bytes or 0) * 1.08 or 1.0
    y_min = min(max(0.0, y_min_bytes), 0.9 * y_max)
    end_s = max(x_max_s or 0.0, step_s, timeline[-1][0] if timeline else 0.0) or 1.0
    gib = 1024**3

    def x(seconds: float) -> float:
        return left + plot_w * seconds / end_s

    def y(nbytes: float) -> float:
        return top + plot_h * (1.0 - (min(max(nbytes, y_min), y_max) - y_min) / (y_max - y_min))

    spans = []
    for i, (start, label, cats) in enumerate(timeline):
        stop = timeline[i + 1][0] if i + 1 < len(timeline) else step_s
        spans.append((start, max(stop, start), label, cats))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="memplot" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" data-peak-bytes="{peak}" data-y-min-bytes="{int(y_min)}" '
           f'data-y-max-bytes="{int(y_max)}" role="img" '
           f'aria-label="{html.escape(title or "memory over time")}">',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    if title:
        out.append(f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>')
    # Forward and backward halves, split where the head (logits and loss) runs.
    head = next((s for s in spans if s[2] == "head"), None)
    if head is not None:
        xh, xe = x(head[0]), x(step_s)
        out.append(f'<line x1="{xh:.1f}" y1="{top}" x2="{xh:.1f}" y2="{top + plot_h}" stroke="#999" '
                   'stroke-dasharray="2,3"/>')
        out.append(f'<text x="{(left + xh) / 2:.1f}" y="{top + 14}" font-size="11" text-anchor="middle" '
                   'fill="#555">forward</text>')
        out.append(f'<text x="{(xh + xe) / 2:.1f}" y="{top + 14}" font-size="11" text-anchor="middle" '
                   'fill="#555">backward</text>')
    lower = [0.0] * len(spans)
    for category in CATEGORIES:
        values = [float(s[3].get(category, 0)) for s in spans]
        if not any(values):
            continue
        upper = [lo + v for lo, v in zip(lower, values)]
        points = []
        for (start, stop, _, _), hi in zip(spans, upper):
            points += [(x(start), y(hi)), (x(stop), y(hi))]
        for (start, stop, _, _), lo in reversed(list(zip(spans, lower))):
            points += [(x(stop), y(lo)), (x(start), y(lo))]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        out.append(f'<polygon class="cat" data-category="{category}" points="{path}" '
                   f'fill="{CATEGORY_COLORS[category]}" stroke="none"><title>{category}: '
                   f'{html.escape(CATEGORY_NOTES[category])}</title></polygon>')
        lower = upper
    if strip:
        below = html.escape(f"{format_bytes(y_min)} below the axis (model states)")
        out.append(f'<rect class="below-axis" x="{left}" y="{top + plot_h}" width="{x(step_s) - left:.1f}" '
                   f'height="{strip}" fill="{CATEGORY_COLORS["model states"]}"><title>{below}</title></rect>')
        out.append(f'<text x="{left + 4}" y="{top + plot_h + strip - 4}" font-size="10" fill="#fff">{below}</text>')
    for (start, stop, label, _), total in zip(spans, totals):
        out.append(f'<rect x="{x(start):.1f}" y="{top}" width="{max(x(stop) - x(start), 0.5):.1f}" '
                   f'height="{plot_h}" fill="transparent"><title>{html.escape(label)}: '
                   f'{format_bytes(total)}</title></rect>')
    if x(step_s) < left + plot_w - 1:
        out.append(f'<line class="step-end" x1="{x(step_s):.1f}" y1="{top}" x2="{x(step_s):.1f}" '
                   f'y2="{top + plot_h + strip}" stroke="#333"/>')
        out.append(f'<text x="{x(step_s) + 4:.1f}" y="{top + plot_h - 6}" font-size="10" fill="#333">step ends'
                   '</text>')
    lines = [(value, color, dash, name) for value, color, dash, name in (
        (budget_bytes, _BUDGET_COLOR, "6,4", "budget"), (device_bytes, "#333", "1,3", "GPU memory"))
        if value and y_min < value <= y_max]
    # The budget defaults to the GPU's memory: one label for two lines that close, not two on top of each other.
    close = len(lines) == 2 and abs(y(lines[0][0]) - y(lines[1][0])) < 12
    for i, (value, color, dash, name) in enumerate(lines):
        out.append(f'<line class="{name.replace(" ", "-")}" x1="{left}" y1="{y(value):.1f}" x2="{left + plot_w}" '
                   f'y2="{y(value):.1f}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        if close and i == 1:
            continue
        label = (f"budget {format_bytes(value)}, GPU memory {format_bytes(lines[1][0])}" if close
                 else f"{name} {format_bytes(value)}")
        out.append(f'<text x="{left + plot_w - 4}" y="{y(value) - 4:.1f}" font-size="11" fill="{color}" '
                   f'text-anchor="end">{label}</text>')
    step = _nice_step((y_max - y_min) / gib)
    tick = math.ceil(y_min / gib / step - 1e-9) * step
    if y_min and tick * gib - y_min > 0.3 * step * gib:  # label the floor too when no tick falls near it
        out.append(f'<text x="{left - 6}" y="{y(y_min) + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{y_min / gib:.3g}</text>')
    while tick * gib <= y_max + 1e-9:
        out.append(f'<text x="{left - 6}" y="{y(tick * gib) + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{round(tick, 6):g}</text>')
        out.append(f'<line x1="{left - 3}" y1="{y(tick * gib):.1f}" x2="{left}" y2="{y(tick * gib):.1f}" '
                   'stroke="#333"/>')
        tick += step
    middle = top + plot_h / 2
    out.append(f'<text x="16" y="{middle:.0f}" font-size="11" transform="rotate(-90 16 {middle:.0f})" '
               'text-anchor="middle">GiB on device</text>')
    scale, unit = (1e3, "ms") if end_s < 10 else (1.0, "s")
    step_x = _nice_step(end_s * scale)
    tick = 0.0
    while tick <= end_s * scale + 1e-9:
        px = x(tick / scale)
        out.append(f'<text x="{px:.1f}" y="{top + plot_h + strip + 14}" font-size="10" text-anchor="middle">'
                   f'{round(tick, 9):g}</text>')
        tick += step_x
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'time in the step ({unit})</text>')
    for i, category in enumerate(CATEGORIES):
        ly = top + 30 + 16 * i
        out.append(f'<g class="legend"><title>{category}: {html.escape(CATEGORY_NOTES[category])}</title>'
                   f'<rect x="{left + plot_w + 6}" y="{ly}" width="10" height="10" '
                   f'fill="{CATEGORY_COLORS[category]}"/>'
                   f'<text x="{left + plot_w + 20}" y="{ly + 9}" font-size="10">{category}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


# -- HTML -----------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #222; max-width: 1000px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
.fits { color: #1a7f37; font-weight: bold; } .nofit { color: #d62728; font-weight: bold; }
.note { color: #666; font-size: 12px; }
dl.legend { font-size: 12px; display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; }
dl.legend dt { font-weight: bold; } dl.legend dd { margin: 0; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
#zoom:checked ~ .plots .full, #zoom:not(:checked) ~ .plots .zoomed { display: none; }
"""


def _table(header: list[str], rows: list[list[str]], text_columns: tuple[int, ...] = (0,)) -> str:
    head = "".join(f'<th class="text">{html.escape(h)}</th>' if i in text_columns else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = "".join(f'<td class="text">{html.escape(c)}</td>' if i in text_columns else f"<td>{html.escape(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _plots(report: PlanReport, sim, none_sim, y_max: float) -> str:
    """Both steps on one time scale (the longer fills the width), in two views: from 0 and zoomed on
    what lies above the model states; a checkbox (CSS only, no script) switches them. The zoomed view is
    the default where the states take more than half the axis, which would squeeze the plan into a sliver."""
    plan, graph = report.plan, report.graph
    resident = graph.resident_bytes
    x_max = max(sim.step_s, none_sim.step_s)
    views = []
    for view, y_min in (("full", 0.0), ("zoomed", float(resident))):
        svgs = [memory_svg(timeline, step_s, budget_bytes=plan.budget_bytes, device_bytes=graph.hardware.device_bytes,
                           y_max_bytes=y_max, y_min_bytes=y_min, x_max_s=x_max,
                           title=f"{name}: peak {format_bytes(peak)}, step {step_s * 1e3:.2f} ms")
                for name, timeline, step_s, peak in (("memopt plan", sim.timeline, sim.step_s, sim.peak_bytes),
                                                     ("no saving", none_sim.timeline, none_sim.step_s,
                                                      none_sim.peak_bytes))]
        views.append(f'<div class="view {view}">{"".join(svgs)}</div>')
    checked = " checked" if resident > y_max / 2 else ""
    legend = "".join(f'<dt><span class="swatch" style="background:{CATEGORY_COLORS[c]}"></span>{html.escape(c)}</dt>'
                     f"<dd>{html.escape(CATEGORY_NOTES[c])}</dd>" for c in CATEGORY_NOTES)
    return "\n".join([
        f'<input type="checkbox" id="zoom"{checked}> <label for="zoom">zoom on activations: the y axis starts at '
        f"the model states ({html.escape(format_bytes(resident))}) instead of 0</label>",
        f'<div class="plots">{"".join(views)}</div>',
        '<p class="note">Both plots share one time axis: a step that takes longer is wider. Hover an area or a '
        "legend entry for what it holds.</p>",
        f'<dl class="legend">{legend}</dl>',
    ])


def render_html(report: PlanReport) -> str:
    """The report as one self-contained HTML page: tables and two memory-over-time plots (plan, no saving)."""
    plan, sim, graph = report.plan, report.simulated, report.graph
    none = report.baselines["none"]
    from .planners import simulate

    none_sim = simulate(graph, none.decisions)
    y_max = max(sim.peak_bytes, none_sim.peak_bytes, plan.budget_bytes) * 1.08
    fits = sim.peak_bytes <= graph.hardware.device_bytes and report.verified
    breakdown = [[name, format_bytes(nbytes), how] for name, nbytes, how in report.breakdown()]
    breakdown.append(["peak, no saving", format_bytes(none.predicted_peak_bytes), "simulated"])
    base_step = none.predicted_step_s
    comparison = [[name, format_bytes(peak), f"{step_s * 1e3:.2f} ms",
                   f"{step_s / base_step if base_step > 0 else 1.0:.3f}", format_bytes(host)]
                  for name, _, peak, step_s, host in _comparison(report)]
    units = [[name, mode, format_bytes(saved), format_bytes(kept), format_bytes(swapped), f"{recompute:.0%}"]
             for name, mode, saved, kept, swapped, recompute in _unit_rows(report)]
    facts = [["budget", _budget_text(report)],
             ["host memory used", f"{format_bytes(sim.host_peak_bytes)} of {format_bytes(graph.hardware.host_bytes)}"],
             ["solver", f"{plan.solver} {plan.status}, gap {plan.gap:.2%}, {plan.solve_time_s:.2f} s"],
             ["simulator check", "ok" if report.verified else "MISMATCH"]]
    if plan.layout:
        facts.append(["buffer layout", f"{format_bytes(plan.layout.get('arena_bytes', 0))} arena, gap "
                                       f"{plan.layout.get('gap', 0.0):.2%} to the lower bound"])
    title = _title(graph, report.request)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>memopt plan: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>memopt plan: {html.escape(title)}</h1>",
        f"<p>GPU {html.escape(_hardware_line(graph))}</p>",
        f'<p class="{"fits" if fits else "nofit"}" id="verdict">{html.escape(_verdict(report))}</p>',
        "<h2>Memory over the step</h2>",
        _plots(report, sim, none_sim, y_max),
        "<h2>Memory breakdown (per GPU)</h2>",
        _table(["category", "bytes", "counted as"], breakdown, (0, 2)),
        "<h2>Plans compared</h2>",
        _table(["plan", "peak", "step", "x no saving", "host"], comparison),
        _table(["", ""], facts, (0, 1)),
        "<h2>Plan per unit</h2>",
        _table(["unit", "mode", "saved", "on device", "to host", "recompute"], units, (0, 1)),
    ]
    if graph.meta.get("note"):
        parts.append(f'<p class="note">{html.escape(graph.meta["note"])}</p>')
    parts.append('<p class="note">Figures are the simulator\'s replay of the plan on the graph; '
                 f'{html.escape(graph.meta.get("timing", "times as profiled"))}.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)
