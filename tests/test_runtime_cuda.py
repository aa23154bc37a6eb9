"""The CUDA path: pinned host arena, D2H/H2D side streams with events, backward prefetch; exact gradients.

Marked ``cuda``: skipped on machines without a GPU. Bitwise assertions run under deterministic algorithms,
strictly (errors, not warnings) when ``CUBLAS_WORKSPACE_CONFIG`` is set as torch requires for it
(``bench/gpu_session.py`` sets ``:4096:8``), and never through attention kernels other than math or flash.
The CPU side of the same code (fake streams and events) is tested in test_runtime_store.py.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.nn import functional as F

import memopt
from memopt.graph import Mode, Plan
from memopt.planners import realize, simulate
from memopt.runtime.engine import UnitPolicy
from memopt.runtime.hooks import Runtime
from memopt.runtime.store import HostStore
from memopt.testing import TinyGPT, TinyMLP, max_difference, snapshot, train

pytestmark = pytest.mark.cuda


def _plan(graph, fractions) -> Plan:
    decisions = [realize(u, *fractions(i)) for i, u in enumerate(graph.units)]
    result = simulate(graph, decisions)
    return Plan(decisions, result.peak_bytes, "test", result.peak_bytes, result.step_s, result.step_s,
                result.peak_bytes, host_bytes=result.host_peak_bytes)


# -- finding 10: which CUDA kernels keep a row split exact -------------------------------------------------------
#
# A token-wise recompute runs a unit on the dropped rows only; its gradients stay bitwise only when every saved
# tensor's rows come out the same as in the forward on all rows. Kernels that compute each row by itself, with a
# reduction order set by the row's length alone, keep that: elementwise ops, LayerNorm (one block per row) and
# softmax over the last dim (a warp or block per row). A cuBLAS matmul need not: its kernel, tile and split-K
# are chosen by the heuristics from M, the row count, so half the rows may sum in another order. Its result on
# this GPU is recorded (junit property) rather than asserted.

_ROW_EXACT = {
    "gelu": F.gelu,
    "add-mul": lambda x: x * 1.5 + x,
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]),
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


def _rows_equal(fn, x: torch.Tensor, rows: int) -> bool:
    """fn on the last ``rows`` rows equals the last rows of fn on all of them, bit for bit."""
    return torch.equal(fn(x)[-rows:], fn(x[-rows:].clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_split_exact_kernels_on_cuda(dtype, record_property):
    x = torch.randn(1024, 256, device="cuda", dtype=dtype)
    for name, fn in _ROW_EXACT.items():
        assert _rows_equal(fn, x, 256), f"{name} ({dtype}) is not row-split exact on {torch.cuda.get_device_name()}"
    weight = torch.randn(1024, 256, device="cuda", dtype=dtype)
    for rows in (64, 256, 512):
        record_property(f"linear_{str(dtype).replace('torch.', '')}_rows{rows}_exact",
                        _rows_equal(lambda t: F.linear(t, weight), x, rows))


def _saved_rows_equal(block, x: torch.Tensor, rows: int) -> bool:
    """Every tensor ``block`` saves for backward, computed on the last ``rows`` rows of ``x`` alone, equals the
    same rows of the tensor saved on all of ``x``: the condition for a bitwise token-wise recompute."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def saved(inp):
        captured = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: captured.append(t.detach()) or t, lambda t: t):
            block(inp)
        return [t for t in captured if t.dim() >= 2 and t.untyped_storage().data_ptr() not in weights]

    full = saved(x.detach().requires_grad_())
    part = saved(x[:, -rows:].detach().clone().requires_grad_())
    # Saved by rows: (1, tokens, features) as the block sees them, or (tokens, features) flattened by a linear.
    return len(full) == len(part) and all(torch.equal(f[..., -rows:, :], p) for f, p in zip(full, part))


