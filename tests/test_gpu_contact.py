"""The first GPU run's checks beyond test_runtime_cuda.py: RNG under replay, autocast, Hugging Face models as
their configs build them, mixed plans with lookahead, measured against predicted memory, copy/compute overlap,
a second device and the pinned arena's cost.

Most checks are a function of the device they run on; the CPU variant runs in the default suite (it checks the
test itself and the CPU path), the CUDA variant is marked ``cuda`` (``bench/gpu_session.py`` runs those).
Figures a GPU shows but no rule fixes (overlap, the ratio of measured to predicted peak, the arena's pinning
time) are recorded as JUnit properties, which the session's summary collects.
"""

from __future__ import annotations

import gc
import statistics
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import memopt
from memopt.graph import Mode, Plan
from memopt.decisions import Decision
from memopt.planners import baseline_plan, min_feasible_bytes, realize, simulate
from memopt.runtime.store import HostStore
from memopt.testing import TinyGPT, TinyMLP, hf_causal_lm, hf_sample, max_difference, snapshot, train

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def math_attention():
    """Bitwise comparisons through SDPA's math kernel: fused attention backward need not be deterministic."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _plan_of(graph, decisions: list[Decision]) -> Plan:
    result = simulate(graph, decisions)
    return Plan(decisions, result.peak_bytes, "test", result.peak_bytes, result.step_s, result.step_s,
                result.peak_bytes, host_bytes=result.host_peak_bytes)


def _mixed(graph) -> list[Decision]:
    """Per unit in turn: keep, swap half, recompute, selective, swap all; a plan of every mode side by side."""
    kinds = [lambda u: realize(u, 1, 0, 0), lambda u: realize(u, 0.5, 0.5, 0), lambda u: realize(u, 0, 0, 1),
             lambda u: Decision(u.name, 0.0, 0.0, 1.0, Mode.SELECTIVE), lambda u: realize(u, 0, 1, 0)]
    return [kinds[i % len(kinds)](u) for i, u in enumerate(graph.units)]


# -- dropout draws the same masks when a unit is replayed (recompute, selective) ----------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [Mode.RECOMPUTE, Mode.SELECTIVE])
def test_dropout_under_replay_is_bitwise(device, mode, deterministic, math_attention):
    batches = [torch.randint(0, 512, (2, 256), device=device) for _ in range(2)]
    torch.manual_seed(0)
    reference_model = TinyGPT(vocab=512, hidden=128, layers=4, max_tokens=256, dropout=0.2).to(device)
    state = {k: v.clone() for k, v in reference_model.state_dict().items()}
    torch.manual_seed(1)
    reference = train(reference_model, batches)
    model = TinyGPT(vocab=512, hidden=128, layers=4, max_tokens=256, dropout=0.2).to(device)
    model.load_state_dict(state)
    graph = memopt.profile(model, batches[0])
    plan = _plan_of(graph, [Decision(u.name, 0.0, 0.0, 1.0, mode) for u in graph.units])
    handle = memopt.apply(model, plan)
    torch.manual_seed(1)
    got = train(model, batches)
    recomputes = handle.stats()["recomputes"]
    handle.remove()
    assert recomputes == len(graph.units) * len(batches)
    assert max_difference(reference, got) == 0.0


# -- bf16 autocast: the replay runs under the forward's autocast state ---------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_mixed_plan_is_bitwise(device, deterministic, math_attention):
    batches = [torch.randint(0, 512, (2, 256), device=device) for _ in range(2)]

    def run(model, handle_config=None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(ids)
            loss.backward()
            opt.step()
        return snapshot(model)

    torch.manual_seed(0)
    base = TinyGPT(vocab=512, hidden=128, layers=5, max_tokens=256).to(device)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    reference = run(base)
    model = TinyGPT(vocab=512, hidden=128, layers=5, max_tokens=256).to(device)
    model.load_state_dict(state)
    with torch.autocast(device, dtype=torch.bfloat16):
        graph = memopt.profile(model, batches[0])
    handle = memopt.apply(model, _plan_of(graph, _mixed(graph)))
    got = run(model)
    handle.remove()
    assert max_difference(reference, got) == 0.0


# -- Hugging Face models as their configs build them (use_cache on), AdamW, memopt.optimize ----------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,attn", [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager")])
def test_hf_model_under_optimize_matches_and_fits(device, family, attn, record_property, deterministic,
                                                  math_attention):
    # sdpa through its math kernel: HF's sdpa code path, with a backward that is deterministic, so bitwise.
    batches = [{k: v.to(device) for k, v in hf_sample(batch=2, seq=256, seed=s).items()} for s in range(2)]

    def loop(build, handle_fn=None):
        base = base_requested = 0
        if device == "cuda":
            # Only this run's bytes: what earlier tests left for the garbage collector, and cuBLAS workspaces they
            # made (the plan counts them as fixed bytes; they are made again below), stay out of the peaks.
            gc.collect()
            torch.cuda.synchronize()
            torch._C._cuda_clearCublasWorkspaces()
            base = torch.cuda.memory_allocated()
            base_requested = torch.cuda.memory_stats()["requested_bytes.all.current"]

        def requested_peak() -> int:
            # What the tensors asked for. torch's caching allocator hands out a free block whole when less
            # than 1 MiB of it would be left over, and counts the whole block as allocated (recorded beside).
            return torch.cuda.memory_stats()["requested_bytes.all.peak"] - base_requested

        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle = handle_fn(model, opt) if handle_fn else None
        peaks, phases, allocated = [], [], []  # per step: requested peak after the forward, backward, optimizer step
        for step, batch in enumerate(batches):
            torch.manual_seed(step)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            loss = model(**batch).loss
            marks = [requested_peak()] if device == "cuda" else []
            loss.backward()
            marks += [requested_peak()] if device == "cuda" else []
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                peaks.append(requested_peak())
                phases.append(marks + [peaks[-1]])
                allocated.append(torch.cuda.max_memory_allocated() - base)
        return model, snapshot(model), handle, (peaks, phases, allocated)

    _, reference, _, (reference_peaks, _, reference_allocated) = loop(
        lambda: hf_causal_lm(family, attn_implementation=attn).to(device))

    def wrap(model, opt):
        # Halfway between the least memory any plan needs and none saved: a real saving that always fits,
        # also where cuBLAS's workspaces (fixed bytes) dwarf a tiny model's activations.
        # exact=True: the LM head unchunked, so every gradient is bitwise (chunks regroup the head's sum).
        config = memopt.MemoptConfig(exact=True)
        graph = memopt.profile(model, batches[0], config, optimizer=opt)
        least, _ = min_feasible_bytes(graph, config.planner_options())
        budget = (least + baseline_plan(graph, "none").predicted_peak_bytes) // 2
        return memopt.apply(model, memopt.plan(graph, budget, config), config, graph=graph)

    def build():
        model = hf_causal_lm(family, attn_implementation=attn).to(device)
        assert model.config.use_cache  # as the config builds it
        return model

    model, got, handle, (peaks, phases, allocated) = loop(build, wrap)
    handle_stats = handle.stats()
    assert handle_stats["unit_forward_calls"] > 0
    plan = handle.plan
    handle.remove()
    assert model.config.use_cache  # restored
    assert max_difference(reference, got) == 0.0
    if device == "cuda":
        record_property("predicted_peak_bytes", plan.predicted_peak_bytes)
        record_property("measured_peak_bytes", peaks[-1])
        record_property("unoptimised_peak_bytes", reference_peaks[-1])
        record_property("unoptimised_predicted_peak_bytes", baseline_plan(handle.graph, "none").predicted_peak_bytes)
        record_property("measured_peak_allocated_bytes", allocated[-1])
        record_property("unoptimised_peak_allocated_bytes", reference_allocated[-1])
        record_property("measured_over_predicted", round(peaks[-1] / plan.predicted_peak_bytes, 4))
        record_property("peak_after_forward_backward_step", phases[-1])
        assert peaks[-1] <= plan.budget_bytes, (peaks, phases, handle_stats, plan.summary())


# -- keep, swap, recompute, selective and token-wise units mixed, with lookahead 1 and 3 -------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lookahead", [1, 3])
def test_mixed_plan_with_lookahead_is_bitwise(device, lookahead, deterministic):
    batches = [torch.randn(1, 512, 64, device=device) for _ in range(3)]
    torch.manual_seed(0)
    reference = train(TinyMLP(depth=10).to(device), batches)
    torch.manual_seed(0)
    model = TinyMLP(depth=10).to(device)
    config = memopt.MemoptConfig(lookahead=lookahead)
    graph = memopt.profile(model, batches[0], config)
    decisions = _mixed(graph)
    decisions[-1] = realize(graph.units[-1], 0.5, 0.5, 0.0)  # a swap in the last unit: prefetched first
    plan = _plan_of(graph, decisions)
    modes = {d.effective for d in plan.decisions}
    # Swapped rows of a unit the probe finds separable (on CUDA, TinyMLP's) are token-wise decisions.
    swaps = any(d.effective is Mode.SWAP or (d.effective is Mode.TOKEN_WISE and d.swap_rows) for d in plan.decisions)
    assert {Mode.KEEP, Mode.RECOMPUTE, Mode.SELECTIVE} <= modes and (swaps or device == "cpu")
    handle = memopt.apply(model, plan, config)
    got = train(model, batches, config)
    stats = handle.stats()
    handle.remove()
    assert max_difference(reference, got) == 0.0
    if device == "cuda":
        assert stats["swapped_bytes_total"] > 0 and stats["fetched_bytes_total"] == stats["swapped_bytes_total"]


# -- copies overlap compute: a swapped step costs less than compute plus its copies in series ---------------------

def _step_s(model, x) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    model(x).sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - started


@pytest.mark.cuda
def test_swap_copies_overlap_compute(record_property):
    """Every other unit swapped: its copies hide behind the next units' compute. The swapped step and the
    all-kept one run in alternating rounds (two models, same weights), against the same bytes copied both ways
    with nothing else running; at least half the copies' time must be hidden (0.97 on an H200)."""
    torch.manual_seed(0)
    kept = TinyMLP(hidden=1024, depth=8).cuda()
    model = TinyMLP(hidden=1024, depth=8).cuda()
    model.load_state_dict(kept.state_dict())
    x = torch.randn(1, 8192, 1024, device="cuda")
    graph = memopt.profile(model, x)
    plan = _plan_of(graph, [realize(u, 0, 1, 0) if i % 2 == 0 else realize(u, 1, 0, 0)
                            for i, u in enumerate(graph.units)])
    handle = memopt.apply(model, plan)
    times: dict[str, list[float]] = {"keep": [], "swap": []}
    for round_ in range(7):  # round 0 warms both up
        for name, which in (("keep", kept), ("swap", model))[:: 1 if round_ % 2 else -1]:
            seconds = _step_s(which, x)
            if round_:
                times[name].append(seconds)
    stats = handle.stats()
    handle.remove()
    swapped = stats["swapped_bytes_total"] // (stats["unit_forward_calls"] // len(graph.units))
    block = torch.empty(swapped // 4, device="cuda")
    host = torch.empty(block.numel(), pin_memory=True)
    copies = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        host.copy_(block, non_blocking=True)
        block.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - started)
    keep_s, swap_s, copy_s = statistics.median(times["keep"]), statistics.median(times["swap"]), min(copies)
    overlap = 1.0 - (swap_s - keep_s) / copy_s
    for key, value in (("keep_step_s", keep_s), ("swap_step_s", swap_s), ("copy_s", copy_s),
                       ("swapped_bytes_per_step", swapped), ("overlap_fraction", overlap)):
        record_property(key, round(value, 5))
    assert swapped > 0 and overlap >= 0.5, (keep_s, swap_s, copy_s)


