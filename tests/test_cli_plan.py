"""`memopt plan` / `memopt report`: every printed plan is re-checked by the simulator and fits its budget."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from memopt.cli import main  # noqa: E402
from memopt.fake_profile import parameter_count  # noqa: E402
from memopt.graph import Plan  # noqa: E402
from memopt.hardware import Hardware  # noqa: E402
from memopt.planners import simulate  # noqa: E402
from memopt.report import PlanReport  # noqa: E402
from memopt.units import format_bytes, parse_bytes  # noqa: E402

BASE = ["plan", "gpt2", "--seq", "256", "--batch", "2", "--gpu", "h100", "--quiet"]


def _plan(tmp_path, capsys, *extra: str, name: str = "plan") -> tuple[str, PlanReport]:
    out_json = tmp_path / f"{name}.json"
    code = main([*BASE, *extra, "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, PlanReport.load(out_json)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plan with no budget (the GPU's memory) and its baselines, to place budgets between them."""
    path = tmp_path_factory.mktemp("ref") / "ref.json"
    assert main([*BASE, "--json", str(path)]) == 0
    return PlanReport.load(path)


def _middle_budget(reference: PlanReport) -> str:
    """Halfway between recomputing every unit and keeping everything, in bytes."""
    low = reference.baselines["checkpoint-all"].predicted_peak_bytes
    return str((low + reference.baselines["none"].predicted_peak_bytes) // 2)


def test_no_budget_plans_for_the_whole_gpu(reference):
    assert reference.plan.budget_bytes == Hardware.preset("h100").device_bytes
    # Everything fits an H100 at this size: the fastest plan keeps every activation.
    assert all(d.mode == "keep" for d in reference.plan.decisions)
    assert reference.plan.predicted_step_s == pytest.approx(reference.baselines["none"].predicted_step_s)


@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.3, 0.05])
def test_printed_plan_fits_its_budget_per_simulator(tmp_path, capsys, reference, fraction):
    low = reference.baselines["checkpoint-all"].predicted_peak_bytes
    high = reference.baselines["none"].predicted_peak_bytes
    budget_bytes = int(low + fraction * (high - low))
    out, report = _plan(tmp_path, capsys, "--budget", str(budget_bytes))

    sim = simulate(report.graph, report.plan.decisions)
    assert sim.peak_bytes <= budget_bytes
    assert sim.peak_bytes == report.plan.predicted_peak_bytes
    assert sim.step_s == pytest.approx(report.plan.predicted_step_s)
    # Never slower than recomputing everything, never faster than keeping everything.
    assert report.baselines["none"].predicted_step_s - 1e-12 <= sim.step_s
    assert sim.step_s <= report.baselines["checkpoint-all"].predicted_step_s + 1e-12
    assert "simulator check" in out and ": ok" in out
    assert "FITS" in out


def test_output_names_every_required_figure(tmp_path, capsys, reference):
    out, report = _plan(tmp_path, capsys, "--budget", _middle_budget(reference))
    for needle in ("parameters", "gradients", "optimizer state", "activations", "logits / loss", "workspace",
                   "no saving", "full recompute", "host memory used", "buffer layout", "gap", "plan per unit"):
        assert needle in out, needle
    for unit in report.graph.units:
        assert unit.name in out
    assert "fp32 master copy" in out  # the optimizer convention is stated


