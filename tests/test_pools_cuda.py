"""The CUDA backend (``memopt.pools.cuda_allocator``) on a GPU: torch allocations served from the arena.

Each case runs in a fresh process: installing a process-wide allocator must happen before torch
initialises CUDA, and a crash must fail the test rather than the run. Everything these cases drive that
a CPU can run is tested there too (tests/test_pools_cuda_glue.py, against a fake driver); the reason each
case still needs a GPU is written beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Only torch's CUDA caching allocator calls a MemPool's allocator (for its segments).
MEMPOOL = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("256MiB")
pool = backend.pool()
with backend.use_pool(pool):
    x = torch.randn(1 << 20, device="cuda")
    y = x * 2
torch.cuda.synchronize()
inside = backend.stats()
ok = bool(torch.equal(y, x * 2))
start, end = backend.base_address, backend.base_address + backend.capacity_bytes
in_region = start <= x.data_ptr() < end and start <= y.data_ptr() < end
outside = torch.empty(16, device="cuda")  # not in the pool: torch's own allocator
print(json.dumps({"ok": ok, "in_region": in_region, "live": inside.live_blocks,
                  "allocated": inside.allocated_bytes, "outside_in_region": start <= outside.data_ptr() < end}))
backend.check()
"""

# install() used to fail always: cuda_allocator() called torch.cuda.current_device(), which initialises the
# caching allocator, after which torch refuses the switch. Only a CUDA build of torch has the switch.
INSTALLED = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("256MiB", quarantine=4)
backend.install()
x = torch.ones(1000, device="cuda")
during = backend.device_stats()
total = float(x.sum())
del x
torch.cuda.synchronize()
backend._pool.collect(wait=True)
after = backend.device_stats()
backend.check()
print(json.dumps({"total": total, "live_during": during.live_blocks, "allocated_during": during.live_bytes,
                  "live_after": after.live_blocks, "frees": after.deferred_frees,
                  "max_allocated": pools.cuda.max_memory_allocated(), "stats_keys": sorted(pools.cuda.memory_stats())}))
"""

# torch's memory_stats raises under a pluggable allocator; memopt's answer instead. And install() after torch
# initialised CUDA says so (torch's own message is "Can't swap an already initialized allocator").
TOO_LATE = """
import json, torch, memopt.pools as pools
torch.empty(1, device="cuda")
backend = pools.cuda_allocator("64MiB")
try:
    backend.install()
    message = None
except RuntimeError as exc:
    message = str(exc)
print(json.dumps({"message": message}))
"""

DOUBLE_FREE = """
import ctypes, json, torch, memopt.pools as pools
from memopt.pools import _lib
backend = pools.cuda_allocator("64MiB")
lib = _lib.library()
ptr = lib.mo_cuda_malloc(4096, backend.device, None)
lib.mo_cuda_free(ptr, 4096, backend.device, None)
lib.mo_cuda_free(ptr, 4096, backend.device, None)
lib.mo_cuda_free(12345, 16, backend.device, None)
count, message = backend.rejected_frees()
try:
    backend.check()
    raised = None
except pools.CorruptionError as exc:
    raised = str(exc)
torch.cuda.synchronize()
backend.close()
print(json.dumps({"count": count, "message": message, "raised": raised}))
"""

# A freed block must not reach another stream while kernels queued before its free may still read it. Only a
# GPU runs kernels after the CPU has moved on (torch.cuda._sleep keeps the side stream busy); the ordering
# itself is tested on CPU with fake events.
STREAMS = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("64MiB", quarantine=0)
backend.install()
side = torch.cuda.Stream()
# Load the kernels first: a kernel's first launch loads its module on the CPU (lazy loading), which on an H200
# took longer than the sleep below, so the side stream was idle again before the default stream allocated.
with torch.cuda.stream(side):
    torch.cuda._sleep(1000)
    torch.empty(1 << 20, device="cuda").fill_(0.0)
torch.cuda.synchronize()
with torch.cuda.stream(side):
    x = torch.empty(1 << 20, device="cuda")
    torch.cuda._sleep(1_000_000_000)  # about 0.5 s of GPU time queued behind x's allocation
    x.fill_(1.0)
    address = x.data_ptr()
    del x
    same_stream = torch.empty(1 << 20, device="cuda").data_ptr()  # queued after the sleep: may reuse at once
y = torch.empty(1 << 20, device="cuda")  # the default stream: must not get memory the side stream may use
other_stream = y.data_ptr()
torch.cuda.synchronize()
stats = backend.device_stats()
print(json.dumps({"same": same_stream == address, "other": other_stream == address,
                  "deferred": stats.deferred_frees, "markers": stats.markers_recorded, "sync_frees": stats.sync_frees,
                  "reuses": stats.stream_reuses, "errors": stats.marker_errors, "waits": stats.marker_waits,
                  "side": side.cuda_stream, "default": torch.cuda.current_stream().cuda_stream}))
"""

# record_stream is a no-op under a pluggable allocator; memopt.pools.cuda.record_stream is not. Only a GPU has
# two streams whose work overlaps.
RECORD_STREAM = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("64MiB", quarantine=0)
backend.install()
side = torch.cuda.Stream()
x = torch.ones(1 << 20, device="cuda")
address = x.data_ptr()
with torch.cuda.stream(side):
    torch.cuda._sleep(200_000_000)
    y = x * 2  # the side stream reads x
