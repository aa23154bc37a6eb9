"""The planner's view of a training step: torch-free dataclasses that round-trip through JSON.

``TrainingGraph`` is what the profiler measures (or the fake profiler models); ``Plan`` is what a
planner decides for it. Neither imports torch, so planners, the CLI and reports run anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .decisions import Decision, Mode
from .hardware import Hardware
from .units import format_bytes

__all__ = ["Decision", "HeadOption", "HeadProfile", "Mode", "Plan", "TrainingGraph", "Unit"]


@dataclass
class Unit:
    """One planning unit: a module whose saved activations are kept, swapped or recomputed together.

    Args:
        name (str): module path in the model, e.g. ``"model.layers.3"``.
        forward_s (float): forward time of the unit, seconds.
        backward_s (float): backward time of the unit (not counting any recompute), seconds.
        input_bytes (int): bytes of the unit's tensor inputs; a recomputed unit holds these.
        output_bytes (int): bytes of the unit's tensor outputs.
        tensor_bytes (list[int]): bytes of each distinct storage the unit saves for backward, in the
            order autograd saves them (pack order). Parameters never appear here.
        token_dims (list[int | None]): per saved tensor, the dimension that indexes tokens, or None.
        tokens (int): rows along the flattened token axis (batch x sequence for a (B, T, ...) input); 0
            when the unit has none.
        token_separable (bool): output rows depend only on the same input rows (probed, or declared).
        forward_workspace_bytes (int): transient peak of a forward that saves its tensors, beyond
            those saved tensors, bytes (outputs, temporaries).
        backward_workspace_bytes (int): transient peak during backward (a recompute included) beyond
            the unit's saved tensors, bytes (activation gradients, temporaries).
        checkpoint_workspace_bytes (int): peak of a forward that saves nothing (whole-unit recompute),
            bytes; intermediates live only until consumed.
        param_grad_bytes (int): bytes of the gradients of the unit's own parameters.
        selective_bytes (int): bytes of the outputs of the unit's expensive ops (matmuls, attention,
            convolutions), which a selective recompute keeps; 0 when none was measured.
        selective_s (float): seconds of the unit's other (cheap) ops, which a selective recompute reruns.
        outside_bytes (list[int]): per saved tensor, the bytes of it counted in ``tensor_bytes`` that the
            step did not allocate (the batch, saved by a token-separable unit, whose rows a token-wise split
            copies): a decision that keeps, swaps or recomputes it whole frees and holds nothing for them.
            Empty means none.
        outside_input_bytes (int): the bytes of ``input_bytes`` the step did not allocate (as above).
    """

    name: str
    forward_s: float
    backward_s: float
    input_bytes: int
    output_bytes: int
    tensor_bytes: list[int]
    token_dims: list[int | None]
    tokens: int = 0
    token_separable: bool = False
    forward_workspace_bytes: int = 0
    backward_workspace_bytes: int = 0
    checkpoint_workspace_bytes: int = 0
    param_grad_bytes: int = 0
    selective_bytes: int = 0
    selective_s: float = 0.0
    outside_bytes: list[int] = field(default_factory=list)
    outside_input_bytes: int = 0

    def __post_init__(self) -> None:
        if self.outside_bytes and (len(self.outside_bytes) != len(self.tensor_bytes) or any(
                not 0 <= o <= b for o, b in zip(self.outside_bytes, self.tensor_bytes))):
            raise ValueError(f"unit {self.name!r}: outside_bytes {self.outside_bytes} must give, per saved tensor, "
                             f"at most its bytes {self.tensor_bytes}")
        if not 0 <= self.outside_input_bytes <= self.input_bytes:
            raise ValueError(f"unit {self.name!r}: outside_input_bytes must be in [0, input_bytes], got "
                             f"{self.outside_input_bytes!r}")
        if len(self.tensor_bytes) != len(self.token_dims):
            raise ValueError(
                f"unit {self.name!r}: tensor_bytes has {len(self.tensor_bytes)} entries but token_dims "
                f"{len(self.token_dims)}; give one token dim (or None) per saved tensor"
            )
        for key in ("forward_s", "backward_s", "input_bytes", "output_bytes", "tokens",
                    "forward_workspace_bytes", "backward_workspace_bytes", "checkpoint_workspace_bytes",
                    "param_grad_bytes", "selective_bytes", "selective_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"unit {self.name!r}: {key} must be >= 0, got {getattr(self, key)!r}")
        if self.token_separable and self.tokens <= 0:
            raise ValueError(f"unit {self.name!r} is token_separable but has tokens={self.tokens}; give its row count")

    @property
    def saved_bytes(self) -> int:
        """All bytes the unit saves for backward."""
        return sum(self.tensor_bytes)

    @property
    def step_saved_bytes(self) -> int:
        """Saved bytes the step itself allocated: what keeping them holds, what dropping them frees."""
        return self.saved_bytes - sum(self.outside_bytes)


@dataclass
class HeadOption:
    """One way to run the LM head and its loss, as measured.

    Args:
        chunks (int): chunks of token rows the loss is computed over (1: the model's own head, unchanged).
        chunk_rows (int): rows per chunk.
        workspace_bytes (int): peak bytes of the head and its loss, forward and backward, beyond their inputs.
        seconds (float): forward and backward seconds of the head and its loss.
    """

    chunks: int
    chunk_rows: int
    workspace_bytes: int
    seconds: float


@dataclass
class HeadProfile:
    """The LM head and its loss as a planning unit (``memopt.runtime.head``).

    Args:
        rows (int): token rows the head computes logits for.
        vocab (int): its output size.
        trained (bool): the head's weight (or bias) gets a gradient. Chunked, that gradient is a sum over
            chunks: equal to the unchunked one within float rounding, not bitwise.
        options (list[HeadOption]): the measured ways to run it; the first is 1 chunk.
        note (str): why it cannot be chunked, when ``options`` holds only the first.
    """

    rows: int
    vocab: int
    trained: bool
    options: list[HeadOption]
    note: str = ""

    def __post_init__(self) -> None:
        self.options = [o if isinstance(o, HeadOption) else HeadOption(**o) for o in self.options]
        if not self.options or self.options[0].chunks != 1:
            raise ValueError(f"a head profile's first option is the unchunked head (1 chunk), got {self.options!r}")

    def option(self, chunks: int) -> HeadOption:
        for o in self.options:
            if o.chunks == chunks:
                return o
        raise ValueError(f"the head was profiled with {[o.chunks for o in self.options]} chunks, not {chunks}; "
                         "make the plan for this graph")


@dataclass
class TrainingGraph:
    """One training step as the planner sees it.

    Args:
        units (list[Unit]): planning units in forward order.
        hardware (Hardware): the hardware measured on, or modelled for.
        param_bytes (int): parameter bytes on the device (after sharding).
        grad_bytes (int): gradient bytes (after sharding).
        optimizer_bytes (int): optimizer state bytes (after sharding).
        fixed_activation_bytes (int): bytes saved outside every unit (embeddings, final norm, loss);
            always kept.
        head_workspace_bytes (int): transient peak where forward turns into backward (logits, loss and
            their gradients), bytes.
        other_forward_s (float): forward time outside the units, seconds.
        other_backward_s (float): backward time outside the units, seconds.
        sharding_degree (int): ZeRO/FSDP degree the model states were divided by.
        gathered_param_bytes (int): parameter bytes gathered beyond this rank's shard while the step runs
            (ZeRO-3: see ``zero3_gathered_bytes``); held like the model states.
        shared_input_bytes (int): tensors the step makes and passes to several units (an attention mask,
            rotary tables): alive through the forward, and until the end of backward when a unit is
            recomputed (wholly or selectively), whose recompute needs them.
        shared_saved (bool): a unit saves a shared input for its backward (rotary tables, a mask): the shared
            inputs are held through backward whatever the plan, and count once there, not in each unit.
        head (HeadProfile | None): the LM head and its loss, when they were measured; its first option is
            part of ``head_workspace_bytes`` and ``other_*_s``, the others replace it there.
        grads_resident (bool): gradients are held the whole step (gradient accumulation, or
            ``zero_grad(set_to_none=False)``). False: ``zero_grad(set_to_none=True)`` freed them, and they
            appear during backward: the head's at the turn, each unit's in its backward, the rest after.
        head_grad_bytes (int): unsharded gradient bytes of trainable parameters outside every unit that the
            step uses after the last unit (final norm, LM head; a tied embedding is one of them).
        other_grad_bytes (int): unsharded gradient bytes of the other trainable parameters outside every unit
            (embeddings): they appear at the end of backward.
        optimizer_step_bytes (int): bytes the optimizer step allocates beyond the states (its temporaries).
        optimizer_step_s (float): seconds of the optimizer step.
        meta (dict): free-form facts (model name, batch shape, dtype, how it was profiled).
    """

    units: list[Unit]
    hardware: Hardware
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    fixed_activation_bytes: int = 0
    head_workspace_bytes: int = 0
    other_forward_s: float = 0.0
    other_backward_s: float = 0.0
    sharding_degree: int = 1
    gathered_param_bytes: int = 0
    shared_input_bytes: int = 0
    shared_saved: bool = False
    head: HeadProfile | None = None
    grads_resident: bool = True
    head_grad_bytes: int = 0
    other_grad_bytes: int = 0
    optimizer_step_bytes: int = 0
    optimizer_step_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError(f"unit names must be unique, got {names}")
        if self.sharding_degree < 1:
            raise ValueError(f"sharding_degree must be >= 1, got {self.sharding_degree!r}")
        for key in ("gathered_param_bytes", "shared_input_bytes", "head_grad_bytes", "other_grad_bytes",
                    "optimizer_step_bytes", "optimizer_step_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")

    def grad_bytes_at(self, phase: str, unit: int = 0) -> int:
        """Gradient bytes alive at the peak of a phase of the step: none in ``"forward"`` and ``"head"`` (the
        turn), those of the head and of the units after it in ``"backward"`` of unit ``unit``, all of them in
        ``"step"`` (the optimizer step). Resident gradients are there in every phase."""
        if self.grads_resident or phase == "step":
            return self.grad_bytes
        if phase in ("forward", "head"):
            return 0  # the head's gradients are made as its backward ends, after the turn's peak
        produced = self.head_grad_bytes
        if phase == "backward":
            # A unit's own gradients are made as its backward ends (its weights' gradients come last in each
            # op's backward, when most of its saved tensors are gone): they count from the next phase on.
            produced += sum(u.param_grad_bytes for u in self.units[unit + 1:])
        total = sum(u.param_grad_bytes for u in self.units) + self.head_grad_bytes + self.other_grad_bytes
        # Sharded gradients (ZeRO-2/3, FSDP) in the same proportion as the unsharded ones.
        return int(self.grad_bytes * min(1.0, produced / total)) if total else 0

    @property
    def states_without_grads_bytes(self) -> int:
        """Parameters, optimizer states and gathered ZeRO-3 parameters: held the whole step."""
        return self.param_bytes + self.optimizer_bytes + self.gathered_param_bytes

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def resident_bytes(self) -> int:
        """Device bytes held through the whole step whatever the plan: model states and gathered parameters."""
        return self.model_state_bytes + self.gathered_param_bytes

    @property
    def activation_bytes(self) -> int:
        """Every byte saved for backward when nothing is saved: units plus fixed."""
        return sum(u.saved_bytes for u in self.units) + self.fixed_activation_bytes

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"no unit named {name!r}; units are {[u.name for u in self.units]}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["hardware"] = self.hardware.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingGraph:
        data = dict(data)
        data["units"] = [Unit(**u) for u in data["units"]]
        data["hardware"] = Hardware.from_dict(data["hardware"])
        if isinstance(data.get("head"), dict):
            data["head"] = HeadProfile(**data["head"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainingGraph:
        return cls.from_dict(json.loads(text))


@dataclass
class Plan:
    """A planner's answer for one ``TrainingGraph`` and budget.

    Args:
        decisions (list[Decision]): one per unit, in forward order.
        budget_bytes (int): the whole-step device budget the plan was solved for, bytes.
        budget_spec (str | int | float): the budget as the user gave it.
        predicted_peak_bytes (int): simulated peak device bytes, model states included.
        predicted_step_s (float): simulated step seconds.
        baseline_step_s (float): simulated step seconds with nothing saved (all kept).
        baseline_peak_bytes (int): simulated peak with nothing saved.
        host_bytes (int): peak host bytes used by swapped activations.
        solver (str): which planner made it (``"mip"``, ``"none"``, ``"checkpoint-all"`` …).
        status (str): solver status (``"optimal"``, ``"time-limit"``, ``"heuristic"``).
        gap (float): relative MIP gap at termination (0 when proven optimal).
        solve_time_s (float): wall-clock seconds the solve took.
        layout (dict | None): buffer layout of the step, when planned.
        graph_meta (dict): the profiled graph's meta, so a plan names what it was made for.
        head_chunks (int, default 1): chunks of token rows the LM head's loss is computed over (1: the
            model's own head).
        head_chunk_rows (int, default 0): rows per chunk when ``head_chunks > 1``.
        world_size (int, default 1): ranks the plan was made for (``memopt.distributed``); applied at another
            world size it raises, since its model states and budget are one rank's share at this one.
        sharding (str, default "none"): how those ranks shard the model states, one of ``Plan.SHARDINGS``:
            ``"none"`` (each rank holds them whole: one process, DDP), ``"zero1"``, ``"zero2"``, ``"zero3"``
            (DeepSpeed ZeRO stages) or ``"fsdp"`` (``torch.distributed.fsdp.fully_shard``).
    """

    SHARDINGS: ClassVar[tuple[str, ...]] = ("none", "zero1", "zero2", "zero3", "fsdp")

    decisions: list[Decision]
    budget_bytes: int
    budget_spec: Any
    predicted_peak_bytes: int
    predicted_step_s: float
    baseline_step_s: float
    baseline_peak_bytes: int
    host_bytes: int = 0
    solver: str = "mip"
    status: str = "optimal"
    gap: float = 0.0
    solve_time_s: float = 0.0
    layout: dict | None = None
    graph_meta: dict[str, Any] = field(default_factory=dict)
    head_chunks: int = 1
    head_chunk_rows: int = 0
    world_size: int = 1
    sharding: str = "none"

    def decision(self, unit: str) -> Decision:
        for d in self.decisions:
            if d.unit == unit:
                return d
        raise KeyError(f"plan has no decision for unit {unit!r}")

    @property
    def overhead(self) -> float:
        """Predicted step time as a multiple of the nothing-saved step."""
        return self.predicted_step_s / self.baseline_step_s if self.baseline_step_s > 0 else 1.0

    def summary(self, graph: TrainingGraph | None = None) -> str:
        """One row per unit, then the totals.

        Budget and peaks include the model states (parameters, gradients, optimizer state and any ZeRO-3
        gathered parameters); where ``graph_meta["resident_bytes"]`` says how many bytes those are, each
        figure is split into them plus the activations.

        Args:
            graph (TrainingGraph | None): the step the plan was made for. Given, a unit's ``keep`` and ``swap``
                are the shares of its saved bytes left on the device and sent to the host and ``recomp`` the
                share of its forward run again, as ``memopt plan`` shows them (a selective recompute keeps its
                matmul and attention outputs and reruns the rest); else the decision's own fractions.
        """
        rows = [f"{'unit':<32} {'mode':<10} {'keep':>6} {'swap':>6} {'recomp':>6}"]
        amounts = None
        if graph is not None and [u.name for u in graph.units] == [d.unit for d in self.decisions]:
            from .planners.simulator import unit_amounts

            amounts = [unit_amounts(u, d) for u, d in zip(graph.units, self.decisions)]
        for i, d in enumerate(self.decisions):
            keep, swap, recompute = d.keep, d.swap, d.recompute
            if amounts is not None:
                saved = graph.units[i].saved_bytes or 1
                keep, swap = amounts[i].kept_bytes / saved, amounts[i].swapped_bytes / saved
                recompute = amounts[i].recompute
            rows.append(f"{d.unit[-32:]:<32} {d.label:<10} {keep:>6.2f} {swap:>6.2f} {recompute:>6.2f}")
        if self.head_chunks > 1:
            rows.append(f"{'lm head + loss':<32} {'chunked':<10} {self.head_chunks} chunks of {self.head_chunk_rows} rows")
        resident = self.graph_meta.get("resident_bytes")
        known = isinstance(resident, int) and not isinstance(resident, bool) and resident >= 0

        def split(total: int) -> str:
            if not known:
                return format_bytes(total)
            return (f"{format_bytes(total)} = {format_bytes(resident)} states + {format_bytes(total - resident)} "
                    "activations")

        rows.append("")
        if known:
            rows.append(f"model states    {format_bytes(resident)} on the device all step (parameters, gradients, "
                        "optimizer)")
        else:
            rows.append("model states    included in budget and peaks below (their size was not recorded)")
        rows.append(f"budget          {split(self.budget_bytes)} (given as {self.budget_spec!r})")
        rows.append(f"predicted peak  {split(self.predicted_peak_bytes)}")
        rows.append(f"nothing saved   {split(self.baseline_peak_bytes)}")
        rows.append(f"predicted step  {self.predicted_step_s * 1e3:.2f} ms = {self.overhead:.3f}x nothing saved")
        rows.append(f"host memory     {format_bytes(self.host_bytes)}")
        if self.world_size > 1 or self.sharding != "none":
            held = ("each holding the model states whole" if self.sharding == "none"
                    else f"model states sharded by {self.sharding}")
            rows.append(f"ranks           {self.world_size}, {held}; budget and peaks are one rank's")
        rows.append(f"solver          {self.solver} {self.status}, gap {self.gap:.2%}, {self.solve_time_s:.2f} s")
        if self.layout:
            rows.append(f"buffer layout   {format_bytes(self.layout.get('arena_bytes', 0))},"
                        f" gap to lower bound {self.layout.get('gap', 0.0):.2%}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["decisions"] = [d.to_dict() for d in self.decisions]
        return data

    def __post_init__(self) -> None:
        names = [d.unit for d in self.decisions]
        if not all(isinstance(d, Decision) for d in self.decisions) or len(set(names)) != len(names):
            raise ValueError(f"a plan has one Decision per unit, each unit once; got {names[:8]}")
        if isinstance(self.head_chunks, bool) or not isinstance(self.head_chunks, int) or self.head_chunks < 1:
            raise ValueError(f"plan head_chunks must be an int >= 1, got {self.head_chunks!r}")
        if self.head_chunks > 1 and (not isinstance(self.head_chunk_rows, int) or self.head_chunk_rows < 1):
            raise ValueError(f"a plan that chunks the head needs head_chunk_rows >= 1, got {self.head_chunk_rows!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"plan world_size must be an int >= 1 (ranks), got {self.world_size!r}")
        if self.sharding not in self.SHARDINGS:
            raise ValueError(f"plan sharding must be one of {self.SHARDINGS}, got {self.sharding!r}")
        for key in ("budget_bytes", "predicted_peak_bytes", "baseline_peak_bytes", "host_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"plan {key} must be an int >= 0 (bytes), got {value!r}")

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """A plan from JSON (``to_dict``); version 2 decisions (``token_wise``/``selective`` flags) load too.

        Raises:
            ValueError: a field is missing or unknown, or a decision is not one the runtime can carry out
                exactly as the simulator counts it (the message names the unit and field).
        """
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"plan has unknown fields {unknown}; it was written by another memopt version or edited")
        data["decisions"] = [d if isinstance(d, Decision) else Decision.from_dict(d) for d in data["decisions"]]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))
