"""gpu_results: file a GPU session's figures with the others: rows into results/train_gpu.csv and the table in
bench/README.md, the session's summary, test reports, trace, memory trace and profiled graphs into
results/gpu_session-<date>/.

    python bench/gpu_results.py DIR [DIR ...]     # DIR: a bench/gpu_session.py output folder

The rows keep the device, torch and memopt versions and the date of the machine that measured them (written
there by train_gpu.py), not this machine's. Text files are filed with that machine's paths taken out
(``scrub``): the checkout's become relative, the Python environment's ``<python>``, the output folder's
``<out>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, _update_readme  # noqa: E402

COLUMNS = ["method", "seq", "allocator", "step_s", "step_vs_none", "peak_alloc_gib", "peak_reserved_gib",
           "reserved_vs_alloc", "predicted_peak_gib", "predicted_step_s", "decisions", "host_peak_gib",
           "device", "torch", "date"]
KEPT = ("summary.json", "session.log", "env.json", "nvidia-smi.txt", "pytest_cuda.xml", "pytest_cuda_pools.xml")
TEXT_SUFFIXES = (".json", ".log", ".txt", ".xml")
_CHECKOUT = re.compile(r"/[^\s\"',:]*?/(?=(?:memopt|bench|tests|planners|integrations|examples)/)")
_PYTHON = re.compile(r"/[^\s\"',:]*?/(?:bin/python3?(?:\.\d+)?|lib/python3\.\d+/site-packages)")
_TMP = re.compile(r"/tmp/[^\s\"',:/]+")


def scrub(text: str) -> str:
    """A session's text without the measuring machine's paths: its checkout's prefix dropped (paths relative to
    the repository), its Python environment ``<python>``, its output folder under /tmp ``<out>``.

    Example:
        >>> scrub("/work/x/memopt/_moalloc.so /opt/v/bin/python3 /opt/v/lib/python3.12/site-packages/pulp /tmp/gs2/a")
        'memopt/_moalloc.so <python> <python>/pulp <out>/a'
    """
    text = _PYTHON.sub("<python>", text)
    text = _CHECKOUT.sub("", text)
    return _TMP.sub("<out>", text)


def _keep(source: Path, target: Path) -> None:
    if source.suffix in TEXT_SUFFIXES:
        target.write_text(scrub(source.read_text(errors="replace")))
    else:
        shutil.copy2(source, target)


def session_rows(folder: Path) -> list[dict]:
    """A session's rows; a run without a ``none`` row of its own (replay, expandable) gets its step ratio from
    the session's ``none`` at the same length (another process of the same session: not interleaved)."""
    rows = []
    for path in sorted(folder.glob("train_gpu_*/train_gpu.json")):
        for row in json.loads(path.read_text()):
            rows.append({"allocator": "torch", **row})
    none = {r["seq"]: r["step_s"] for r in rows if r["method"] == "none" and r.get("step_s")}
    for row in rows:
        if not row.get("step_vs_none") and row.get("step_s") and row["seq"] in none:
            row["step_vs_none"] = round(row["step_s"] / none[row["seq"]], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for folder in args.folders:
        found = session_rows(folder)
        if not found:
            parser.error(f"{folder} holds no train_gpu_*/train_gpu.json: give a bench/gpu_session.py output folder")
        rows += found
        date = found[0].get("date", "undated").replace("-", "")
        keep = RESULTS_DIR / f"gpu_session-{date}" / folder.name
        keep.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (folder / name).exists():
                _keep(folder / name, keep / name)
        for trace in [*folder.glob("train_gpu_*/trace_*"), *folder.glob("memory/memory_trace.json")]:
            _keep(trace, keep / trace.name)
        for graph in folder.glob("train_gpu_*/graph_*.json"):  # live-profiled graphs: plan them again anywhere
            _keep(graph, keep / f"{graph.parent.name}_{graph.name}")
        for log in folder.glob("train_gpu_*/departures_*.json"):  # the replay's fallbacks, and why
            _keep(log, keep / f"{log.parent.name}_{log.name}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = RESULTS_DIR / "train_gpu.csv"
    old = list(csv.DictReader(path.open())) if path.exists() else []
    columns = list(dict.fromkeys([*(old[0] if old else {}), *columns]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([*old, *rows])
    _update_readme("train_gpu", rows, COLUMNS)
    print(f"{len(rows)} rows into {path} and the train_gpu table of bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
