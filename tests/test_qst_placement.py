"""Where the side network's tensors live: its dtype follows the backbone's compute dtype (norms and gates
in float32), and hidden states from another device are moved to it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from memopt.meter import MemoryMeter  # noqa: E402
from memopt.qst import QSTConfig, apply_qst  # noqa: E402
from memopt.qst.layers import FP32LayerNorm, FP32RMSNorm  # noqa: E402
from memopt.qst.testing import tiny_causal_lm, tiny_classifier, wake_side  # noqa: E402

HIDDEN, VOCAB, BATCH, TOKENS = 64, 96, 2, 16


class DtypeMeter(MemoryMeter):
    """A MemoryMeter that also remembers the dtype and shape of every tensor allocated under it."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and self.tracks(leaf):
                self.allocated.append((str(func), leaf.dtype, tuple(leaf.shape)))
        return out

    def float32_of_width(self, width: int, numel: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Float32 tensors of ``width`` channels and at least ``numel`` elements: copies of a hidden state."""
        return [a for a in self.allocated
                if a[1] == torch.float32 and a[2] and a[2][-1] == width and torch.Size(a[2]).numel() >= numel]


def _side_step_under_meter(side_dtype: str | None, downsample: str = "adapter") -> DtypeMeter:
    """Side network, LM head and loss, forward and backward, on a bfloat16 NF4 backbone's states."""
    model = tiny_causal_lm("llama", hidden_size=HIDDEN, vocab_size=VOCAB).to(torch.bfloat16)
    qst = apply_qst(model, QSTConfig(r=4, side_dtype=side_dtype, downsample=downsample)).train()
    wake_side(qst, std=0.1)
    ids = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qst._capture() as capture:
        trunk = qst.backbone.base_model(input_ids=ids)
        states = capture.collected()
    assert all(s.dtype == torch.bfloat16 for s in states)
    with DtypeMeter() as meter:
        hidden = qst.side(states, trunk.last_hidden_state)
        logits = qst.backbone.get_output_embeddings()(hidden)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
    return meter


@pytest.mark.parametrize("downsample", ["adapter", "maxpool"])
def test_bf16_backbone_gets_a_bf16_side_network_with_no_float32_copy_of_a_hidden_state(downsample):
    meter = _side_step_under_meter(None, downsample)
    assert meter.float32_of_width(HIDDEN, BATCH * TOKENS * HIDDEN) == []
    # Configurable: a float32 side network copies every state it reads (and its output) to float32.
    wide = _side_step_under_meter("float32", downsample)
    assert len(wide.float32_of_width(HIDDEN, BATCH * TOKENS * HIDDEN)) >= 3
    assert meter.peak_bytes < 0.75 * wide.peak_bytes


def test_norms_and_gates_stay_float32_and_linears_take_the_side_dtype():
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    side = apply_qst(model, QSTConfig(r=4)).side
    linears = [m for m in side.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in side.modules() if isinstance(m, (FP32RMSNorm, FP32LayerNorm))]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert len(norms) == 2 * 2 + 1 + 3  # two per block, the final one, one per downsample
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert side.ladder_logits.dtype == side.output_logits.dtype == torch.float32
    assert side.dtype == torch.bfloat16
    # compute_dtype decides when given; side_dtype overrides both.
    assert apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4, compute_dtype="bfloat16")).side.dtype == torch.bfloat16
    assert apply_qst(tiny_causal_lm("llama").to(torch.bfloat16),
                     QSTConfig(r=4, side_dtype="float32")).side.dtype == torch.float32


def test_fp32_norm_computes_in_float32_and_returns_the_input_dtype():
    norm = FP32RMSNorm(8, eps=1e-6)
    x = (torch.randn(3, 8) * 300).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, nn.functional.rms_norm(x.float(), (8,), eps=1e-6).to(torch.bfloat16))


@pytest.mark.parametrize("build", [
    lambda: apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4)),
    lambda: apply_qst(tiny_classifier("opt"), QSTConfig(r=4)),
])
def test_side_network_on_another_device_than_the_backbone_layers(build):
    """A device_map split on one machine: backbone layers on the CPU, side network and head on 'meta'.

    Every hidden state and the mask must be moved to the side network's device, or the first op that
    mixes a CPU and a meta tensor raises.
    """
    qst = build()
    wake_side(qst)
    qst.side.to("meta")
    qst._info.head.to("meta")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = qst(input_ids=ids, attention_mask=mask)
    assert out.logits.device.type == "meta"
    assert qst.device.type == "meta"
    assert all(p.device.type == "cpu" for p in qst.backbone.get_input_embeddings().parameters())


def test_side_network_is_built_on_the_heads_device():
    model = tiny_causal_lm("llama")
    model.lm_head.to("meta")
    qst = apply_qst(model, QSTConfig(r=4, quantize=None))
    assert qst.side.device.type == "meta" and qst.device.type == "meta"
    assert model.model.embed_tokens.weight.device.type == "cpu"