def test_model_state_figures_equal_analytic_counts(tmp_path, capsys):
    n = parameter_count("gpt2")
    out, report = _plan(tmp_path, capsys, "--zero-stage", "2", "--world-size", "4", "--optimizer", "adamw")
    graph = report.graph
    assert graph.param_bytes == 2 * n
    assert graph.grad_bytes == -(-2 * n // 4)
    # fp32 master copy + exp_avg + exp_avg_sq (12 bytes a parameter) and a 4-byte step count per tensor:
    # wte, wpe, 12 blocks x 12 tensors, ln_f weight and bias (lm_head is tied to wte)
    tensors = 2 + 12 * 12 + 2
    assert graph.optimizer_bytes == -(-(12 * n + 4 * tensors) // 4)
    assert (report.plan.world_size, report.plan.sharding) == (4, "zero2")  # a DeepSpeed "plan" section takes it
    assert "ZeRO-2" in out


def test_report_re_renders_a_saved_plan(tmp_path, capsys, reference):
    out, _ = _plan(tmp_path, capsys, "--budget", _middle_budget(reference))
    html = tmp_path / "again.html"
    assert main(["report", str(tmp_path / "plan.json"), "--html", str(html)]) == 0
    again = capsys.readouterr().out
    printed = [line for line in out.splitlines() if not line.startswith("wrote ")]
    assert again.splitlines()[: len(printed)] == printed
    assert "<svg" in html.read_text()


def test_version_1_reports_still_load(tmp_path, reference):
    """A report written before the graph carried gathered and shared bytes reads as one with both at 0."""
    data = reference.to_dict()
    assert data["version"] == 3
    data["version"] = 1
    for key in ("gathered_param_bytes", "shared_input_bytes"):
        del data["graph"][key]
    old = PlanReport.from_dict(data)
    assert old.graph.gathered_param_bytes == 0 and old.graph.shared_input_bytes == 0
    assert old.plan == reference.plan
    with pytest.raises(ValueError, match="version 4 is not supported"):
        PlanReport.from_dict({**data, "version": 4})


def _as_version_2(decision: dict) -> dict:
    """A decision as version 2 wrote it: token_wise and selective flags, no mode."""
    out = {k: v for k, v in decision.items() if k != "mode"}
    out["token_wise"] = decision["mode"] == "token-wise"
    out["selective"] = decision["mode"] == "selective"
    return out


def test_version_2_reports_load_their_decisions_by_flag(reference):
    data = reference.to_dict()
    data["version"] = 2
    data["plan"]["decisions"] = [_as_version_2(d) for d in data["plan"]["decisions"]]
    assert PlanReport.from_dict(data).plan == reference.plan


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(keep=0.5, swap=0.5), r"keep, swap, recompute = 1.0, 0.0, 0.0"),
    (lambda d: d.update(mode="tokenwise"), r"mode must be one of .*'token-wise'"),
    (lambda d: d.update(swap_tensors=[0], swap=0.5, keep=0.5, mode="swap", rows=3), r"rows=3 has no meaning for mode 'swap'"),
    (lambda d: d.update(surprise=1), r"unknown fields \['surprise'\]"),
], ids=["fractions-without-tensors", "old-spelling", "foreign-field", "unknown-field"])
def test_an_edited_report_that_no_runtime_could_carry_out_is_refused_by_name(reference, edit, message):
    data = reference.to_dict()
    edit(data["plan"]["decisions"][0])
    with pytest.raises(ValueError, match=message):
        PlanReport.from_dict(data)


def test_custom_gpu_figures_override_the_preset(tmp_path, capsys):
    out, report = _plan(tmp_path, capsys, "--gpu-memory", "48GiB", "--tflops", "100", "--hbm-tbps", "1",
                        "--pcie-gbps", "16")
    hw = report.graph.hardware
    assert (hw.device_bytes, hw.peak_flops_per_s, hw.mem_bytes_per_s, hw.h2d_bytes_per_s) == (
        parse_bytes("48GiB"), 100e12, 1e12, 16e9)
    assert report.plan.budget_bytes == parse_bytes("48GiB")
    assert "custom" in out


def test_no_budget_is_named_as_the_gpus_memory(tmp_path, capsys):
    out, report = _plan(tmp_path, capsys)
    line = next(line for line in out.splitlines() if line.startswith("budget "))
    assert "no --budget given: the GPU's memory, h100" in line
    assert "given as" not in line and str(report.plan.budget_bytes) not in line  # not "(given as 85899345920)"
    from memopt.report import render_html

    assert "no --budget given: the GPU&#x27;s memory, h100" in render_html(report)


def test_budget_is_shown_as_model_states_plus_activations(tmp_path, capsys, reference):
    low = reference.baselines["checkpoint-all"].predicted_peak_bytes
    budget = str(int(low + 0.3 * (reference.baselines["none"].predicted_peak_bytes - low)))  # solves in a second
    out, report = _plan(tmp_path, capsys, "--budget", budget)
    resident = report.graph.resident_bytes
    free = report.plan.budget_bytes - resident
    assert resident > 0 and free > 0
    line = next(line for line in out.splitlines() if line.startswith("budget "))
    expected = f"= model states {format_bytes(resident)} + {format_bytes(free)} for activations (given as {budget!r})"
    assert expected in line
    # Plan.summary (what handle.report() prints) splits the budget and each peak the same way.
    summary = report.plan.summary()
    assert f"model states    {format_bytes(resident)} on the device all step" in summary
    assert f"budget          {format_bytes(report.plan.budget_bytes)} = {format_bytes(resident)} states + " \
           f"{format_bytes(free)} activations" in summary
    peak = report.plan.predicted_peak_bytes
    assert f"predicted peak  {format_bytes(peak)} = {format_bytes(resident)} states + " \
           f"{format_bytes(peak - resident)} activations" in summary


def test_plan_saved_without_resident_bytes_still_loads_and_summarises(reference):
    """A plan from before graph_meta carried the model-state bytes loads, and says the states are included."""
    data = reference.plan.to_dict()
    data["graph_meta"] = {k: v for k, v in data["graph_meta"].items() if k != "resident_bytes"}
    old = Plan.from_dict(data)
    summary = old.summary()
    assert "model states    included in budget and peaks below" in summary
    assert f"budget          {format_bytes(old.budget_bytes)} (given as" in summary


def test_json_is_plain_json_with_the_request(tmp_path, capsys):
    _plan(tmp_path, capsys, "--budget", "20GiB")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["request"]["model"] == "gpt2" and data["request"]["budget"] == "20GiB"
    assert data["plan"]["budget_spec"] == "20GiB"


def test_demo_is_dispatched_to_memopt_demo(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("memopt.demo")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "memopt.demo", fake)
    monkeypatch.setattr("memopt.demo", fake, raising=False)
    assert main(["demo", "--steps", "2"]) == 7
    assert seen == [["--steps", "2"]]


def test_llama3_8b_shows_its_head_row_and_counts_the_logits_by_hand(tmp_path, capsys):
    """The head of a 128k vocabulary at 8192 tokens: the model's own loss holds the log-softmax (fp32), its
    gradient and the logits' gradient (fp32) at once, three N x V x 4 bytes; chunked, a fraction of it."""
    # (ZeRO-2 over 4 GPUs: the model states fit an H100 and the step needs a plan.)
    path = tmp_path / "llama3.json"
    code = main(["plan", "llama3-8b", "--seq", "8192", "--gpu", "h100", "--zero-stage", "2", "--world-size", "4",
                 "--quiet", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = PlanReport.load(path)
    head = report.graph.head
    rows, vocab = 8192, 128256
    assert (head.rows, head.vocab) == (rows, vocab)
    by_hand = 3 * rows * vocab * 4
    assert abs(report.graph.head_workspace_bytes - by_hand) <= 0.03 * by_hand
    assert abs(head.options[0].workspace_bytes - by_hand) <= 0.03 * by_hand
    row = next(line for line in out.splitlines() if "lm head + loss" in line)
    assert report.plan.head_chunks > 1 and "chunked" in row and "chunks of" in row
    # Chunked, an eighth of that or less, beside the trained head's weight gradient (bf16, accumulated in place).
    assert min(o.workspace_bytes for o in head.options) < by_hand / 8 + vocab * 4096 * 2



@pytest.mark.parametrize("budget", ["0.9", "90%"])
def test_a_budget_as_a_fraction_of_the_activation_peak(tmp_path, capsys, reference, budget):
    """As the API takes it: 0.9 or 90 % of the activation peak, model states added."""
    out, report = _plan(tmp_path, capsys, "--budget", budget)
    resident = report.graph.resident_bytes
    none = reference.baselines["none"].predicted_peak_bytes
    assert report.plan.budget_bytes == int(resident + 0.9 * (none - resident))
    assert report.plan.predicted_peak_bytes <= report.plan.budget_bytes
    assert f"given as {budget!r}" in out


def test_the_readmes_quoted_plan_is_what_the_command_prints(capsys):
    """The README quotes `memopt plan mistral-7b ...`: its memory breakdown and its baselines' rows (what no
    solver time limit changes) are printed as quoted."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"^memopt plan (mistral-7b [^\n]*?) --html plan\.html$", readme, re.M).group(1).split()
    block = readme[readme.index("memopt plan: mistral-7b"):]
    block = block[:block.index("```")]
    quoted = [line for line in block.splitlines()
              if re.match(r"  (parameters|activations|peak, no saving|no saving|full recompute) ", line)]
    assert len(quoted) == 5, quoted
    assert main(["plan", *command, "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in quoted:
        assert line in printed, line
