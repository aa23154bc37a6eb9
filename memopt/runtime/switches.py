"""Model switches a plan needs while it is applied, each restored exactly when it is removed.

- **The KV cache is off for training forwards.** A Hugging Face model built with ``use_cache=True`` (the
  default of most configs) fills a cache with every layer's keys and values during a training forward and
  returns it with the loss, so they stay alive through the backward, whatever the plan drops; a recompute
  would append them to the cache a second time. As Hugging Face gradient checkpointing does, a forward
  that runs in train mode with gradients gets ``use_cache=False``; eval and no-grad forwards (generation)
  are untouched.
- **Hugging Face gradient checkpointing is off.** The plan decides which layers recompute; checkpointing
  every layer underneath it would recompute twice.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .._warn import warn

__all__ = ["ModelSwitches", "cache_module", "checkpointing_modules"]


def cache_module(model: nn.Module) -> tuple[nn.Module, int | None] | None:
    """The outermost module whose forward takes ``use_cache`` and whose config turns it on by default, with
    the parameter's positional index (None when it can only be passed by keyword); None when there is none."""
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        if not getattr(config, "use_cache", False):
            continue
        try:
            parameters = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            continue
        for index, parameter in enumerate(parameters):
            if parameter.name == "use_cache":
                positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                return module, index if positional else None
    return None


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with Hugging Face gradient checkpointing turned on (``module.gradient_checkpointing`` true)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


class ModelSwitches:
    """Turn the cache off for training forwards and Hugging Face gradient checkpointing off; ``restore()``
    puts both back as they were.

    Args:
        model (nn.Module): the model.
        announce (bool, default False): warn once about each switch that changes something (the applied
            plan does; a profile, which restores them at once, does not).
    """

    def __init__(self, model: nn.Module, announce: bool = False) -> None:
        self._hook = None
        self._checkpointing: list[tuple[nn.Module, bool, object]] = []
        found = cache_module(model)
        if found is not None:
            module, index = found
            self._hook = module.register_forward_pre_hook(_cache_off(index), with_kwargs=True)
            if announce:
                warn(
                    f"memopt: {type(module).__name__} is configured with use_cache=True, which keeps every layer's "
                    "keys and values for the whole training step and would make a recompute append them again; "
                    "training forwards run with use_cache=False while the plan is applied (as Hugging Face gradient "
                    "checkpointing does). Eval and no-grad forwards (generate) keep the cache; handle.remove() "
                    "restores everything")
        for module in checkpointing_modules(model):
            own = module.__dict__.get("gradient_checkpointing", _MISSING)
            self._checkpointing.append((module, own is not _MISSING, own))
            module.gradient_checkpointing = False
        if self._checkpointing and announce:
            warn(
                "memopt: Hugging Face gradient checkpointing is turned off while the plan is applied: the plan "
                "decides which layers recompute; handle.remove() turns it back on")

    def restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for module, own, value in self._checkpointing:
            if own:
                module.gradient_checkpointing = value
            else:
                module.__dict__.pop("gradient_checkpointing", None)
        self._checkpointing = []


_MISSING = object()


def _cache_off(index: int | None):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if not (module.training and torch.is_grad_enabled()) or torch.is_inference_mode_enabled():
            return None
        if index is not None and len(args) > index:
            if args[index] is False:
                return None
            args = (*args[:index], False, *args[index + 1:])
            return args, kwargs
        if kwargs.get("use_cache") is False:
            return None
        return args, {**kwargs, "use_cache": False}

    return hook
