"""apply_qst / QSTModel structure: what is frozen, quantized and trainable, logits at initialisation,
gradient flow, parameter budget, and the errors a bad setup gets."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from memopt.qst import QSTConfig, QSTModel, apply_qst  # noqa: E402
from memopt.qst.backbone import ARCHITECTURES, quantize_nf4  # noqa: E402
from memopt.qst.testing import FAMILIES, tiny_causal_lm, wake_side  # noqa: E402


def _batch(vocab_size: int = 128, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def _saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of distinct non-parameter storages autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            held[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return sum(held.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_untrained_unquantized_qst_gives_the_backbones_logits_bit_for_bit(family, dtype):
    model = tiny_causal_lm(family).to(dtype)
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch).logits
        qst = apply_qst(model, QSTConfig(r=4, quantize=None))
        got = qst(**batch).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_backbone_is_frozen_4bit_and_untrained_logits_match_it(family):
    model = tiny_causal_lm(family)
    head = model.get_output_embeddings()
    batch = _batch()
    qst = apply_qst(model, QSTConfig(r=4))
    linears = [m for m in qst.backbone.modules() if isinstance(m, (nn.Linear, bnb.nn.Linear4bit))]
    quantized = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == len(linears) - 1  # every linear but the LM head
    assert qst.backbone.get_output_embeddings() is head and not isinstance(head, bnb.nn.Linear4bit)
    for layer in quantized:
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.bnb_quantized
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
    assert not any(p.requires_grad for p in qst.backbone.parameters())
    assert all(name.startswith("side.") for name, p in qst.named_parameters() if p.requires_grad)
    with torch.no_grad():
        got = qst(**batch).logits
        expected = qst.backbone(**batch).logits
    assert torch.equal(got, expected)


def test_gradients_reach_only_the_side_network_and_the_backbone_keeps_nothing():
    qst = apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4))
    batch = _batch()
    # Untrained, the upsample (zero) is the only side parameter with a gradient: like LoRA's B.
    qst(**batch, labels=batch["input_ids"]).loss.backward()
    first = {n for n, p in qst.side.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert first == {"upsample.weight"}
    qst.side.zero_grad(set_to_none=True)
    wake_side(qst, std=0.1)  # past the first step, so every side parameter gets a gradient
    qst(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is None for p in qst.backbone.parameters())
    side_grads = {n: p.grad for n, p in qst.side.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in side_grads.values())
    assert side_grads["output_logits"].shape == (64,) and side_grads["ladder_logits"].shape == (2, 16)


def test_trainable_parameters_under_one_percent_on_a_1b_llama_counted_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    qst = apply_qst(model, QSTConfig())
    trainable, total = qst.get_nb_trainable_parameters()
    assert qst.side.device.type == "meta"
    assert 1.1e9 < total < 1.4e9
    assert 0 < trainable <= 0.01 * total
    assert isinstance(qst.backbone.model.layers[0].mlp.down_proj.weight, bnb.nn.Params4bit)


@pytest.mark.parametrize("downsample, params_per_downsample", [
    ("adapter", 64 * 16 + 16 * 16), ("linear", 64 * 16), ("maxpool", 0), ("avgpool", 0),
])
@pytest.mark.parametrize("norm", [True, False])
def test_downsample_kinds_end_in_a_float32_layernorm_by_default(downsample, params_per_downsample, norm):
    qst = apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4, downsample=downsample, downsample_norm=norm))
    assert len(qst.side.downsamples) == 3  # embeddings + 2 layers
    norm_params = 2 * 16 if norm else 0  # LayerNorm weight and bias at side width
    assert sum(p.numel() for p in qst.side.downsamples[1].parameters()) == params_per_downsample + norm_params
    wake_side(qst)
    batch = _batch()
    states = [torch.randn(2, 9, 64) * scale for scale in (0.3, 1.0, 1e3)]
    with torch.no_grad():
        logits = qst(**batch).logits
        fed = [down(state) for down, state in zip(qst.side.downsamples, states)]
    assert logits.shape == (2, 9, 128) and torch.isfinite(logits).all()
    if norm:
        # Whatever the scale of a backbone state, the side network receives it normalised.
        for out in fed:
            torch.testing.assert_close(out.std(-1, correction=0), torch.ones(2, 9), atol=1e-2, rtol=0)
    elif downsample.endswith("pool"):
        assert fed[2].abs().mean() > 100 * fed[1].abs().mean()


def test_pooled_downsample_keeps_no_backbone_width_tensors_for_backward():
    batch = {"input_ids": torch.randint(2, 128, (4, 32))}
    held = {}
    for downsample in ("adapter", "avgpool"):
        qst = apply_qst(tiny_causal_lm("llama", num_layers=4), QSTConfig(r=4, downsample=downsample))
        held[downsample] = _saved_bytes(qst, batch)
    backbone_state_bytes = 4 * 32 * 64 * 4  # one (batch, tokens, hidden) float32 state
    # The adapter keeps the 5 captured states (embeddings + 4 layers) as its input; pooling keeps none.
    assert held["adapter"] - held["avgpool"] >= 5 * backbone_state_bytes


def test_layer_subset_builds_one_side_layer_per_fed_layer():
    qst = apply_qst(tiny_causal_lm("gpt2", num_layers=4), QSTConfig(r=4, layers=[1, 3]))
    assert len(qst.side.blocks) == 2 and len(qst.side.downsamples) == 3
    assert qst(**_batch()).logits.shape == (2, 9, 128)


def test_side_lora_trains_adapters_instead_of_side_linears():
    pytest.importorskip("peft")
    qst = apply_qst(tiny_causal_lm("qwen2"), QSTConfig(r=4, side_lora_rank=2))
    trainable = [n for n, p in qst.side.named_parameters() if p.requires_grad]
    frozen = [n for n, p in qst.side.named_parameters() if not p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert all(n.startswith("blocks.") and "base_layer" in n for n in frozen) and frozen
    assert "output_logits" in trainable and "upsample.weight" in trainable
    wake_side(qst)
    batch = _batch()
    qst(**batch, labels=batch["input_ids"]).loss.backward()
    assert qst.side.blocks[0].attn.q_proj.lora_A["default"].weight.grad is not None


def test_state_dict_holds_the_side_network_only():
    qst = apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4))
    state = qst.state_dict()
    assert state and all(k.startswith("side.") for k in state)
    assert set(state) == {"side." + k for k in qst.side.state_dict()}
    with torch.no_grad():
        qst.side.output_logits.fill_(0.25)
    fresh = apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4))
    fresh.load_state_dict(qst.state_dict())
    assert torch.equal(fresh.side.output_logits, torch.full((64,), 0.25))
    with pytest.raises(RuntimeError, match=r"unexpected keys \['backbone.x'\].*only \['side'\] \('side.\*'\)"):
        fresh.load_state_dict({**qst.state_dict(), "backbone.x": torch.zeros(1)})


def test_a_backbone_already_in_4bit_is_not_quantized_again():
    model = tiny_causal_lm("llama")
    quantize_nf4(model, double_quant=False, compute_dtype=torch.float32)
    weight = model.model.layers[0].self_attn.q_proj.weight
    qst = apply_qst(model, QSTConfig(r=4))
    assert qst.backbone.model.layers[0].self_attn.q_proj.weight is weight
    assert not weight.quant_state.nested


# -- errors ----------------------------------------------------------------------------------------


def test_r_not_dividing_the_hidden_size_is_refused_before_touching_the_model():
    model = tiny_causal_lm("llama", hidden_size=48, heads=4)
    with pytest.raises(ValueError, match=r"r=5 does not divide the backbone's hidden size 48; pick r among"):
        apply_qst(model, QSTConfig(r=5))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_architectures_name_the_supported_families():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64,
    ))
    with pytest.raises(ValueError, match=r"families \['gpt2', 'llama', .*model_type='gpt_neox'.*AutoModelForCausalLM"):
        apply_qst(neox)
    with pytest.raises(ValueError, match=r"got Linear \(model_type=None\)"):
        apply_qst(nn.Linear(4, 4))
    assert sorted(ARCHITECTURES) == sorted(FAMILIES)


def test_base_model_without_lm_head_is_refused():
    from transformers import AutoModel

    bare = AutoModel.from_config(tiny_causal_lm("llama").config)
    with pytest.raises(ValueError, match=r"has no LM head; QST needs the causal LM class"):
        apply_qst(bare)


def test_apply_qst_twice_says_the_model_is_already_a_qst_model():
    qst = apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4, quantize=None))
    side = {name: p.clone() for name, p in qst.side.named_parameters()}
    with pytest.raises(ValueError, match=r"model is already a QSTModel \(r=4, wrapping LlamaForCausalLM\); train it as "
                                         r"it is, or pass the original Hugging Face causal LM to apply_qst"):
        apply_qst(qst, QSTConfig(r=4, quantize=None))
    # The QSTModel is untouched: the same side network, still the only part that trains.
    assert all(torch.equal(p, side[name]) and p.requires_grad for name, p in qst.side.named_parameters())
    assert not any(p.requires_grad for p in qst.backbone.parameters())


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match=r"names layer 5, but the backbone has 2 layers \(0..1\)"):
        apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4, layers=[0, 5]))


def test_nf4_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    model = tiny_causal_lm("llama")
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install 'memopt\[hf\]'"):
        apply_qst(model, QSTConfig(r=4))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    # quantize=None needs no bitsandbytes at all.
    assert isinstance(apply_qst(model, QSTConfig(r=4, quantize=None)), QSTModel)


def test_side_lora_without_peft_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"side_lora_rank=...\) needs peft: pip install 'memopt\[hf\]'"):
        apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4, quantize=None, side_lora_rank=2))


def test_config_must_be_a_qstconfig():
    with pytest.raises(TypeError, match=r"config must be a QSTConfig, got dict"):
        QSTModel(tiny_causal_lm("llama"), {"r": 4})
