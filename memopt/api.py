"""The one-call API: ``optimize`` = ``profile`` + ``plan`` + ``apply``, and the ``Handle`` it returns."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from .blocks import units_for_plan
from .config import MemoptConfig
from .graph import Decision, Mode, Plan, TrainingGraph
from .hardware import Hardware
from .runtime.engine import UnitPolicy
from .runtime.head import HeadChunking
from .step_clock import StepClock
from .runtime.hooks import Runtime
from .units import format_bytes, parse_budget

__all__ = ["Handle", "apply", "optimize", "plan", "profile", "resolve_budget"]


def profile(model: nn.Module, sample: Any, config: MemoptConfig | None = None,
            hardware: Hardware | None = None, optimizer=None) -> TrainingGraph:
    """Profile training steps of ``model`` on ``sample`` (see ``memopt.profiler.profile_model``): one full
    step measures the bytes (and warms up), ``config.profile_warmup`` more are discarded, then
    ``config.profile_repeats`` timing-only steps give the times, combined by ``memopt.timing.robust_times``
    (medians, identical blocks pooled, a busy machine flagged).

    On CUDA the profile reads the allocator's peak per window, so it resets ``torch.cuda.max_memory_allocated``
    (``reset_peak_memory_stats``): read your own peaks before ``profile``, ``optimize`` or ``handle.replan``.

    Example:
        >>> import torch, memopt
        >>> from memopt.testing import TinyMLP
        >>> graph = memopt.profile(TinyMLP(), torch.randn(2, 128, 64), hardware=memopt.Hardware.preset("cpu"))
        >>> len(graph.units), graph.meta["profiled_steps"]
        (4, 3)
    """
    from .profiler import profile_model
    from .timing import robust_times

    config = config or MemoptConfig()
    full = profile_model(model, sample, config, hardware, optimizer=optimizer)
    for _ in range(config.profile_warmup):
        profile_model(model, sample, config, full.hardware, timing_only=True)
    timed = [profile_model(model, sample, config, full.hardware, timing_only=True)
             for _ in range(config.profile_repeats)]
    return robust_times(full, timed)


def resolve_budget(graph: TrainingGraph, budget: int | str | float) -> int:
    """Whole-step device bytes for a budget: bytes as given, or a fraction of the activation peak (see
    ``memopt.units.parse_budget`` for the forms accepted).

    The activation peak is the simulated peak with nothing saved, less the model states.
    """
    budget = parse_budget(budget)
    if isinstance(budget, float):
        from .planners import baseline_plan

        peak = baseline_plan(graph, "none").predicted_peak_bytes
        base = graph.resident_bytes
        return int(base + budget * (peak - base))
    return budget


def plan(graph: TrainingGraph, budget: int | str | float, config: MemoptConfig | None = None) -> Plan:
    """Solve the MIP for ``graph`` under ``budget``.

    Args:
        graph (TrainingGraph): the profiled (or modelled) step.
        budget (int | str | float): whole-step device bytes (``"12GiB"`` or an int), or a float in (0, 1]:
            that fraction of the activation peak.
        config (MemoptConfig | None): solver options.

    Raises:
        memopt.BudgetError: no plan fits; the message names the smallest budget that does.
    """
    config = config or MemoptConfig()
    from .planners import solve

    budget_bytes = resolve_budget(graph, budget)
    return solve(graph, budget_bytes, config.planner_options(), budget_spec=budget)


def policy_for(decision: Decision) -> UnitPolicy:
    """The runtime policy that carries out one decision, read through ``Decision.effective`` as the simulator
    reads it."""
    mode = decision.effective
    if mode is Mode.TOKEN_WISE:
        return UnitPolicy(mode, keep_rows=decision.keep_rows, swap_rows=decision.swap_rows, rows=decision.rows,
                          token_dims=tuple(decision.token_dims))
    if mode is Mode.SWAP:
        return UnitPolicy(mode, swap_tensors=frozenset(decision.swap_tensors))
    return UnitPolicy(mode)


class Handle:
    """A model with a plan applied. ``remove()`` restores it exactly."""

    def __init__(self, model: nn.Module, plan: Plan, config: MemoptConfig, graph: TrainingGraph | None,
                 announce: bool = True, optimizer=None, *, sharding: str | None = None, replanner=None) -> None:
        from .distributed import check_plan_fits

        # A plan's budget and model states are one rank's share at the world size and sharding it was made for.
        self.sharding = check_plan_fits(plan, model, sharding)
        # How replan() profiles and plans this model again (memopt.distributed.optimize, with an integration's
        # profiling and model-state sharding); None: memopt.optimize.
        self._replanner = replanner
        self.model, self.plan, self.config, self.graph = model, plan, config, graph
        self.optimizer = optimizer
        self._clock = StepClock(model, optimizer, plan.predicted_step_s)
        units = units_for_plan(model, [d.unit for d in plan.decisions])
        host_bytes = int(plan.host_bytes * 1.1) + (1 << 20) if plan.host_bytes else 0
        self._runtime = Runtime(model, units, [policy_for(d) for d in plan.decisions],
                                host_capacity_bytes=host_bytes, lookahead=config.lookahead,
                                on_shape_change=config.on_shape_change, announce=announce)
        self._head = HeadChunking(model, plan.head_chunk_rows) if plan.head_chunks > 1 else None
        self._runtime.install()
        if self._head is not None:
            self._head.install()
        self._applied_at = time.perf_counter()
        model._memopt_handle = self

    @property
    def active(self) -> bool:
        return self._runtime is not None

    def stats(self) -> dict:
        """Measured since the plan was applied: unit calls, recomputes and their seconds, host bytes."""
        if self._runtime is None:
            raise RuntimeError("memopt: this handle was removed; its stats are gone with it")
        out = {**self._runtime.stats(), "applied_s": time.perf_counter() - self._applied_at, **self._clock.stats()}
        if self._head is not None:
            out.update(head_chunked_calls=self._head.calls, head_notes=list(dict.fromkeys(self._head.notes)))
        return out

    def exactness(self) -> str:
        """Which gradients equal the model's without memopt bit for bit, and which within float rounding."""
        if self.plan.head_chunks > 1 and _head_trained(self.model):
            return (f"every gradient bitwise as without memopt, except the LM head's weight (and bias): a sum over "
                    f"{self.plan.head_chunks} chunks of rows, equal within float rounding (MemoptConfig(exact=True) "
                    "forbids it)")
        return "every gradient bitwise as without memopt"

    def report(self) -> str:
        """The plan's table, followed by what was measured since it was applied."""
        lines = [self.plan.summary(self.graph)]
        if self._runtime is not None:
            stats = self._runtime.stats()
            lines.append(f"measured        {stats['unit_forward_calls']} planned unit calls, "
                         f"{stats['recomputes']} recomputes ({stats['recompute_s']:.3f} s)")
            if "host_peak_bytes" in stats:
                lines.append(f"host arena      peak {format_bytes(stats['host_peak_bytes'])}")
            if self._head is not None:
                lines.append(f"lm head         {self._head.calls} calls over chunks of {self.plan.head_chunk_rows} rows"
                             + "".join(f"; {note}" for note in dict.fromkeys(self._head.notes)))
            lines.append(f"exactness       {self.exactness()}")
        return "\n".join(lines)

    def replan(self, sample: Any, budget: int | str | float | None = None) -> Plan:
        """Profile again on ``sample`` (e.g. a batch of a new shape) and apply the new plan.

        Raises:
            memopt.BudgetError: no plan fits; the current plan stays applied, as does any other error.
        """
        budget = self.plan.budget_spec if budget is None else budget
        parse_budget(budget)
        model, config = self.model, self.config
        old_plan, old_graph = self.plan, self.graph
        self.remove()
        try:
            if self._replanner is not None:
                handle = self._replanner(model, sample, budget, config, optimizer=self.optimizer)
            else:
                handle = optimize(model, sample, budget, config, optimizer=self.optimizer)
        except BaseException:
            # Profiling needs the model bare; put the plan that ran before back exactly as it was applied.
            handle = Handle(model, old_plan, config, old_graph, announce=False, optimizer=self.optimizer,
                            sharding=self.sharding, replanner=self._replanner)
            self.__dict__.update(handle.__dict__)
            model._memopt_handle = self
            raise
        self.__dict__.update(handle.__dict__)
        model._memopt_handle = self
        return self.plan

    def remove(self) -> None:
        """Take every hook off the model; it is exactly as before ``apply``."""
        if self._runtime is None:
            return
        if self._head is not None:
            self._head.remove()
            self._head = None
        self._clock.remove()
        self._runtime.remove()
        self._runtime.close()
        self._runtime = None
        if getattr(self.model, "_memopt_handle", None) is self:
            del self.model._memopt_handle

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<memopt.Handle {state}: {len(self.plan.decisions)} units, {self.plan.overhead:.3f}x predicted step>"


