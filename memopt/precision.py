"""Model states as training really stores them: a precision convention, and an optimizer's own states.

Precision conventions, named as PyTorch Lightning names them:

| name | parameters | gradients | optimizer states | master copy |
|---|---|---|---|---|
| ``32-true`` | fp32 | fp32 | fp32 | none |
| ``bf16-true`` | bf16 | bf16 | bf16 (torch optimizers keep states in the parameter's dtype) | none |
| ``bf16-mixed`` | bf16 | bf16 | fp32 | fp32 (as DeepSpeed and Megatron keep it) |
| ``fp16-mixed`` | fp16 | fp16 | fp32 | fp32 |

Optimizer states, per parameter of shape ``s`` with ``n`` elements, as torch 2.x and bitsandbytes 0.4x create
them at the first step (``tests/test_precision.py`` checks each against a real step):

- ``adamw``, ``adam``: ``exp_avg`` and ``exp_avg_sq`` (``n`` elements each; ``max_exp_avg_sq`` too with
  amsgrad) and a 0-d fp32 ``step``;
- ``sgd``: nothing; ``sgd-momentum``: ``momentum_buffer`` (``n``);
- ``adafactor`` (``torch.optim.Adafactor``): a 0-d fp32 ``step``; for 2 or more dims the factored
  ``row_var`` (``prod(s[:-1])``) and ``col_var`` (``prod(s[:-2]) * s[-1]``), else ``variance`` (``n``);
- ``adamw8bit`` (``bitsandbytes.optim.AdamW8bit``): for tensors of at least 4096 elements two uint8 states
  (``n`` bytes each), their fp32 block maxima (one per 256 elements) and two 256-entry fp32 quantisation maps;
  smaller tensors keep two fp32 states.

A torch multi-tensor (``foreach``) Adam step also allocates one temporary the size of the states it updates
(``torch._foreach_sqrt`` of ``exp_avg_sq``): ``step_workspace_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OPTIMIZERS", "PRECISIONS", "Precision", "live_optimizer_states", "optimizer_name", "optimizer_state_bytes",
           "precision", "step_traffic_bytes", "step_workspace_bytes", "uses_foreach"]


@dataclass(frozen=True)
class Precision:
    """One precision convention: bytes per element of each model state.

    Args:
        name (str): the convention's name.
        param_bytes (int): bytes per parameter element.
        grad_bytes (int): bytes per gradient element.
        state_bytes (int): bytes per optimizer-state element (a float state).
        master_bytes (int): bytes per element of the optimizer's master copy of the parameters (0: none).
        compute (str): the dtype activations are computed in: ``bf16``, ``fp16`` or ``fp32``.
    """

    name: str
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    master_bytes: int
    compute: str


PRECISIONS = {
    "32-true": Precision("32-true", 4, 4, 4, 0, "fp32"),
    "bf16-true": Precision("bf16-true", 2, 2, 2, 0, "bf16"),
    "bf16-mixed": Precision("bf16-mixed", 2, 2, 4, 4, "bf16"),
    "fp16-mixed": Precision("fp16-mixed", 2, 2, 4, 4, "fp16"),
}

#: Optimizers whose states ``optimizer_state_bytes`` counts.
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "adafactor", "adamw8bit")

_STEP_BYTES = 4  # torch keeps each parameter's step count in a 0-d fp32 tensor
_EIGHT_BIT_MIN = 4096  # bitsandbytes' min_8bit_size
_EIGHT_BIT_BLOCK = 256
_QMAP_BYTES = 256 * 4


def precision(name: str) -> Precision:
    """The convention called ``name``.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def optimizer_state_bytes(optimizer: str, shapes: Sequence[Sequence[int]], state_bytes: int,
                          amsgrad: bool = False) -> int:
    """Bytes of ``optimizer``'s states for trainable parameters of these shapes (module docstring).

    Args:
        optimizer (str): one of ``OPTIMIZERS``.
        shapes (Sequence[Sequence[int]]): each trainable parameter's shape.
        state_bytes (int): bytes per element of a float state (the parameter's for torch optimizers).
        amsgrad (bool, default False): Adam(W) keeps ``max_exp_avg_sq`` too.

    Raises:
        ValueError: an unknown optimizer.

    Example:
        >>> optimizer_state_bytes("adamw", [(1024, 1024)], state_bytes=2)
        4194308
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer in ("adamw", "adam"):
            total += (3 if amsgrad else 2) * n * state_bytes + _STEP_BYTES
        elif optimizer == "sgd-momentum":
            total += n * state_bytes
        elif optimizer == "adafactor":
            factored = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n
            total += factored * state_bytes + _STEP_BYTES
        elif optimizer == "adamw8bit":
            if n >= _EIGHT_BIT_MIN:
                total += 2 * (n + math.ceil(n / _EIGHT_BIT_BLOCK) * 4 + _QMAP_BYTES)
            else:
                total += 2 * n * 4
    return total


def step_workspace_bytes(optimizer: str, shapes: Sequence[Sequence[int]], state_bytes: int,
                         foreach: bool = True) -> int:
    """Bytes an optimizer step allocates for its own arithmetic beyond the states: a multi-tensor (``foreach``,
    torch's default for CUDA tensors) Adam step one temporary the size of all its states (``_foreach_sqrt``),
    the one-tensor-at-a-time step (torch's default on CPU) two of the largest parameter's (``sqrt``, then
    ``div``)."""
    if optimizer not in ("adamw", "adam"):
        return 0
    sizes = [math.prod(shape) for shape in shapes]
    return (sum(sizes) if foreach else 2 * max(sizes, default=0)) * state_bytes


#: Element reads and writes per parameter of one optimizer step, counted from torch 2.x's multi-tensor
#: implementations (``_multi_tensor_adamw``: lerp, mul, addcmul, sqrt, div, add, weight-decay mul, addcdiv;
#: ``_multi_tensor_sgd``: momentum mul and add, then the update); bitsandbytes' fused 8-bit kernel reads and
#: writes each state byte once.
_STEP_ACCESSES = {"adamw": 20, "adam": 20, "sgd": 3, "sgd-momentum": 8, "adafactor": 16, "adamw8bit": 6}


def step_traffic_bytes(optimizer: str, n_params: int, state_bytes: int) -> int:
    """Bytes one optimizer step reads and writes, for its time on a memory-bound device."""
    if optimizer not in _STEP_ACCESSES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    return _STEP_ACCESSES[optimizer] * n_params * state_bytes


def uses_foreach(optimizer, params) -> bool:
    """Whether a torch optimizer steps its parameters together (``foreach``): as asked in its groups, else
    torch's default, on for CUDA tensors; a fused step makes no temporaries either way."""
    flags = [g.get("foreach") for g in optimizer.param_groups]
    if any(g.get("fused") for g in optimizer.param_groups):
        return False
    if any(f is not None for f in flags):
        return any(flags)
    return bool(params) and all(p.is_cuda for p in params)


def optimizer_name(optimizer) -> str:
    """The ``OPTIMIZERS`` name of a live optimizer (its class), for counting its states before its first step.

    Raises:
        ValueError: a class memopt does not know; its states can still be read after one step.
    """
    name = type(optimizer).__name__
    if name in ("AdamW", "Adam"):
        return name.lower()
    if name == "SGD":
        return "sgd-momentum" if any(g.get("momentum", 0) for g in optimizer.param_groups) else "sgd"
    if name == "Adafactor":
        return "adafactor"
    if name in ("AdamW8bit", "Adam8bit", "PagedAdamW8bit", "PagedAdam8bit"):
        return "adamw8bit"
    raise ValueError(f"memopt does not know the states of {name} before its first step; call memopt.optimize "
                     "after one optimizer step (its states are then read as they are), or pass no optimizer to "
                     "count AdamW's")


def live_optimizer_states(optimizer) -> tuple[int, int, str]:
    """``(state bytes, step temporaries, how counted)`` of a live torch or bitsandbytes optimizer.

    After a step its states are read as they are (every distinct storage in ``optimizer.state``); before,
    they are counted from its class and its parameters' shapes and dtypes (module docstring).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    name = None
    try:
        name = optimizer_name(optimizer)
    except ValueError:
        if not all(optimizer.state.get(p) for p in params):
            raise
    foreach = uses_foreach(optimizer, params)
    workspace = 0
    if name:
        by_size = {}
        for p in params:
            by_size.setdefault(p.element_size(), []).append(p.shape)
        workspace = sum(step_workspace_bytes(name, shapes, size, foreach) for size, shapes in by_size.items())
    if params and all(optimizer.state.get(p) for p in params):
        seen: dict[int, int] = {}
        for p in params:
            for value in optimizer.state[p].values():
                if hasattr(value, "untyped_storage"):
                    seen[value.untyped_storage().data_ptr() or id(value)] = value.untyped_storage().nbytes()
        return sum(seen.values()), workspace, f"{type(optimizer).__name__}: its states as they are after a step"
    amsgrad = any(g.get("amsgrad", False) for g in optimizer.param_groups)
    total = sum(optimizer_state_bytes(name, [p.shape], p.element_size(), amsgrad=amsgrad) for p in params)
    return total, workspace, f"{type(optimizer).__name__}: counted from its class and its parameters"
