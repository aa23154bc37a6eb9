"""Plan reports: text and self-contained HTML, JSON round trip, and the plot rendered by headless Chromium."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from memopt.graph import Decision
from memopt.planners import random_graph, simulate, solve
from memopt.planners.simulator import CATEGORIES
from memopt.report import CATEGORY_COLORS, PlanReport, memory_svg, render_html, render_text

ROOT = Path(__file__).resolve().parents[1]


def _report(seed: int = 0, squeeze: float = 0.5) -> PlanReport:
    graph = random_graph(8, seed=seed)
    keep = simulate(graph, [Decision(u.name) for u in graph.units])
    budget = int(keep.peak_bytes - squeeze * (keep.peak_bytes - graph.model_state_bytes) / 2)
    plan = solve(graph, budget, budget_spec=budget)
    return PlanReport(graph, plan, {"model": "synthetic", "budget": str(budget)})


@pytest.fixture(scope="module")
def report() -> PlanReport:
    return _report()


def test_report_rechecks_the_plan(report):
    assert report.verified
    assert report.simulated.peak_bytes <= report.plan.budget_bytes
    text = render_text(report)
    assert "simulator check" in text and ": ok" in text


def test_json_round_trip_re_renders_identically(tmp_path, report):
    path = report.save(tmp_path / "plan.json")
    again = PlanReport.load(path)
    assert again.plan.to_dict() == report.plan.to_dict()
    assert [u.name for u in again.graph.units] == [u.name for u in report.graph.units]
    assert render_text(again) == render_text(report)
    assert render_html(again) == render_html(report)


def test_html_is_self_contained(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    # Nothing fetched: no external stylesheet, image, font or script.
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "@import" not in page and "url(" not in page
    assert page.count('class="memplot"') == 2
    for unit in report.graph.units:
        assert unit.name in page


def _polygons(svg: str) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for category, points in re.findall(r'data-category="([^"]+)" points="([^"]+)"', svg):
        out[category] = [tuple(map(float, p.split(","))) for p in points.split()]
    return out


def test_plot_stacks_categories_and_draws_the_budget(report):
    sim = report.simulated
    budget = report.plan.budget_bytes
    y_max = 2.0 * sim.peak_bytes
    height, top, bottom = 340, 28, 40
    svg = memory_svg(sim.timeline, sim.step_s, budget_bytes=budget, y_max_bytes=y_max, height=height)
    polygons = _polygons(svg)
    present = [c for c in CATEGORIES if any(cats[c] for _, _, cats in sim.timeline)]
    assert list(polygons) == present
    for category in present:
        assert f'fill="{CATEGORY_COLORS[category]}"' in svg
    # The top edge of the last stacked area is the total: its highest point is the simulated peak.
    plot_h = height - top - bottom
    last = polygons[present[-1]]
    highest = min(py for _, py in last[: len(last) // 2])
    assert highest == pytest.approx(top + plot_h * (1 - sim.peak_bytes / y_max), abs=0.06)
    match = re.search(r'class="budget" x1="[^"]+" y1="([^"]+)"', svg)
    assert match is not None
    assert float(match.group(1)) == pytest.approx(top + plot_h * (1 - budget / y_max), abs=0.06)
    assert f'data-peak-bytes="{sim.peak_bytes}"' in svg


def test_a_report_refuses_a_plan_for_another_graph(report):
    other = random_graph(5, seed=9)
    with pytest.raises(ValueError, match="graph the plan was made for"):
        PlanReport(other, report.plan)


def _checker():
    spec = importlib.util.spec_from_file_location("check_html_report", ROOT / "scripts" / "check_html_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_html_report_renders_in_headless_chromium(tmp_path, report):
    checker = _checker()
    browser = checker.find_browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium); see scripts/check_html_report.py")
    path = tmp_path / "report.html"
    path.write_text(render_html(report))
    found = checker.check_html(path, browser)
    assert found["plots"] == 2
    assert found["plot_pixels"] >= checker.MIN_PLOT_PIXELS
    assert "model states" in found["categories_drawn"]
    assert found["budget_pixels"] > 0


def test_chromium_check_catches_an_empty_plot(tmp_path, report):
    checker = _checker()
    browser = checker.find_browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium); see scripts/check_html_report.py")
    page = render_html(report)
    # Flatten every stacked area to a point: the page parses with all its elements, but nothing shows.
    flat = re.sub(r'(<polygon class="cat" data-category="[^"]+") points="[^"]+"', r'\1 points="70,300 70,300"',
                  page)
    assert flat.count('class="cat"') == page.count('class="cat"') > 0
    path = tmp_path / "flat.html"
    path.write_text(flat)
    with pytest.raises(AssertionError, match="rendered plot is empty"):
        checker.check_html(path, browser)
    # And a page without the areas at all fails the parsed-page check.
    stripped = re.sub(r'<polygon class="cat".*?</polygon>', "", page, flags=re.S)
    path.write_text(stripped)
    with pytest.raises(AssertionError, match="lacks the plot"):
        checker.check_html(path, browser)
