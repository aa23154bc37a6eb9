"""``PlannerOptions``: the planner's switches, validated once, travelling whole from the config to the solver.

``MemoptConfig`` makes one (``MemoptConfig.planner_options``); ``solve`` and ``min_feasible_bytes`` take it as
is, or build one from keyword arguments (the same validation).
"""

from __future__ import annotations

from dataclasses import dataclass

from memopt.graph import HeadOption, TrainingGraph

from ._choices import UnitChoices

__all__ = ["PlannerOptions"]

_HEAD_MODES = ("auto", "chunked", "off")


@dataclass(frozen=True)
class PlannerOptions:
    """What the planner may do and how long it may search.

    Args:
        host_budget_bytes (int | None, default None): host bytes for swapped activations; None is the graph's
            ``hardware.host_bytes``.
        time_limit_s (float, default 10.0): solver time limit, seconds; the incumbent is used after it.
        mip_gap (float, default 0.005): relative gap at which the solver stops.
        row_multiple (int, default 64): token-wise cuts fall on multiples of this many rows.
        allow_swap (bool, default True): let plans swap to host memory (never offered where host memory is the
            device memory: ``Hardware.unified_memory``).
        allow_recompute (bool, default True): let plans recompute.
        lookahead (int, default 1): units whose swapped activations are prefetched ahead in backward.
        head (str, default "auto"): the LM head's loss over chunks of rows: ``"auto"`` where the budget needs it,
            ``"chunked"`` always (where the head was profiled for it), ``"off"`` never.
        exact (bool, default False): only plans whose gradients are bitwise those of the model without memopt:
            a trained head is not chunked (its weight's gradient becomes a sum over chunks).

    Raises:
        ValueError: a value out of range; the message names the field and a good value.
    """

    host_budget_bytes: int | None = None
    time_limit_s: float = 10.0
    mip_gap: float = 0.005
    row_multiple: int = 64
    allow_swap: bool = True
    allow_recompute: bool = True
    lookahead: int = 1
    head: str = "auto"
    exact: bool = False

    def __post_init__(self) -> None:
        host = self.host_budget_bytes
        if host is not None and (isinstance(host, bool) or not isinstance(host, int) or host < 0):
            raise ValueError(f"host_budget_bytes must be an int >= 0, got {host!r}; None uses the graph's "
                             "hardware.host_bytes")
        if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) \
                or not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, got {self.time_limit_s!r}; e.g. 10.0")
        if isinstance(self.mip_gap, bool) or not isinstance(self.mip_gap, (int, float)) or not 0 <= self.mip_gap < 1:
            raise ValueError(f"mip_gap must be in [0, 1), got {self.mip_gap!r}; e.g. 0.005")
        if isinstance(self.row_multiple, bool) or not isinstance(self.row_multiple, int) or self.row_multiple < 1:
            raise ValueError(f"row_multiple must be a positive int, got {self.row_multiple!r}; 64 is a good choice")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {self.lookahead!r}; 1 prefetches the next unit")
        if not (self.allow_swap or self.allow_recompute):
            raise ValueError("allow_swap and allow_recompute are both False; nothing could save memory")
        if self.head not in _HEAD_MODES:
            raise ValueError(f"head must be one of {', '.join(repr(m) for m in _HEAD_MODES)}, got {self.head!r}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True or False, got {self.exact!r}")

    def host_bytes(self, graph: TrainingGraph) -> int:
        """The host budget for ``graph``, bytes."""
        return graph.hardware.host_bytes if self.host_budget_bytes is None else self.host_budget_bytes

    def head_options(self, graph: TrainingGraph) -> list[HeadOption]:
        """The head options a plan may take: the unchunked head alone, or the chunked ones these switches allow."""
        head = graph.head
        if head is not None and self.head == "chunked" and self.exact and head.trained and len(head.options) > 1:
            raise ValueError("head='chunked' asks to chunk the LM head, and exact=True forbids it for a head that is "
                             "trained (its weight's gradient would be a sum over chunks, equal within float rounding, "
                             "not bitwise); drop one: MemoptConfig(head='auto', exact=True) keeps the head whole, "
                             "MemoptConfig(head='chunked') chunks it")
        if head is None or self.head == "off" or (self.exact and head.trained):
            return head.options[:1] if head is not None else []
        chunked = head.options[1:]
        return chunked if self.head == "chunked" and chunked else head.options

    def choices(self, graph: TrainingGraph) -> list[UnitChoices]:
        """Each unit's realisable decisions under these switches."""
        # Where host memory is the device memory (a CPU), a swap frees nothing and costs a copy: never offered.
        swap = self.allow_swap and not graph.hardware.unified_memory
        return [UnitChoices(u, self.row_multiple, swap, self.allow_recompute) for u in graph.units]
