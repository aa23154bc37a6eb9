"""The Hugging Face Trainer with MemoptCallback trains to bitwise the same weights as without it."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.testing import hf_causal_lm, max_difference, snapshot

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seq: int = 128):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 256, (n, seq), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path, callbacks, gradient_checkpointing=False, lora=False):
    from transformers import Trainer, TrainingArguments

    model = hf_causal_lm("llama", attn_implementation="sdpa", num_hidden_layers=6)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
                             gradient_checkpointing=gradient_checkpointing, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)
    trainer.train()
    return model, trainer


def test_trainer_with_memopt_is_exact_and_cleans_up(tmp_path):
    from memopt.integrations.hf import MemoptCallback

    reference, _ = _train(tmp_path / "ref", [])
    # exact=True: a chunked LM head (trained here) would regroup its weight's gradient; see test_head.py.
    callback = MemoptCallback(0.4, memopt.MemoptConfig(allow_swap=False, exact=True))
    seen = {}

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault("plan", callback.handle.plan)
            seen["recomputes"] = callback.handle.stats()["recomputes"]

    model, _ = _train(tmp_path / "memopt", [callback, Spy()])
    assert seen["recomputes"] > 0
    assert {d.mode for d in seen["plan"].decisions} != {"keep"}
    assert callback.handle is None and not hasattr(model, "_memopt_handle")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert max_difference(snapshot(reference), snapshot(model)) == 0.0


def test_trainer_with_peft_lora_is_exact(tmp_path):
    from memopt.integrations.hf import MemoptCallback

    reference, _ = _train(tmp_path / "ref", [], lora=True)
    callback = MemoptCallback(0.4)
    model, _ = _train(tmp_path / "memopt", [callback], lora=True)
    assert max_difference(snapshot(reference), snapshot(model)) == 0.0


def test_trainer_gradient_checkpointing_is_replaced_then_restored(tmp_path):
    from memopt.integrations.hf import MemoptCallback

    from transformers import TrainerCallback

    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.is_activation_checkpointing)

    reference, _ = _train(tmp_path / "ref", [], gradient_checkpointing=True)
    callback = MemoptCallback(0.5, memopt.MemoptConfig(exact=True))  # the head unchunked: every gradient bitwise
    with pytest.warns(UserWarning, match="gradient checkpointing is turned off"):
        model, _ = _train(tmp_path / "memopt", [callback, Watch()], gradient_checkpointing=True)
    assert seen and not any(seen), "memopt's plan, not Hugging Face checkpointing, recomputes during the run"
    assert model.is_activation_checkpointing, "turned back on when training ends"
    assert max_difference(snapshot(reference), snapshot(model)) == 0.0


def test_bad_budget_is_rejected():
    from memopt.integrations.hf import MemoptCallback

    with pytest.raises(ValueError, match="budget"):
        MemoptCallback(budget=None)


@pytest.mark.parametrize("field,value,needle", [
    ("deepspeed", {"zero_optimization": {"stage": 2}}, "memopt.integrations.deepspeed.initialize"),
    ("fsdp", "full_shard auto_wrap", "memopt.integrations.fsdp.optimize"),
])
def test_a_trainer_that_wraps_the_model_is_refused_before_anything_changes(field, value, needle):
    """The callback sees the model after accelerate wrapped it: it refuses, naming what to use, and leaves the
    model untouched."""
    from types import SimpleNamespace

    from memopt.integrations.hf import MemoptCallback

    model = hf_causal_lm("llama", num_hidden_layers=2)
    before = snapshot(model)
    args = SimpleNamespace(deepspeed=None, fsdp="")
    setattr(args, field, value)
    callback = MemoptCallback(budget=0.5)
    with pytest.raises(ValueError, match=needle):
        callback.on_train_begin(args, None, None, model=model, train_dataloader=[{"input_ids": torch.zeros(1, 8)}])
    assert callback.handle is None
    assert all("forward" not in vars(m) for m in model.modules())
    assert max_difference(before, snapshot(model)) == 0.0