# -- a model on the second GPU: nothing lands on the first ---------------------------------------------------------

@pytest.mark.cuda
def test_model_on_second_gpu(deterministic):
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    device = "cuda:1"
    batches = [torch.randn(1, 512, 64, device=device) for _ in range(2)]
    torch.manual_seed(0)
    reference = train(TinyMLP(depth=4).to(device), batches)
    torch.manual_seed(0)
    model = TinyMLP(depth=4).to(device)
    on_first = torch.cuda.memory_allocated(0)
    graph = memopt.profile(model, batches[0])
    plan = _plan_of(graph, [realize(u, 0, 1, 0) if i % 2 else realize(u, 0, 0, 1) for i, u in enumerate(graph.units)])
    handle = memopt.apply(model, plan)
    got = train(model, batches)
    handle.remove()
    assert max_difference(reference, got) == 0.0
    assert torch.cuda.memory_allocated(0) == on_first


# -- the pinned host arena: its size is the plan's, its cost is measured ---------------------------------------------

@pytest.mark.cuda
def test_pinned_arena_size_and_time(record_property):
    for capacity in (64 << 20, 1 << 30):
        started = time.perf_counter()
        store = HostStore(torch.device("cuda", torch.cuda.current_device()), capacity)
        made_s = time.perf_counter() - started
        assert store.arena.buffer.numel() == capacity and store.arena.buffer.is_pinned()
        started = time.perf_counter()
        store.close()
        record_property(f"pin_{capacity >> 20}MiB_s", round(made_s, 4))
        record_property(f"unpin_{capacity >> 20}MiB_s", round(time.perf_counter() - started, 4))
