"""The planner's view of a training step: torch-free dataclasses that round-trip through JSON.

``TrainingGraph`` is what the profiler measures (or the fake profiler models); ``Plan`` is what a
planner decides for it. Neither imports torch, so planners, the CLI and reports run anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .hardware import Hardware
from .units import format_bytes

__all__ = ["Decision", "Plan", "TrainingGraph", "Unit", "ZERO3_MAX_REUSE_DISTANCE", "param_groups", "shard_bytes",
           "zero3_gathered_bytes"]


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

    def __post_init__(self) -> None:
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
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError(f"unit names must be unique, got {names}")
        if self.sharding_degree < 1:
            raise ValueError(f"sharding_degree must be >= 1, got {self.sharding_degree!r}")
        for key in ("gathered_param_bytes", "shared_input_bytes"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")

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
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainingGraph:
        return cls.from_dict(json.loads(text))


@dataclass
class Decision:
    """What happens to one unit's saved activations.

    ``keep + swap + recompute == 1``. For a token-separable unit the fractions are of its token rows:
    rows ``[0, keep_rows)`` stay on the device, ``[keep_rows, keep_rows + swap_rows)`` go to host memory
    and the rest are recomputed from the unit's input rows (``rows`` in all, ``token_dims`` per saved
    tensor). A ``selective`` decision (``recompute == 1``) keeps the outputs of the unit's expensive ops and
    recomputes only the rest. Otherwise they are fractions of bytes:
    ``recompute`` is 0 or 1 (the whole unit is checkpointed) and the saved tensors whose pack-order
    indices are in ``swap_tensors`` go to host memory.
    """

    unit: str
    keep: float = 1.0
    swap: float = 0.0
    recompute: float = 0.0
    token_wise: bool = False
    keep_rows: int = 0
    swap_rows: int = 0
    rows: int = 0
    token_dims: list[int | None] = field(default_factory=list)
    swap_tensors: list[int] = field(default_factory=list)
    selective: bool = False

    def __post_init__(self) -> None:
        total = self.keep + self.swap + self.recompute
        if self.selective and (self.recompute < 1.0 - 1e-9 or self.token_wise):
            raise ValueError(f"decision for {self.unit!r}: a selective recompute has recompute=1 and no row split")
        if min(self.keep, self.swap, self.recompute) < -1e-9 or abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"decision for {self.unit!r}: keep, swap, recompute must be >= 0 and sum to 1, got "
                f"{self.keep!r}, {self.swap!r}, {self.recompute!r}"
            )

    @property
    def mode(self) -> str:
        """One word for tables: keep, swap, recompute, selective, token-wise or mixed."""
        if self.selective:
            return "selective"
        for name in ("keep", "swap", "recompute"):
            if getattr(self, name) >= 1.0 - 1e-9:
                return name
        return "token-wise" if self.token_wise else "mixed"


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
    """

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

    def decision(self, unit: str) -> Decision:
        for d in self.decisions:
            if d.unit == unit:
                return d
        raise KeyError(f"plan has no decision for unit {unit!r}")

    @property
    def overhead(self) -> float:
        """Predicted step time as a multiple of the nothing-saved step."""
        return self.predicted_step_s / self.baseline_step_s if self.baseline_step_s > 0 else 1.0

    def summary(self) -> str:
        """The table the CLI prints: one row per unit, then the totals.

        Budget and peaks include the model states (parameters, gradients, optimizer state and any ZeRO-3
        gathered parameters); where ``graph_meta["resident_bytes"]`` says how many bytes those are, each
        figure is split into them plus the activations.
        """
        rows = [f"{'unit':<32} {'mode':<10} {'keep':>6} {'swap':>6} {'recomp':>6}"]
        for d in self.decisions:
            rows.append(f"{d.unit[-32:]:<32} {d.mode:<10} {d.keep:>6.2f} {d.swap:>6.2f} {d.recompute:>6.2f}")
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
        rows.append(f"solver          {self.solver} {self.status}, gap {self.gap:.2%}, {self.solve_time_s:.2f} s")
        if self.layout:
            rows.append(f"buffer layout   {format_bytes(self.layout.get('arena_bytes', 0))},"
                        f" gap to lower bound {self.layout.get('gap', 0.0):.2%}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        data["decisions"] = [Decision(**d) for d in data["decisions"]]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def shard_bytes(nbytes: int, world_size: int) -> int:
    """One rank's share of ``nbytes`` sharded over ``world_size`` ranks (rounded up: the largest shard)."""
    return -(-nbytes // world_size)


def param_groups(unit_bytes: list[int], param_bytes: int) -> list[int]:
    """Parameter bytes gathered together: each unit's, and the rest of the model's outside every unit."""
    return [*unit_bytes, max(0, param_bytes - sum(unit_bytes))]


#: DeepSpeed's default ``stage3_max_reuse_distance``, in parameters.
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000


def zero3_gathered_bytes(group_bytes: list[int], param_bytes: int, world_size: int, n_params: int,
                         max_reuse_distance: int = ZERO3_MAX_REUSE_DISTANCE) -> int:
    """Parameter bytes ZeRO-3 holds gathered beyond a rank's shard, at most the rest of the model.

    DeepSpeed keeps a gathered parameter until its next use when that use comes within
    ``stage3_max_reuse_distance`` parameters; every parameter's next use (its backward) comes within the
    model's size, so a model no larger than that distance stays gathered whole. A larger one holds the
    parameters of the group at work and of the one prefetched next: the two largest groups.

    Args:
        group_bytes (list[int]): parameter bytes of each unit, and of the parameters outside every unit.
        param_bytes (int): the whole model's parameter bytes, unsharded.
        world_size (int): ranks the parameters are sharded over.
        n_params (int): the model's parameter count.
        max_reuse_distance (int, default DeepSpeed's 1e9): ``stage3_max_reuse_distance``.
    """
    rest = param_bytes - shard_bytes(param_bytes, world_size)
    if n_params <= max_reuse_distance:
        return rest
    largest = sorted(group_bytes, reverse=True)[:2]
    return min(rest, sum(largest))
