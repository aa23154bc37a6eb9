"""Open a memopt HTML report in headless Chromium and check that its memory plot is drawn.

Usage::

    python scripts/check_html_report.py [REPORT.html] [--browser PATH] [--keep DIR]

Without REPORT.html it first writes one with ``memopt plan gpt2 --seq 512 --budget 2.5GiB --gpu l4 --html``.
Two checks run in the real browser:

1. ``--dump-dom``: the page Chromium parsed holds the plot (``svg.memplot``) with its stacked category
   areas and the budget line.
2. ``--screenshot``: the rendered pixels of the page contain the colours of the activation categories
   (everything above the model states) over a sizeable area, and the budget line's red, i.e. the plot
   is visibly non-empty.

Exit status: 0 when both pass, 1 when a check fails, 77 when no Chromium is installed (install one with
``apt-get install chromium``). The test ``tests/test_report_html.py`` runs this check and skips
without a browser.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable")
EXIT_NO_BROWSER = 77
WINDOW = (1000, 1000)
# A category area counts as drawn when its colour covers at least this many pixels of the screenshot.
MIN_CATEGORY_PIXELS = 400
MIN_PLOT_PIXELS = 20_000


def find_browser() -> str | None:
    """Path of an installed Chromium-family browser, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout_s)


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {color}, interlace {interlace}")
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    rows, previous = [], bytearray(stride)
    for r in range(height):
        kind = raw[r * (stride + 1)]
        line = bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = previous[i], previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(v for i, v in enumerate(line) if i % 4 != 3))
        previous = line
    return width, height, rows


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def count_colors(rows: list[bytes], colors: dict[str, str], tolerance: int = 6) -> dict[str, int]:
    """Pixels within ``tolerance`` (per channel) of each named colour."""
    targets = {name: _hex_rgb(color) for name, color in colors.items()}
    counts = dict.fromkeys(colors, 0)
    from collections import Counter

    histogram = Counter()
    for row in rows:
        histogram.update(zip(row[0::3], row[1::3], row[2::3]))
    for rgb, n in histogram.items():
        for name, target in targets.items():
            if all(abs(a - b) <= tolerance for a, b in zip(rgb, target)):
                counts[name] += n
                break
    return counts


def check_html(path: Path, browser: str, keep: Path | None = None) -> dict:
    """Run both checks on one report; returns what was found, raises AssertionError on a failure."""
    from memopt.report import CATEGORY_COLORS
    from memopt.report import _BUDGET_COLOR as budget_color

    url = path.resolve().as_uri()
    dom = _run(browser, ["--dump-dom", url])
    if dom.returncode != 0 or "<svg" not in dom.stdout:
        raise AssertionError(f"Chromium did not render {path}: exit {dom.returncode}, {dom.stderr.strip()[-300:]}")
    plots = dom.stdout.count('class="memplot"')
    areas = dom.stdout.count('class="cat"')
    budget_line = 'class="budget"' in dom.stdout
    if plots < 1 or areas < 1 or not budget_line:
        raise AssertionError(f"the parsed page lacks the plot: {plots} plots, {areas} category areas, budget line "
                             f"{'present' if budget_line else 'missing'}")
    workdir = Path(tempfile.mkdtemp(prefix="memopt-html-check-")) if keep is None else keep
    workdir.mkdir(parents=True, exist_ok=True)
    shot = workdir / "report.png"
    result = _run(browser, [f"--screenshot={shot}", url])
    if not shot.exists():
        raise AssertionError(f"Chromium wrote no screenshot: exit {result.returncode}, {result.stderr.strip()[-300:]}")
    _, _, rows = decode_png(shot.read_bytes())
    counts = count_colors(rows, {**CATEGORY_COLORS, "budget": budget_color})
    drawn = {name: n for name, n in counts.items() if name != "budget" and n >= MIN_CATEGORY_PIXELS}
    plot_pixels = sum(n for name, n in counts.items() if name != "budget")
    # The model states are one flat band (or, zoomed, a strip below the axis); the plan is what lies above.
    activation_pixels = sum(n for name, n in counts.items() if name not in ("budget", "model states"))
    if activation_pixels < MIN_PLOT_PIXELS or not set(drawn) - {"model states"}:
        raise AssertionError(f"the rendered plot is empty: {activation_pixels} pixels in activation category colours "
                             f"{counts}")
    if counts["budget"] < 50:
        raise AssertionError(f"the budget line is not visible: {counts['budget']} red pixels")
    if keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"plots": plots, "category_areas": areas, "plot_pixels": plot_pixels, "activation_pixels": activation_pixels,
            "categories_drawn": sorted(drawn), "budget_pixels": counts["budget"], "pixels": counts}


def _make_report(directory: Path) -> Path:
    from memopt.cli import main as memopt_main

    path = directory / "report.html"
    code = memopt_main(["plan", "gpt2", "--seq", "512", "--budget", "2.5GiB", "--gpu", "l4", "--html", str(path),
                        "--quiet"])
    if code != 0:
        raise SystemExit(f"memopt plan failed with exit code {code}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", help="HTML report to check; made from a small preset when omitted")
    parser.add_argument("--browser", help="Chromium binary (default: the first of %s found)" % ", ".join(BROWSERS))
    parser.add_argument("--keep", type=Path, help="keep the screenshot in this folder")
    args = parser.parse_args(argv)
    browser = args.browser or find_browser()
    if browser is None:
        print("no Chromium found; install one (apt-get install chromium) or pass --browser", file=sys.stderr)
        return EXIT_NO_BROWSER
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.report) if args.report else _make_report(Path(tmp))
        try:
            found = check_html(path, browser, args.keep)
        except AssertionError as exc:
            print(f"FAIL {path}: {exc}", file=sys.stderr)
            return 1
    print(f"OK {path}: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
