"""Plan-CLI scenario: `memopt plan` on 7B-class presets, timed end to end, and fake-vs-live accuracy.

Each `memopt plan` case runs the real command in a fresh process (interpreter start, imports, fake
trace, solve, simulator re-check) and records:

- ``wall_vs_60s``: wall-clock seconds as a ratio to the 60 s the CLI is allowed;
- ``states_vs_analytic``: the parameter + gradient + optimizer bytes it reports over the count from the
  published architecture (1.000 = equal; from the JSON where a plan was made, else parsed from the
  printed breakdown, which rounds to 0.01 GiB);
- ``peak_vs_none`` / ``step_vs_none`` / ``step_vs_full_recompute``: the plan's simulated peak and step
  against keeping every activation and against recomputing every unit, all from the same graph.

The accuracy cases profile tiny models of several families both live and with fake tensors in this
run: ``fake_vs_live_activations`` is the fake estimate of the activation bytes over the live measurement.

Run: ``python bench/plan_cli.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import write_rows

from memopt.units import format_bytes

LIMIT_S = 60.0

# (label, extra CLI arguments); the first is the exact command.
CASES = [
    ("llama-7b 40GiB h100", ["llama-7b", "--seq", "4096", "--batch", "1", "--budget", "40GiB", "--gpu", "h100"]),
    ("llama-7b 40GiB h100 zero3x8", ["llama-7b", "--seq", "4096", "--batch", "1", "--budget", "40GiB", "--gpu", "h100",
                                     "--zero-stage", "3", "--world-size", "8"]),
    ("llama-7b 24GiB h100 zero3x8", ["llama-7b", "--seq", "4096", "--batch", "1", "--budget", "24GiB", "--gpu", "h100",
                                     "--zero-stage", "3", "--world-size", "8"]),
    ("llama3-8b 8k a100-80g zero3x8", ["llama3-8b", "--seq", "8192", "--batch", "1", "--gpu", "a100-80g",
                                       "--zero-stage", "3", "--world-size", "8"]),
    ("mistral-7b 20GiB a100-40g zero3x8", ["mistral-7b", "--seq", "4096", "--batch", "1", "--budget", "20GiB",
                                           "--gpu", "a100-40g", "--zero-stage", "3", "--world-size", "8"]),
    ("qwen2-7b 48GiB h200 zero2x8", ["qwen2-7b", "--seq", "4096", "--batch", "2", "--budget", "48GiB", "--gpu", "h200",
                                     "--zero-stage", "2", "--world-size", "8"]),
]

ACCURACY = [("llama", 256), ("gpt2", 256), ("qwen2", 512), ("mistral", 512)]

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def _analytic_states_bytes(model: str, argv: list[str]) -> int:
    from memopt.fake_profile import TrainingSetup, analytic_param_count, load_model_config, model_states

    def opt(flag: str, default: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv else default

    setup = TrainingSetup(seq_len=int(opt("--seq", "1")), batch_size=int(opt("--batch", "1")),
                          dtype=opt("--dtype", "bf16"), optimizer=opt("--optimizer", "adamw"),
                          zero_stage=int(opt("--zero-stage", "0")), world_size=int(opt("--world-size", "1")))
    return model_states(analytic_param_count(load_model_config(model)), setup).total_bytes


def _printed_states_bytes(stdout: str) -> int:
    total = 0
    for name in ("parameters", "gradients", "optimizer state"):
        match = re.search(rf"^\s+{name}\s+([0-9.]+) (\w+)", stdout, flags=re.M)
        if match is None:
            raise RuntimeError(f"the breakdown lacks {name!r}:\n{stdout}")
        total += float(match.group(1)) * _UNITS[match.group(2)]
    return int(total)


def run_cli_case(label: str, argv: list[str], workdir: Path) -> dict:
    from memopt.report import PlanReport

    json_path = workdir / f"{label.replace(' ', '_')}.json"
    command = [sys.executable, "-m", "memopt.cli", "plan", *argv, "--json", str(json_path), "--quiet"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wall_s = time.perf_counter() - started
    analytic = _analytic_states_bytes(argv[0], argv)
    row = {"case": label, "exit_code": result.returncode, "wall_s": round(wall_s, 2),
           "wall_vs_60s": wall_s / LIMIT_S, "states": format_bytes(analytic)}
    if result.returncode == 0:
        report = PlanReport.load(json_path)
        none, full = report.baselines["none"], report.baselines["checkpoint-all"]
        sim = report.simulated
        row.update(states_vs_analytic=report.graph.model_state_bytes / analytic,
                   peak_vs_none=sim.peak_bytes / none.predicted_peak_bytes,
                   step_vs_none=sim.step_s / none.predicted_step_s,
                   step_vs_full_recompute=sim.step_s / full.predicted_step_s,
                   verdict="fits" if report.verified and report.fits_device else "no fit")
    else:
        row.update(states_vs_analytic=_printed_states_bytes(result.stdout) / analytic, peak_vs_none="-",
                   step_vs_none="-", step_vs_full_recompute="-",
                   verdict=result.stderr.strip().splitlines()[-1].split("error: ")[-1][:48] + "...")
    row["fake_vs_live_activations"] = "-"
    return row


def run_accuracy_case(family: str, seq: int) -> dict:
    import transformers

    from memopt.config import MemoptConfig
    from memopt.fake_profile import TrainingSetup, fake_profile
    from memopt.hardware import Hardware
    from memopt.profiler import profile_model
    from memopt.testing import HF_FAMILIES, hf_causal_lm, hf_sample

    hardware = Hardware.preset("cpu")
    config_name, kwargs = HF_FAMILIES[family]
    started = time.perf_counter()
    fake = fake_profile(getattr(transformers, config_name)(**kwargs),
                        TrainingSetup(seq_len=seq, batch_size=2, dtype="fp32"), hardware)
    fake_s = time.perf_counter() - started
    started = time.perf_counter()
    live = profile_model(hf_causal_lm(family, attn_implementation="sdpa"), hf_sample(batch=2, seq=seq),
                         MemoptConfig(probe_separable=False), hardware)
    live_s = time.perf_counter() - started
    fake_bytes = fake.activation_bytes + fake.head_workspace_bytes
    live_bytes = live.activation_bytes + live.head_workspace_bytes
    return {"case": f"tiny {family} seq {seq}: fake vs live", "exit_code": 0, "wall_s": round(fake_s, 2),
            "wall_vs_60s": "-", "states": "-", "states_vs_analytic": "-", "peak_vs_none": "-", "step_vs_none": "-",
            "step_vs_full_recompute": "-", "verdict": f"fake trace {fake_s:.2f} s, live profile {live_s:.2f} s",
            "fake_vs_live_activations": fake_bytes / live_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-accuracy", action="store_true", help="only the CLI cases")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, argv in CASES:
            rows.append(run_cli_case(label, argv, Path(tmp)))
            print(rows[-1], flush=True)
    if not args.skip_accuracy:
        for family, seq in ACCURACY:
            rows.append(run_accuracy_case(family, seq))
            print(rows[-1], flush=True)
    write_rows("plan_cli", rows)


if __name__ == "__main__":
    main()
