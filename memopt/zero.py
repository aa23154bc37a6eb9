"""ZeRO and sharding arithmetic: one rank's share of the model states, and what ZeRO-3 keeps gathered.

Used by the DeepSpeed integration (live graphs) and the fake profile (``memopt plan --zero-stage``), so both
count sharded model states alike. Torch-free.
"""

from __future__ import annotations

__all__ = ["SHARDED_FROM", "ZERO3_MAX_REUSE_DISTANCE", "param_groups", "shard_bytes", "zero3_gathered_bytes",
           "zero_share"]

#: The ZeRO stage from which each model state is sharded.
SHARDED_FROM = {"optimizer": 1, "gradients": 2, "parameters": 3}


def shard_bytes(nbytes: int, world_size: int) -> int:
    """One rank's share of ``nbytes`` sharded over ``world_size`` ranks (rounded up: the largest shard)."""
    return -(-nbytes // world_size)


def zero_share(nbytes: int, state: str, zero_stage: int, world_size: int) -> int:
    """One rank's bytes of a model state (``"optimizer"``, ``"gradients"`` or ``"parameters"``; the optimizer
    step's temporaries go with the optimizer) under ZeRO ``zero_stage``: its shard from the stage that shards
    it on, all of it below.

    Example:
        >>> zero_share(1000, "gradients", 1, 4), zero_share(1000, "gradients", 2, 4)
        (1000, 250)
    """
    return shard_bytes(nbytes, world_size) if zero_stage >= SHARDED_FROM[state] else nbytes


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
