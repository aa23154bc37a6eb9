"""``StepClock``: the training step as it really runs under a plan, against the plan's prediction.

A step is timed from the start of a training forward of the model to the end of the optimizer's step (an
optimizer step hook), so it is the step the planner predicts: forward, backward and the optimizer. On CUDA
both ends are events recorded on the current stream, read only when asked (``stats``), so no hook waits for
the GPU. The first step is left out (warm-up). On a CPU, after the fourth step, a measured median more than
``TOLERANCE`` away from the prediction is warned about once: the plan's time model does not fit this machine.
Without an optimizer the clock measures nothing.
"""

from __future__ import annotations

import collections
import statistics
import time

import torch
from torch import nn

from ._warn import warn

__all__ = ["TOLERANCE", "StepClock"]

#: Relative difference between the measured and the predicted step above which a warning is given.
TOLERANCE = 0.20


class StepClock:
    """Time the steps of ``model`` trained by ``optimizer`` (module docstring).

    Args:
        model (nn.Module): the model.
        optimizer (torch.optim.Optimizer | None): its optimizer; None measures nothing.
        predicted_step_s (float): the plan's predicted step, seconds.
    """

    def __init__(self, model: nn.Module, optimizer, predicted_step_s: float) -> None:
        self.predicted_step_s = predicted_step_s
        # (start, end) of the latest steps after the first (perf_counter seconds, or CUDA events): a bounded
        # window, so a long run neither grows it nor slows stats().
        self.first_done = False
        self.steps: collections.deque = collections.deque(maxlen=32)
        self._start = None
        self._warned = False
        self._hooks = []
        if optimizer is None:
            return
        self.cuda = next((p.is_cuda for p in model.parameters()), False)
        self._hooks.append(model.register_forward_pre_hook(self._on_forward))
        self._hooks.append(optimizer.register_step_post_hook(self._on_step))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _on_forward(self, module: nn.Module, _args) -> None:
        if self._start is None and module.training and torch.is_grad_enabled():
            self._start = self._now()

    def _on_step(self, *_args) -> None:
        if self._start is None:
            return
        end = self._now()
        if self.first_done:
            self.steps.append((self._start, end))
        self.first_done = True
        self._start = None
        if not self.cuda and len(self.steps) == 3:
            self._check()

    def measured_step_s(self) -> float | None:
        """Median seconds of the latest steps after the first (at most 32); None before two steps."""
        if not self.steps:
            return None
        if self.cuda:
            self.steps[-1][1].synchronize()
            seconds = [start.elapsed_time(end) / 1e3 for start, end in self.steps]
        else:
            seconds = [end - start for start, end in self.steps]
        return statistics.median(seconds)

    def _check(self) -> None:
        measured = self.measured_step_s()
        if measured is None or self._warned or self.predicted_step_s <= 0:
            return
        if abs(measured / self.predicted_step_s - 1) > TOLERANCE:
            self._warned = True
            warn(f"memopt: the training step takes {measured * 1e3:.1f} ms (median after the first), the plan "
                 f"predicted {self.predicted_step_s * 1e3:.1f} ms ({measured / self.predicted_step_s:.2f}x): its "
                 "time model does not fit this machine or loop; handle.replan(sample) measures again")

    def stats(self) -> dict:
        """``measured_step_s`` and ``predicted_step_s`` (and their ratio) once two steps ran."""
        measured = self.measured_step_s()
        if measured is None:
            return {}
        self._check()
        return {"measured_step_s": measured, "predicted_step_s": self.predicted_step_s,
                "step_vs_predicted": measured / self.predicted_step_s if self.predicted_step_s > 0 else float("nan")}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
