"""Device time and device bytes in the profiler and ``Hardware.measure``.

On CUDA a replay or an expensive op only launches kernels before the CPU clock is read, and cuBLAS and
attention keep workspaces outside any tensor. The CPU tests below run the CUDA code paths with fake events
(a device clock the test moves) and a fake allocator count; the tests marked ``cuda`` check the same on a GPU.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

import memopt
from memopt import hardware as hardware_module
from memopt import profiler
from memopt.config import MemoptConfig
from memopt.hardware import Hardware
from memopt.meter import MemoryMeter
from memopt.testing import TinyMLP


class _DeviceClock:
    """A GPU timeline the test moves; every fake event reads it when recorded."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.now_s, self.step_s = 0.0, step_s

    def event_class(self):
        clock = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing, "elapsed_time needs enable_timing=True"
                self.at_s = None

            def record(self, stream=None) -> None:
                self.at_s = clock.now_s
                clock.now_s += clock.step_s  # the work launched after it runs this long on the device

            def synchronize(self) -> None:
                assert self.at_s is not None

            def elapsed_time(self, end) -> float:
                return (end.at_s - self.at_s) * 1e3  # milliseconds, as torch's

        return Event


@pytest.fixture
def device_clock(monkeypatch):
    clock = _DeviceClock()
    syncs: list[str] = []
    clock.syncs = syncs
    monkeypatch.setattr(torch.cuda, "Event", clock.event_class())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append("torch.cuda.synchronize"))
    return clock


# -- finding 4: recompute and expensive ops timed on the device ------------------------------------------------

def test_a_replay_is_timed_by_device_events_not_by_its_launches(device_clock):
    recorder = profiler._Recorder(MemoryMeter(), ["blocks.0"], MemoptConfig(), torch.device("cuda"))
    recorder.on_backward(0)
    device_clock.now_s += 0.040  # the replay's kernels run 40 ms on the GPU
    recorder.on_recompute(0, [], seconds=0.0005)  # the CPU saw only the launches: 0.5 ms
    record = recorder.records[0]
    assert record.recompute_s == pytest.approx(0.040) and record.forward_s == [pytest.approx(0.040)]
    recorder.close_backward(recorder.records[0].backward_start_s + 0.1)
    assert record.backward_s == pytest.approx(0.1 - 0.040)


def test_expensive_ops_are_timed_by_events_without_a_synchronisation_per_op(device_clock):
    device_clock.step_s = 0.005  # each expensive op runs 5 ms on the device
    record = profiler._UnitRecord()
    a = torch.randn(64, 64)
    with profiler._ExpensiveOps(record, time.perf_counter, lambda: device_clock.syncs.append("sync"),
                                device_events=True):
        (a @ a).relu() @ a
        assert device_clock.syncs == []  # nothing waits while the unit runs
    assert record.expensive_s == pytest.approx(0.010)  # two matmuls; the relu is cheap and not timed
    assert record.expensive_bytes == 2 * 64 * 64 * 4


def test_selective_seconds_come_from_the_warm_replay_on_cuda(device_clock):
    """The forward's expensive ops are cold on a GPU (first launches load kernels, cuBLAS makes its handle):
    on the H200 their seconds exceeded the warm forward's and selective_s came out 0. On CUDA the replay's
    expensive ops are timed too, and the cheap seconds are the replay's less theirs."""
    recorder = profiler._Recorder(MemoryMeter(), ["blocks.0"], MemoptConfig(), torch.device("cuda"))
    record = recorder.records[0]
    a = torch.randn(64, 64)
    device_clock.step_s = 0.050  # cold: each expensive op of the forward takes 50 ms
    with recorder.forward_context(0):
        (a @ a).relu() @ a
    record.forward_s.append(0.030)  # the forward, by the CPU clock after a synchronisation
    recorder.on_backward(0)
    device_clock.step_s = 0.004  # warm: 4 ms per expensive op
    with recorder.replay_context(0):
        (a @ a).relu() @ a
    assert record.expensive_s == pytest.approx(0.100) and record.replay_expensive_s == pytest.approx(0.008)
    recorder.on_recompute(0, [], seconds=0.001)  # the replay began at the backward's event
    assert record.replay_s == pytest.approx(record.forward_s[-1])
    assert profiler._selective_s(record) == pytest.approx(record.replay_s - 0.008)
    assert profiler._selective_s(record) > 0
    timing = profiler._Recorder(MemoryMeter(), ["blocks.0"], MemoptConfig(), torch.device("cpu"))
    assert isinstance(timing.replay_context(0), type(contextlib.nullcontext()))  # CPU: the wall clock, as before


def test_cpu_profiles_keep_the_wall_clock():
    recorder = profiler._Recorder(MemoryMeter(), ["blocks.0"], MemoptConfig(), torch.device("cpu"))
    assert not recorder.device_events
    recorder.on_backward(0)
    recorder.on_recompute(0, [], seconds=0.0123)
    assert recorder.records[0].recompute_s == 0.0123


# -- finding 5: what profiling leaves allocated on the device counts as fixed bytes ---------------------------

def test_device_allocated_bytes_is_nothing_on_cpu_and_clears_cublas_workspaces_on_cuda(monkeypatch):
    assert profiler._device_allocated_bytes(torch.device("cpu"), clear_workspaces=True) is None
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 123)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: calls.append("clear"), raising=False)
    assert profiler._device_allocated_bytes(torch.device("cuda", 0)) == 123
    assert calls == ["sync"]
    assert profiler._device_allocated_bytes(torch.device("cuda", 0), clear_workspaces=True) == 123
    assert calls == ["sync", "sync", "clear"]


