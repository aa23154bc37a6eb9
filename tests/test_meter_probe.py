"""The meter's windows with a device probe: scratch a kernel allocates and frees inside one op (no op's
output, so no tensor the meter sees) raises the window's peak; what the allocator allocates outside any
tensor and keeps (a cuBLAS workspace made during the window) does not. The probe here is a fake of the CUDA
allocator's counters; on a GPU the profiler's windows read the real ones (tests/test_gpu_contact.py)."""

from __future__ import annotations

import torch

import memopt
from memopt.meter import MemoryMeter
from memopt.testing import TinyMLP


class FakeProbe:
    """Device counters that follow the meter's tensors, plus what a test says a kernel did beside them."""

    def __init__(self) -> None:
        self.meter: MemoryMeter | None = None
        self.outside = 0  # bytes allocated outside any tensor and kept
        self.high = 0  # the counters' peak

    def allocated(self) -> int:
        return self.meter.current_bytes + self.outside

    def peak(self) -> int:
        return max(self.high, self.allocated())

    def reset_peak(self) -> None:
        self.high = self.allocated()

    def scratch(self, nbytes: int) -> None:
        """A kernel took nbytes for a moment, on top of what is live now."""
        self.high = max(self.high, self.allocated() + nbytes)


def test_scratch_inside_an_op_raises_the_window_and_a_kept_workspace_does_not():
    probe = FakeProbe()
    with MemoryMeter(probe) as meter:
        probe.meter = meter
        x = torch.ones(1024)  # 4 KiB, live as the window starts
        start = meter.reset_window()
        y = x * 2  # 4 KiB more
        probe.scratch(64 << 10)  # a kernel's 64 KiB scratch, freed at once
        assert meter.window_peak_bytes == start + 4096  # what the meter alone sees
        assert meter.window_peak() == start + 4096 + (64 << 10)
        meter.reset_window()
        probe.outside += 32 << 20  # a workspace made during the window and kept: fixed bytes, not the window's
        probe.high = probe.allocated()
        assert meter.window_peak() == meter.current_bytes
        del y
    assert MemoryMeter().window_peak() == 0  # without a probe: the meter's own window


class _ScratchInBackward(torch.autograd.Function):
    """Identity whose backward, like a CUDA kernel, takes scratch the meter cannot see."""

    probe: FakeProbe | None = None
    nbytes = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _ScratchInBackward.probe is not None:
            _ScratchInBackward.probe.scratch(_ScratchInBackward.nbytes)
        return grad


class _StackProbe(FakeProbe):
    """The fake counters of the meter the profiler runs (found on the dispatch mode stack)."""

    def allocated(self) -> int:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        if self.meter is None:
            self.meter = next(m for m in _get_current_dispatch_mode_stack() if isinstance(m, MemoryMeter))
        return super().allocated()


class _Scratchy(torch.nn.Module):
    def __init__(self, block: torch.nn.Module, scratchy: bool) -> None:
        super().__init__()
        self.block, self.scratchy = block, scratchy

    def forward(self, x):
        # First in the forward, so last in the unit's backward: inside the window its saved tensors open.
        return self.block(_ScratchInBackward.apply(x) if self.scratchy else x)


def test_a_profiled_units_backward_scratch_counts_in_its_workspace(monkeypatch):
    torch.manual_seed(0)
    mlp = TinyMLP(depth=3)
    mlp.blocks = torch.nn.ModuleList([_Scratchy(b, i == 1) for i, b in enumerate(mlp.blocks)])
    x = torch.randn(2, 64, 64)
    scratch = 1 << 20
    workspaces = []
    for nbytes in (0, scratch):
        probe = _StackProbe()
        _ScratchInBackward.probe, _ScratchInBackward.nbytes = probe, nbytes
        monkeypatch.setattr("memopt.profiler._device_probe", lambda device: probe)
        graph = memopt.profile(mlp, x)
        workspaces.append([u.backward_workspace_bytes for u in graph.units])
    _ScratchInBackward.probe = None
    without, with_scratch = workspaces
    assert with_scratch[0] == without[0] and with_scratch[2] == without[2]
    assert 0 < with_scratch[1] - without[1] <= scratch, (without, with_scratch)
