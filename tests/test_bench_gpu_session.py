"""bench/gpu_session.py end to end with ``--tiny`` (a tiny model on CPU, the CUDA tests skipped), and the parts
of bench/train_gpu.py a GPU run depends on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_session  # noqa: E402
import train_gpu  # noqa: E402


def test_gpu_session_tiny_runs_end_to_end_and_fills_its_folder(tmp_path):
    out = tmp_path / "session"
    env = {**os.environ, "OUT": str(out)}  # the folder the GPU machine hands back
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session.py"), "--tiny", "--budget-s", "240"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [phase["name"] for phase in summary["phases"]]
    # The replay and memory runs need CUDA; without it the tiny benchmark runs, and again under expandable segments.
    assert names == ["pytest_cuda", "pytest_cuda_pools", "train_gpu_tiny", "train_gpu_expandable_tiny"]
    assert all(phase["rc"] == 0 for phase in summary["phases"])
    tests = summary["phases"][0]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    rows = json.loads((out / "train_gpu_tiny" / "train_gpu.json").read_text())
    assert [row["method"] for row in rows] == ["none", "hf-ckpt", "memopt-match", "memopt-50"]
    assert all("error" not in row and row["step_s"] > 0 for row in rows), rows
    assert {row["allocator"] for row in rows} == {"torch"}
    expandable = json.loads((out / "train_gpu_expandable_tiny" / "train_gpu.json").read_text())
    assert [(r["method"], r["allocator"]) for r in expandable] == [("hf-ckpt", "torch-expandable"),
                                                                   ("memopt-match", "torch-expandable")]
    import gpu_results

    filed = {(r["method"], r["allocator"]): r for r in gpu_results.session_rows(out)}
    none = filed[("none", "torch")]["step_s"]
    # Its own run has no "none": the ratio is to the session's, at the same length.
    assert filed[("hf-ckpt", "torch-expandable")]["step_vs_none"] == round(expandable[0]["step_s"] / none, 3)
    assert (out / "train_gpu_tiny" / "trace_memopt-match.json.gz").stat().st_size > 0
    assert (out / "train_gpu_tiny" / "plan_memopt-match.json").exists() and (out / "train_gpu_tiny" / "train_gpu.csv").exists()
    assert json.loads((out / "env.json").read_text())["torch"] == torch.__version__
    log = (out / "session.log").read_text()
    assert "train_gpu_tiny: exit 0" in log and "gpu_session" in result.stdout


def test_gpu_session_refuses_to_measure_without_a_gpu(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    assert gpu_session.main(["--out", str(tmp_path)]) == 2
    assert json.loads((tmp_path / "summary.json").read_text())["error"] == "no CUDA device"


def test_junit_counts_reads_failures_and_properties(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">
      <testcase classname="t" name="a"><properties><property name="linear_exact" value="False"/></properties></testcase>
      <testcase classname="t" name="b"><failure message="x"/></testcase>
      <testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>""")
    counts = gpu_session.junit_counts(xml)
    assert (counts["tests"], counts["failures"], counts["skipped"]) == (3, 1, 1)
    assert counts["failed"] == ["t::b"] and counts["properties"] == {"a:linear_exact": "False"}


def test_cuda_test_files_are_found():
    files = gpu_session.cuda_test_files()
    assert "tests/test_runtime_cuda.py" in files and "tests/test_profiler_cuda.py" in files


def test_train_gpu_names_what_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert any("transformers" in line for line in train_gpu.check_prerequisites())
    assert train_gpu.main(["--tiny"]) == 2
    assert "pip install 'transformers" in capsys.readouterr().err


def test_train_gpu_resets_peaks_after_profiling(monkeypatch):
    """memopt's peak figures start after its profiling step, not before it."""
    calls: list[str] = []
    monkeypatch.setattr(train_gpu.memopt, "optimize", lambda *a, **k: calls.append("optimize") or "handle")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: calls.append("reset peaks"))
    assert train_gpu.optimize_then_reset_peaks(None, {}, 0.5, torch.device("cuda")) == "handle"
    assert calls == ["optimize", "synchronize", "reset peaks"]
    calls.clear()
    train_gpu.optimize_then_reset_peaks(None, {}, 0.5, torch.device("cpu"))
    assert calls == ["optimize"]


def test_train_gpu_sums_the_replays_departures_by_reason():
    from memopt.pools._device import DevicePool

    pool = DevicePool.host(1 << 20)
    assert train_gpu.departure_summary(pool.stats()) == ""
    pool.plan([4096], [0], 4096)
    pool.step()
    a, b = pool.alloc(4096), pool.alloc(4096)  # the second: past the plan's end
    assert train_gpu.departure_summary(pool.stats()) == "size 1 / busy 0 / stream 0"
    pool.free(a)
    pool.free(b)


def test_gpu_results_files_a_session_with_its_own_device(tmp_path, monkeypatch):
    import gpu_results
    import harness

    session = tmp_path / "session"
    (session / "train_gpu_16384").mkdir(parents=True)
    row = {"method": "none", "seq": 16384, "step_s": 0.35, "device": "NVIDIA H200", "torch": "2.11.0+cu130",
           "date": "2026-11-29"}
    (session / "train_gpu_16384" / "train_gpu.json").write_text(json.dumps([row]))
    (session / "train_gpu_16384" / "trace_memopt-match.json.gz").write_bytes(b"trace")
    (session / "train_gpu_16384" / "departures_memopt-match.json").write_text("[]")
    # What the measuring machine wrote, its paths in it.
    (session / "summary.json").write_text(json.dumps({"out": "/tmp/gs", "python": "/opt/env/bin/python3"}))
    (session / "env.json").write_text(json.dumps({"moalloc": "/srv/checkout/memopt/_moalloc.so",
                                                  "cbc": "/opt/env/lib/python3.12/site-packages/pulp/cbc"}))
    monkeypatch.setattr(gpu_results, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(harness, "README", tmp_path / "README.md")
    (tmp_path / "results").mkdir()
    assert gpu_results.main([str(session)]) == 0
    filed = (tmp_path / "results" / "train_gpu.csv").read_text()
    assert "NVIDIA H200" in filed and "2.11.0+cu130" in filed  # the measuring machine's, not this one's
    kept = tmp_path / "results" / "gpu_session-20261129" / "session"
    assert (kept / "summary.json").exists() and (kept / "trace_memopt-match.json.gz").exists()
    assert (kept / "train_gpu_16384_departures_memopt-match.json").read_text() == "[]"
    # Filed without the measuring machine's paths.
    assert json.loads((kept / "summary.json").read_text()) == {"out": "<out>", "python": "<python>"}
    assert json.loads((kept / "env.json").read_text()) == {"moalloc": "memopt/_moalloc.so", "cbc": "<python>/pulp/cbc"}
    assert "| none | 16384 | torch |" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit):
        gpu_results.main([str(tmp_path / "results")])  # not a session folder: says so