def _head_trained(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and any(p.requires_grad for p in head.parameters())


def apply(model: nn.Module, plan: Plan, config: MemoptConfig | None = None,
          graph: TrainingGraph | None = None, *, sharding: str | None = None) -> Handle:
    """Apply ``plan`` to ``model`` through hooks; returns the ``Handle``.

    Args:
        sharding (str | None, default None): how the model's states are sharded where it runs (one of
            ``Plan.SHARDINGS``); None tells it from the model where it can (FSDP2, ZeRO-3 parameters).

    Raises:
        RuntimeError: the model already carries a memopt plan.
        ValueError: the plan was made for another world size or sharding (``memopt.distributed.check_plan_fits``).
    """
    _check_not_applied(model)
    return Handle(model, plan, config or MemoptConfig(), graph, sharding=sharding)


def optimize(model: nn.Module, sample: Any, budget: int | str | float,
             config: MemoptConfig | None = None, optimizer=None) -> Handle:
    """Profile one step, plan it under ``budget`` and apply the plan to ``model`` in place.

    Args:
        model (nn.Module): the model, in train mode.
        sample: one batch: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        budget (int | str | float): whole-step device bytes (``"12GiB"``), or a float in (0, 1]: that fraction
            of the profiled activation peak.
        config (MemoptConfig | None): options; ``config.loss_fn(output, sample)`` gives the loss when
            the output has no ``.loss``.
        optimizer (torch.optim.Optimizer | None): the optimizer that trains the model: its states (their
            class, the parameters' dtypes, bitsandbytes' 8-bit states; as they are after a step) count in the
            model states; without one, ``config.optimizer``'s are counted. Its steps also time the step
            ``handle.stats()`` compares with the prediction.

    With ``torch.distributed`` initialised at more than one rank, every rank calls it at once and all apply one
    plan, made from the slowest rank's profile (``memopt.distributed.optimize``); the budget is one rank's.

    Returns:
        Handle: ``.plan``, ``.report()``, ``.stats()``, ``.remove()``.

    Raises:
        memopt.BudgetError: the budget is below the smallest feasible one (named in the message).
        RuntimeError: the model is already optimized.

    Example:
        >>> import torch, memopt
        >>> from memopt.testing import TinyMLP
        >>> model = TinyMLP()
        >>> handle = memopt.optimize(model, torch.randn(2, 128, 64), budget=0.5)
        >>> model(torch.randn(2, 128, 64)).backward()
        >>> handle.remove()
    """
    _check_not_applied(model)
    parse_budget(budget)
    config = config or MemoptConfig()
    from .distributed import world_size

    if world_size() > 1:  # every rank must apply one plan: made once from all ranks' profiles
        from .distributed import optimize as optimize_ranks

        return optimize_ranks(model, sample, budget, config, optimizer=optimizer)
    graph = profile(model, sample, config, optimizer=optimizer)
    solved = plan(graph, budget, config)
    return Handle(model, solved, config, graph, optimizer=optimizer)


def _check_not_applied(model: nn.Module) -> None:
    if getattr(model, "_memopt_handle", None) is not None:
        raise RuntimeError(
            "memopt: this model is already optimized (nested optimize/apply); call handle.remove() first, "
            "or handle.replan(sample) to plan it again"
        )
