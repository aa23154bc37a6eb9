"""Hugging Face Trainer integration: one callback plans and applies memopt when training starts.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MemoptCallback(budget="20GiB")])

At ``on_train_begin`` the callback takes the first batch of the Trainer's own dataloader (without moving
any random state, so the run's data order is the one it would have without memopt), profiles one step,
plans it under the budget and applies the plan; at ``on_train_end`` it removes it. As for any applied
plan, Hugging Face gradient checkpointing (``gradient_checkpointing=True``) and the KV cache of training
forwards are turned off while it runs and back on after (``memopt.runtime.switches``): memopt's plan
decides which layers recompute. PEFT/QLoRA models work: the units are the base model's decoder layers.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("memopt.integrations.hf needs: pip install 'memopt[hf]'") from error

import memopt
from memopt.units import parse_budget

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
        parse_budget(budget)
        self.budget = budget
        self.config = config or memopt.MemoptConfig()
        self.handle: memopt.Handle | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs: Any):
        if model is None or train_dataloader is None:
            raise ValueError("MemoptCallback needs the Trainer's model and train dataloader at on_train_begin")
        _refuse_wrapped(args)
        sample = _first_batch(train_dataloader, _device(model))
        self.handle = memopt.optimize(model, sample, self.budget, self.config)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs: Any):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        return control


def _refuse_wrapped(args) -> None:
    """The callback runs after accelerate has wrapped the model: under a DeepSpeed or FSDP config its profile
    would run with their hooks live (gradient reduction, parameter gathering) and plan the wrong step."""
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        raise ValueError(f"MemoptCallback cannot plan a Trainer run with a DeepSpeed config (deepspeed={deepspeed!r}):"
                         " the callback sees the model after DeepSpeed has wrapped it. Put a \"memopt\" section in "
                         "the DeepSpeed config and train with memopt.integrations.deepspeed.initialize, or drop "
                         "the callback")
    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        raise ValueError(f"MemoptCallback cannot plan a Trainer run with FSDP (fsdp={fsdp!r}): the callback sees "
                         "the model after accelerate has sharded it. Shard it with fully_shard and train with "
                         "memopt.integrations.fsdp.optimize, or drop the callback")


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
