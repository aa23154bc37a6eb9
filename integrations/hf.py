"""Hugging Face Trainer integration: one callback plans and applies memopt when training starts.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MemoptCallback(budget="20GiB")])

At ``on_train_begin`` the callback takes the first batch of the Trainer's own dataloader (without moving
any random state, so the run's data order is the one it would have without memopt), profiles one step,
plans it under the budget and applies the plan; at ``on_train_end`` it removes it. Hugging Face
gradient checkpointing, when turned on, is turned off for the run: memopt's plan decides which layers
recompute, and checkpointing every layer on top of it would only cost time. PEFT/QLoRA models work: the
units are the base model's decoder layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("memopt.integrations.hf needs: pip install 'memopt[hf]'") from error

import memopt

__all__ = ["MemoptCallback"]


class MemoptCallback(TrainerCallback):
    """Apply a memopt plan for the Trainer's model while it trains.

    Args:
        budget (int | str | float): whole-step device bytes (``"20GiB"``), or a float in (0, 1]: that
            fraction of the profiled activation peak.
        config (memopt.MemoptConfig | None, default None): memopt options.

    Attributes:
        handle (memopt.Handle | None): the applied plan while training runs (``handle.report()``).
    """

    def __init__(self, budget: int | str | float, config: memopt.MemoptConfig | None = None) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, str, float)):
            raise ValueError(f"budget must be bytes ('20GiB' or an int) or a fraction like 0.5, got {budget!r}")
        self.budget = budget
        self.config = config or memopt.MemoptConfig()
        self.handle: memopt.Handle | None = None
        self._checkpointing: dict | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs: Any):
        if model is None or train_dataloader is None:
            raise ValueError("MemoptCallback needs the Trainer's model and train dataloader at on_train_begin")
        if _checkpointing_on(model):
            warnings.warn("memopt: Hugging Face gradient checkpointing is turned off for this run; the memopt plan "
                          "decides which layers recompute", stacklevel=2)
            self._checkpointing = dict(args.gradient_checkpointing_kwargs or {})
            if hasattr(model, "activation_checkpointing_disable"):
                model.activation_checkpointing_disable()
            else:
                model.gradient_checkpointing_disable()
        sample = _first_batch(train_dataloader, _device(model))
        self.handle = memopt.optimize(model, sample, self.budget, self.config)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs: Any):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self._checkpointing is not None and model is not None:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=self._checkpointing)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=self._checkpointing)
            self._checkpointing = None
        return control


def _checkpointing_on(model) -> bool:
    # transformers 5 renamed gradient checkpointing to activation checkpointing; older releases have only the first.
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _first_batch(dataloader, device: torch.device) -> dict:
    """The dataloader's first batch on ``device``; every RNG stream is as it was before."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        batch = next(iter(dataloader))
    if not isinstance(batch, dict):
        raise ValueError(f"MemoptCallback expects dict batches (input_ids, labels, ...), got {type(batch).__name__}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
