"""DeepSpeed integration: a ``"memopt"`` section in the DeepSpeed config, applied by ``initialize``.

    engine, optimizer, loader, scheduler = memopt.integrations.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), training_data=data,
        config={..., "zero_optimization": {"stage": 2}, "memopt": {"budget": "20GiB"}})

Same signature and return as ``deepspeed.initialize``, plus an optional ``sample`` (one micro-batch); without
it the first micro-batch of ``training_data`` is used. Every rank calls it at once, as ``deepspeed.initialize``.
Before DeepSpeed wraps the model, memopt moves it to the accelerator and the configured dtype (as DeepSpeed
would), profiles one step on each rank's sample, divides the model states by the data-parallel world size as
the ZeRO stage shards them (stage 1: optimizer state, stage 2: and gradients, stage 3: and parameters, plus
the parameters it keeps gathered: the whole model within ``stage3_max_reuse_distance`` parameters, else its
two largest blocks), makes one plan for every rank from the slowest rank's times (``memopt.distributed``;
the budget is one rank's) and applies it; the handle is ``engine.memopt_handle``. The ``"memopt"`` section
takes ``budget`` and any ``MemoptConfig`` field, or ``plan``: a plan made before (a ``Plan.to_dict()`` or the
path of its JSON), refused unless made for this world size and ZeRO stage. DeepSpeed's own activation
checkpointing beside it is refused (see ``_check_no_deepspeed_checkpointing``): one planner decides what is
recomputed and swapped.

A model built under ``deepspeed.zero.Init`` has its parameters partitioned from the start: memopt gathers them
whole on every rank for the profiled steps (``deepspeed.zero.GatheredParameters``), so the profile sees their
real shapes; that needs the whole model's parameters in one rank's memory for a moment. Where they do not fit,
make the plan where they do (or with ``memopt plan``'s model of the step) and pass it as ``"plan"``.
``engine.memopt_handle.replan(sample)`` after DeepSpeed wrapped the model profiles the same way, on shadow
parameters that share the data but none of DeepSpeed's gradient hooks, with ZeRO-3's module hooks lifted for
the profiled steps: the optimizer's gradients are untouched.

Under ZeRO-3 a parameter's data comes and goes (gathered before its module runs, released after):
memopt keeps every saved parameter (or view of one) as it is, and a recompute runs inside backward with
DeepSpeed's hooks gathering what it needs, while the parameters gathered for the backward in progress stay
gathered through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import OrderedDict
from typing import Any

import torch

try:
    import deepspeed
except ImportError as error:  # pragma: no cover - exercised only without deepspeed
    raise ImportError("memopt.integrations.deepspeed needs: pip install 'memopt[deepspeed]'") from error

import memopt
from memopt import distributed
from memopt.zero import ZERO3_MAX_REUSE_DISTANCE, param_groups, shard_bytes, zero3_gathered_bytes, zero_share

__all__ = ["initialize", "shard_model_states"]


def shard_model_states(graph: memopt.TrainingGraph, zero_stage: int, world_size: int, *,
                       group_bytes: list[int] | None = None, n_params: int | None = None,
                       max_reuse_distance: int = ZERO3_MAX_REUSE_DISTANCE) -> memopt.TrainingGraph:
    """The graph with its model states as one data-parallel rank holds them under ZeRO ``zero_stage``.

    Stage 1 divides the optimizer state (and the optimizer step's temporaries and seconds, where the graph has
    them) by ``world_size``, stage 2 the gradients too, stage 3 the parameters too, and counts what ZeRO-3
    gathers while it runs as ``gathered_param_bytes``
    (``memopt.zero.zero3_gathered_bytes``: the whole rest of the model when it has at most
    ``max_reuse_distance`` parameters, else its two largest groups).

    Args:
        group_bytes (list[int] | None): parameter bytes of each unit and of those outside every unit;
            None takes the units' trainable parameter bytes and the rest.
        n_params (int | None): the model's parameter count; None counts it as within the reuse distance.
        max_reuse_distance (int): DeepSpeed's ``stage3_max_reuse_distance``.
    """
    _check_stage(zero_stage, world_size)
    optimizer = zero_share(graph.optimizer_bytes, "optimizer", zero_stage, world_size)
    grads = zero_share(graph.grad_bytes, "gradients", zero_stage, world_size)
    params, gathered = zero_share(graph.param_bytes, "parameters", zero_stage, world_size), 0
    if zero_stage >= 3:
        if group_bytes is None:
            group_bytes = param_groups([u.param_grad_bytes for u in graph.units], graph.param_bytes)
        gathered = zero3_gathered_bytes(group_bytes, graph.param_bytes, world_size,
                                        0 if n_params is None else n_params, max_reuse_distance)
    # The optimizer steps over its partition from stage 1 on: its temporaries and its time shrink with it.
    step = {k: (shard_bytes(v, world_size) if isinstance(v, int) else v / world_size)
            for k, v in ((k, getattr(graph, k, None)) for k in ("optimizer_step_bytes", "optimizer_step_s"))
            if v is not None and zero_stage >= 1}
    return dataclasses.replace(graph, optimizer_bytes=optimizer, grad_bytes=grads, param_bytes=params,
                               gathered_param_bytes=gathered, sharding_degree=world_size if zero_stage else 1, **step)


def _check_stage(zero_stage: int, world_size: int) -> None:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               config: str | dict | None = None, config_params: str | dict | None = None,
               sample: Any = None, collate_fn: Any = None, **kwargs: Any):
    """``deepspeed.initialize`` with memopt applied first when the config has a ``"memopt"`` section.

    Args:
        sample: one micro-batch (tensor, tuple or dict) to profile; default: the first of ``training_data``.
        The others: as ``deepspeed.initialize``.

    Returns:
        tuple: ``(engine, optimizer, training_dataloader, lr_scheduler)``, as ``deepspeed.initialize``;
        ``engine.memopt_handle`` is the applied plan (None without a ``"memopt"`` section).

    Raises:
        ValueError: a bad ``"memopt"`` section, DeepSpeed's own activation checkpointing configured beside it
            (an ``"activation_checkpointing"`` section with settings other than its defaults, or
            ``deepspeed.checkpointing.configure`` called), no sample and no training data, or a ``"plan"`` made
            for another world size or ZeRO stage.
        memopt.BudgetError: the budget is below the smallest feasible one (raised on every rank).
    """
    if model is None:
        raise ValueError("memopt.integrations.deepspeed.initialize needs model=...")
    ds_config = _load(config if config is not None else config_params)
    section = ds_config.pop("memopt", None)
    handle = None
    wrapped: dict[str, Any] = {}  # the engine, once DeepSpeed has wrapped the model: replan profiles around it
    if section is not None:
        _check_no_deepspeed_checkpointing(ds_config)
        handle = _apply(model, section, ds_config, sample, training_data, collate_fn, wrapped)
    try:
        out = deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                   training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config,
                                   collate_fn=collate_fn, **kwargs)
    except BaseException:
        if handle is not None:
            handle.remove()
        raise
    wrapped["engine"] = out[0]
    out[0].memopt_handle = handle
    return out


# DeepSpeed's "activation_checkpointing" defaults: a section that only restates them changes nothing.
_DS_CHECKPOINTING_DEFAULTS = {"partition_activations": False, "contiguous_memory_optimization": False,
                              "cpu_checkpointing": False, "number_checkpoints": None,
                              "synchronize_checkpoint_boundary": False, "profile": False}


def _check_no_deepspeed_checkpointing(ds_config: dict) -> None:
    """Refuse DeepSpeed's activation checkpointing settings beside a "memopt" section.

    The section acts only through ``deepspeed.checkpointing`` calls in the model's code. If the model makes
    them, DeepSpeed partitions, offloads or recomputes activations under memopt's plan, which was profiled and
    solved without knowing it; if it does not, the settings do nothing while the user believes they are on.
    Either way the config says two different things, and a warning scrolls past in a multi-rank log, so this
    raises: the fix is one deleted section. A section empty or at DeepSpeed's defaults (as config templates
    carry it) is accepted, since deleting it would change nothing, unless the model's code has configured
    ``deepspeed.checkpointing``, which says it does make those calls.
    """
    if deepspeed.checkpointing.is_configured():
        raise ValueError(
            "deepspeed.checkpointing.configure() was called, so the model uses DeepSpeed's activation checkpointing, "
            "and the DeepSpeed config has a \"memopt\" section: both would decide what the step recomputes or "
            "offloads. Remove the model's deepspeed.checkpointing calls (and DeepSpeed's \"activation_checkpointing\" "
            "section) to let memopt plan recompute and swap, or remove the \"memopt\" section")
    section = ds_config.get("activation_checkpointing")
    if section is None:
        return
    changed = ({k: v for k, v in section.items() if _DS_CHECKPOINTING_DEFAULTS.get(k, object()) != v}
               if isinstance(section, dict) else section)
    if changed:
        raise ValueError(
            f"the DeepSpeed config has both an \"activation_checkpointing\" section ({changed!r}) and a \"memopt\" "
            "section: both decide what the step recomputes or offloads. Remove DeepSpeed's "
            "\"activation_checkpointing\" section (and its deepspeed.checkpointing calls) to let memopt plan "
            "recompute and swap, or remove the \"memopt\" section to keep DeepSpeed's checkpointing")


def _load(config: str | dict | None) -> dict:
    if config is None:
        raise ValueError("a DeepSpeed config is required (config=dict or path to a JSON file)")
    if isinstance(config, str):
        with open(config) as f:
            return json.load(f)
    return dict(config)


def _apply(model: torch.nn.Module, section: dict, ds_config: dict, sample: Any, training_data: Any,
           collate_fn: Any, wrapped: dict) -> memopt.Handle:
    if not isinstance(section, dict) or ("budget" in section) == ("plan" in section):
        raise ValueError(f"the DeepSpeed config's \"memopt\" section needs a budget (or a plan made before), got "
                         f"{section!r}; e.g. \"memopt\": {{\"budget\": \"20GiB\"}}")
    options = {k: v for k, v in section.items() if k not in ("budget", "plan")}
    known = {f.name for f in dataclasses.fields(memopt.MemoptConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the \"memopt\" section; valid: budget, plan, "
                         f"{', '.join(sorted(known))}")
    config = memopt.MemoptConfig(**options)
    zero_section = ds_config.get("zero_optimization", {})
    zero = zero_section.get("stage", 0)
    world = distributed.world_size()
    _check_stage(zero, world)
    sharding = f"zero{zero}" if zero else "none"
    reuse = int(zero_section.get("stage3_max_reuse_distance", ZERO3_MAX_REUSE_DISTANCE))

    def profile(model, sample, config, optimizer=None):
        with _bare(model, wrapped.get("engine")):
            graph = memopt.profile(model, sample, config, optimizer=optimizer)
            group_bytes, n_params = _group_bytes(model, graph), sum(_numel(p) for p in model.parameters())
        return shard_model_states(graph, zero, world, group_bytes=group_bytes, n_params=n_params,
                                  max_reuse_distance=reuse)

    def replanner(model, sample, budget, config, optimizer=None):
        return distributed.optimize(model, sample, budget, config, sharding=sharding, optimizer=optimizer,
                                    profile=profile)

    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    if not _partitioned(model):  # zero.Init placed its partitions already
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
            torch.float16 if ds_config.get("fp16", {}).get("enabled") else None)
        model.to(device=device, dtype=dtype)
    if "plan" in section:
        plan = _load_plan(section["plan"])
        return memopt.Handle(model, plan, config, None, sharding=sharding, replanner=replanner)
    if sample is None:
        if training_data is None:
            raise ValueError("pass sample=<one micro-batch> or training_data= so memopt can profile a step")
        batch_size = ds_config.get("train_micro_batch_size_per_gpu") or ds_config.get("train_batch_size", 1)
        loader = torch.utils.data.DataLoader(training_data, batch_size=batch_size, collate_fn=collate_fn)
        sample = next(iter(loader))
    return replanner(model, _to(sample, device), section["budget"], config)


def _load_plan(plan: Any) -> memopt.Plan:
    if isinstance(plan, memopt.Plan):
        return plan
    if isinstance(plan, dict):
        return memopt.Plan.from_dict(plan)
    if isinstance(plan, str):
        with open(plan) as f:
            return memopt.Plan.from_json(f.read())
    raise ValueError(f"the \"memopt\" section's plan must be a Plan.to_dict() or the path of its JSON, got "
                     f"{type(plan).__name__}")


def _numel(param: torch.nn.Parameter) -> int:
    """Elements of a parameter whole: a ZeRO-3 parameter's data is its partition, or nothing, between uses."""
    return getattr(param, "ds_numel", param.numel())


