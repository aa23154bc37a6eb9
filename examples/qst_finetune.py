"""Fine-tune a causal LM with Quantized Side Tuning under the Hugging Face Trainer.

The backbone is quantized to NF4 and frozen; only a side network r times narrower trains, and only it
is saved. By default a tiny randomly initialised Llama learns to copy a sequence (runs in under a
minute on a CPU); ``--model`` takes a local Hugging Face checkpoint directory instead.

    python examples/qst_finetune.py
    python examples/qst_finetune.py --model path/to/llama-2-7b --steps 1000

Unless given, the reduction factor, learning rate, batch and gradient clipping follow the backbone's
size (``DEFAULTS``): the QST authors' recipe for real checkpoints, and a higher learning rate for the
tiny random one, whose side network has to learn the whole task from scratch.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from memopt.qst import QSTConfig, QSTModel, apply_qst
from memopt.qst.testing import tiny_causal_lm

# (widest hidden size, settings): the first row whose width is at least the backbone's applies.
# Real checkpoints: the authors' run (r=16, lr 2e-4 constant, 3 % warm-up, clip 0.3, batch 16), with
# 1e-4 from 33B up as QLoRA's recipe, which QST's follows, has it. The tiny random backbone gives the
# side network nothing to build on; at 2e-4 it needs ~10x the steps (bench/README.md, QST section).
DEFAULTS = [
    (1023, {"r": 4, "lr": 1e-3, "batch": 32, "max_grad_norm": 1.0, "warmup_ratio": 0.0}),
    (5120, {"r": 16, "lr": 2e-4, "batch": 16, "max_grad_norm": 0.3, "warmup_ratio": 0.03}),
    (None, {"r": 16, "lr": 1e-4, "batch": 16, "max_grad_norm": 0.3, "warmup_ratio": 0.03}),
]


def defaults_for(hidden_size: int) -> dict:
    """The ``DEFAULTS`` row for a backbone ``hidden_size`` channels wide."""
    for widest, settings in DEFAULTS:
        if widest is None or hidden_size <= widest:
            return dict(settings)
    raise AssertionError("the last DEFAULTS row takes every width")


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

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="Quantized Side Tuning with the Hugging Face Trainer")
    parser.add_argument("--model", help="local Hugging Face checkpoint; default: a tiny random model")
    parser.add_argument("--family", default="llama", help="tiny model family when --model is not given")
    parser.add_argument("--r", type=int, help="side network reduction factor (default: by backbone size)")
    parser.add_argument("--downsample", default="adapter", choices=["adapter", "linear", "maxpool", "avgpool"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, help="learning rate (default: by backbone size)")
    parser.add_argument("--batch", type=int, help="examples per step (default: by backbone size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the side network's initialisation and the data")
    parser.add_argument("--output-dir", help="where the side network is saved; default: a temporary directory")
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    backbone = load_backbone(args)
    settings = defaults_for(backbone.config.hidden_size)
    settings.update({k: v for k, v in (("r", args.r), ("lr", args.lr), ("batch", args.batch)) if v is not None})
    print(f"hidden size {backbone.config.hidden_size}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    torch.manual_seed(args.seed)
    qst = apply_qst(backbone, QSTConfig(r=settings["r"], downsample=args.downsample))
    qst.print_trainable_parameters()
    vocab_size = min(qst.config.vocab_size, 32)
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        training = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=settings["batch"],
            learning_rate=settings["lr"], lr_scheduler_type="constant_with_warmup",
            warmup_steps=round(settings["warmup_ratio"] * args.steps), max_grad_norm=settings["max_grad_norm"],
            logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[], disable_tqdm=True,
            seed=args.seed,
        )
        dataset = copy_task(vocab_size, settings["batch"] * args.steps, seed=args.seed)
        trainer = Trainer(model=qst, args=training, train_dataset=dataset)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"copy loss: first logged {losses[0]:.3f}, last logged {losses[-1]:.3f}")

        qst.save_pretrained(f"{output_dir}/side")
        reloaded = QSTModel.from_pretrained(load_backbone(args), f"{output_dir}/side").eval()
        prompt = copy_task(vocab_size, 1, seed=1)[0]["input_ids"][:9].unsqueeze(0)
        completion = reloaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)[0, 9:]
        print(f"prompt {prompt[0, :8].tolist()} -> generated {completion.tolist()}")
    return losses[-1]


if __name__ == "__main__":
    main()