pools.cuda.record_stream(x, side)
del x
z = torch.empty(1 << 20, device="cuda")  # the default stream, same size: x's memory must wait for the side stream
reused_early = z.data_ptr() == address
torch.cuda.synchronize()
print(json.dumps({"reused_early": reused_early, "y_ok": bool((y == 2).all())}))
"""

# torch.cuda.use_mem_pool routes the calling thread only; autograd runs CUDA backward on a thread of its own,
# which exists only with a GPU. use_pool routes every thread.
BACKWARD = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("512MiB")
start, end = backend.base_address, backend.base_address + backend.capacity_bytes
def grads_in_region(route):
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).cuda()
    pool = backend.pool()
    with route(pool):
        loss = model(torch.randn(64, 512, device="cuda")).square().mean()
        loss.backward()
    torch.cuda.synchronize()
    return all(start <= p.grad.data_ptr() < end for p in model.parameters())
print(json.dumps({"use_pool": grads_in_region(backend.use_pool),
                  "use_mem_pool": grads_in_region(torch.cuda.use_mem_pool)}))
"""

# Only torch's caching allocator turns a MemPool allocator's NULL into OutOfMemoryError; process-wide, the
# region overflows to the driver instead (torch cannot take a NULL there).
OUT_OF_MEMORY = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("32MiB")
pool = backend.pool()
try:
    with backend.use_pool(pool):
        x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    raised = None
except torch.OutOfMemoryError as exc:
    raised = type(exc).__name__
print(json.dumps({"raised": raised}))
"""

OVERFLOW = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("32MiB")
backend.install()
x = torch.ones(64 << 20, dtype=torch.uint8, device="cuda")
total = int(x.sum())
stats = backend.device_stats()
print(json.dumps({"total": total, "overflow": stats.overflow_allocs}))
"""

# The replay itself is tested on CPU against recorded traces; only a GPU runs a training step whose
# allocations reach mo_cuda_malloc (torch's CPU allocator never calls a pluggable allocator). Parameters
# must equal a run without memopt bit for bit (deterministic kernels), and the replayed steps reserve at
# most 2 % over what they allocate.
REPLAY = """
import contextlib, json, os, sys
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
use_memopt = sys.argv[1] == "1"
if use_memopt:
    import memopt.pools as pools
    backend = pools.cuda_allocator("2GiB")
    backend.install()
torch.use_deterministic_algorithms(True)
from memopt.testing import TinyMLP  # linear, layer norm, GELU: deterministic kernels, so bitwise comparable
torch.manual_seed(0)
model = TinyMLP(hidden=256, depth=6).cuda()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(8, 256, 256, device="cuda")
out = {}
for step in range(6):
    with backend.step() if use_memopt else contextlib.nullcontext():
        model(x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if use_memopt and step == 2:
        backend.reset_peak_stats()
if use_memopt:
    s = backend.device_stats()
    out = {"planned": s.planned_allocs, "fallbacks": s.fallback_allocs, "unplanned": s.unplanned_allocs,
           "peak_reserved": s.peak_reserved_bytes, "peak_live": s.peak_live_bytes, "note": backend.replay_note,
           "method": backend.replay_plan.method if backend.replay_plan else None}
    backend.check()
out["params"] = [p.detach().double().sum().item() for p in model.parameters()]
out["first"] = model.head.weight.flatten()[:64].tolist()
print(json.dumps(out))
"""


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mempool_serves_from_the_region():
    out = _run(MEMPOOL)
    assert out["ok"] and out["in_region"] and not out["outside_in_region"]
    assert out["live"] >= 1 and out["allocated"] >= 2 * 4 * (1 << 20)


def test_installed_allocator_sees_every_tensor_and_reports_memory():
    out = _run(INSTALLED)
    assert out["total"] == 1000.0
    assert out["live_during"] >= 1 and out["allocated_during"] >= 4000
    assert out["live_after"] < out["live_during"] and out["frees"] >= 1
    assert out["max_allocated"] >= 4000 and "allocated_bytes.all.peak" in out["stats_keys"]


def test_install_after_cuda_was_initialised_says_so():
    assert "before any CUDA tensor" in _run(TOO_LATE)["message"]


def test_double_free_from_torch_is_recorded_not_fatal():
    out = _run(DOUBLE_FREE)
    assert out["count"] == 2
    assert "neither in the region" in out["message"]
    assert out["raised"] and "2 free(s) were refused" in out["raised"]


def test_a_freed_block_waits_for_its_stream_on_the_gpu():
    out = _run(STREAMS)
    assert not out["other"] and out["deferred"] >= 1 and out["markers"] >= 1, out


def test_record_stream_holds_under_the_pluggable_allocator():
    out = _run(RECORD_STREAM)
    assert not out["reused_early"] and out["y_ok"]


def test_use_pool_catches_backward_allocations():
    out = _run(BACKWARD)
    assert out["use_pool"]
    assert not out["use_mem_pool"]  # torch's behaviour, the reason use_pool exists; if torch changes, drop it


def test_a_full_mempool_region_is_an_out_of_memory_error():
    assert _run(OUT_OF_MEMORY)["raised"] == "OutOfMemoryError"


def test_a_full_process_wide_region_overflows_to_the_driver():
    out = _run(OVERFLOW)
    assert out["total"] == 64 << 20 and out["overflow"] >= 1


def test_replayed_steps_are_planned_exact_and_reserve_what_they_use():
    with_memopt, without = _run(REPLAY, "1"), _run(REPLAY, "0")
    assert with_memopt["params"] == without["params"] and with_memopt["first"] == without["first"]
    assert with_memopt["planned"] > 0 and with_memopt["fallbacks"] <= with_memopt["planned"] // 100
    assert with_memopt["peak_reserved"] <= 1.02 * with_memopt["peak_live"], with_memopt