def test_device_allocated_bytes_under_an_installed_memopt_arena(monkeypatch):
    """torch.cuda.memory_allocated raises under a pluggable allocator: the installed arena answers instead."""
    import types

    from memopt.pools import cuda as pools_cuda

    arena = types.SimpleNamespace(device_stats=lambda: types.SimpleNamespace(live_bytes=4567))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("CUDAPluggableAllocator does not yet support getDeviceStats")))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(pools_cuda._installed, 0, arena)
    assert profiler._device_allocated_bytes(torch.device("cuda", 0)) == 4567


def test_bytes_the_step_leaves_on_the_device_become_fixed_bytes(monkeypatch):
    config = MemoptConfig()
    x = torch.randn(2, 128, 64)
    hw = Hardware.preset("cpu")
    torch.manual_seed(0)
    plain = profiler.profile_model(TinyMLP(), x, config, hw)
    readings = iter([1000, 1000 + (64 << 20)])  # before the step, after it: cuBLAS made two 32 MiB workspaces
    asked: list[bool] = []

    def allocated(device, clear_workspaces=False):
        asked.append(clear_workspaces)
        return next(readings)

    monkeypatch.setattr(profiler, "_device_allocated_bytes", allocated)
    torch.manual_seed(0)
    graph = profiler.profile_model(TinyMLP(), x, config, hw)
    assert asked == [True, False]
    assert graph.meta["device_workspace_bytes"] == 64 << 20
    assert graph.fixed_activation_bytes == plain.fixed_activation_bytes + (64 << 20)
    assert plain.meta["device_workspace_bytes"] == 0


# -- finding 12: Hardware.measure times device work with events ------------------------------------------------

def test_measure_times_batches_on_the_device_clock(device_clock):
    def launch():  # returns at once; the device then works 10 ms
        device_clock.now_s += 0.010

    events = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    seconds = hardware_module._seconds_per_call(launch, events, batch=4, repeats=3)
    assert seconds == pytest.approx(0.010)


def test_measure_on_cpu_times_the_wall_clock():
    seconds = hardware_module._seconds_per_call(lambda: time.sleep(0.002), None, batch=1, repeats=3)
    assert 0.0015 < seconds < 0.05


# -- on a GPU ----------------------------------------------------------------------------------------------------

def _event_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class _Wide(nn.Module):
    """Blocks whose forward is about a millisecond of bf16 matmul on a GPU, with cheap ops (a LayerNorm and a GELU
    on the wide activation: about a tenth of the time) that a selective recompute would rerun."""

    def __init__(self, hidden: int = 2048, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x.float().square().mean()


@pytest.mark.cuda
def test_profiled_times_are_device_times_on_cuda():
    """Before events, a unit's forward_s was the min of its synchronised forward and its replay's launch time
    (~0.1 ms), selective_s was ~0 and backward_s held the replay. Each must now match the device."""
    torch.manual_seed(0)
    model = _Wide().cuda().to(torch.bfloat16)
    x = torch.randn(1, 8192, 2048, device="cuda", dtype=torch.bfloat16)
    block = model.blocks[1]
    with torch.no_grad():
        forward_s = _event_seconds(lambda: block(x))
    graph = memopt.profile(model, x)
    unit = graph.units[1]
    assert 0.7 < unit.forward_s / forward_s < 1.5, (unit.forward_s, forward_s)
    assert 1.2 < unit.backward_s / forward_s < 3.0, (unit.backward_s, forward_s)
    # The cheap ops are a small share of the block's time, but not nothing (launch time alone made it ~0).
    assert 0.02 * unit.forward_s < unit.selective_s < 0.5 * unit.forward_s, (unit.selective_s, unit.forward_s)


@pytest.mark.cuda
def test_profile_counts_cublas_workspaces_as_fixed_bytes_on_cuda(record_property):
    """cuBLAS keeps a workspace per handle and stream (the forward's thread and autograd's), invisible to the
    meter; the profile measures what the step left allocated and counts it in the fixed bytes."""
    model = TinyMLP(depth=3).cuda()
    x = torch.randn(2, 512, 64, device="cuda")
    graph = memopt.profile(model, x)
    workspace = graph.meta["device_workspace_bytes"]
    record_property("first_before_after", graph.meta["device_allocated_before_after"])
    second = memopt.profile(model, x)
    record_property("second_before_after", second.meta["device_allocated_before_after"])
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch._C._cuda_clearCublasWorkspaces()
    record_property("freed_by_a_clear_after_the_second", held - torch.cuda.memory_allocated())
    assert workspace >= 1 << 20, workspace
    assert graph.fixed_activation_bytes >= workspace
    # A second profile clears them first, so it sees them again instead of taking them for the user's.
    assert second.meta["device_workspace_bytes"] >= 1 << 20


@pytest.mark.cuda
def test_measure_on_cuda_is_repeatable_and_near_the_card():
    hardware_module._MEASURED.clear()
    first = Hardware.measure("cuda")
    hardware_module._MEASURED.clear()
    second = Hardware.measure("cuda")
    for field in ("h2d_bytes_per_s", "d2h_bytes_per_s", "peak_flops_per_s", "mem_bytes_per_s"):
        a, b = getattr(first, field), getattr(second, field)
        assert abs(a - b) / max(a, b) < 0.2, (field, a, b)
    name = first.name.lower()
    preset = next((Hardware.preset(p) for p in ("h200", "h100") if p in name), None)
    if preset is not None:
        # The presets are what this method measured with 8192^3 matmuls on an H100 (DESIGN section 11).
        assert second.peak_flops_per_s > 0.75 * preset.peak_flops_per_s, second
        assert second.mem_bytes_per_s > 0.6 * preset.mem_bytes_per_s, second
    assert second.h2d_bytes_per_s > 5e9 and second.d2h_bytes_per_s > 5e9, second
