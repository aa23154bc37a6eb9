"""Fine-tuning setups for ``memopt plan``: LoRA adapters, and QLoRA's 4-bit base, on a model of fake tensors.

``add_lora(model, rank)`` freezes the model and puts a LoRA branch (``lora_B(lora_A(x)) * alpha / rank``, as
PEFT's ``LoraLayer`` computes it) beside every ``nn.Linear`` but the LM head, on the device and dtype of the
layer (PEFT itself moves parameters with ``.to()``, which fake tensors refuse). Only the adapters train: a
frozen linear saves nothing for its own weight, so the step's activations are what PEFT's would be.

QLoRA stores those base weights in bitsandbytes' NF4 with double quantisation (``nf4_bytes``, checked against
bitsandbytes' own tensors in ``tests/test_fake_adapters.py``) and dequantises each into a bf16 temporary when
it runs: one such weight is the extra workspace of a unit (``dequantized_bytes``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoraLinear", "add_lora", "dequantized_bytes", "nf4_bytes"]

_BLOCK = 64  # bitsandbytes' NF4 block size
_BLOCK2 = 256  # blocks per second-level block of the double quantisation
_CODE_BYTES = 16 * 4  # the NF4 code book: 16 fp32 values
_CODE2_BYTES = 256 * 4  # the 8-bit code of the quantised block maxima
_OFFSET_BYTES = 4


def nf4_bytes(n_elements: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps for a weight of ``n_elements`` in NF4: two 4-bit values per byte, one maximum per
    block of 64 (fp32, or uint8 plus one fp32 per 256 blocks and an offset with double quantisation), code books."""
    blocks = math.ceil(n_elements / _BLOCK)
    packed = math.ceil(n_elements / 2)
    if not double_quant:
        return packed + 4 * blocks + _CODE_BYTES
    return packed + blocks + 4 * math.ceil(blocks / _BLOCK2) + _CODE_BYTES + _OFFSET_BYTES + _CODE2_BYTES


class LoraLinear(nn.Module):
    """A frozen linear with a trainable low-rank branch beside it (PEFT's ``LoraLayer`` arithmetic)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0) -> list[nn.Linear]:
    """Freeze ``model`` and wrap every ``nn.Linear`` but its LM head in a ``LoraLinear``; returns the wrapped
    base layers.

    Raises:
        ValueError: a rank below 1, or a model without a linear layer to adapt.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}; e.g. --lora 16")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    model.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear besides its LM head for LoRA to adapt")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(linear, rank, alpha))
    return [linear for _, linear in targets]


def dequantized_bytes(module: nn.Module) -> int:
    """The largest bf16 weight a QLoRA base layer of ``module`` dequantises while it runs."""
    return max((2 * m.base_layer.weight.numel() for m in module.modules() if isinstance(m, LoraLinear)), default=0)
