"""Shared benchmark harness: every scenario appends CSV rows that carry device, versions and date,
and rewrites its section of the summary table in bench/README.md.

A scenario script builds a list of row dicts (its own columns) and calls ``write_rows``. Figures are
ratios against a baseline measured in the same run; the baseline's own row says ``1.00``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import re
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"


def environment() -> dict[str, str]:
    """Device, versions and date for every row."""
    import torch

    import memopt

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "torch": torch.__version__,
        "memopt": memopt.__version__,
        "date": _dt.date.today().isoformat(),
    }


def latest_session_files(pattern: str) -> list[Path]:
    """The files matching ``pattern`` in the newest filed GPU session folder that has any
    (``results/gpu_session-<date>/session-<x>/``, as bench/gpu_results.py files them).

    Raises:
        SystemExit: no filed session holds such a file.
    """
    for session in sorted(RESULTS_DIR.glob("gpu_session-*/session-*"), reverse=True):
        found = sorted(session.glob(pattern))
        if found:
            return found
    raise SystemExit(f"no filed {pattern} under bench/results/gpu_session-*/: pass the files to read")


def write_rows(scenario: str, rows: list[dict], *, table_columns: list[str] | None = None) -> Path:
    """Append rows to ``bench/results/<scenario>.csv`` and refresh the scenario's table in README.md.

    Args:
        scenario (str): scenario name, also the CSV file stem and the README section id.
        rows (list[dict]): one dict per measured case; keys are column names.
        table_columns (list[str] | None, default None): columns shown in the README table; all when None.
    """
    if not rows:
        raise ValueError(f"scenario {scenario!r} produced no rows")
    env = environment()
    rows = [{**row, **env} for row in rows]
    columns = list(rows[0])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{scenario}.csv"
    exists = path.exists()
    if exists:
        with path.open() as f:
            header = next(csv.reader(f), None)
        if header != columns:
            # A scenario whose columns changed starts a fresh file rather than mixing schemas.
            path.rename(path.with_suffix(f".{_dt.datetime.now():%Y%m%d%H%M%S}.csv"))
            exists = False
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
    _update_readme(scenario, rows, table_columns or [c for c in columns if c not in ("torch", "memopt")])
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _update_readme(scenario: str, rows: list[dict], columns: list[str]) -> None:
    begin, end = f"<!-- {scenario}:begin -->", f"<!-- {scenario}:end -->"
    table = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    table += [f"| {' | '.join(_fmt(r.get(c, '')) for c in columns)} |" for r in rows]
    block = "\n".join([begin, *table, end])
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {scenario}\n\n{block}\n"
    README.write_text(text)
