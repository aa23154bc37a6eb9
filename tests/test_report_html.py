"""Plan reports: text and self-contained HTML, JSON round trip, and the plot rendered by headless Chromium."""

from __future__ import annotations

import html
import importlib.util
import re
from pathlib import Path

import pytest

from memopt.graph import Decision
from memopt.planners import random_graph, simulate, solve
from memopt.planners.simulator import CATEGORIES
from memopt.report import CATEGORY_COLORS, CATEGORY_NOTES, PlanReport, memory_svg, render_html, render_text

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
    # Two plots (the plan, no saving) in two views (from 0, zoomed on the activations).
    assert page.count('class="memplot"') == 4
    for unit in report.graph.units:
        assert unit.name in page


def _views(page: str) -> dict[str, list[str]]:
    views = {}
    for view, body in re.findall(r'<div class="view (\w+)">(.*?)</div>', page, flags=re.S):
        views[view] = re.findall(r"<svg.*?</svg>", body, flags=re.S)
    return views


def _plot_box(svg: str) -> tuple[float, float, float, float]:
    x, y, w, h = re.search(r'<rect x="(\d+)" y="(\d+)" width="(\d+)" height="(\d+)" fill="#fafafa"', svg).groups()
    return float(x), float(y), float(w), float(h)


def test_zoomed_view_starts_the_y_axis_at_the_model_states(report):
    page = render_html(report)
    views = _views(page)
    assert sorted(views) == ["full", "zoomed"] and all(len(svgs) == 2 for svgs in views.values())
    resident = report.graph.resident_bytes
    assert resident > 0
    for full, zoomed in zip(views["full"], views["zoomed"]):
        assert 'data-y-min-bytes="0"' in full and f'data-y-min-bytes="{resident}"' in zoomed
        y_max = int(re.search(r'data-y-max-bytes="(\d+)"', full).group(1))
        assert f'data-y-max-bytes="{y_max}"' in zoomed
        # The activations (above the model states) get the zoomed plot's whole height.
        full_polygons, zoomed_polygons = _polygons(full), _polygons(zoomed)
        states_top = min(py for _, py in full_polygons["model states"])
        full_activations = states_top - min(py for _, py in full_polygons[list(full_polygons)[-1]])
        _, top, _, height = _plot_box(zoomed)
        zoomed_activations = top + height - min(py for _, py in zoomed_polygons[list(zoomed_polygons)[-1]])
        _, _, _, full_height = _plot_box(full)
        stretch = y_max / (y_max - resident) * height / full_height
        assert stretch > 1.5  # the synthetic graph's states take a third of the axis or more
        assert zoomed_activations / full_activations == pytest.approx(stretch, rel=0.01)
        # The bytes below the axis are drawn and named, not dropped.
        assert 'class="below-axis"' in zoomed and "below the axis (model states)" in zoomed
    # A CSS-only switch: no script, and the states' share picks the view shown first.
    assert '<input type="checkbox" id="zoom"' in page and "#zoom:checked" in page
    assert (' id="zoom" checked' in page) == (resident > max(report.simulated.peak_bytes, report.plan.budget_bytes,
                                                                report.baselines["none"].predicted_peak_bytes)
                                              * 1.08 / 2)


def test_plots_of_steps_of_different_lengths_share_one_time_scale(report):
    """The longer step fills the width; the shorter ends early at its own length, marked."""
    sim, none = report.simulated, report.baselines["none"]
    assert sim.step_s > none.predicted_step_s  # the plan recomputes or swaps: its step is longer
    plan_svg, none_svg = _views(render_html(report))["full"]
    x0, _, width, _ = _plot_box(plan_svg)
    end = float(re.search(r'class="step-end" x1="([^"]+)"', none_svg).group(1))
    assert end - x0 == pytest.approx(width * none.predicted_step_s / sim.step_s, abs=0.06)
    assert 'class="step-end"' not in plan_svg


def test_every_legend_category_is_explained(report):
    page = render_html(report)
    for category in CATEGORIES:
        note = html.escape(CATEGORY_NOTES[category])
        assert f"<dt>" in page and f"{category}</dt><dd>{note}</dd>" in page  # the caption under the plots
        assert f"<title>{category}: {note}</title>" in page  # the legend entry's tooltip
    assert "fixed" in CATEGORY_NOTES and "outside every planned unit" in CATEGORY_NOTES["fixed"]


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


def test_budget_at_the_gpus_memory_gets_one_label(report):
    """Without --budget the budget is the GPU's memory: two lines on one height, labelled once, not overprinted."""
    sim = report.simulated
    both = memory_svg(sim.timeline, sim.step_s, budget_bytes=3 << 30, device_bytes=3 << 30, y_max_bytes=4 << 30)
    labels = re.findall(r'text-anchor="end">([^<]*GiB)</text>', both)
    assert labels == ["budget 3.00 GiB, GPU memory 3.00 GiB"]
    apart = memory_svg(sim.timeline, sim.step_s, budget_bytes=1 << 30, device_bytes=3 << 30, y_max_bytes=4 << 30)
    assert re.findall(r'text-anchor="end">([^<]*GiB)</text>', apart) == ["budget 1.00 GiB", "GPU memory 3.00 GiB"]


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
    assert found["plots"] == 4  # two plots in two views, one view shown
    assert found["plot_pixels"] >= checker.MIN_PLOT_PIXELS
    assert "model states" in found["categories_drawn"]
    assert found["budget_pixels"] > 0


def test_zoom_switch_works_in_headless_chromium(tmp_path, report):
    """The CSS-only checkbox really switches views: zoomed, the states shrink to a strip and the plan grows."""
    checker = _checker()
    browser = checker.find_browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium); see scripts/check_html_report.py")
    page = render_html(report)
    assert ' id="zoom" checked' in page  # the synthetic graph's states take most of the axis: zoomed first
    found = {}
    for view, text in (("zoomed", page), ("full", page.replace(' id="zoom" checked', ' id="zoom"'))):
        path = tmp_path / f"{view}.html"
        path.write_text(text)
        found[view] = checker.check_html(path, browser)
    assert found["zoomed"]["pixels"]["model states"] < found["full"]["pixels"]["model states"] / 3
    assert found["zoomed"]["activation_pixels"] > 1.5 * found["full"]["activation_pixels"]


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
