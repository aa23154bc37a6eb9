"""Many ranks, one plan: every rank profiles, one plan is made from the slowest rank's figures, every rank
applies it.

Ranks that profile apart measure other times, so the MIP can choose other plans for them; under ZeRO-3 or
FSDP a recompute issues all-gathers, so ranks with different plans issue different collectives and hang.
``optimize`` profiles on every rank at once (the profiled steps of a sharded model issue the same collectives
on every rank), merges the graphs into the one every rank plans from (``agree_graph``: each time and byte the
largest any rank measured), solves it once on rank 0 and broadcasts the plan (``plan``), which every rank
applies. The budget is one rank's. The plan records the world size and sharding it was made for, and
``check_plan_fits`` refuses it under others.

``launch`` runs a function on local processes joined by a gloo process group: tests and examples train on
2 CPU ranks with it.

Example:
    >>> import torch
    >>> from memopt import distributed
    >>> from memopt.graph import Decision, Plan
    >>> plan = Plan([Decision("blocks.0")], 1, 1, 0, 0.0, 0.0, 0, world_size=2, sharding="zero3")
    >>> distributed.world_size()
    1
    >>> try:
    ...     distributed.check_plan_fits(plan, torch.nn.Linear(2, 2))
    ... except ValueError as error:
    ...     print(str(error)[:95])
    memopt: this plan was made for world size 2 with ZeRO-3 sharding and is applied at world size 1
"""

from __future__ import annotations

import dataclasses
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import MemoptConfig
from .errors import BudgetError, MemoptError
from .graph import Plan, TrainingGraph

__all__ = ["agree_graph", "check_plan_fits", "detect_sharding", "launch", "merge_graphs", "optimize", "plan", "rank",
           "rank_table", "world_size"]

_SHARDING_NAMES = {"none": "no sharding", "zero1": "ZeRO-1 sharding", "zero2": "ZeRO-2 sharding",
                   "zero3": "ZeRO-3 sharding", "fsdp": "FSDP2 sharding"}
# Per unit and per graph: seconds and bytes a rank measures for itself; the plan takes the largest of all ranks.
_UNIT_TIMES = ("forward_s", "backward_s", "selective_s")
_UNIT_BYTES = ("input_bytes", "output_bytes", "forward_workspace_bytes", "backward_workspace_bytes",
               "checkpoint_workspace_bytes", "selective_bytes", "outside_input_bytes", "param_grad_bytes")
_GRAPH_FIGURES = ("param_bytes", "grad_bytes", "optimizer_bytes", "fixed_activation_bytes", "head_workspace_bytes",
                  "gathered_param_bytes", "shared_input_bytes", "other_forward_s", "other_backward_s",
                  "optimizer_step_bytes", "optimizer_step_s")


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Ranks in the default process group; 1 without ``torch.distributed``."""
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 without ``torch.distributed``."""
    return torch.distributed.get_rank() if _initialized() else 0


