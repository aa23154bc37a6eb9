"""FSDP2 integration: memopt on a model sharded with ``torch.distributed.fsdp.fully_shard``.

    for block in model.model.layers:          # as torchtitan applies it: each block, then the root
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    handle = memopt.integrations.fsdp.optimize(model, sample, budget="20GiB")

Every rank calls ``optimize`` at once (a collective). Each profiles its own micro-batch, the ranks agree on one
plan from the slowest rank's times (``memopt.distributed``), and every rank applies it. The model states are
one rank's (``shard_model_states``): its shards of the parameters and gradients, in the dtype FSDP stores
them, the optimizer states divided by the mesh size, and the parameters FSDP holds unsharded while the step
runs, in ``MixedPrecisionPolicy.param_dtype``.

Recompute under FSDP2: FSDP unshards a module's parameters in its pre-backward hook, which runs as the
gradient reaches the module's outputs, before autograd reaches the saved tensors inside it; memopt replays a
unit there, calling the unit's forward directly, so the unit's own FSDP hooks do not run and cannot reshard
what its running backward needs, and it runs on the unsharded parameters. An FSDP module nested inside a
unit and not yet in backward is unsharded by its own pre-forward hook in the replay and left unsharded for its
backward (FSDP reshards nothing while a backward runs). Saved parameters (FSDP's unsharded ones, whose
storage FSDP frees and refills) are kept as themselves, never swapped or dropped.

The LM head is not chunked under FSDP (``MemoptConfig(head="auto")`` profiles it ``"off"``): its options are
measured after the profiled step, when FSDP has resharded the root's parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError as error:  # pragma: no cover - torch without FSDP2
    raise ImportError("memopt.integrations.fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from error

import memopt
from memopt import distributed

__all__ = ["FsdpStates", "fsdp_states", "optimize", "profile", "shard_model_states"]


@dataclasses.dataclass(frozen=True)
class FsdpStates:
    """What one rank of an FSDP2 model holds, in bytes.

    Args:
        mesh_size (int): ranks the parameters are sharded over.
        param_bytes (int): this rank's parameter shards, padded as FSDP stores them, in their own dtype.
        trainable_param_bytes (int): the part of ``param_bytes`` that trains (its gradients take as much).
        full_trainable_bytes (int): the trainable parameters whole, in their own dtype.
        gathered_param_bytes (int): unsharded parameters held at once while the step runs, in the mixed
            precision policy's ``param_dtype``: every group that stays unsharded after its forward (the
            root's), and the two largest of those resharded after forward (the one running and the one
            prefetched).
    """

    mesh_size: int
    param_bytes: int
    trainable_param_bytes: int
    full_trainable_bytes: int
    gathered_param_bytes: int


def _own_groups(module: FSDPModule) -> list[tuple[Any, torch.dtype | None]]:
    """The FSDP parameter groups of one ``fully_shard`` module, each with the dtype its mixed precision policy
    unshards to."""
    state = module._get_fsdp_state()
    found = getattr(state, "_fsdp_param_groups", None)
    if found is None:  # torch before grouped fully_shard
        found = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
    return [(group, state._mp_policy.param_dtype) for group in found]


def _param_groups(model: nn.Module) -> list[tuple[Any, torch.dtype | None, bool]]:
    """Every FSDP parameter group of ``model``: (group, unshard dtype, held unsharded from its forward to its
    backward). The root (the outermost ``fully_shard`` module) is held so, as every group that does not reshard
    after forward; FSDP marks the root only at its first forward, so it is told here by its place."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return [(group, dtype, module is modules[0] or getattr(group, "post_forward_mesh_info", None) is None)
            for module in modules for group, dtype in _own_groups(module)]


def fsdp_states(model: nn.Module) -> FsdpStates:
    """One rank's model states of ``model`` as FSDP2 holds them (``FsdpStates``).

    Raises:
        ValueError: ``model`` has no ``fully_shard`` module.
    """
    groups = _param_groups(model)
    if not groups:
        raise ValueError(f"memopt.integrations.fsdp: {type(model).__name__} has no fully_shard module; shard it first "
                         "(fully_shard(block) for each block, then fully_shard(model)), or use memopt.optimize")
    mesh = max(g.mesh_info.shard_mesh_size for g, _, _ in groups)
    local = trainable = full_trainable = 0
    held, resharded = 0, []
    for group, param_dtype, kept in groups:
        unsharded = 0
        for fp in group.fsdp_params:
            param = fp.sharded_param
            stored = getattr(fp, "_sharded_param_data", None)
            shard = (stored.numel() * stored.element_size() if stored is not None
                     else param.to_local().numel() * param.element_size())
            local += shard
            if param.requires_grad:
                trainable += shard
                full_trainable += param.numel() * param.element_size()
            dtype = param_dtype if param_dtype is not None and param.dtype.is_floating_point else param.dtype
            unsharded += param.numel() * torch.empty((), dtype=dtype).element_size()
        if kept:
            held += unsharded
        else:
            resharded.append(unsharded)
    gathered = held + sum(sorted(resharded, reverse=True)[:2])
    return FsdpStates(mesh, local, trainable, full_trainable, gathered)


