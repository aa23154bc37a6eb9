"""The chunked LM head under the ways models are trained: the Trainer (which passes num_items_in_batch), PEFT
LoRA, QLoRA (a 4-bit bitsandbytes base) and DeepSpeed ZeRO-2. A frozen head keeps every weight bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import memopt
from memopt.testing import hf_causal_lm, hf_sample, max_difference, snapshot

transformers = pytest.importorskip("transformers")

VOCAB = 2048


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 256):
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def _trainer_run(tmp_path, callbacks):
    from transformers import Trainer, TrainingArguments

    model = _lora(hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=VOCAB, num_hidden_layers=3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-3, report_to=[], save_strategy="no", seed=0, use_cpu=True,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks).train()
    return model


def test_trainer_with_lora_and_a_chunked_head_is_bitwise(tmp_path):
    """The Trainer sums the loss over num_items_in_batch and scales it for accumulation: the incoming gradient
    is not 1, so each chunk is recomputed in backward, with the same kernels."""
    from memopt.integrations.hf import MemoptCallback

    reference = _trainer_run(tmp_path / "ref", [])
    callback = MemoptCallback(1.0, memopt.MemoptConfig(head="chunked", allow_swap=False))
    seen = {}

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.update(plan=callback.handle.plan, stats=callback.handle.stats())

    model = _trainer_run(tmp_path / "memopt", [callback, Spy()])
    assert seen["plan"].head_chunks > 1 and seen["stats"]["head_chunked_calls"] > 0
    assert not seen["stats"]["head_notes"]
    assert max_difference(snapshot(reference), snapshot(model)) == 0.0


def test_qlora_with_a_chunked_head_is_bitwise():
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    def make():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        model = transformers.LlamaForCausalLM(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = transformers.LlamaForCausalLM.from_pretrained(
                None, config=config, state_dict=model.state_dict(),
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32))
        return _lora(quantized).train()

    batches = [hf_sample(vocab_size=VOCAB, seq=256, seed=i) for i in range(2)]

    def train(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    reference = train(make())
    model = make()
    assert type(model.get_output_embeddings()) is torch.nn.Linear, "bitsandbytes keeps the LM head unquantized"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = memopt.optimize(model, batches[0], 1.0, memopt.MemoptConfig(head="chunked", allow_swap=False))
    got = train(model)
    assert handle.plan.head_chunks > 1 and handle.stats()["head_chunked_calls"] == 2
    handle.remove()
    assert max_difference(reference, got) == 0.0


SCRIPT = r'''
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from memopt.integrations.deepspeed import initialize
from memopt.testing import hf_causal_lm, hf_sample
use_memopt = sys.argv[1] == "1"
torch.manual_seed(0)
model = hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=2048, num_hidden_layers=2)
model.get_output_embeddings().weight.requires_grad_(False)
batches = [hf_sample(vocab_size=2048, seq=256, seed=i) for i in range(3)]
config = {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
if use_memopt:
    config["memopt"] = {"budget": 1.0, "head": "chunked", "allow_swap": False}
init = initialize if use_memopt else deepspeed.initialize
engine, *_ = init(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config,
                  **({"sample": batches[0]} if use_memopt else {}))
for batch in batches:
    engine.backward(engine(**batch).loss)
    engine.step()
handle = getattr(engine, "memopt_handle", None)
calls = handle.stats()["head_chunked_calls"] if handle else 0
params = [safe_get_full_fp32_param(p).tolist() for p in model.parameters() if p.requires_grad]
print("RESULT" + json.dumps({"params": params, "calls": calls}))
'''


def _deepspeed(use_memopt: bool, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if use_memopt else "0", str(port)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_deepspeed_zero2_with_a_chunked_frozen_head_is_bitwise():
    plain, chunked = _deepspeed(False, 29631), _deepspeed(True, 29632)
    assert chunked["calls"] == 3
    assert chunked["params"] == plain["params"]