@pytest.mark.parametrize("fractions", [
    lambda i: (0.0, 1.0, 0.0),                             # swap everything: copies only, always bitwise
    lambda i: (0.5, 0.5, 0.0) if i % 2 else (0, 0, 1),     # token-wise keep/swap (no row recompute), whole recompute
    lambda i: (0.25, 0.25, 0.5),                           # token-wise keep/swap/recompute: bitwise if rows are
])
def test_swap_streams_exact_on_cuda(fractions, deterministic):
    batches = [torch.randn(1, 512, 64, device="cuda") for _ in range(3)]
    torch.manual_seed(0)
    reference = train(TinyMLP(depth=6).cuda(), batches)
    torch.manual_seed(0)
    model = TinyMLP(depth=6).cuda()
    # Declared separable: the probe's answer depends on cuBLAS (above); the plan must split rows regardless.
    config = memopt.MemoptConfig(token_separable={"blocks.*": True})
    graph = memopt.profile(model, batches[0], config)
    assert all(u.token_separable for u in graph.units)
    plan = _plan(graph, fractions)
    handle = memopt.apply(model, plan, config)
    got = train(model, batches, config)
    stats = handle.stats()
    assert stats["host_pinned"] and stats["swapped_bytes_total"] > 0 and stats["refused_bytes"] == 0
    assert stats["fetched_bytes_total"] == stats["swapped_bytes_total"]
    assert handle._runtime.store.arena.buffer.is_pinned()
    handle.remove()
    recomputes_rows = any(d.effective is Mode.TOKEN_WISE and d.keep_rows + d.swap_rows < d.rows for d in plan.decisions)
    if recomputes_rows and not _saved_rows_equal(model.blocks[0], batches[0], 256):
        # cuBLAS chose another kernel for half the rows on this GPU: exact up to float rounding only.
        assert max_difference(reference, got) < 1e-5
    else:
        assert max_difference(reference, got) == 0.0


# -- finding 1: flash and efficient attention save CPU scalars; they are kept, never swapped --------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swap_everything_with_sdpa_keeps_its_cpu_seeds(dtype):
    """Flash (bf16) and efficient (fp32) attention save ``philox_seed``/``philox_offset`` as CPU int64 scalars;
    swapping them called ``record_stream`` on a CPU tensor, which raises. They stay where they are."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=512, hidden=128, layers=4, max_tokens=512).cuda().to(dtype)
    ids = torch.randint(0, 512, (2, 512), device="cuda")
    reference = TinyGPT(vocab=512, hidden=128, layers=4, max_tokens=512).cuda().to(dtype)
    reference.load_state_dict(model.state_dict())
    reference(ids).backward()
    units = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    runtime = Runtime(model, units, [UnitPolicy(Mode.SWAP, swap_tensors=frozenset(range(64)))] * len(units),
                      host_capacity_bytes=1 << 28)
    runtime.install()
    model(ids).backward()
    torch.cuda.synchronize()
    stats = runtime.stats()
    runtime.remove()
    runtime.close()
    # Efficient attention (fp32) saves its seed and offset as CPU scalars; flash (bf16) under torch 2.11 on an
    # H200 saved none (off_device_bytes 0): what matters is that neither crashes nor changes the gradients.
    if dtype == torch.float32:
        assert stats["off_device_bytes"] > 0, "no CPU scalar was saved: SDPA took the math path"
    assert stats["swapped_bytes_total"] > 0 and stats["fetched_bytes_total"] == stats["swapped_bytes_total"]
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # attention backward need not be deterministic
    assert max_difference([p.grad for p in reference.parameters()], [p.grad for p in model.parameters()]) < tolerance


# -- finding 8: the host arena is pinned in place, at its exact size --------------------------------------------

def test_host_arena_pinned_at_exact_size_outside_torchs_host_cache():
    capacity = (3 << 20) + 4096 + 48  # torch.empty(pin_memory=True) would take 4 MiB and keep them cached
    cached_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    store = HostStore(torch.device("cuda", torch.cuda.current_device()), capacity)
    buffer = store.arena.buffer
    assert buffer.is_pinned() and buffer.numel() == capacity and store.stats()["host_pinned"]
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == cached_before
    x = torch.randn(1000, 33, device="cuda")
    entry = store.put(x)
    assert torch.equal(store.fetch(entry), x)
    del entry
    store.close()
    assert not buffer.is_pinned()  # unregistered on close


# -- finding 6: no hook waits for the GPU ---------------------------------------------------------------------------

def test_training_step_never_synchronises_on_cuda(monkeypatch):
    """Every unit swapped: no hook calls Event.synchronize, Stream.synchronize or torch.cuda.synchronize."""
    torch.manual_seed(0)
    model = TinyMLP(depth=4).cuda()
    x = torch.randn(2, 512, 64, device="cuda")
    units = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    runtime = Runtime(model, units, [UnitPolicy(Mode.SWAP, swap_tensors=frozenset(range(16)))] * 4,
                      host_capacity_bytes=1 << 26)
    runtime.install()
    model(x).backward()  # warm-up: streams, events and the allocator's first blocks
    waits: list[str] = []
    for owner, name in ((torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda self, *a, _o=original, _n=f"{owner.__name__}.{name}": (
            waits.append(_n), _o(self, *a))[1])
    original_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (waits.append("cuda.synchronize"),
                                                                    original_sync(*a, **k))[1])
    model(x).backward()
    assert waits == []
    monkeypatch.undo()
    torch.cuda.synchronize()
    runtime.store.reclaim()
    assert runtime.store.stats()["host_pending_blocks"] == 0
    runtime.remove()
    runtime.close()


def _allocation_timeline(layers, base: int) -> tuple[list[str], list]:
    """Allocated MiB (above ``base``) as each layer's forward ends (``f<i>``) and as its backward begins
    (``b<i>``, when its output's gradient arrives): where a step's bytes go, read off the allocator's counters
    (no synchronisation). Tensor hooks only, as memopt's own: the autograd graph is unchanged."""
    timeline: list[str] = []

    def mark(label: str) -> None:
        timeline.append(f"{label}:{(torch.cuda.memory_allocated() - base) / 2**20:.1f}")

    def after_forward(index, _module, _args, out):
        mark(f"f{index}")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: mark(f"b{index}"))

    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: after_forward(i, m, a, o))
             for i, layer in enumerate(layers)]
    return timeline, hooks


