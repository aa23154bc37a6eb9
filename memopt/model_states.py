"""A live model's states as its training holds them: parameters, gradients, optimizer states, and when.

``live_model_states(model, config, optimizer, head_side)`` reads the parameters and their dtypes; the
optimizer's states from the live optimizer when one is given (``memopt.precision.live_optimizer_states``),
else counts ``config.optimizer``'s for the trainable parameters, in their dtype, or in fp32 with an fp32
master copy when ``config.precision`` is a mixed convention. Gradients are split by when backward makes
them: each unit's own (``Unit.param_grad_bytes``), the head side's (parameters outside the units that the
step uses after them) and the rest (embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import MemoptConfig
from .precision import PRECISIONS, live_optimizer_states, optimizer_state_bytes, step_traffic_bytes, step_workspace_bytes

__all__ = ["LiveStates", "live_model_states"]


@dataclass(frozen=True)
class LiveStates:
    """Model-state bytes of a live model (see the module docstring)."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    optimizer_step_bytes: int
    optimizer_traffic_bytes: int
    head_grad_bytes: int
    other_grad_bytes: int
    convention: str


def _distinct(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def live_model_states(model: nn.Module, config: MemoptConfig, optimizer=None,
                      unit_modules: list[nn.Module] = (), head_side: set[int] = frozenset()) -> LiveStates:
    """Count ``model``'s states.

    Args:
        model (nn.Module): the model.
        config (MemoptConfig): ``optimizer`` and ``precision`` when no live optimizer is given.
        optimizer (torch.optim.Optimizer | None): the optimizer that trains the model.
        unit_modules (list[nn.Module]): the planning units' modules.
        head_side (set[int]): ids of the parameters outside the units that the step uses after them.
    """
    params = _distinct(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    in_units = {id(p) for m in unit_modules for p in m.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    head = sum(p.numel() * p.element_size() for p in trainable if id(p) in head_side and id(p) not in in_units)
    other = sum(p.numel() * p.element_size() for p in trainable if id(p) not in head_side and id(p) not in in_units)
    n_trainable = sum(p.numel() for p in trainable)
    if optimizer is not None:
        states, workspace, convention = live_optimizer_states(optimizer)
        traffic = sum(step_traffic_bytes(_name(optimizer), p.numel(), p.element_size()) for p in trainable)
        return LiveStates(param_bytes, grad_bytes, states, workspace, traffic, head, other, convention)
    mixed = config.precision is not None and PRECISIONS[config.precision].master_bytes > 0
    master = 4 * n_trainable if mixed and any(p.element_size() < 4 for p in trainable) else 0
    states = traffic = 0
    foreach = bool(trainable) and all(p.is_cuda for p in trainable)  # torch's default
    widths: dict[int, list] = {}
    for p in trainable:
        width = 4 if master else p.element_size()
        widths.setdefault(width, []).append(p.shape)
        states += optimizer_state_bytes(config.optimizer, [p.shape], width)
        traffic += step_traffic_bytes(config.optimizer, p.numel(), width)
    workspace = sum(step_workspace_bytes(config.optimizer, shapes, width, foreach) for width, shapes in widths.items())
    convention = (f"{config.optimizer} counted for the trainable parameters, states in "
                  f"{'fp32 with an fp32 master copy' if master else 'the parameters dtype'}")
    return LiveStates(param_bytes, grad_bytes, states + master, workspace, traffic, head, other, convention)


def _name(optimizer) -> str:
    from .precision import optimizer_name

    try:
        return optimizer_name(optimizer)
    except ValueError:
        return "adamw"
