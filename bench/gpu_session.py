"""gpu_session: everything one GPU session runs, as is, into one output folder.

    python bench/gpu_session.py                  # on the GPU machine: results into $OUT (or --out)
    python bench/gpu_session.py --tiny --out DIR # any machine: a tiny model on CPU, CUDA tests skipped

Phases, each printed with the time spent so far, each bounded by what is left of ``--budget-s`` (default
540 s, so a 15-minute device lease holds the machine's start-up too):

1. environment: torch, CUDA, the device, transformers, pulp and its CBC, memopt's C allocator; ``nvidia-smi``.
   Without a GPU (and without ``--tiny``) the session stops here and says so.
2. ``pytest -m cuda`` on the test files that have CUDA tests, with deterministic settings
   (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which makes the bitwise tests run under strict
   ``torch.use_deterministic_algorithms``; they pick math or flash attention themselves). The process-wide
   allocator tests (test_pools_cuda.py) run in their own process. JUnit XML and the log go to the folder.
3. the benchmark: bench/train_gpu.py at seq 16384, then 32768 (``--seq``; the reference run of DESIGN
   section 11: a 953M Llama, bf16, AdamW, batch 1) over none, hf-ckpt, memopt-match and memopt-50, with a
   ``torch.profiler`` trace of one memopt step at the first length; between them, in a process of its own,
   hf-ckpt and memopt-match with memopt's CUDA arena installed and each step's planned layout replayed
   (``--replay``), and the same two under torch's allocator with ``expandable_segments:True`` (run
   ``expandable``), so the three allocators' reserved/allocated come from one session. ``--tiny`` runs the
   2-layer model at seq 256 on whatever device there is.

Output folder: ``env.json``, ``nvidia-smi.txt``, ``pytest_cuda*.xml`` and ``.log``, one folder per benchmark
run (``train_gpu_<seq>/``, ``train_gpu_replay_<seq>/``: rows, plans, graphs and the trace), ``summary.json``
(each phase's exit status, seconds and counts, the tests' recorded properties) and ``session.log``
(everything printed). Exit status 0 when every phase passed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_STARTED = time.perf_counter()
_LOG: list[str] = []


def say(message: str) -> None:
    line = f"[gpu_session {time.perf_counter() - _STARTED:6.1f}s] {message}"
    _LOG.append(line)
    print(line, flush=True)


def environment(out: Path) -> dict:
    """What this machine has; written to env.json."""
    import torch

    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_count=torch.cuda.device_count(),
                   device_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    for package in ("transformers", "pulp", "numpy", "pytest"):
        try:
            env[package] = __import__(package).__version__
        except Exception as exc:  # noqa: BLE001 - reported, the phases that need it say why they fail
            env[package] = f"missing: {type(exc).__name__}"
    try:
        from memopt.planners._cbc import cbc_path

        env["cbc"] = cbc_path()
    except Exception as exc:  # noqa: BLE001
        env["cbc"] = f"missing: {exc}"
    try:
        from memopt.pools import _lib

        _lib.library()
        env["moalloc"] = str(_lib.library_path())
    except Exception as exc:  # noqa: BLE001
        env["moalloc"] = f"missing: {exc}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    return env


def run_phase(name: str, argv: list[str], out: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run one phase in its own process (a crash or an OOM costs only that phase), its output to ``<name>.log``
    and echoed; returns its exit status and seconds."""
    timeout_s = max(10.0, timeout_s)
    say(f"{name}: {' '.join(argv)} (at most {timeout_s:.0f} s)")
    started = time.perf_counter()
    log_path = out / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)

        def copy() -> None:
            for line in process.stdout:
                log.write(line)
                if line.strip():
                    print(f"    {line.rstrip()}", flush=True)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            rc = "timeout"
        reader.join(timeout=10)
    seconds = round(time.perf_counter() - started, 1)
    say(f"{name}: exit {rc} after {seconds} s")
    return {"name": name, "rc": rc, "seconds": seconds, "log": log_path.name}