# -- finding 5: the plan holds the workspaces the meter cannot see -------------------------------------------------

def test_cuda_peak_within_budget(record_property):
    # What earlier tests of the process left for the garbage collector, and cuBLAS workspaces they made (which
    # the plan counts as fixed bytes, made again below), are no part of this step.
    gc.collect()
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = TinyGPT(vocab=1024, hidden=256, layers=8, max_tokens=1024).cuda()
    ids = torch.randint(0, 1024, (4, 1024), device="cuda")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    model(ids).backward()  # the same step without memopt, for the record
    torch.cuda.synchronize()
    unoptimised = torch.cuda.max_memory_allocated() - base
    handle = memopt.optimize(model, ids, 0.5)
    assert handle.graph.meta["device_workspace_bytes"] > 0  # cuBLAS's, counted in the fixed bytes
    torch.cuda.reset_peak_memory_stats()
    before_step = torch.cuda.memory_allocated() - base
    timeline, hooks = _allocation_timeline(model.layers, base)
    model(ids).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for hook in hooks:
        hook.remove()
    stats = handle.stats()
    handle.remove()
    record_property("unoptimised_peak", unoptimised)
    record_property("timeline_mib", " ".join(timeline))
    for key in ("swapped_bytes_total", "refused_bytes", "off_device_bytes", "host_peak_bytes"):
        record_property(key, stats.get(key))
    record_property("allocated_before_step", before_step)
    record_property("peak", peak)
    record_property("predicted_peak", handle.plan.predicted_peak_bytes)
    # The peak also holds the weights, gradients and the batch: compare with the budget, which counts model
    # states, allowing the optimizer states that do not exist in this test.
    assert peak <= handle.plan.budget_bytes, (peak, stats, handle.plan.summary())


# -- finding 3: the RNG state is read after the batch is drawn -----------------------------------------------------

def test_profile_on_cuda_leaves_rng_untouched():
    model = TinyMLP(depth=3).cuda()
    x = torch.randn(2, 128, 64, device="cuda")  # draws from the CUDA generator: before the state is read
    state = torch.cuda.get_rng_state()
    before = snapshot(model)
    memopt.profile(model, x)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert max_difference(before, snapshot(model)) == 0.0
