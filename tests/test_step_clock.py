"""memopt.step_clock: the training steps a handle times, from the first forward to the optimizer's step."""

from __future__ import annotations

import torch

from memopt.step_clock import StepClock
from memopt.testing import TinyMLP


def test_steps_after_the_first_are_timed_in_a_bounded_window():
    model = TinyMLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clock = StepClock(model, opt, predicted_step_s=1.0)
    x = torch.randn(2, 16, 64)

    def step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    step()
    assert clock.measured_step_s() is None  # the first step (allocations, warm-up) is not a figure
    step()
    assert clock.measured_step_s() > 0 and len(clock.steps) == 1
    for _ in range(40):
        step()
    assert len(clock.steps) == 32  # a long run keeps the latest, not all
    with torch.no_grad():
        model(x)  # an evaluation forward starts no step
    assert clock._start is None
