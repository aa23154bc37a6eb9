"""Fine-tune a causal LM with Quantized Side Tuning under the Hugging Face Trainer.

The backbone is quantized to NF4 and frozen; only a side network 16x narrower trains, and only it is
saved. By default a tiny randomly initialised Llama learns to copy a sequence (runs in seconds on a
CPU); ``--model`` takes a local Hugging Face checkpoint directory instead.

    python examples/qst_finetune.py --steps 300
    python examples/qst_finetune.py --model path/to/llama --r 16 --steps 1000
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from memopt.qst import QSTConfig, QSTModel, apply_qst
from memopt.qst.testing import tiny_causal_lm


def copy_task(vocab_size: int, examples: int, half: int = 8, seed: int = 0) -> list[dict]:
    """Rows ``a SEP a``: the model must repeat ``a``; the loss counts only the repeat."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(examples):
        tokens = torch.randint(2, vocab_size, (half,), generator=generator)
        ids = torch.cat([tokens, torch.tensor([1]), tokens])
        labels = ids.clone()
        labels[: half + 1] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def load_backbone(args: argparse.Namespace) -> torch.nn.Module:
    if args.model is None:
        return tiny_causal_lm(args.family, vocab_size=32, hidden_size=128, heads=8)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="Quantized Side Tuning with the Hugging Face Trainer")
    parser.add_argument("--model", help="local Hugging Face checkpoint; default: a tiny random model")
    parser.add_argument("--family", default="llama", help="tiny model family when --model is not given")
    parser.add_argument("--r", type=int, default=4, help="side network reduction factor (16 for real models)")
    parser.add_argument("--downsample", default="adapter", choices=["adapter", "linear", "maxpool", "avgpool"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output-dir", help="where the side network is saved; default: a temporary directory")
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    qst = apply_qst(load_backbone(args), QSTConfig(r=args.r, downsample=args.downsample))
    qst.print_trainable_parameters()
    vocab_size = qst.config.vocab_size
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        training = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=32, learning_rate=args.lr,
            lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=max(1, args.steps // 5),
            save_strategy="no", report_to=[], disable_tqdm=True,
        )
        trainer = Trainer(model=qst, args=training, train_dataset=copy_task(min(vocab_size, 32), 32 * args.steps))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"copy loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}")

        qst.save_pretrained(f"{output_dir}/side")
        reloaded = QSTModel.from_pretrained(load_backbone(args), f"{output_dir}/side").eval()
        prompt = copy_task(min(vocab_size, 32), 1, seed=1)[0]["input_ids"][:9].unsqueeze(0)
        completion = reloaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)[0, 9:]
        print(f"prompt {prompt[0, :8].tolist()} -> generated {completion.tolist()}")
    return losses[-1]


if __name__ == "__main__":
    main()
