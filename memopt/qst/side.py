"""The side network: everything QST trains, and all that ``save_pretrained`` stores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import QSTConfig
from .layers import FP32RMSNorm, SideBlock, SideCache, init_side_weights, make_downsample, side_mask

__all__ = ["GATE_GAIN", "SideNetwork"]

# Gates are sigmoid(GATE_GAIN * logit). Adam moves a parameter by about the learning rate per step
# whatever its gradient, so a plain logit moves a gate by ~lr/4 a step: 0.0075 in 300 steps at the
# paper's 1e-4. The gain makes that 0.75 (a gate can swing from 1/2 to 0.9), and at lr 1e-2 still only
# a quarter per step.
GATE_GAIN = 100.0


def _cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` for a freshly built module, by new parameters rather than swapped storage, so it also
    works on fake tensors (``memopt plan --qst`` builds the side network of a model it only traces)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dtype != dtype:
            setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))


class SideNetwork(nn.Module):
    """A narrow transformer fed by the backbone's hidden states.

    With ``h_0`` the backbone's embedding output and ``h_1 .. h_n`` the outputs of the fed layers::

        s_0 = down_0(h_0)
        s_i = b_i * down_i(h_i) + (1 - b_i) * side_layer_i(s_{i-1}),   b_i = sigmoid(GATE_GAIN * g_i)
        out = h_final + a * up(norm(s_n)),                             a = sigmoid(GATE_GAIN * g_out)

    ``h_final`` is the backbone's last hidden state (what its head reads). The gates ``b_i`` (one per
    side channel and layer) and ``a`` (one per output channel) are the authors' sigmoid gates; ``up``
    starts at zero, so an untrained side network returns ``h_final`` bit for bit and the side's
    correction then grows as fast as any weight trains, with no scalar to climb from 0 first.

    Weights live in ``dtype``; norms and gate logits stay float32 (their updates are finer than
    bfloat16 resolves), and gates are cast to ``dtype`` before they touch an activation, so nothing of
    the backbone's width is ever copied to float32.

    Args:
        config (QSTConfig): the QST options.
        hidden_size (int): backbone width d (decoder layers).
        out_features (int): width of the head's input (differs from d for e.g. OPT-350m).
        num_fed (int): number of fed backbone layers, one side layer each.
        backbone_heads (int): the backbone's attention heads; the side layers get ``heads / r`` of them.
        intermediate_size (int): the backbone's MLP inner width; the side MLP gets ``1 / r`` of it.
        dtype (torch.dtype, default torch.float32): dtype of the linear weights and activations.
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
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        width = config.side_width(hidden_size)
        heads = max(1, backbone_heads // config.r)
        while width % heads:
            heads -= 1
        intermediate = max(1, intermediate_size // config.r)
        self.width = width
        self.downsamples = nn.ModuleList(
            make_downsample(config.downsample, hidden_size, width, config.adapter_rank, config.downsample_norm)
            for _ in range(num_fed + 1)
        )
        # Logit 0: every gate starts at 1/2, side path and backbone input weighing the same.
        self.ladder_logits = nn.Parameter(torch.zeros(num_fed, width))
        self.blocks = nn.ModuleList(SideBlock(width, heads, intermediate) for _ in range(num_fed))
        self.norm = FP32RMSNorm(width, eps=1e-6)
        self.upsample = nn.Linear(width, out_features, bias=False)
        self.output_logits = nn.Parameter(torch.zeros(out_features))
        init_side_weights(self, num_fed)
        nn.init.zeros_(self.upsample.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _cast_parameters(module, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the side network's weights and activations."""
        return self.upsample.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device the side network computes on; hidden states are moved here."""
        return self.upsample.weight.device

    @property
    def ladder_gates(self) -> torch.Tensor:
        """``b_i``, (fed layers, side width): the weight of each fed hidden state against the side path."""
        return torch.sigmoid(GATE_GAIN * self.ladder_logits)

    @property
    def output_gate(self) -> torch.Tensor:
        """``a``, (out_features,): how much of the side network's correction reaches the head."""
        return torch.sigmoid(GATE_GAIN * self.output_logits)

    def forward(
        self,
        states: Sequence[torch.Tensor],
        final_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: SideCache | None = None,
    ) -> torch.Tensor:
        """Add the side network's correction to the backbone's final hidden state.

        Args:
            states (Sequence[torch.Tensor]): ``h_0 .. h_n``, each (batch, new tokens, d), without grad,
                on any device.
            final_hidden (torch.Tensor): the backbone's last hidden state, (batch, kept tokens,
                out_features); may cover only the last tokens of ``states`` (``logits_to_keep``).
            attention_mask (torch.Tensor | None, default None): (batch, cached + new tokens), 1 for real
                tokens.
            cache (SideCache | None, default None): keys and values of the tokens before ``states``;
                the new tokens' are appended to it.

        Returns:
            torch.Tensor: the head's input, in ``final_hidden``'s dtype, on the side network's device.

        Raises:
            ValueError: the number of states does not match the side network.
            RuntimeError: ``attention_mask`` does not cover the cached and the new tokens.
        """
        if len(states) != len(self.downsamples):
            raise ValueError(f"side network expects {len(self.downsamples)} hidden states, got {len(states)}")
        device, dtype = self.device, self.dtype
        batch, tokens = states[0].shape[:2]
        past = cache.length if cache is not None else 0
        # Positions and mask are made where the backbone's mask lives (reading it there needs no copy,
        # and works when the side network sits on another device), then moved.
        if attention_mask is None:
            positions = torch.arange(past, past + tokens).expand(batch, -1)
        else:
            if attention_mask.shape[-1] != past + tokens:
                raise RuntimeError(
                    f"the attention mask covers {attention_mask.shape[-1]} tokens, but the side network's cache "
                    f"holds {past} and {tokens} are new; a generation mode that rewinds the backbone's cache "
                    "needs use_cache=False"
                )
            # Left padding (as in batched generation) must not shift the real tokens' positions.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens:]
        mask = side_mask(attention_mask, tokens, past)
        positions = positions.to(device)
        mask = mask.to(device) if mask is not None else None
        ladder = self.ladder_gates.to(dtype)
        side = self.downsamples[0](states[0].to(device=device, dtype=dtype))
        for i, block in enumerate(self.blocks):
            fed = self.downsamples[i + 1](states[i + 1].to(device=device, dtype=dtype))
            side = ladder[i] * fed + (1 - ladder[i]) * block(side, positions, mask, cache, i)
        # The head may read only the last tokens (generate's logits_to_keep); the cache needed all.
        side = side[:, side.shape[1] - final_hidden.shape[1]:]
        correction = self.upsample(self.norm(side)) * self.output_gate.to(dtype)
        return final_hidden.to(device) + correction.to(final_hidden.dtype)