def _partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _group_bytes(model: torch.nn.Module, graph: memopt.TrainingGraph) -> list[int]:
    """Parameter bytes, frozen ones included, of each unit and of those outside every unit."""
    from memopt.blocks import split_name

    def nbytes(params) -> int:
        return sum(_numel(p) * p.element_size() for p in params)

    return param_groups([nbytes(model.get_submodule(split_name(u.name)[0]).parameters()) for u in graph.units],
                        nbytes(model.parameters()))


@contextlib.contextmanager
def _bare(model: torch.nn.Module, engine: Any):
    """The model as a plain module for profiled steps: ZeRO-3 parameters gathered whole (every rank at once), and
    once DeepSpeed has wrapped it, shadow parameters in place of its own (the same data, none of the optimizer's
    gradient hooks, so a profiled backward leaves its gradients untouched) with ZeRO-3's module hooks lifted
    (they would gather and release the shadows). A plain model before ``deepspeed.initialize`` stays as it is."""
    partitioned = _partitioned(model)
    if engine is None and not partitioned:
        yield
        return
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None, enabled=partitioned):
        saved = [(module, module._parameters) for module in model.modules()]
        shadows: dict[int, torch.nn.Parameter] = {}
        for module, params in saved:
            plain = OrderedDict()
            for name, param in params.items():
                if param is not None and id(param) not in shadows:
                    shadows[id(param)] = torch.nn.Parameter(param.data, requires_grad=param.requires_grad)
                plain[name] = None if param is None else shadows[id(param)]
            object.__setattr__(module, "_parameters", plain)
        if offload is not None:
            offload._remove_module_hooks()
        try:
            yield
        finally:
            for module, params in saved:
                object.__setattr__(module, "_parameters", params)
            if offload is not None:
                offload.setup_zero_stage3_hooks()


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch
