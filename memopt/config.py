"""``MemoptConfig``: every option of memopt in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .units import parse_bytes

__all__ = ["MemoptConfig"]

_SHAPE_POLICIES = ("recompute", "error")


@dataclass
class MemoptConfig:
    """Options of ``memopt.optimize`` and friends.

    Args:
        loss_fn (Callable | None, default None): ``loss_fn(output, sample) -> scalar tensor`` when the
            model's output has no ``.loss``.
        units (list[str] | None, default None): module paths (``fnmatch`` patterns allowed, e.g.
            ``"model.layers.*"``) of the planning units. None picks every block of the model's largest
            list of repeated modules, or the children of a top-level ``nn.Sequential``.
        token_separable (dict[str, bool], default {}): declare units token-separable (True) or not
            (False) by pattern, instead of the probe.
        probe_separable (bool, default True): probe each unit for token separability while profiling.
        row_multiple (int, default 64): token-wise cuts fall on multiples of this many rows.
        time_limit_s (float, default 10.0): MIP time limit, seconds; the incumbent is used after it.
        mip_gap (float, default 0.005): relative MIP gap at which the solver stops.
        host_budget (int | str | None, default None): host bytes swapped activations may use; None
            means half the host's available memory.
        profile_repeats (int, default 3): timing-only profiled steps after the full one (which measures the
            bytes and warms up): each unit's time is the median over them, pooled over identical blocks
            (``memopt.timing``).
        profile_warmup (int, default 1): timing-only steps run before those and discarded (the first step
            without the meter runs other code paths than the full one).
        on_shape_change (str, default "recompute"): what a batch of another shape than the profiled
            one gets. ``"recompute"`` recomputes every unit whose plan depends on shapes (token-wise
            units) and warns once: always exact, may cost time. ``"error"`` raises.
        allow_swap (bool, default True): let the planner swap to host memory.
        allow_recompute (bool, default True): let the planner recompute.
        optimizer (str, default "adamw"): the optimizer whose states count in the model states when
            ``memopt.optimize`` is given no live optimizer (``memopt.precision.OPTIMIZERS``); with one, its
            states are read from it.
        precision (str | None, default None): the precision convention (``memopt.precision.PRECISIONS``); None
            counts the parameters as they are stored, with optimizer states in their dtype and no master copy.
            A mixed convention (``bf16-mixed``, ``fp16-mixed``) adds the optimizer's fp32 master copy and fp32
            states for 16-bit parameters.
        grad_accumulation (bool, default False): gradients are held across steps (gradient accumulation, or
            ``zero_grad(set_to_none=False)``): resident the whole step. False: they appear during backward.
        lookahead (int, default 1): units whose swapped activations are prefetched ahead in backward.
        head (str, default "auto"): the LM head and its loss computed over chunks of token rows, so that the
            logits of all tokens never exist at once: ``"auto"`` where the budget needs it (the planner
            decides), ``"chunked"`` always, ``"off"`` never (the head is then not profiled for it).
        exact (bool, default False): only plans whose gradients are bitwise those without memopt: a trained
            head is then never chunked (its weight's gradient would be a sum over chunks, equal within float
            rounding); with ``head="chunked"`` a plan for a trained head that could be chunked is refused
            (ValueError) rather than left unchunked.
    """

    loss_fn: Callable[[Any, Any], Any] | None = None
    units: list[str] | None = None
    token_separable: dict[str, bool] = field(default_factory=dict)
    probe_separable: bool = True
    row_multiple: int = 64
    time_limit_s: float = 10.0
    mip_gap: float = 0.005
    host_budget: int | str | None = None
    profile_repeats: int = 3
    profile_warmup: int = 1
    on_shape_change: str = "recompute"
    allow_swap: bool = True
    allow_recompute: bool = True
    optimizer: str = "adamw"
    precision: str | None = None
    grad_accumulation: bool = False
    lookahead: int = 1
    head: str = "auto"
    exact: bool = False

    def __post_init__(self) -> None:
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(output, sample), got {self.loss_fn!r}")
        if self.units is not None:
            if isinstance(self.units, str) or not all(isinstance(u, str) for u in self.units):
                raise ValueError(f"units must be a list of module paths, got {self.units!r}; e.g. ['model.layers.*']")
            if not self.units:
                raise ValueError("units is an empty list; pass None to pick the repeated blocks automatically")
        if self.host_budget is not None:
            self.host_budget = parse_bytes(self.host_budget, what="host_budget")
        if not isinstance(self.profile_repeats, int) or self.profile_repeats < 1:
            raise ValueError(f"profile_repeats must be an int >= 1, got {self.profile_repeats!r}")
        if not isinstance(self.profile_warmup, int) or self.profile_warmup < 0:
            raise ValueError(f"profile_warmup must be an int >= 0, got {self.profile_warmup!r}")
        if self.on_shape_change not in _SHAPE_POLICIES:
            raise ValueError(f"on_shape_change must be one of {_SHAPE_POLICIES}, got {self.on_shape_change!r}")
        from .precision import OPTIMIZERS, PRECISIONS

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}; pass the live "
                             "optimizer to memopt.optimize(..., optimizer=opt) to read its states")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None, got {self.precision!r}")
        if not isinstance(self.grad_accumulation, bool):
            raise ValueError(f"grad_accumulation must be True or False, got {self.grad_accumulation!r}")
        self.planner_options()  # the planner's switches are validated there, once

    def planner_options(self):
        """The planner's switches (``memopt.planners.PlannerOptions``) from this config.

        Raises:
            ValueError: a planner switch out of range (row_multiple, time_limit_s, mip_gap, lookahead, or
                allow_swap and allow_recompute both off).
        """
        from .planners.options import PlannerOptions

        return PlannerOptions(host_budget_bytes=self.host_budget, time_limit_s=self.time_limit_s, mip_gap=self.mip_gap,
                              row_multiple=self.row_multiple, allow_swap=self.allow_swap,
                              allow_recompute=self.allow_recompute, lookahead=self.lookahead, head=self.head,
                              exact=self.exact)
