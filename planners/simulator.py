"""Replay a plan on a ``TrainingGraph``: exact byte accounting and a three-stream timeline.

The simulator is the ground truth of the planner package. The MIP models exactly the memory and time
rules written here, baselines are compared through it, and every ``Plan`` carries its figures.

Memory. ``base`` (model states, and the parameters ZeRO-3 gathers) and ``fixed`` (activations saved
outside every unit) are held the whole step. For unit u with realised fractions (k, s, r) of its saved bytes ``S`` and input bytes ``I``:

- ``held = k*S + r*I`` stays on the device from the end of u's forward until u's backward ends;
- ``swapped = s*S`` is copied to host memory;
- ``eff = 0`` when ``r == 1`` (a whole-unit checkpoint frees its intermediates during forward), else ``S``;
- a selective recompute keeps only the outputs of the expensive ops (``held = selective bytes + I``), its
  forward holds those and the checkpoint workspace, and it recomputes the cheap ops (``selective_s``).

Where host memory is the device memory (``hardware.unified_memory``, a CPU), ``swapped`` bytes are held like
kept ones: the copy takes the memory the tensor freed.

Forward of u holds ``base + fixed + shared + sum(held[v<u]) + inflight + eff[u] + forward workspace`` (the
checkpoint workspace instead of ``eff + forward workspace`` for a whole-unit recompute), where
``inflight`` is the previous unit's swap still being copied (asynchronous copies only). The LM head and its
loss run at the turnaround (``other_*_s``, ``head workspace``): a plan that computes the loss over chunks of
rows replaces the unchunked head's measured bytes and seconds there by its option's (``head_change``). The turnaround
holds every ``held``, the last unit's swap (asynchronous) and the head workspace. Backward of u holds
``base + fixed + sum(held[v<u]) + S[u] + backward workspace + prefetch`` (plus the largest saved tensor
while a token-wise split rebuilds its tensors from rows, and, when u is recomputed in part or whole, what
its forward's transients take beyond the backward workspace while it is replayed: ``replay_bytes``), where ``prefetch`` is the swap
of the ``lookahead`` units before u being copied back. ``shared`` (tensors passed to several units, such
as an attention mask) is held through the forward, and through the turnaround and backward too when a
unit is recomputed wholly or selectively (conservatively, to the end: its recompute holds them).

Model states. Parameters, optimizer states and gathered ZeRO-3 parameters are held the whole step; gradients
too when ``grads_resident`` (gradient accumulation), else they appear as backward makes them
(``TrainingGraph.grad_bytes_at``): none in the forward and at the turn, the head's and each unit's from the
backward after theirs on (each is made as its backward ends, past the peak of that phase). A graph that models it ends with the optimizer step: every gradient, the states and the step's
temporaries (``optimizer_step_bytes``), no activations, for ``optimizer_step_s``.

Time. With asynchronous copies there are three streams. Compute runs the forwards, the head
(``other_forward_s + other_backward_s``), then the backwards from the last unit down, each taking
``r*forward_s + backward_s``. The D2H copy of u starts when u's forward ends and must be done by the end
of the next unit's forward (by the head for the last unit), or compute waits. The H2D copy of u starts
when the backward of unit ``u + lookahead`` starts (when backward starts, for the last units), after its
own D2H and the previous H2D; u's backward waits for it. Without asynchronous copies (CPU) each copy is
a synchronous memcpy on the compute stream and nothing is in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from memopt.graph import Decision, Mode, TrainingGraph, Unit

__all__ = ["CATEGORIES", "SimResult", "UnitAmounts", "assembly_bytes", "head_change", "models_optimizer_step",
           "replay_bytes", "simulate", "simulate_amounts", "unit_amounts"]

#: Memory categories of a timeline point, in stacking order for a plot.
CATEGORIES = ("model states", "fixed", "kept", "recompute input", "swap in flight", "unit working set", "workspace")

_FULL = 1.0 - 1e-9


@dataclass(frozen=True)
class UnitAmounts:
    """What a realised decision means in bytes and seconds for one unit.

    Args:
        kept_bytes (float): saved bytes left on the device, bytes.
        swapped_bytes (float): saved bytes copied to host memory, bytes.
        recompute (float): fraction of the unit recomputed in backward, in [0, 1].
        row_assembly (bool, default False): a token-wise split whose saved tensors are put back together
            from kept, swapped and recomputed rows in backward (one tensor's parts and whole coexist).
        selective (bool, default False): selective recompute: ``kept_bytes`` are the outputs of the unit's
            expensive ops (matmuls, attention, convolutions), its inputs are held too, and ``recompute``
            is the share of its forward time the cheap ops take.
        held_input_bytes (float, default 0.0): bytes of the unit's inputs held for its recompute.
        forward_bytes (float, default 0.0): saved bytes the unit's forward holds when it ends (its working
            set beside the workspace).
        backward_bytes (float, default 0.0): saved bytes alive while the unit's backward runs.
    """

    kept_bytes: float
    swapped_bytes: float
    recompute: float
    row_assembly: bool = False
    selective: bool = False
    held_input_bytes: float = 0.0
    forward_bytes: float = 0.0
    backward_bytes: float = 0.0

    @property
    def full_recompute(self) -> bool:
        return self.recompute >= _FULL

    @property
    def drops_forward(self) -> bool:
        """The forward saves nothing (whole or selective recompute): its intermediates go as they are used."""
        return self.selective or self.full_recompute



@dataclass
class SimResult:
    """What the simulator found for one plan.

    Args:
        peak_bytes (int): peak device bytes over the step, model states included.
        step_s (float): end of the last backward, seconds.
        host_peak_bytes (int): host bytes holding swapped activations, bytes.
        recompute_s (float): compute seconds spent recomputing, seconds.
        stall_s (float): compute seconds spent waiting for (or doing, without async copies) copies, seconds.
        peak_phase (str): label of the first phase at the peak, e.g. ``"backward layers.3"``.
        timeline (list[tuple[float, str, dict[str, int]]]): one point per phase: start time (seconds),
            phase label and bytes by category (``CATEGORIES``); the categories sum to that phase's bytes.
    """

    peak_bytes: int
    step_s: float
    host_peak_bytes: int
    recompute_s: float
    stall_s: float
    peak_phase: str
    timeline: list[tuple[float, str, dict[str, int]]] = field(default_factory=list)


def unit_amounts(unit: Unit, decision: Decision) -> UnitAmounts:
    """Bytes kept and swapped and the recomputed fraction that a decision means for its unit.

    Read through ``Decision.effective``, as the runtime reads it: token-wise decisions count rows, swap
    decisions the bytes of the saved tensors they name.

    Args:
        unit (Unit): the unit.
        decision (Decision): its decision (normally from ``realize``).

    Raises:
        ValueError: the decision names another unit, a saved tensor the unit does not have, another row
            count than the unit's, or a selective recompute of a unit profiled without one.
    """
    if decision.unit != unit.name:
        raise ValueError(f"decision for {decision.unit!r} given for unit {unit.name!r}; pass decisions in unit order")
    saved = float(unit.saved_bytes)
    # Storages the step did not allocate (the batch) are held and freed by no decision, but a row split copies
    # their rows like any other's.
    own = float(unit.step_saved_bytes)
    own_input = float(unit.input_bytes - unit.outside_input_bytes)
    mode = decision.effective
    if decision.mode is Mode.TOKEN_WISE and (not unit.token_separable or decision.rows != unit.tokens):
        raise ValueError(
            f"decision for {unit.name!r} splits {decision.rows} token rows but the unit "
            f"{'has ' + str(unit.tokens) if unit.token_separable else 'is not token-separable'}; realise it with "
            "planners.realize")
    if mode is Mode.KEEP:
        return UnitAmounts(own, 0.0, 0.0, forward_bytes=own, backward_bytes=own)
    if mode is Mode.RECOMPUTE:
        return UnitAmounts(0.0, 0.0, 1.0, held_input_bytes=own_input, backward_bytes=own)
    if mode is Mode.TOKEN_WISE:
        keep = decision.keep_rows / unit.tokens
        swap = decision.swap_rows / unit.tokens
        recompute_rows = unit.tokens - decision.keep_rows - decision.swap_rows
        split = sum(rows > 0 for rows in (decision.keep_rows, decision.swap_rows, recompute_rows)) >= 2
        rest = max(0.0, 1.0 - keep - swap)
        # Backward rebuilds every tensor from its rows: all new storages.
        return UnitAmounts(keep * saved, swap * saved, rest, row_assembly=split, held_input_bytes=rest * unit.input_bytes,
                           forward_bytes=own, backward_bytes=saved)
    if mode is Mode.SELECTIVE:
        if not unit.selective_bytes:
            raise ValueError(f"decision for {unit.name!r} is a selective recompute, but the unit was profiled "
                             "without one (selective_bytes is 0)")
        share = min(1.0, unit.selective_s / unit.forward_s) if unit.forward_s > 0 else 0.0
        kept = float(unit.selective_bytes)
        return UnitAmounts(kept, 0.0, share, selective=True, held_input_bytes=own_input, forward_bytes=kept,
                           backward_bytes=own)
    bad = [i for i in decision.swap_tensors if not 0 <= i < len(unit.tensor_bytes)]
    if bad:
        raise ValueError(f"decision for {unit.name!r} swaps tensors {bad}, but the unit saves "
                         f"{len(unit.tensor_bytes)}; indices are pack-order positions")
    outside = unit.outside_bytes or [0] * len(unit.tensor_bytes)
    copied = float(sum(unit.tensor_bytes[i] for i in decision.swap_tensors))
    freed = copied - sum(outside[i] for i in decision.swap_tensors)
    # A swapped storage comes back as a new one, the batch's too.
    return UnitAmounts(own - freed, copied, 0.0, forward_bytes=own, backward_bytes=own + copied - freed)


def replay_bytes(unit: Unit) -> int:
    """Backward bytes beyond the backward workspace while a unit is recomputed (its forward's transients
    beside the saved tensors being rebuilt), for a unit whose backward replays it."""
    return max(0, unit.forward_workspace_bytes - unit.backward_workspace_bytes)


def assembly_bytes(unit: Unit) -> int:
    """Backward bytes beyond the saved set while a token-wise unit rebuilds its largest tensor from rows."""
    return max(unit.tensor_bytes, default=0)


def simulate(graph: TrainingGraph, decisions: Sequence[Decision], *, lookahead: int = 1,
             head_chunks: int = 1) -> SimResult:
    """Replay decisions on a graph and return its peak memory, step time and memory timeline.

    Args:
        graph (TrainingGraph): the step.
        decisions (Sequence[Decision]): one per unit, in the graph's unit order.
        lookahead (int, default 1): how many units ahead backward prefetches swapped activations.
        head_chunks (int, default 1): chunks the LM head's loss is computed over (``graph.head``'s options).

    Returns:
        SimResult: peak bytes, step seconds, host bytes, recompute and stall seconds, timeline.

    Raises:
        ValueError: the decisions do not match the units one to one, or lookahead < 1.

    Example:
        >>> from memopt.planners.synthetic import random_graph
        >>> from memopt.graph import Decision
        >>> g = random_graph(4, seed=0)
        >>> keep_all = simulate(g, [Decision(u.name) for u in g.units])
        >>> keep_all.stall_s
        0.0
    """
    if len(decisions) != len(graph.units):
        raise ValueError(f"got {len(decisions)} decisions for {len(graph.units)} units; give one per unit in order")
    amounts = [unit_amounts(u, d) for u, d in zip(graph.units, decisions)]
    return simulate_amounts(graph, amounts, lookahead=lookahead, head_chunks=head_chunks)


def head_change(graph: TrainingGraph, head_chunks: int) -> tuple[int, float]:
    """Bytes and seconds the head's ``head_chunks`` option adds to (or takes from) the unchunked head's.

    Raises:
        ValueError: the graph's head was not profiled with that many chunks.
    """
    if head_chunks == 1:
        return 0, 0.0
    if graph.head is None:
        raise ValueError(f"a plan computes the head's loss over {head_chunks} chunks, but the graph's head was not "
                         "profiled; make the plan for this graph")
    base, option = graph.head.options[0], graph.head.option(head_chunks)
    return option.workspace_bytes - base.workspace_bytes, option.seconds - base.seconds


def simulate_amounts(graph: TrainingGraph, amounts: Sequence[UnitAmounts], *, lookahead: int = 1,
                     timeline: bool = True, head_chunks: int = 1) -> SimResult:
    """``simulate`` on per-unit byte amounts: the fast path planners use to try many decisions.

    Args:
        graph (TrainingGraph): the step.
        amounts (Sequence[UnitAmounts]): one per unit, in order.
        lookahead (int, default 1): prefetch distance in units.
        timeline (bool, default True): build the per-phase timeline (skip it when only figures matter).
        head_chunks (int, default 1): chunks the LM head's loss is computed over.
    """
    if not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}; 1 prefetches the next unit")
    head_bytes, head_s = head_change(graph, head_chunks)
    points = _memory(graph, amounts, lookahead, head_bytes)
    peak, peak_phase = -1.0, ""
    for label, cats in points:
        total = sum(cats.values())
        if total > peak + 1e-6:
            peak, peak_phase = total, label
    schedule = _schedule(graph, amounts, lookahead, head_s)
    points_out = []
    if timeline:
        for start, (label, cats) in zip(schedule.starts, points):
            points_out.append((start, label, {c: int(round(cats[c])) for c in CATEGORIES}))
    return SimResult(
        peak_bytes=int(math.ceil(peak - 1e-6)),
        step_s=schedule.step_s,
        host_peak_bytes=int(math.ceil(sum(a.swapped_bytes for a in amounts) - 1e-6)),
        recompute_s=sum(a.recompute * u.forward_s for u, a in zip(graph.units, amounts)),
        stall_s=schedule.stall_s,
        peak_phase=peak_phase,
        timeline=points_out,
    )


def _memory(graph: TrainingGraph, amounts: Sequence[UnitAmounts], lookahead: int,
            head_bytes: int = 0) -> list[tuple[str, dict[str, float]]]:
    """The memory pass: one point per phase (each unit's forward, the head, each unit's backward), its bytes
    split by category (``CATEGORIES``) so that a plot can stack them."""
    units = graph.units
    n = len(units)
    is_async = graph.hardware.async_copies
    unified = graph.hardware.unified_memory  # a swapped copy takes the same memory: held like a kept tensor
    # Tensors passed to several units live through the forward, and on while a recompute needs them.
    shared = float(graph.shared_input_bytes)
    shared_after = shared if graph.shared_saved or any(a.drops_forward for a in amounts) else 0.0
    swapped = [a.swapped_bytes for a in amounts]
    points: list[tuple[str, dict[str, float]]] = []
    kept_sum = 0.0  # kept bytes of units before u
    input_sum = 0.0  # recompute-input bytes of units before u
    for u, (unit, a) in enumerate(zip(units, amounts)):
        points.append((f"forward {unit.name}", {
            "kept": kept_sum, "recompute input": input_sum + shared,
            "swap in flight": swapped[u - 1] if is_async and u > 0 else 0.0,
            "unit working set": a.forward_bytes,
            "workspace": float(unit.checkpoint_workspace_bytes if a.drops_forward else unit.forward_workspace_bytes),
        }))
        kept_sum += a.kept_bytes + (a.swapped_bytes if unified else 0.0)
        input_sum += a.held_input_bytes
    points.append(("head", {
        "kept": kept_sum, "recompute input": input_sum + shared_after,
        "swap in flight": swapped[n - 1] if is_async and n else 0.0,
        "unit working set": 0.0, "workspace": float(max(0, graph.head_workspace_bytes + head_bytes)),
    }))
    for u in range(n - 1, -1, -1):
        unit, a = units[u], amounts[u]
        kept_sum -= a.kept_bytes + (a.swapped_bytes if unified else 0.0)
        input_sum -= a.held_input_bytes
        prefetch = sum(swapped[max(0, u - lookahead):u]) if is_async else 0.0
        points.append((f"backward {unit.name}", {
            "kept": kept_sum, "recompute input": input_sum + shared_after, "swap in flight": prefetch,
            "unit working set": a.backward_bytes,
            "workspace": float(unit.backward_workspace_bytes) + (assembly_bytes(unit) if a.row_assembly else 0.0)
            + (replay_bytes(unit) if a.recompute > 0 else 0.0),
        }))
    held = float(graph.states_without_grads_bytes)
    grads = ([graph.grad_bytes_at("forward")] * n + [graph.grad_bytes_at("head")]
             + [graph.grad_bytes_at("backward", u) for u in range(n - 1, -1, -1)])
    for (_, cats), grad in zip(points, grads):
        cats["model states"] = held + grad
        cats["fixed"] = float(graph.fixed_activation_bytes)
    if models_optimizer_step(graph):
        # Activations are gone; every gradient, the states and the step's own temporaries are here.
        points.append(("optimizer step", {
            "model states": held + graph.grad_bytes_at("step"), "fixed": 0.0, "kept": 0.0, "recompute input": 0.0,
            "swap in flight": 0.0, "unit working set": 0.0, "workspace": float(graph.optimizer_step_bytes),
        }))
    return points


def models_optimizer_step(graph: TrainingGraph) -> bool:
    """Whether the graph says what the optimizer step holds and takes (profiles made since it does)."""
    return not graph.grads_resident or graph.optimizer_step_bytes > 0 or graph.optimizer_step_s > 0


@dataclass(frozen=True)
class _Schedule:
    starts: list[float]  # start of each phase, in the memory pass's order
    step_s: float
    stall_s: float


def _schedule(graph: TrainingGraph, amounts: Sequence[UnitAmounts], lookahead: int, head_change_s: float = 0.0) -> _Schedule:
    """The time pass: compute, D2H and H2D streams (asynchronous copies), or copies on the compute stream."""
    units = graph.units
    n = len(units)
    hw = graph.hardware
    d2h_s = [a.swapped_bytes / hw.d2h_bytes_per_s for a in amounts]
    h2d_s = [a.swapped_bytes / hw.h2d_bytes_per_s for a in amounts]
    head_s = max(0.0, graph.other_forward_s + graph.other_backward_s + head_change_s)
    starts: list[float] = []
    if not hw.async_copies:
        clock = 0.0
        for u, unit in enumerate(units):
            starts.append(clock)
            clock += unit.forward_s + d2h_s[u]
        starts.append(clock)
        clock += head_s
        for u in range(n - 1, -1, -1):
            starts.append(clock)
            clock += h2d_s[u] + amounts[u].recompute * units[u].forward_s + units[u].backward_s
        if models_optimizer_step(graph):
            starts.append(clock)
            clock += graph.optimizer_step_s
        return _Schedule(starts, clock, sum(d2h_s) + sum(h2d_s))
    stall = 0.0
    d2h_end = [0.0] * n
    clock = 0.0
    for u, unit in enumerate(units):
        starts.append(clock)
        compute_end = clock + unit.forward_s
        end = max(compute_end, d2h_end[u - 1]) if u else compute_end
        stall += end - compute_end
        d2h_end[u] = max(end, d2h_end[u - 1] if u else 0.0) + d2h_s[u]
        clock = end
    head_start = max(clock, d2h_end[n - 1]) if n else clock
    stall += head_start - clock
    starts.append(head_start)
    backward_start_s = head_start + head_s
    block_start = [0.0] * n
    h2d_end_prev = 0.0
    clock = backward_start_s
    for u in range(n - 1, -1, -1):
        gate = block_start[u + lookahead] if u + lookahead < n else backward_start_s
        h2d_end_prev = max(gate, d2h_end[u], h2d_end_prev) + h2d_s[u]
        start = max(clock, h2d_end_prev)
        stall += start - clock
        block_start[u] = start
        starts.append(start)
        clock = start + amounts[u].recompute * units[u].forward_s + units[u].backward_s
    if models_optimizer_step(graph):
        starts.append(clock)
        clock += graph.optimizer_step_s
    return _Schedule(starts, clock, stall)
