"""``memopt plan`` for fine-tuning setups: LoRA adapters on a frozen base, QLoRA's 4-bit base counted as
bitsandbytes stores it, and QST's side network."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from memopt.cli import main  # noqa: E402
from memopt.report import PlanReport  # noqa: E402

SMALL_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 352,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "max_position_embeddings": 512, "tie_word_embeddings": False,
}


def _plan(tmp_path, capsys, *flags: str) -> tuple[str, PlanReport]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_LLAMA))
    out_json = tmp_path / "plan.json"
    code = main(["plan", str(config), "--seq", "64", "--gpu", "h100", "--quiet", "--json", str(out_json), *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, PlanReport.load(out_json)


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(name))


def _bitsandbytes_base_bytes() -> tuple[int, int]:
    """(bytes bitsandbytes keeps for the NF4 base, bytes of the weights it leaves as built) of the same model."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from memopt.qst.backbone import quantize_nf4

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SMALL_LLAMA.items() if k != "architectures"}))
    model.to(torch.bfloat16)
    quantize_nf4(model, double_quant=True, compute_dtype=torch.bfloat16)
    nf4 = dense = 0
    for p in model.parameters():
        if getattr(p, "quant_state", None) is None:
            dense += p.numel() * p.element_size()
            continue
        state = p.quant_state
        tensors = [p.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        nf4 += sum(t.numel() * t.element_size() for t in tensors)
    return nf4, dense


def test_qlora_base_bytes_equal_bitsandbytes_own_count(tmp_path, capsys):
    out, report = _plan(tmp_path, capsys, "--qlora", "--lora", "16")
    nf4, dense = _bitsandbytes_base_bytes()
    meta = report.graph.meta
    assert meta["nf4_base_bytes"] == nf4
    assert meta["frozen_param_bytes"] - meta["nf4_base_bytes"] == dense  # embeddings, norms, LM head in bf16
    assert "4-bit base" in _row(out, "4-bit base") and "NF4" in _row(out, "4-bit base")
    # The adapters alone train: 7 projections a layer, rank 16 (A: in x 16, B: 16 x out), 2 layers.
    h, inter, kv = 128, 352, 2 * 32
    per_layer = 16 * ((h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + inter) + (inter + h))
    assert meta["n_params"] == 2 * per_layer
    assert report.graph.grad_bytes == 2 * meta["n_params"]
    assert report.graph.param_bytes == 2 * meta["n_params"] + nf4 + dense


def test_lora_keeps_the_base_as_built_and_trains_only_the_adapters(tmp_path, capsys):
    out, report = _plan(tmp_path, capsys, "--lora", "8")
    meta = report.graph.meta
    assert meta["nf4_base_bytes"] == 0
    assert "4-bit base" not in out and "frozen weights" in out
    from transformers import LlamaConfig, LlamaForCausalLM

    full = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SMALL_LLAMA.items() if k != "architectures"}))
    assert meta["frozen_param_bytes"] == 2 * sum(p.numel() for p in full.parameters())  # bf16, as built
    assert report.graph.optimizer_bytes == pytest.approx(12 * meta["n_params"], abs=4 * 200)  # + Adam's step counts


def test_qlora_needs_a_rank(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_LLAMA))
    assert main(["plan", str(config), "--seq", "64", "--qlora", "--quiet"]) == 2
    assert "--lora 16 --qlora" in capsys.readouterr().err


def test_qst_counts_the_side_network_and_the_4bit_backbone_as_memopt_qst_builds_them(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from memopt.qst import QSTConfig, apply_qst

    out, report = _plan(tmp_path, capsys, "--qst")
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SMALL_LLAMA.items() if k != "architectures"}))
    qst = apply_qst(model.to(torch.bfloat16), QSTConfig())
    trainable = sum(p.numel() for p in qst.parameters() if p.requires_grad)
    nf4, dense = 0, 0
    for p in qst.backbone.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            dense += p.numel() * p.element_size()
        else:
            nf4 += sum(t.numel() * t.element_size() for t in
                       (p.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code))
    meta = report.graph.meta
    assert meta["n_params"] == trainable
    assert meta["nf4_base_bytes"] == nf4
    assert meta["frozen_param_bytes"] - nf4 == dense
    assert "QST side network" in _row(out, "parameters") and "NF4" in _row(out, "4-bit base")
    assert "QSTModel" in out.splitlines()[0]


def test_qst_and_lora_together_are_refused(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_LLAMA))
    assert main(["plan", str(config), "--seq", "64", "--qst", "--lora", "8", "--quiet"]) == 2
    assert "choose one (--qst, or --lora R [--qlora])" in capsys.readouterr().err