def detect_sharding(model: nn.Module) -> str | None:
    """The sharding a model shows: ``"fsdp"`` (a ``fully_shard`` module in it), ``"zero3"`` (DeepSpeed ZeRO-3
    parameters), else None: no sharding, or one that leaves the model as it is (ZeRO-1/2, DDP)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP2 module can exist
    kind = getattr(fsdp, "FSDPModule", None)
    if kind is not None and any(isinstance(m, kind) for m in model.modules()):
        return "fsdp"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "zero3"
    return None


def _where(ranks: int, sharding: str | None) -> str:
    return f"world size {ranks}" + (f" with {_SHARDING_NAMES[sharding]}" if sharding else "")


def check_plan_fits(plan: Plan, model: nn.Module, sharding: str | None = None) -> str:
    """Refuse a plan made for another world size or sharding than the one it is applied under.

    Args:
        plan (Plan): the plan.
        model (nn.Module): the model it is applied to.
        sharding (str | None, default None): the sharding the model runs under, one of ``Plan.SHARDINGS``;
            None tells it from the model where it shows (``detect_sharding``), else takes the plan's.

    Returns:
        str: the sharding the plan runs under.

    Raises:
        ValueError: the world size differs, or the sharding; the message names both and the fix.
    """
    if sharding is not None and sharding not in Plan.SHARDINGS:
        raise ValueError(f"sharding must be one of {Plan.SHARDINGS}, got {sharding!r}")
    ranks = world_size()
    known = sharding or detect_sharding(model)
    if plan.world_size != ranks or (known is not None and known != plan.sharding) or (
            known is None and plan.sharding == "fsdp"):
        here = known if known is not None else ("none" if plan.sharding == "fsdp" else None)
        raise ValueError(
            f"memopt: this plan was made for {_where(plan.world_size, plan.sharding)} and is applied at "
            f"{_where(ranks, here)}; its budget and model states are one rank's share where it was made. Make the "
            "plan where it runs, on every rank: memopt.optimize (memopt.distributed.optimize), "
            "memopt.integrations.deepspeed.initialize or memopt.integrations.fsdp.optimize")
    return known or plan.sharding


def _merge_unit(units: list[dict]) -> dict:
    first = dict(units[0])
    for other in units[1:]:
        if len(other["tensor_bytes"]) != len(first["tensor_bytes"]):
            raise MemoptError(
                f"memopt: unit {first['name']!r} saved {len(first['tensor_bytes'])} tensors on rank 0 and "
                f"{len(other['tensor_bytes'])} on another rank; every rank must profile the same step (the same "
                "sample shapes and code path)")
        for key in (*_UNIT_TIMES, *_UNIT_BYTES):
            first[key] = max(first[key], other[key])
        first["tensor_bytes"] = [max(a, b) for a, b in zip(first["tensor_bytes"], other["tensor_bytes"])]
        if first["outside_bytes"] and len(other["outside_bytes"]) == len(first["outside_bytes"]):
            first["outside_bytes"] = [max(a, b) for a, b in zip(first["outside_bytes"], other["outside_bytes"])]
    return first


def _merge_head(heads: list[dict | None]) -> dict | None:
    first = heads[0]
    if first is None or any(h is None or [o["chunks"] for o in h["options"]] != [o["chunks"] for o in first["options"]]
                            for h in heads[1:]):
        return first
    options = [dict(o) for o in first["options"]]
    for head in heads[1:]:
        for mine, theirs in zip(options, head["options"]):
            mine["seconds"] = max(mine["seconds"], theirs["seconds"])
            mine["workspace_bytes"] = max(mine["workspace_bytes"], theirs["workspace_bytes"])
    return {**first, "options": options}


def merge_graphs(graphs: list[TrainingGraph]) -> TrainingGraph:
    """One graph for every rank from each rank's: the first's structure and hardware, and each unit's and the
    step's seconds and bytes the largest of all (the slowest rank's times; the most memory any rank needs).

    Raises:
        MemoptError: the ranks profiled different units or saved tensors.
    """
    names = [[u.name for u in g.units] for g in graphs]
    for index, other in enumerate(names[1:], start=1):
        if other != names[0]:
            raise MemoptError(
                f"memopt: rank 0 profiled units {names[0][:4]}... and rank {index} {other[:4]}...; every rank must "
                "profile the same model with the same MemoptConfig(units=...)")
    dicts = [g.to_dict() for g in graphs]
    merged = dict(dicts[0])
    for key in _GRAPH_FIGURES:
        if key in merged:
            merged[key] = max(d[key] for d in dicts)
    merged["units"] = [_merge_unit([d["units"][i] for d in dicts]) for i in range(len(graphs[0].units))]
    merged["head"] = _merge_head([d.get("head") for d in dicts])
    merged["meta"] = {**dicts[0]["meta"], "ranks": len(graphs), "merged": "largest seconds and bytes over ranks"}
    return TrainingGraph.from_dict(merged)


def agree_graph(graph: TrainingGraph) -> TrainingGraph:
    """The graph every rank plans from: this rank's graph merged with every other's (``merge_graphs``).

    A collective: every rank calls it. Without ``torch.distributed`` (or at one rank) it returns ``graph``.
    """
    if world_size() == 1:
        return graph
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, graph.to_dict())
    return merge_graphs([TrainingGraph.from_dict(g) for g in gathered])


def _portable(error: BaseException) -> tuple:
    """What the other ranks re-raise of rank 0's error (a ``BudgetError`` keeps its figures)."""
    if isinstance(error, BudgetError):
        return ("budget", str(error), {"budget_bytes": error.budget_bytes,
                                       "min_feasible_bytes": error.min_feasible_bytes,
                                       "dominated_by": error.dominated_by})
    return ("other", f"{type(error).__name__}: {error}", {})


