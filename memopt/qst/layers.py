"""Building blocks of the side network: downsamples, float32 norms, the narrow transformer layer and its
key/value cache.

Everything here is plain torch and architecture-independent: the side network only ever sees
``(batch, tokens, channels)`` hidden states, so one implementation serves every backbone family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdapterDownsample", "FP32LayerNorm", "FP32RMSNorm", "LinearDownsample", "PoolDownsample", "SideBlock",
    "SideCache", "make_downsample", "side_mask",
]


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm computed in float32 with a float32 weight; the result comes back in the input's dtype."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden.float(), self.normalized_shape, self.weight, self.eps).to(hidden.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 with float32 parameters; the result comes back in the input's dtype."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(hidden.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(hidden.dtype)


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


def make_downsample(kind: str, in_features: int, out_features: int, rank: int, norm: bool) -> nn.Module:
    """The downsample named by ``QSTConfig.downsample``, followed by a float32 LayerNorm when ``norm``."""
    if kind == "adapter":
        down: nn.Module = AdapterDownsample(in_features, out_features, rank)
    elif kind == "linear":
        down = LinearDownsample(in_features, out_features)
    elif kind in ("maxpool", "avgpool"):
        down = PoolDownsample(in_features // out_features, kind[:3])
    else:
        raise ValueError(f"unknown downsample {kind!r}; use 'adapter', 'linear', 'maxpool' or 'avgpool'")
    return nn.Sequential(down, FP32LayerNorm(out_features)) if norm else down


class SideCache:
    """Keys and values of every side layer for the tokens seen so far: the side network's KV cache.

    One lives for one ``generate`` call. Each side layer appends its new keys and values in
    ``update``; ``length`` is how many tokens are cached.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        """Tokens cached so far (0 before the first forward)."""
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``keys`` / ``values`` (batch, heads, tokens, head_dim) of ``layer``; return all of them."""
        if layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], keys], dim=2)
            self.values[layer] = torch.cat([self.values[layer], values], dim=2)
        return self.keys[layer], self.values[layer]


def side_mask(attention_mask: torch.Tensor | None, tokens: int, past: int = 0) -> torch.Tensor | None:
    """Boolean (batch or 1, 1, tokens, past + tokens) mask for ``tokens`` new queries after ``past`` cached
    keys: causal and blind to padded keys. None when plain causal attention (or, for one new token,
    attention to everything) is exact.

    A query may always see itself, so a padded query row is never fully masked (which would give NaN).
    """
    total = past + tokens
    padded = attention_mask is not None and not bool(attention_mask[:, -total:].all())
    if not padded and (past == 0 or tokens == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    query = torch.arange(past, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    causal = key <= query
    if not padded:
        return causal[None, None]
    keys = attention_mask[:, None, None, -total:].bool()
    return (causal & keys) | (key == query)


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
        angles = positions[:, None, :, None].to(torch.float32) * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated = x[..., :rotary] * cos + _rotate_half(x[..., :rotary]) * sin
        return torch.cat((rotated, x[..., rotary:]), dim=-1) if rotary < x.shape[-1] else rotated

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: SideCache | None = None, layer: int = 0,
    ) -> torch.Tensor:
        batch, tokens, _ = hidden.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q = self._rope(split(self.q_proj(hidden)), positions)
        k = self._rope(split(self.k_proj(hidden)), positions)
        v = split(self.v_proj(hidden))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Without a mask, more than one query means no cache before them (side_mask): plain causal.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and tokens > 1)
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
        self.attn_norm = FP32RMSNorm(width, eps=1e-6)
        self.attn = SideAttention(width, heads)
        self.mlp_norm = FP32RMSNorm(width, eps=1e-6)
        self.mlp = SideMLP(width, intermediate)

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: SideCache | None = None, layer: int = 0,
    ) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_norm(hidden), positions, mask, cache, layer)
        return hidden + self.mlp(self.mlp_norm(hidden))


def init_side_weights(module: nn.Module, num_blocks: int) -> None:
    """Width-aware init: N(0, 1/fan_in) for every linear, residual output projections scaled down by
    sqrt(2 x layers), as GPT-2 does.

    A fixed std of 0.02 (what the backbone's own config prescribes) suits a 1024-wide layer; at the side
    width of 32-256 it leaves every projection several times too small, and at the paper's learning
    rates (1e-4) Adam needs thousands of steps to grow them.
    """
    residual = 1.0 / math.sqrt(2 * max(num_blocks, 1))
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = 1.0 / math.sqrt(sub.in_features)
            if name.endswith(("o_proj", "down_proj")):
                std *= residual
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
