"""trace_gaps: where a traced GPU step leaves the compute stream idle, and what the host's waits cost it.

    python bench/trace_gaps.py [TRACE.json.gz ...] [--window-ms 10] [--no-write]

Reads ``torch.profiler`` Chrome traces (by default the ``trace_*.json.gz`` of the latest filed GPU session,
written by bench/train_gpu.py) and reports, for the stream that ran the most kernels: the span from its first
kernel to its last, the idle time between them (kernels, copies and memsets counted as busy), that idle per
window of ``--window-ms``, and every host wait on the device (``aten::_local_scalar_dense``: ``.item()``,
``bool(tensor)``) that lasted over a millisecond, with the idle of the windows after it above the trace's
median window: what that wait cost the GPU. Figures come from the trace alone; nothing is timed here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import latest_session_files, write_rows  # noqa: E402

BUSY = ("kernel", "gpu_memcpy", "gpu_memset")
WAITS = ("aten::_local_scalar_dense",)


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def idle_gaps(events: list[dict]) -> tuple[int, float, float, list[tuple[float, float]]]:
    """The busiest stream, its first and last busy microsecond, and its idle gaps ``(start, length)`` in us."""
    busy = [e for e in events if e.get("cat") in BUSY and "dur" in e]
    if not busy:
        raise SystemExit("the trace has no kernels: trace a step on a GPU (bench/train_gpu.py --trace)")
    counts: dict = {}
    for e in busy:
        if e["cat"] == "kernel":
            counts[e["args"].get("stream")] = counts.get(e["args"].get("stream"), 0) + 1
    stream = max(counts, key=counts.get)
    mine = sorted((e for e in busy if e["args"].get("stream") == stream), key=lambda e: e["ts"])
    gaps, end = [], mine[0]["ts"]
    for e in mine:
        if e["ts"] > end:
            gaps.append((end, e["ts"] - end))
        end = max(end, e["ts"] + e["dur"])
    return stream, mine[0]["ts"], end, gaps


def analyse(path: Path, window_ms: float) -> dict:
    events = load(path)
    stream, start, stop, gaps = idle_gaps(events)
    window = window_ms * 1e3
    n_windows = int((stop - start) // window) + 1
    idle = [0.0] * n_windows
    for at, length in gaps:  # a gap is booked to the window it starts in
        idle[int((at - start) // window)] += length
    typical = statistics.median(idle)
    waits = sorted((e for e in events if e.get("cat") == "cpu_op" and e.get("name") in WAITS and e.get("dur", 0) > 1e3),
                   key=lambda e: e["ts"])
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    costs = []
    for e in waits:
        # Named by the outermost op around it (an autograd node's evaluation, for a wait inside backward).
        around = min((o for o in ops if o["ts"] <= e["ts"] and o["ts"] + o["dur"] >= e["ts"] + e["dur"]),
                     key=lambda o: o["ts"], default=e)
        # The GPU runs dry once the host has waited for it: the idle from the wait's end, two windows on.
        first = max(0, int((e["ts"] + e["dur"] - start) // window))
        extra = sum(max(0.0, w - typical) for w in idle[first:first + 2])
        costs.append(f"{(e['ts'] - start) / 1e3:.1f} ms in {around['name']}: waited {e['dur'] / 1e3:.1f} ms, "
                     f"GPU idle +{extra / 1e3:.2f} ms")
    total_idle = sum(length for _, length in gaps)
    return {"trace": f"{path.parent.parent.name}/{path.parent.name}/{path.name}", "stream": stream,
            "span_ms": round((stop - start) / 1e3, 2), "idle_ms": round(total_idle / 1e3, 2),
            "idle_pct": round(100 * total_idle / (stop - start), 2),
            "median_idle_ms_per_window": round(typical / 1e3, 3), "window_ms": window_ms,
            "host_waits_over_1ms": len(waits), "after_each_wait": "; ".join(costs)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="*", type=Path)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print the rows only")
    args = parser.parse_args(argv)
    rows = [analyse(path, args.window_ms) for path in (args.traces or latest_session_files("trace_*.json.gz"))]
    for row in rows:
        print(row)
    if not args.no_write:
        write_rows("trace_gaps", rows)
    return rows


if __name__ == "__main__":
    main()
