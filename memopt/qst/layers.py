"""Building blocks of the side network: downsamples and the narrow transformer layer.

Everything here is plain torch and architecture-independent: the side network only ever sees
``(batch, tokens, channels)`` hidden states, so one implementation serves every backbone family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterDownsample", "LinearDownsample", "PoolDownsample", "SideBlock", "make_downsample", "side_mask"]

_INIT_STD = 0.02


class AdapterDownsample(nn.Module):
    """d -> rank -> d/r through two bias-free linears and a SiLU: few parameters, full expressiveness.

    Args:
        in_features (int): backbone hidden size d.
        out_features (int): side width d/r.
        rank (int): bottleneck width.
    """

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(hidden)))


class LinearDownsample(nn.Module):
    """d -> d/r in one linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PoolDownsample(nn.Module):
    """Parameter-free: max or mean over each group of ``factor`` adjacent channels.

    The backbone's hidden states never require grad and a pool has no parameters, so autograd records
    nothing here: no tensor of the backbone's width is held for backward.
    """

    def __init__(self, factor: int, mode: str):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pool mode must be 'max' or 'avg', got {mode!r}")
        self.factor = factor
        self.mode = mode

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        grouped = hidden.unflatten(-1, (hidden.shape[-1] // self.factor, self.factor))
        return grouped.amax(-1) if self.mode == "max" else grouped.mean(-1)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, mode={self.mode!r}"


def make_downsample(kind: str, in_features: int, out_features: int, rank: int) -> nn.Module:
    """The downsample named by ``QSTConfig.downsample``."""
    if kind == "adapter":
        return AdapterDownsample(in_features, out_features, rank)
    if kind == "linear":
        return LinearDownsample(in_features, out_features)
    if kind in ("maxpool", "avgpool"):
        return PoolDownsample(in_features // out_features, kind[:3])
    raise ValueError(f"unknown downsample {kind!r}; use 'adapter', 'linear', 'maxpool' or 'avgpool'")


def side_mask(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """Boolean (batch, 1, tokens, tokens) mask: causal and blind to padded keys; None when causal alone.

    A query may always see itself, so a padded query row is never fully masked (which would give NaN).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    device = attention_mask.device
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    keys = attention_mask[:, None, None, -tokens:].bool()
    return (causal & keys) | torch.eye(tokens, dtype=torch.bool, device=device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class SideAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions, at side width.

    Rotary positions let the side network locate tokens on its own: not every backbone family writes
    absolute positions into its hidden states.
    """

    def __init__(self, width: int, heads: int, rope_base: float = 10000.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"side width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        rotary = self.head_dim - self.head_dim % 2
        inv_freq = 1.0 / rope_base ** (torch.arange(0, rotary, 2, dtype=torch.float32) / max(rotary, 1))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rotary = self.inv_freq.numel() * 2
        if rotary == 0:
            return x
        angles = positions[:, None, :, None].to(torch.float32) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated = x[..., :rotary] * cos + _rotate_half(x[..., :rotary]) * sin
        return torch.cat((rotated, x[..., rotary:]), dim=-1) if rotary < x.shape[-1] else rotated

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, _ = hidden.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q = self._rope(split(self.q_proj(hidden)), positions)
        k = self._rope(split(self.k_proj(hidden)), positions)
        v = split(self.v_proj(hidden))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class SideMLP(nn.Module):
    """Gated SiLU MLP at side width."""

    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, intermediate, bias=False)
        self.up_proj = nn.Linear(width, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class SideBlock(nn.Module):
    """One pre-norm side transformer layer, ``r`` times narrower than the backbone's.

    Args:
        width (int): side width d/r.
        heads (int): attention heads; must divide ``width``.
        intermediate (int): MLP inner width.
    """

    def __init__(self, width: int, heads: int, intermediate: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=1e-6)
        self.attn = SideAttention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=1e-6)
        self.mlp = SideMLP(width, intermediate)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_norm(hidden), positions, mask)
        return hidden + self.mlp(self.mlp_norm(hidden))


def init_side_weights(module: nn.Module, num_blocks: int) -> None:
    """GPT-2 style init: N(0, 0.02), residual output projections scaled down by sqrt(2 x layers)."""
    residual_std = _INIT_STD / math.sqrt(2 * max(num_blocks, 1))
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else _INIT_STD
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
