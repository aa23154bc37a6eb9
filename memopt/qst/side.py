"""The side network: everything QST trains, and all that ``save_pretrained`` stores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import QSTConfig
from .layers import SideBlock, init_side_weights, make_downsample, side_mask

__all__ = ["SideNetwork"]


class SideNetwork(nn.Module):
    """A narrow transformer fed by the backbone's hidden states.

    With ``h_0`` the backbone's embedding output and ``h_1 .. h_n`` the outputs of the fed layers::

        s_0 = down_0(h_0)
        s_i = beta_i * down_i(h_i) + (1 - beta_i) * side_layer_i(s_{i-1}),   beta_i = sigmoid(gamma_i)
        out = (1 - alpha) * h_final + alpha * up(norm(s_n))

    ``h_final`` is the backbone's last hidden state (what its LM head reads). ``alpha`` is a plain
    scalar that starts at exactly 0, so an untrained side network returns ``h_final`` bit for bit.

    Args:
        config (QSTConfig): the QST options.
        hidden_size (int): backbone width d (decoder layers).
        out_features (int): width of the LM head's input (differs from d for e.g. OPT-350m).
        num_fed (int): number of fed backbone layers, one side layer each.
        backbone_heads (int): the backbone's attention heads; the side layers get ``heads / r`` of them.
        intermediate_size (int): the backbone's MLP inner width; the side MLP gets ``1 / r`` of it.
    """

    def __init__(
        self,
        config: QSTConfig,
        *,
        hidden_size: int,
        out_features: int,
        num_fed: int,
        backbone_heads: int,
        intermediate_size: int,
    ):
        super().__init__()
        width = config.side_width(hidden_size)
        heads = max(1, backbone_heads // config.r)
        while width % heads:
            heads -= 1
        intermediate = max(1, intermediate_size // config.r)
        self.width = width
        self.downsamples = nn.ModuleList(
            make_downsample(config.downsample, hidden_size, width, config.adapter_rank) for _ in range(num_fed + 1)
        )
        # gamma_i = 0 starts every gate at beta = 1/2: side path and backbone input weigh the same.
        self.gate_logits = nn.Parameter(torch.zeros(num_fed))
        self.blocks = nn.ModuleList(SideBlock(width, heads, intermediate) for _ in range(num_fed))
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.upsample = nn.Linear(width, out_features, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))
        init_side_weights(self, num_fed)

    @property
    def betas(self) -> torch.Tensor:
        """The mixing gates beta_i = sigmoid(gamma_i), one per side layer."""
        return torch.sigmoid(self.gate_logits)

    def forward(
        self,
        states: Sequence[torch.Tensor],
        final_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix the side network's output into the backbone's final hidden state.

        Args:
            states (Sequence[torch.Tensor]): ``h_0 .. h_n``, each (batch, tokens, d), without grad.
            final_hidden (torch.Tensor): the backbone's last hidden state (batch, tokens, out_features).
            attention_mask (torch.Tensor | None, default None): (batch, tokens), 1 for real tokens.

        Returns:
            torch.Tensor: the LM head's input, in ``final_hidden``'s dtype.
        """
        if len(states) != len(self.downsamples):
            raise ValueError(f"side network expects {len(self.downsamples)} hidden states, got {len(states)}")
        dtype = self.alpha.dtype
        tokens = final_hidden.shape[1]
        if attention_mask is None:
            positions = torch.arange(tokens, device=final_hidden.device).expand(final_hidden.shape[0], -1)
        else:
            # Left padding (as in batched generation) must not shift the real tokens' positions.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens:]
        mask = side_mask(attention_mask, tokens)
        betas = self.betas
        side = self.downsamples[0](states[0].to(dtype))
        for i, block in enumerate(self.blocks):
            fed = self.downsamples[i + 1](states[i + 1].to(dtype))
            side = betas[i] * fed + (1 - betas[i]) * block(side, positions, mask)
        side_out = self.upsample(self.norm(side))
        mixed = (1 - self.alpha) * final_hidden.to(dtype) + self.alpha * side_out
        return mixed.to(final_hidden.dtype)