def _reraise(kind: str, message: str, figures: dict):
    if kind == "budget":
        raise BudgetError(message, **figures)
    raise MemoptError(f"memopt: rank 0 failed to make the plan every rank applies: {message}")


def plan(graph: TrainingGraph, budget: int | str | float, config: MemoptConfig | None = None, *,
         sharding: str = "none") -> Plan:
    """One plan for every rank: ``graph`` agreed over the ranks (``agree_graph``), solved on rank 0 under
    ``budget`` (one rank's), broadcast. A collective: every rank calls it, with its own profiled graph.

    Args:
        graph (TrainingGraph): this rank's profiled graph, its model states as this rank holds them.
        budget (int | str | float): one rank's budget, as ``memopt.plan`` takes it.
        config (MemoptConfig | None): solver options.
        sharding (str, default "none"): the sharding the plan is made for (``Plan.SHARDINGS``); recorded in it.

    Returns:
        Plan: the same plan on every rank, its ``world_size`` and ``sharding`` set.

    Raises:
        memopt.BudgetError: on every rank, when no plan fits on rank 0.
        MemoptError: on every other rank, when rank 0 failed otherwise (rank 0 raises its own error).
    """
    return _solve_once(agree_graph(graph), budget, config, sharding)


def _solve_once(agreed: TrainingGraph, budget: int | str | float, config: MemoptConfig | None, sharding: str) -> Plan:
    """Solve the agreed graph on rank 0 and broadcast the plan, or the error, to every rank."""
    from . import api

    if sharding not in Plan.SHARDINGS:
        raise ValueError(f"sharding must be one of {Plan.SHARDINGS}, got {sharding!r}")
    ranks = world_size()
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if rank() == 0:
        try:
            solved = api.plan(agreed, budget, config)
            outcome[0] = ("plan", dataclasses.replace(solved, world_size=ranks, sharding=sharding).to_dict(), None)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            error = exc
            outcome[0] = _portable(exc)
    if ranks > 1:
        torch.distributed.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, payload, figures = outcome[0]
    if kind != "plan":
        _reraise(kind, payload, figures)
    return Plan.from_dict(payload)


def optimize(model: nn.Module, sample: Any, budget: int | str | float, config: MemoptConfig | None = None, *,
             sharding: str | None = None, optimizer=None, profile: Callable[..., TrainingGraph] | None = None):
    """``memopt.optimize`` on every rank, with one plan: profile here, plan once for all (``plan``), apply.

    A collective: every rank calls it at once, each with its own micro-batch of the same shape.

    Args:
        model (nn.Module): this rank's model (sharded or not).
        sample: one micro-batch of this rank.
        budget (int | str | float): one rank's budget.
        config (MemoptConfig | None): options.
        sharding (str | None, default None): the sharding to record and check (``Plan.SHARDINGS``); None
            tells it from the model (``detect_sharding``), else ``"none"``.
        optimizer (torch.optim.Optimizer | None): as ``memopt.optimize`` takes it.
        profile (Callable | None): ``profile(model, sample, config, optimizer=...)`` giving this rank's graph,
            its model states as this rank holds them; None is ``memopt.integrations.fsdp.profile`` for an FSDP2
            model, else ``memopt.profile``. The DeepSpeed integration passes its own.

    Returns:
        memopt.Handle: the applied plan; ``handle.replan(sample)`` plans again the same way, on every rank.
    """
    from . import api

    api._check_not_applied(model)
    config = config or MemoptConfig()
    sharding = sharding or detect_sharding(model) or "none"
    if profile is None and sharding == "fsdp":  # its model states as one rank holds them; see that module
        from memopt.integrations.fsdp import profile
    profiler = profile or api.profile
    # The handle keeps the graph the plan was made from: the same on every rank.
    graph = agree_graph(profiler(model, sample, config, optimizer=optimizer))
    solved = _solve_once(graph, budget, config, sharding)

    def replanner(model, sample, budget, config, optimizer=None):
        return optimize(model, sample, budget, config, sharding=sharding, optimizer=optimizer, profile=profile)

    return api.Handle(model, solved, config, graph, optimizer=optimizer, sharding=sharding, replanner=replanner)


