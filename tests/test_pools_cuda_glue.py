"""The CUDA backend's glue on a machine without a GPU.

- memopt/csrc/cuda.c runs against a fake CUDA driver (tests/csrc/fake_libcuda.c, found as libcuda.so.1 through
  LD_LIBRARY_PATH), whose streams run only when told: frees wait for their stream's events, record_stream
  holds, a full region waits then overflows (process-wide) or returns NULL (MemPool), the process stops
  with a message rather than hand torch a NULL (tests/csrc/cuda_glue.c).
- memopt/pools/cuda.py with torch's CUDA functions replaced by fakes: install() checks torch's CUDA state
  first and says when it is too late, cuda_allocator() never initialises it, use_pool() routes every thread,
  the module's memory functions answer for an installed arena, and step() records then replays a step.

What only a GPU can show is in tests/test_pools_cuda.py (marked cuda), with the reason beside each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memopt.pools.cuda as pcuda
from memopt.errors import AllocatorError
from memopt.pools import _lib
from memopt.pools._device import DevicePool

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "memopt" / "csrc"
TESTS_C = ROOT / "tests" / "csrc"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fake driver is a Linux shared library")


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    return compiler


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory) -> Path:
    """A directory holding the fake libcuda.so.1."""
    out = tmp_path_factory.mktemp("fake_cuda")
    subprocess.run([_compiler(), "-O1", "-std=c11", "-D_GNU_SOURCE", "-fPIC", "-shared", "-o", str(out / "libcuda.so.1"),
                    str(TESTS_C / "fake_libcuda.c")], check=True, capture_output=True, text=True)
    return out


@linux_only
def test_cuda_glue_against_a_fake_driver(fake_driver, tmp_path):
    sources = [str(TESTS_C / "cuda_glue.c")] + [str(CSRC / n) for n in _lib._SOURCES]
    base = [_compiler(), "-O1", "-g", "-std=c11", "-D_GNU_SOURCE", f"-I{CSRC}", *sources, "-ldl", "-lpthread",
            "-o", str(tmp_path / "cuda_glue")]
    built = subprocess.run(base[:2] + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"] + base[2:],
                           capture_output=True, text=True)
    if built.returncode != 0:  # no sanitizer runtime: plain build
        subprocess.run(base, check=True, capture_output=True, text=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake_driver), ASAN_OPTIONS="detect_leaks=1")
    run = subprocess.run([str(tmp_path / "cuda_glue")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]


# A process with the fake driver and torch's CUDA surface faked: what the backend does, end to end.
BACKEND = r"""
import ctypes, json, sys, torch
calls = []
class FakePluggable:
    def __init__(self, path, malloc, free):
        calls.append(("pluggable", malloc, free))
    def allocator(self):
        return "raw"
def refuse(*a):
    raise AssertionError("torch's CUDA state was initialised")
torch.cuda.is_available = lambda: True
torch.cuda.is_initialized = lambda: False
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = refuse
torch.cuda.memory.CUDAPluggableAllocator = FakePluggable
torch.cuda.memory.change_current_allocator = lambda a: calls.append(("change", type(a).__name__))
torch.cuda.memory_stats = refuse
import memopt.pools as pools
from memopt.pools import _lib
lib = _lib.library()
driver = ctypes.CDLL("libcuda.so.1")
backend = pools.cuda_allocator("8MiB", quarantine=0)
backend.install()
out = {"calls": calls, "installed": backend.installed, "lowest_first": [backend.device_stats().lowest_first]}
malloc, free = lib.mo_cuda_malloc, lib.mo_cuda_free
S = ctypes.c_void_p(0x77)
big = malloc(16 << 20, 0, S)  # larger than the region: process-wide, so the driver lends it
out["overflow"] = bool(big) and not backend.base_address <= big < backend.base_address + backend.capacity_bytes
free(big, 16 << 20, 0, S)
driver.fake_cuda_run(S)
pools.cuda.reset_peak_memory_stats()
x = malloc(1 << 20, 0, S)
out["memory_stats"] = pools.cuda.memory_stats()
out["max_memory_allocated"] = pools.cuda.max_memory_allocated(0)
free(x, 1 << 20, 0, S)
def step():
    a = malloc(300000, 0, S); b = malloc(700000, 0, S); free(a, 0, 0, S)
    c = malloc(200000, 0, S); free(b, 0, 0, S); free(c, 0, 0, S)
    driver.fake_cuda_run(S)
for _ in range(5):  # one warm-up, one recorded, three replayed
    with backend.step():
        step()
stats = backend.device_stats()
out["lowest_first"].append(stats.lowest_first)
out["planned"], out["fallbacks"], out["steps"] = stats.planned_allocs, stats.fallback_allocs, stats.replay_steps
out["method"] = backend.replay_plan.method
with backend.step():  # one allocation the recorded step did not make: the heap serves it, the log names it
    z = malloc(4096, 0, S)
    step()
    free(z, 0, 0, S)
out["departures"] = [[d.step, d.position, d.nbytes, d.planned_nbytes, d.reason] for d in backend.departures()]
planned_before = backend.device_stats().planned_allocs
backend.restart_replay()  # another workload: heap, record, replay again
out["restarted"] = backend.replay_plan is None and backend.device_stats().plan_bytes == 0
out["lowest_first"].append(backend.device_stats().lowest_first)
def other():
    a = malloc(900000, 0, S); b = malloc(100000, 0, S); free(b, 0, 0, S); free(a, 0, 0, S)
    driver.fake_cuda_run(S)
