"""A recompute that does not reproduce the forward's saved tensors stops with the unit and the tensor named.

torch.utils.checkpoint checks each recomputed tensor's shape and dtype; memopt checks shape, dtype and device,
for whole, selective and token-wise recomputes. The usual cause is data-dependent control flow in the unit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from memopt.graph import Decision, Plan
from memopt.planners import realize


class Flaky(nn.Module):
    """A block whose forward branches on a flag the test flips between forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.wide = nn.Linear(64, 128)
        self.back = nn.Linear(128, 64)
        self.other_path = False

    def forward(self, x):
        if self.other_path:
            return x + self.back(self.wide(x).double().relu().float())
        return x + self.proj(x).relu()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Flaky() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def _apply(model, decide):
    graph = memopt.profile(model, torch.randn(2, 128, 64))
    plan = Plan([decide(u) for u in graph.units], 1, 1, 0, 0.0, 0.0, 0)
    return memopt.apply(model, plan)


@pytest.mark.parametrize("decide", [
    lambda u: realize(u, 0.0, 0.0, 1.0),
    lambda u: Decision(u.name, 0.0, 0.0, 1.0, "selective"),
], ids=["recompute", "selective"])
def test_a_unit_that_takes_another_branch_in_its_recompute_is_named(decide):
    model = Net()
    handle = _apply(model, decide)
    loss = model(torch.randn(2, 128, 64))
    model.blocks[1].other_path = True
    with pytest.raises(RuntimeError, match=r"unit 'blocks\.1'.*(saved|expensive op).*same path every time"):
        loss.backward()
    handle.remove()


class Shifty(nn.Module):
    """Token-separable, but recomputes its rows in another dtype when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.half = False

    def forward(self, x):
        h = self.proj(x)
        if self.half:
            h = h.double()
        return x + (h * h).float()


class ShiftyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Shifty() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def test_a_recomputed_tensor_of_another_dtype_is_named_with_both_descriptions():
    model = ShiftyNet()
    handle = _apply(model, lambda u: realize(u, 0.0, 0.0, 1.0))
    loss = model(torch.randn(2, 128, 64))
    model.blocks[0].half = True
    with pytest.raises(RuntimeError, match=r"unit 'blocks\.0' gave saved tensor #\d+ .* float64 .* its forward .* float32"):
        loss.backward()
    handle.remove()


def test_token_wise_rows_recomputed_in_another_dtype_are_named():
    model = ShiftyNet()
    handle = _apply(model, lambda u: realize(u, 0.5, 0.0, 0.5))
    assert all(d.token_wise and 0 < d.keep_rows < d.rows for d in handle.plan.decisions)
    loss = model(torch.randn(2, 128, 64))
    model.blocks[1].half = True
    with pytest.raises(RuntimeError, match=r"token-wise recompute of unit 'blocks\.1' gave rows .* float64"):
        loss.backward()
    handle.remove()
