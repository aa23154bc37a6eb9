"""The CPU benchmarks' measuring parts on tiny shapes: what they report is what they claim to measure."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import head  # noqa: E402


def test_head_bench_measures_a_smaller_transient_when_chunked():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(512, 32, generator=generator)
    w = torch.randn(4096, 32, generator=generator).requires_grad_(True)
    target = torch.randint(0, 4096, (512,), generator=generator)
    unchunked = head._peak("unchunked", h, w, target, 64)
    chunked = head._peak("chunked", h, w, target, 64)
    logits = 512 * 4096 * 4
    assert unchunked >= 2 * logits  # logits and their gradient at least
    assert chunked < unchunked / 4  # 8 chunks of 64 rows: one chunk's logits at a time


def test_qst_curve_reports_the_loss_per_window(monkeypatch):
    import qst

    monkeypatch.setattr(qst, "CURVE_WINDOW", 2)
    rows = qst.main(["--curve", "1e-3", "--ablation-steps", "4", "--no-write"])
    assert len(rows) == 1 and rows[0]["lr"] == 1e-3 and rows[0]["steps"] == 4
    assert len(rows[0]["curve_every_window"].split("/")) == 2 and rows[0]["trainable_params"] > 0


def test_match_ckpt_plans_at_checkpointings_bytes_and_holds_them(monkeypatch):
    import match_ckpt

    from memopt.testing import hf_causal_lm, hf_sample

    monkeypatch.setitem(match_ckpt.CASES, "tiny", (
        lambda: hf_causal_lm("llama", attn_implementation="sdpa", num_hidden_layers=6, vocab_size=2048),
        lambda: hf_sample(vocab_size=2048, seq=256)))
    rows = {row["method"]: row for row in match_ckpt.measure("tiny", rounds=1)}
    assert set(rows) == {"none", "hf-ckpt", "memopt"}
    assert rows["memopt"]["activation_vs_ckpt"] <= 1.0 and rows["hf-ckpt"]["activation_vs_ckpt"] == 1.0
    assert rows["none"]["step_vs_none"] == 1.0 and rows["memopt"]["memopt_vs_ckpt_min_median_max"].count("/") == 2


def test_alloc_from_start_trace_holds_the_models_blocks_before_its_first_step():
    import alloc

    trace = alloc.recorded_trace(64, 2, 128, steps=2, min_ops=0, from_start=True)
    marks = [i for i, record in enumerate(trace) if record[1] == alloc.STEP]
    assert len(marks) == 2
    before = {ident for ident, kind, _ in trace[:marks[0]] if kind == 0}
    freed_in_steps = {ident for ident, kind, _ in trace[marks[0]:marks[-1]] if kind == 1}
    # Parameters and AdamW states made before the first mark live through the steps (freed only at the end).
    assert len(before - freed_in_steps) > 10


def test_target_bound_finds_the_budget_of_a_ratio_and_orders_its_variants():
    import target_bound

    from memopt.planners.synthetic import random_graph

    graph = random_graph(4, seed=3)
    state = graph.model_state_bytes / target_bound.GiB
    none = target_bound.baseline_plan(graph, "none")
    budget = (graph.model_state_bytes + 0.9 * (none.predicted_peak_bytes - graph.model_state_bytes)) / target_bound.GiB
    row = target_bound.bound_rows(graph, budget, [1.05], "random-4")
    assert all(isinstance(row[f"{name}_vs_none"], float) for name in target_bound.variants(graph)), row
    # Fewer bytes held can only make the optimal step faster (within the MIP's relative gap).
    assert row["no_grads_no_states_vs_none"] <= row["grads_freed_as_made_vs_none"] * 1.01
    assert row["grads_freed_as_made_vs_none"] <= row["as_profiled_vs_none"] * 1.01
    found = row["gib_for_1.05x"]
    assert state < found
    assert target_bound.step_ratio(graph, int(found * target_bound.GiB)) <= 1.05
    below = target_bound.step_ratio(graph, int((found - 0.06) * target_bound.GiB))
    assert below is None or below > 1.05


def test_trace_gaps_finds_the_idle_and_prices_a_host_wait(tmp_path):
    import gzip
    import json

    import trace_gaps

    # One stream: 10 us kernels every 10 us (no idle) for 100 ms, but for 5 ms of idle after a 40 ms host wait.
    events, t = [], 0.0
    while t < 100_000:
        if 50_000 <= t < 55_000:
            t = 55_000.0
        events.append({"cat": "kernel", "ts": t, "dur": 10.0, "args": {"stream": 7}})
        t += 10.0
    events.append({"cat": "kernel", "ts": 0.0, "dur": 5.0, "args": {"stream": 9}})  # a copy stream
    events.append({"cat": "cpu_op", "name": "autograd::engine::evaluate_function: Head", "ts": 9_000.0, "dur": 41_500.0})
    events.append({"cat": "cpu_op", "name": "aten::_local_scalar_dense", "ts": 10_000.0, "dur": 40_000.0})
    events.append({"cat": "cpu_op", "name": "aten::_local_scalar_dense", "ts": 70_000.0, "dur": 500.0})  # short
    path = tmp_path / "s" / "d" / "trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    row = trace_gaps.analyse(path, 10.0)
    assert row["stream"] == 7 and row["idle_ms"] == 5.0 and row["median_idle_ms_per_window"] == 0.0
    assert row["host_waits_over_1ms"] == 1
    assert row["after_each_wait"] == "10.0 ms in autograd::engine::evaluate_function: Head: waited 40.0 ms, GPU idle +5.00 ms"
