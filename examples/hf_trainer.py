"""memopt in a Hugging Face Trainer run: one callback.

    python examples/hf_trainer.py [--budget 0.4] [--steps 8]

Trains a tiny Llama (built from a config; nothing is downloaded) on random tokens with the Trainer, with
MemoptCallback applying a plan for the given budget, and prints the plan the run used.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import memopt
from memopt.integrations.hf import MemoptCallback
from memopt.testing import hf_causal_lm


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int) -> None:
        self.ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PrintPlan(MemoptCallback):
    def on_train_begin(self, *args, **kwargs):
        control = super().on_train_begin(*args, **kwargs)
        print(self.handle.report())
        return control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.4, help="fraction of the activation peak")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = hf_causal_lm("llama", attn_implementation="sdpa", num_hidden_layers=6)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=args.steps,
                                     learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=2,
                                     use_cpu=not torch.cuda.is_available())
        callback = PrintPlan(args.budget, memopt.MemoptConfig(allow_swap=torch.cuda.is_available()))
        Trainer(model=model, args=training, train_dataset=RandomTokens(64, 256), callbacks=[callback]).train()


if __name__ == "__main__":
    main()