# -- local ranks ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(fn, rank_: int, ranks: int, port: int, backend: str, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), WORLD_SIZE=str(ranks),
                      LOCAL_RANK=str(rank_), LOCAL_WORLD_SIZE=str(ranks))
    try:
        torch.distributed.init_process_group(backend, rank=rank_, world_size=ranks)
        out = fn(rank_, ranks, *args)
        results.put((rank_, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((rank_, False, traceback.format_exc()))
    finally:
        if _initialized():
            torch.distributed.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), *, backend: str = "gloo",
           timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes joined by one process group.

    Each process is started fresh (``spawn``), so ``fn`` must be importable (defined at a module's top level,
    under ``if __name__ == "__main__":`` guards in a script). ``MASTER_ADDR``, ``MASTER_PORT`` (a free port),
    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set as ``torchrun`` sets them, then the default process
    group is initialised (``backend``, default gloo: runs on CPUs).

    Args:
        fn (Callable): the work of one rank; its return value must pickle (plain values travel best).
        world_size (int, default 2): processes.
        args (tuple): further arguments of ``fn``.
        backend (str, default "gloo"): ``torch.distributed`` backend.
        timeout_s (float, default 300.0): seconds all ranks may take, start-up included.

    Returns:
        list: ``fn``'s return value of each rank, by rank.

    Raises:
        RuntimeError: a rank raised (its traceback is quoted); the other ranks are stopped.
        TimeoutError: the ranks did not all finish in ``timeout_s`` (a hang: ranks waiting in collectives that
            others never issue); every rank is stopped.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_run_rank, args=(fn, r, world_size, port, backend, args, results))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish in {timeout_s:.0f} s: a hang "
                                   "(ranks waiting in collectives that others never issue) or too little timeout_s")
            try:
                index, ok, value = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} of {world_size} died with exit code {procs[dead[0]].exitcode} "
                                       "before reporting") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {index} of {world_size} failed:\n{value}")
            out[index] = value
    finally:
        for proc in procs:
            proc.join(timeout=10 if len(out) == world_size else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [out[r] for r in range(world_size)]


def rank_table(results: list[dict], held: str = "gathered") -> str:
    """Each rank's memory as a text table, from one dict a rank: ``rank``, ``params``, ``grads``, ``optimizer``,
    ``gathered`` (parameters held whole during the step, headed ``held``), ``predicted_peak``,
    ``activation_peak`` (bytes), ``recomputes``, ``losses`` and ``device_peak`` (bytes or None); then whether
    every rank applied one plan (``plan``, any comparable value).

    Raises:
        RuntimeError: the ranks applied different plans.
    """
    from .units import format_bytes

    lines = [f"{'rank':>4} {'params':>10} {'grads':>10} {'optimizer':>10} {held:>10} {'predicted peak':>15} "
             f"{'activations':>12} {'recomputes':>10}  losses"]
    for r in results:
        device = f"  (device peak {format_bytes(r['device_peak'])})" if r.get("device_peak") is not None else ""
        lines.append(f"{r['rank']:>4} {format_bytes(r['params']):>10} {format_bytes(r['grads']):>10} "
                     f"{format_bytes(r['optimizer']):>10} {format_bytes(r['gathered']):>10} "
                     f"{format_bytes(r['predicted_peak']):>15} {format_bytes(r['activation_peak']):>12} "
                     f"{r['recomputes']:>10}  " + " ".join(f"{x:.4f}" for x in r["losses"]) + device)
    if len({r["plan"] for r in results}) != 1:
        raise RuntimeError("the ranks applied different plans:\n" + "\n".join(lines))
    lines.append(f"\nall {len(results)} ranks applied one plan")
    return "\n".join(lines)
