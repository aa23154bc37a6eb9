"""DeepSpeed integration: a ``"memopt"`` section in the DeepSpeed config, applied by ``initialize``.

    engine, optimizer, loader, scheduler = memopt.integrations.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), training_data=data,
        config={..., "zero_optimization": {"stage": 2}, "memopt": {"budget": "20GiB"}})

Same signature and return as ``deepspeed.initialize``, plus an optional ``sample`` (one micro-batch); without
it the first micro-batch of ``training_data`` is used. Before DeepSpeed wraps the model, memopt moves it
to the accelerator and the configured dtype (as DeepSpeed would), profiles one step on the sample, divides
the model states by the data-parallel world size as the ZeRO stage shards them (stage 1: optimizer state,
stage 2: and gradients, stage 3: and parameters, plus the parameters it keeps gathered: the whole model
within ``stage3_max_reuse_distance`` parameters, else its two largest blocks), plans under the budget and
applies the plan; the handle is ``engine.memopt_handle``. The ``"memopt"`` section takes ``budget`` and
any ``MemoptConfig`` field. DeepSpeed's own activation checkpointing beside it is refused (see
``_check_no_deepspeed_checkpointing``): one planner decides what is recomputed and swapped.

Under ZeRO-3 a parameter's data comes and goes (gathered before its module runs, released after):
memopt keeps every saved parameter (or view of one) as it is, and a recompute runs inside backward with
DeepSpeed's hooks gathering what it needs, while the parameters gathered for the backward in progress stay
gathered through it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

try:
    import deepspeed
except ImportError as error:  # pragma: no cover - exercised only without deepspeed
    raise ImportError("memopt.integrations.deepspeed needs: pip install 'memopt[deepspeed]'") from error

import memopt
from memopt.zero import ZERO3_MAX_REUSE_DISTANCE, param_groups, shard_bytes, zero3_gathered_bytes

__all__ = ["initialize", "shard_model_states"]


def shard_model_states(graph: memopt.TrainingGraph, zero_stage: int, world_size: int, *,
                       group_bytes: list[int] | None = None, n_params: int | None = None,
                       max_reuse_distance: int = ZERO3_MAX_REUSE_DISTANCE) -> memopt.TrainingGraph:
    """The graph with its model states as one data-parallel rank holds them under ZeRO ``zero_stage``.

    Stage 1 divides the optimizer state by ``world_size``, stage 2 the gradients too, stage 3 the
    parameters too, and counts what ZeRO-3 gathers while it runs as ``gathered_param_bytes``
    (``memopt.zero.zero3_gathered_bytes``: the whole rest of the model when it has at most
    ``max_reuse_distance`` parameters, else its two largest groups).

    Args:
        group_bytes (list[int] | None): parameter bytes of each unit and of those outside every unit;
            None takes the units' trainable parameter bytes and the rest.
        n_params (int | None): the model's parameter count; None counts it as within the reuse distance.
        max_reuse_distance (int): DeepSpeed's ``stage3_max_reuse_distance``.
    """
    _check_stage(zero_stage, world_size)
    optimizer = shard_bytes(graph.optimizer_bytes, world_size) if zero_stage >= 1 else graph.optimizer_bytes
    grads = shard_bytes(graph.grad_bytes, world_size) if zero_stage >= 2 else graph.grad_bytes
    params, gathered = graph.param_bytes, 0
    if zero_stage >= 3:
        params = shard_bytes(graph.param_bytes, world_size)
        if group_bytes is None:
            group_bytes = param_groups([u.param_grad_bytes for u in graph.units], graph.param_bytes)
        gathered = zero3_gathered_bytes(group_bytes, graph.param_bytes, world_size,
                                        0 if n_params is None else n_params, max_reuse_distance)
    return dataclasses.replace(graph, optimizer_bytes=optimizer, grad_bytes=grads, param_bytes=params,
                               gathered_param_bytes=gathered, sharding_degree=world_size if zero_stage else 1)


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
            ``deepspeed.checkpointing.configure`` called), or no sample and no training data.
        memopt.BudgetError: the budget is below the smallest feasible one.
    """
    if model is None:
        raise ValueError("memopt.integrations.deepspeed.initialize needs model=...")
    ds_config = _load(config if config is not None else config_params)
    section = ds_config.pop("memopt", None)
    handle = None
    if section is not None:
        _check_no_deepspeed_checkpointing(ds_config)
        handle = _apply(model, section, ds_config, sample, training_data, collate_fn)
    try:
        out = deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                   training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config,
                                   collate_fn=collate_fn, **kwargs)
    except BaseException:
        if handle is not None:
            handle.remove()
        raise
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
           collate_fn: Any) -> memopt.Handle:
    if not isinstance(section, dict) or "budget" not in section:
        raise ValueError(f"the DeepSpeed config's \"memopt\" section needs a budget, got {section!r}; "
                         "e.g. \"memopt\": {\"budget\": \"20GiB\"}")
    options = {k: v for k, v in section.items() if k != "budget"}
    known = {f.name for f in dataclasses.fields(memopt.MemoptConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the \"memopt\" section; valid: budget, {', '.join(sorted(known))}")
    config = memopt.MemoptConfig(**options)
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    _check_stage(zero, world)

    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else None)
    if dtype is None:
        model.to(device)
    else:
        model.to(device=device, dtype=dtype)
    if sample is None:
        if training_data is None:
            raise ValueError("pass sample=<one micro-batch> or training_data= so memopt can profile a step")
        batch_size = ds_config.get("train_micro_batch_size_per_gpu") or ds_config.get("train_batch_size", 1)
        loader = torch.utils.data.DataLoader(training_data, batch_size=batch_size, collate_fn=collate_fn)
        sample = next(iter(loader))
    sample = _to(sample, device)
    graph = memopt.profile(model, sample, config)
    zero_section = ds_config.get("zero_optimization", {})
    graph = shard_model_states(graph, zero, world, group_bytes=_group_bytes(model, graph),
                               n_params=sum(p.numel() for p in model.parameters()),
                               max_reuse_distance=int(zero_section.get("stage3_max_reuse_distance",
                                                                       ZERO3_MAX_REUSE_DISTANCE)))
    return memopt.apply(model, memopt.plan(graph, section["budget"], config), config, graph)


def _group_bytes(model: torch.nn.Module, graph: memopt.TrainingGraph) -> list[int]:
    """Parameter bytes, frozen ones included, of each unit and of those outside every unit."""
    def nbytes(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    return param_groups([nbytes(model.get_submodule(u.name).parameters()) for u in graph.units],
                        nbytes(model.parameters()))


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch
