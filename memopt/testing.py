"""Tiny models for tests, examples and the demo: one constructor per family, seeded, CPU-sized."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["HF_FAMILIES", "TinyConvNet", "TinyGPT", "TinyMLP", "hf_causal_lm", "hf_sample", "hf_t5", "hf_t5_sample", "max_difference", "metered_loop",
           "metered_step", "snapshot", "train"]


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


class _GPTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(batch, tokens, hidden)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TinyGPT(nn.Module):
    """A small decoder-only transformer in plain torch (no transformers needed); returns the LM loss."""

    def __init__(self, vocab: int = 1024, hidden: int = 256, layers: int = 8, heads: int = 4,
                 max_tokens: int = 2048, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_tokens, hidden)
        self.layers = nn.ModuleList(_GPTBlock(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


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
    # Tied embeddings scaled by sqrt(hidden); Gemma-2 adds soft-capped logits (divide, tanh, multiply).
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512)),
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
                                    sliding_window=128)),
}


def hf_causal_lm(family: str, seed: int = 0, attn_implementation: str = "eager", **overrides) -> nn.Module:
    """A tiny Hugging Face causal LM of one family (needs ``transformers``), in train mode, built exactly as its
    config builds it (``use_cache`` and every other default as the config has them) but for ``overrides`` and
    the attention implementation."""
    import transformers

    if family not in HF_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(HF_FAMILIES)}")
    config_name, kwargs = HF_FAMILIES[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.train()


def hf_t5(seed: int = 0) -> nn.Module:
    """A small T5 (needs ``transformers``): vocab 4096, 3 encoder and 3 decoder layers, in train mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=4096, d_model=128, d_kv=32, d_ff=256, num_layers=3, num_decoder_layers=3,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config).train()


def hf_t5_sample(batch: int = 2, seq: int = 512, seed: int = 0) -> dict:
    """Random input ids and labels for ``hf_t5``."""
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 4096, (batch, seq), generator=generator),
            "labels": torch.randint(0, 4096, (batch, seq), generator=generator)}


def hf_sample(vocab_size: int = 256, batch: int = 2, seq: int = 64, seed: int = 0) -> dict:
    """A batch of random token ids with labels for a causal LM."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def train(model: nn.Module, batches: list, config=None, lr: float = 0.05) -> list[torch.Tensor]:
    """SGD with momentum over ``batches`` (one step each); returns ``snapshot(model)`` after the last."""
    from .config import MemoptConfig
    from .profiler import compute_loss, run_model

    config = config or MemoptConfig()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for batch in batches:
        opt.zero_grad()
        compute_loss(run_model(model, batch), batch, config).backward()
        opt.step()
    return snapshot(model)


def metered_loop(model: nn.Module, batches: list[dict], lr: float = 1e-3) -> tuple[list[torch.Tensor], int]:
    """A plain Hugging Face training loop, ``model(**batch).loss.backward()`` with AdamW, each step under the
    memory meter and after ``torch.manual_seed(step)`` (so dropout draws alike in every run).

    Returns:
        tuple[list[torch.Tensor], int]: ``snapshot(model)`` after the last step, and the largest metered peak
        of activation bytes over the steps.
    """
    from .meter import MemoryMeter

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    peak = 0
    for step, batch in enumerate(batches):
        torch.manual_seed(step)
        with MemoryMeter() as meter:
            model(**batch).loss.backward()
        peak = max(peak, meter.peak_bytes)
        opt.step()
        opt.zero_grad()
    return snapshot(model), peak


def metered_step(model: nn.Module, batch, config=None, optimizer_step: bool = True) -> int:
    """Peak bytes one training step allocates, as a loop with ``zero_grad()`` (gradients freed between steps)
    and AdamW allocates them in its steady state: activations, their gradients and temporaries, the parameters'
    gradients as backward makes them, and (``optimizer_step``) the optimizer step's own temporaries. AdamW runs
    at lr 0 (the parameters do not change) and takes one step first, unmetered, to make its states, which a
    plan counts as held the whole step. What a plan predicts is
    ``plan.predicted_peak_bytes - graph.states_without_grads_bytes``."""
    from .config import MemoptConfig
    from .meter import MemoryMeter
    from .profiler import compute_loss, run_model

    config = config or MemoptConfig()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.0, weight_decay=0.0) if optimizer_step else None
    meter = MemoryMeter()
    for metered in ((False, True) if opt is not None else (True,)):
        for p in model.parameters():
            p.grad = None
        with meter if metered else contextlib.nullcontext():
            compute_loss(run_model(model, batch), batch, config).backward()
            if opt is not None:
                opt.step()
    for p in model.parameters():
        p.grad = None
    return meter.peak_bytes


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every parameter and buffer: all that a training step can change."""
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two snapshots."""
    if len(a) != len(b):
        raise ValueError(f"snapshots differ in length: {len(a)} vs {len(b)}")
    return max(((x.double() - y.double()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))
