"""The CUDA backend (``memopt.pools.cuda_allocator``): torch allocations served from the arena.

Each case runs in a fresh process: installing a process-wide allocator must happen before torch's
first CUDA allocation, and a crash must fail the test rather than the run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MEMPOOL = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("256MiB")
pool = backend.pool()
with torch.cuda.use_mem_pool(pool):
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

INSTALLED = """
import json, torch, memopt.pools as pools
backend = pools.cuda_allocator("256MiB", quarantine=4)
backend.install()
x = torch.ones(1000, device="cuda")
during = backend.stats()
total = float(x.sum())
del x
torch.cuda.synchronize()
after = backend.stats()
backend.check()
print(json.dumps({"total": total, "live_during": during.live_blocks, "allocated_during": during.allocated_bytes,
                  "live_after": after.live_blocks, "frees": after.free_count}))
"""

DOUBLE_FREE = """
import ctypes, json, torch, memopt.pools as pools
from memopt.pools import _lib
backend = pools.cuda_allocator("64MiB")
lib = _lib.library()
lib.mo_cuda_malloc.restype = ctypes.c_void_p
lib.mo_cuda_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
lib.mo_cuda_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
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
backend.close()
print(json.dumps({"count": count, "message": message, "raised": raised}))
"""


def _run(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mempool_serves_from_the_region():
    out = _run(MEMPOOL)
    assert out["ok"] and out["in_region"] and not out["outside_in_region"]
    assert out["live"] >= 1 and out["allocated"] >= 2 * 4 * (1 << 20)


def test_installed_allocator_sees_every_tensor():
    out = _run(INSTALLED)
    assert out["total"] == 1000.0
    assert out["live_during"] >= 1 and out["allocated_during"] >= 4000
    assert out["live_after"] < out["live_during"] and out["frees"] >= 1


def test_double_free_from_torch_is_recorded_not_fatal():
    out = _run(DOUBLE_FREE)
    assert out["count"] == 2
    assert "not in device" in out["message"]
    assert out["raised"] and "2 free(s) were refused" in out["raised"]
