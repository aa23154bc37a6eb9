"""Wrap a model with one call, train as usual, unwrap: the memopt quickstart.

    python examples/quickstart.py [--budget 0.5] [--steps 5]

Trains a small decoder-only transformer (plain torch) on random tokens, once without memopt and once
under a plan for the given budget, and checks that both end with identical parameters.
"""

from __future__ import annotations

import argparse

import torch

import memopt
from memopt.testing import TinyGPT, max_difference, snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.5", help="bytes like '2GiB', or a fraction of the activation peak")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget

    batches = [torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(i)) for i in range(args.steps)]

    def train(model: TinyGPT) -> list[torch.Tensor]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for ids in batches:
            opt.zero_grad()
            model(ids).backward()
            opt.step()
        return snapshot(model)

    torch.manual_seed(0)
    reference = train(TinyGPT(vocab=512, hidden=128, layers=6, max_tokens=256))

    torch.manual_seed(0)
    model = TinyGPT(vocab=512, hidden=128, layers=6, max_tokens=256)
    handle = memopt.optimize(model, batches[0], budget=budget)  # profile, plan, apply: one call
    print(handle.report())
    result = train(model)
    print(f"\nafter training: {handle.stats()}")
    handle.remove()  # the model is exactly as before

    difference = max_difference(reference, result)
    print(f"largest parameter difference against training without memopt: {difference}")
    if difference != 0.0:
        raise SystemExit("parameters differ")


if __name__ == "__main__":
    main()