for _ in range(4):
    with backend.step():
        other()
stats = backend.device_stats()
out["planned_after"], out["fallbacks_after"] = stats.planned_allocs - planned_before, stats.fallback_allocs
backend.check()
print(json.dumps(out))
"""


@linux_only
def test_the_python_backend_with_a_fake_driver(fake_driver):
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake_driver))
    proc = subprocess.run([sys.executable, "-c", BACKEND], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["calls"] == [["pluggable", "mo_cuda_malloc", "mo_cuda_free"], ["change", "FakePluggable"]]
    assert out["installed"] and out["overflow"]
    # Lowest first from install until the replay was armed, and again from restart_replay() (a new workload).
    assert out["lowest_first"] == [1, 0, 1]
    assert out["memory_stats"]["allocated_bytes.all.current"] == 1 << 20
    assert out["max_memory_allocated"] == 1 << 20
    assert out["planned"] == 9 and out["fallbacks"] == 0 and out["steps"] == 3
    assert out["departures"] == [[4, 0, 4096, 300000, "size"]]
    assert out["restarted"] and out["planned_after"] == 4 and out["fallbacks_after"] == 1


# -- torch's CUDA functions faked in this process ------------------------------------------------------------
@pytest.fixture
def backend():
    pool = DevicePool.virtual(1 << 24)
    yield pcuda.CudaArenaAllocator(0, 1 << 24, pool._handle, pool.base_address)
    pool.close()


def test_install_says_when_torch_initialised_cuda_already(backend, monkeypatch):
    changed = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "change_current_allocator", changed.append)
    with pytest.raises(RuntimeError, match="before any CUDA tensor"):
        backend.install()
    assert changed == [] and not backend.installed


def test_cuda_allocator_does_not_initialise_cuda(monkeypatch):
    def initialises():
        raise AssertionError("torch.cuda.current_device() initialises CUDA, after which install() is refused")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", initialises)
    # No driver here: the reservation fails, after the device was chosen without torch.
    with pytest.raises(AllocatorError, match="device 0"):
        pcuda.cuda_allocator("1MiB")
    with pytest.raises(ValueError, match="not one of the 1 CUDA device"):
        pcuda.cuda_allocator("1MiB", device=3)


def test_use_pool_routes_every_thread_and_always_ends(backend, monkeypatch):
    calls = []
    for name in ("_cuda_beginAllocateToPool", "_cuda_endAllocateToPool", "_cuda_releasePool",
                 "_cuda_beginAllocateCurrentThreadToPool"):
        monkeypatch.setattr(torch._C, name, lambda *a, _n=name: calls.append((_n, a)), raising=False)

    class Pool:
        id = (7, 0)

    with contextlib.suppress(KeyError), backend.use_pool(Pool()):
        raise KeyError("the block fails")
    assert calls == [("_cuda_beginAllocateToPool", (0, (7, 0))), ("_cuda_endAllocateToPool", (0, (7, 0))),
                     ("_cuda_releasePool", (0, (7, 0)))]


def test_step_needs_an_installed_arena(backend):
    with pytest.raises(AllocatorError, match="install"), backend.step():
        pass


def test_step_records_replays_and_records_again_for_another_shape(backend, monkeypatch):
    monkeypatch.setitem(pcuda._installed, 0, backend)
    pool = backend._pool
    placement: list[bool] = []  # the heap's lowest-first setting, as each step (and each arming) left it
    set_lowest_first = pool.set_lowest_first
    monkeypatch.setattr(pool, "set_lowest_first", lambda on: (placement.append(on), set_lowest_first(on)))

    def run(sizes):
        blocks = [pool.alloc(n, stream=5) for n in sizes]
        for b in blocks:
            pool.free(b, stream=5)

    with backend.step():  # warm-up: the heap
        run([300_000, 700_000])
    with pytest.raises(KeyError), backend.step():  # recorded, but it raised: not laid out
        run([300_000, 700_000])
        raise KeyError
    assert backend.replay_plan is None
    for _ in range(2):  # recorded and laid out, then replayed
        with backend.step():
            run([300_000, 700_000])
    assert backend.replay_plan is not None and pool.stats().planned_allocs == 2
    assert backend.replay_plan.regions  # laid out among the blocks alive when it was armed
    # Lowest first on the heap for the warm-up and the recorded steps (twice: the first recording raised),
    # off once armed, and off while replaying.
    assert placement == [True, True, True, False, False], placement
    with backend.step():  # another shape: nothing matches, so the next step is recorded again
        run([123_456, 654_321])
    assert backend.replay_plan is None
    for _ in range(2):
        with backend.step():
            run([123_456, 654_321])
    assert pool.stats().planned_allocs == 4 and backend.replay_plan.nbytes == [123_456, 654_321]
    pool.collect(wait=True)
    pool.unplan()


def test_memory_functions_defer_to_torch_without_an_installed_arena(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1234)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"torch": True})
    assert pcuda.max_memory_allocated() == 1234 and pcuda.memory_stats() == {"torch": True}


def test_record_stream_outside_an_installed_arena_is_torchs():
    seen = []

    class Tensor:
        device = torch.device("cpu")

        def record_stream(self, stream):
            seen.append(stream)

    pcuda.record_stream(Tensor(), "s")
    assert seen == ["s"]
