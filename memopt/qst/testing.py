"""Tiny Hugging Face causal LMs of every family QST supports, built from configs (no download).

Used by the tests, the QST benchmark and the example; each call with the same arguments returns the
same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "tiny_causal_lm", "tiny_classifier", "tiny_config", "wake_side"]

FAMILIES = ("gpt2", "llama", "mistral", "opt", "qwen2")


def tiny_config(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 128,
    max_positions: int = 512,
) -> Any:
    """A Hugging Face config of ``family`` with the given shape.

    Args:
        family (str, default "llama"): one of ``FAMILIES``.
        hidden_size (int, default 64): model width.
        num_layers (int, default 2): decoder layers.
        heads (int, default 4): attention heads (key/value heads are half of them where the family
            has grouped-query attention).
        intermediate_size (int | None, default None): MLP width; None means ``4 * hidden_size``.
        vocab_size (int, default 128): vocabulary size.
        max_positions (int, default 512): longest sequence.
    """
    import transformers

    inner = intermediate_size or 4 * hidden_size
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    kv_heads = max(1, heads // 2)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=heads, n_inner=inner, vocab_size=vocab_size,
            n_positions=max_positions, **special,
        )
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=heads, ffn_dim=inner,
            vocab_size=vocab_size, max_position_embeddings=max_positions, word_embed_proj_dim=hidden_size,
            **special,
        )
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return getattr(transformers, classes[family])(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=inner, vocab_size=vocab_size,
        max_position_embeddings=max_positions, **special,
    )


def tiny_causal_lm(family: str = "llama", *, seed: int = 0, **shape: Any) -> nn.Module:
    """A randomly initialised causal LM from ``tiny_config(family, **shape)``, float32, on the CPU.

    Args:
        family (str, default "llama"): one of ``FAMILIES``.
        seed (int, default 0): torch seed for the weights; the global RNG state is left as it was.
        **shape: forwarded to ``tiny_config``.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_classifier(family: str = "llama", *, num_labels: int = 2, seed: int = 0, **shape: Any) -> nn.Module:
    """A randomly initialised ``*ForSequenceClassification`` from ``tiny_config(family, **shape)``.

    Its backbone weights equal ``tiny_causal_lm``'s for the same seed and shape; padding is token 1.

    Args:
        family (str, default "llama"): one of ``FAMILIES``.
        num_labels (int, default 2): classes of the new head.
        seed (int, default 0): torch seed for the weights; the global RNG state is left as it was.
        **shape: forwarded to ``tiny_config``.
    """
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(family, **shape)
    config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    return model.eval()


def wake_side(qst: nn.Module, *, seed: int = 0, std: float = 1.0) -> None:
    """Give ``qst.side``'s zero-started upsample random weights, in place, as training would.

    An untrained side network adds exactly nothing to the backbone; tests that must see whether the
    side network is used (generation, devices, gradients) wake it first.

    Args:
        qst (nn.Module): a ``QSTModel``.
        seed (int, default 0): seed of the weights; the global RNG state is left as it was.
        std (float, default 1.0): their standard deviation.
    """
    weight = qst.side.upsample.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)
