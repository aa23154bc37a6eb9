"""Tiny models for tests, examples and the demo: one constructor per family, seeded, CPU-sized."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HF_FAMILIES", "TinyConvNet", "TinyMLP", "hf_causal_lm", "hf_sample"]


class TinyMLP(nn.Module):
    """A stack of position-wise residual MLP blocks over (batch, tokens, hidden); token-separable units."""

    def __init__(self, hidden: int = 64, depth: int = 4, expansion: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, expansion * hidden), nn.GELU(),
                          nn.Dropout(dropout), nn.Linear(expansion * hidden, hidden))
            for _ in range(depth)
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).square().mean()


class TinyConvNet(nn.Module):
    """A small residual conv net with BatchNorm; its blocks are not token-separable."""

    def __init__(self, channels: int = 16, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
            for _ in range(depth)
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        x = self.stem(images)
        for layer in self.layers:
            x = x + layer(x)
        logits = self.head(x.mean(dim=(2, 3)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


# family -> (config class name, keyword arguments); tiny, but every structural feature present.
HF_FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=512)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=512,
                                resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=512)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=512)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, vocab_size=256, max_position_embeddings=512)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                              vocab_size=256, max_position_embeddings=512, word_embed_proj_dim=64)),
}


def hf_causal_lm(family: str, seed: int = 0, attn_implementation: str = "eager", **overrides) -> nn.Module:
    """A tiny Hugging Face causal LM of one family (needs ``transformers``), in train mode."""
    import transformers

    if family not in HF_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(HF_FAMILIES)}")
    config_name, kwargs = HF_FAMILIES[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    config._attn_implementation = attn_implementation
    config.use_cache = False
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.train()


def hf_sample(vocab_size: int = 256, batch: int = 2, seq: int = 64, seed: int = 0) -> dict:
    """A batch of random token ids with labels for a causal LM."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