def shard_model_states(graph: memopt.TrainingGraph, states: FsdpStates) -> memopt.TrainingGraph:
    """The graph with its model states as one rank holds them under FSDP2.

    Parameters and gradients are this rank's shards (``states``); the optimizer states (and the optimizer
    step's temporaries and seconds, where the graph has them), which the optimizer keeps per sharded parameter,
    are the profiled ones divided as the trainable parameters are; the unsharded parameters FSDP holds while the
    step runs count as ``gathered_param_bytes``.
    """
    share = states.trainable_param_bytes / states.full_trainable_bytes if states.full_trainable_bytes else 0.0
    # The optimizer steps over the shards: its temporaries and its time shrink with them.
    step = {k: (math.ceil(v * share) if isinstance(v, int) else v * share)
            for k, v in ((k, getattr(graph, k, None)) for k in ("optimizer_step_bytes", "optimizer_step_s"))
            if v is not None}
    return dataclasses.replace(
        graph, param_bytes=states.param_bytes, grad_bytes=states.trainable_param_bytes,
        optimizer_bytes=math.ceil(graph.optimizer_bytes * share),
        gathered_param_bytes=states.gathered_param_bytes, sharding_degree=states.mesh_size, **step)


def _profile_config(config: memopt.MemoptConfig) -> memopt.MemoptConfig:
    if config.head == "chunked":
        raise ValueError("memopt.integrations.fsdp cannot chunk the LM head (MemoptConfig(head='chunked')): its "
                         "options are measured after the profiled step, when FSDP has resharded the root's "
                         "parameters; pass head='auto' or 'off'")
    return dataclasses.replace(config, head="off")


def _materialize_unsharded(model: nn.Module) -> None:
    """Have FSDP allocate its unsharded parameters before the first profiled step (a collective: every rank
    unshards and reshards each module alike). FSDP allocates them at a module's first unshard and keeps them,
    freeing and refilling their storage; allocated inside the profiled step, the memory meter would count them
    as activations, and the runtime would not yet know them as parameters."""
    for module in model.modules():
        if isinstance(module, FSDPModule) and any(
                not hasattr(fp, "_unsharded_param") for group, _ in _own_groups(module) for fp in group.fsdp_params):
            module.unshard()
            module.reshard()


def profile(model: nn.Module, sample: Any, config: memopt.MemoptConfig | None = None,
            optimizer=None) -> memopt.TrainingGraph:
    """``memopt.profile`` of this rank's step of a ``fully_shard`` model, its model states as this rank holds them
    (``shard_model_states``). A collective: every rank profiles at once (the steps all-gather).

    Raises:
        ValueError: the model has no ``fully_shard`` module, or ``config.head == "chunked"``.
    """
    fsdp_states(model)  # refuses a model without fully_shard before any rank profiles
    config = _profile_config(config or memopt.MemoptConfig())
    _materialize_unsharded(model)
    graph = memopt.profile(model, sample, config, optimizer=optimizer)
    return shard_model_states(graph, fsdp_states(model))


def optimize(model: nn.Module, sample: Any, budget: int | str | float, config: memopt.MemoptConfig | None = None,
             optimizer=None) -> memopt.Handle:
    """Profile, plan once for every rank and apply, on a model sharded with ``fully_shard``.

    A collective: every rank calls it at once, with its own micro-batch of the same shape.

    Args:
        model (nn.Module): the sharded model (``fully_shard`` on its blocks and root), in train mode.
        sample: this rank's micro-batch: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        budget (int | str | float): one rank's budget: whole-step bytes (``"20GiB"``), or a float in (0, 1]: that
            fraction of the profiled activation peak.
        config (memopt.MemoptConfig | None): options (``head="chunked"`` is refused, see the module docstring).
        optimizer (torch.optim.Optimizer | None): the optimizer, as ``memopt.optimize`` takes it.

    Returns:
        memopt.Handle: the applied plan (``plan.sharding == "fsdp"``); ``handle.replan(sample)`` plans again the
        same way, on every rank.

    Raises:
        ValueError: the model has no ``fully_shard`` module, or ``head="chunked"``.
        memopt.BudgetError: no plan fits one rank's budget (raised on every rank).
    """
    fsdp_states(model)  # refuses a model without fully_shard before any rank profiles
    config = config or memopt.MemoptConfig()
    _profile_config(config)
    return distributed.optimize(model, sample, budget, config, sharding="fsdp", optimizer=optimizer, profile=profile)