def junit_counts(path: Path) -> dict:
    """Tests, failures, errors and skips from a JUnit XML file, and the properties the tests recorded."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    properties = {}
    failed = []
    for case in root.iter("testcase"):
        for prop in case.iter("property"):
            properties[f"{case.get('name')}:{prop.get('name')}"] = prop.get("value")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {**counts, "failed": failed, "properties": properties}


def cuda_test_files() -> list[str]:
    """Test files holding CUDA tests (what ``-m cuda`` selects lives only in files that name the marker)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on whatever device (CI checks the script)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else bench/results/...)")
    parser.add_argument("--seq", default="16384,32768",
                        help="benchmark sequence lengths, comma-separated, in order (not with --tiny)")
    parser.add_argument("--replay", default="120GiB", metavar="BYTES",
                        help="CUDA arena for the replay phase (hf-ckpt and memopt-match at the first seq with the "
                             "planned layout replayed); 0 skips it")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole session")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--runs", default="main,replay,expandable,memory",
                        help="benchmark runs, comma-separated: main (every --seq), replay, expandable (hf-ckpt and "
                             "memopt-match at the first seq under expandable_segments:True), memory (bench/"
                             "cuda_memory_trace.py: a swapped step's memory unit by unit, with a snapshot)")
    args = parser.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "bench" / "results" / f"gpu_session-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget_s - (time.perf_counter() - _STARTED)  # noqa: E731
    phases: list[dict] = []
    summary = {"tiny": args.tiny, "out": str(out), "phases": phases}
    try:
        say(f"output folder {out}")
        env = environment(out)
        summary["env"] = env
        say(f"torch {env['torch']}, CUDA {env['torch_cuda']}, device {env.get('device', 'cpu')}, "
            f"moalloc {env['moalloc']}, cbc {env['cbc']}")
        if not env["cuda_available"] and not args.tiny:
            say("no CUDA device here: this session measures a GPU. Run with --tiny to check the script on CPU.")
            summary["error"] = "no CUDA device"
            return 2
        python = sys.executable
        if not args.skip_tests:
            deterministic = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}
            files = cuda_test_files()
            alone = [f for f in files if f.endswith("test_pools_cuda.py")]
            rest = [f for f in files if f not in alone]
            for name, group, share in (("pytest_cuda", rest, 0.2), ("pytest_cuda_pools", alone, 0.25)):
                if not group:
                    continue
                xml = out / f"{name}.xml"
                # -v: each test's result is in the log as it ends, even when the phase runs out of time
                timeout = ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []
                phase = run_phase(name, [python, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider",
                                         *timeout, f"--junitxml={xml}", *group], out, share * args.budget_s,
                                  deterministic)
                phase.update(junit_counts(xml))
                phases.append(phase)
                say(f"{name}: {phase.get('tests', 0)} tests, {phase.get('failures', 0)} failed, "
                    f"{phase.get('errors', 0)} errors, {phase.get('skipped', 0)} skipped")
        if not args.skip_bench:
            seqs = [None] if args.tiny else [int(s) for s in str(args.seq).split(",") if s.strip()]
            wanted = {r.strip() for r in args.runs.split(",")}
            runs = [(f"train_gpu_{seq or 'tiny'}", seq, [], index == 0, None) for index, seq in enumerate(seqs)
                    if "main" in wanted]
            if "replay" in wanted and args.replay not in ("0", "") and env["cuda_available"]:
                # Its own process: the arena must be installed before anything initialises CUDA.
                runs.insert(min(1, len(runs)), (f"train_gpu_replay_{seqs[0] or 'tiny'}", seqs[0],
                                ["--methods", "hf-ckpt,memopt-match", "--replay", args.replay], False, None))
            if "expandable" in wanted:
                # Its own process too: the caching allocator reads its configuration when CUDA starts.
                runs.insert(min(2, len(runs)), (f"train_gpu_expandable_{seqs[0] or 'tiny'}", seqs[0],
                                                ["--methods", "hf-ckpt,memopt-match"], False,
                                                {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}))
            for name, seq, extra, trace, run_env in runs:
                if left() < 30:
                    say(f"{name}: skipped, {left():.0f} s left")
                    continue
                bench = out / name
                size = ["--tiny", "--steps", "2"] if args.tiny else ["--seq", str(seq)]
                phase = run_phase(name, [python, str(ROOT / "bench" / "train_gpu.py"), *size, "--out", str(bench),
                                         *(["--trace"] if trace else []), *extra], out, left() - 5, run_env)
                rows = bench / "train_gpu.json"
                phase["rows"] = json.loads(rows.read_text()) if rows.exists() else []
                phases.append(phase)
            if "memory" in wanted and env["cuda_available"] and left() > 30:
                phases.append(run_phase("cuda_memory_trace", [python, str(ROOT / "bench" / "cuda_memory_trace.py"),
                                                              "--out", str(out / "memory"), "--snapshot"],
                                        out, left() - 5))
        return 0 if phases and all(p["rc"] == 0 for p in phases) else 1
    finally:
        summary["seconds"] = round(time.perf_counter() - _STARTED, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        say(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
        for phase in phases:
            say(f"  {phase['name']}: exit {phase['rc']}, {phase['seconds']} s"
                + (f", failed: {', '.join(phase['failed'])}" if phase.get("failed") else ""))
        (out / "session.log").write_text("\n".join(_LOG) + "\n")


if __name__ == "__main__":
    sys.exit(main())
