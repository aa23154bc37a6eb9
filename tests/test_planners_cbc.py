"""Which CBC binary the planner MIPs run (the one PuLP 3 bundles, then cbcbox, then PATH), through
``COIN_CMD`` and without a DeprecationWarning, and that another source solves the same program."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest

pulp = pytest.importorskip("pulp")

from memopt.errors import MemoptError  # noqa: E402
from memopt.planners import baseline_plan, random_graph, solve  # noqa: E402
from memopt.planners._cbc import cbc_path, cbc_solver  # noqa: E402

BUNDLED = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)
HAS_BUNDLED = bool(BUNDLED) and os.access(BUNDLED, os.X_OK)


def _executable(path) -> str:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def every_source(monkeypatch, tmp_path) -> dict:
    """A cbcbox and a ``cbc`` on PATH beside whatever PuLP bundles."""
    box = types.ModuleType("cbcbox")
    box.cbc_bin_path = lambda: str(tmp_path / "cbcbox-cbc")
    monkeypatch.setitem(sys.modules, "cbcbox", box)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return {"cbcbox": _executable(tmp_path / "cbcbox-cbc"), "path": _executable(tmp_path / "bin" / "cbc")}


def _without_bundled(monkeypatch) -> None:
    monkeypatch.setattr(pulp.PULP_CBC_CMD, "pulp_cbc_path", "/nonexistent/cbc", raising=False)


def _middle_budget(graph) -> int:
    low = baseline_plan(graph, "checkpoint-all").predicted_peak_bytes
    high = baseline_plan(graph, "none").predicted_peak_bytes
    return (low + high) // 2


@pytest.mark.skipif(not HAS_BUNDLED, reason="this PuLP bundles no runnable CBC")
def test_bundled_binary_comes_first_through_coin_cmd(every_source):
    """What the planner always ran, now through COIN_CMD: no warning, same status."""
    assert cbc_path() == BUNDLED
    graph = random_graph(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        solver = cbc_solver(time_limit_s=5.0, gap_rel=0.0)
        plan = solve(graph, _middle_budget(graph), mip_gap=0.0)
    assert type(solver) is pulp.COIN_CMD and solver.path == BUNDLED
    assert solver.timeLimit == 5.0 and solver.optionsDict["gapRel"] == 0.0 and not solver.msg
    assert plan.status == "optimal" and plan.predicted_peak_bytes <= _middle_budget(graph)


def test_cbcbox_comes_next(monkeypatch, every_source):
    _without_bundled(monkeypatch)
    assert cbc_path() == every_source["cbcbox"]


def test_cbc_on_path_comes_last(monkeypatch, every_source):
    _without_bundled(monkeypatch)
    sys.modules["cbcbox"].cbc_bin_path = lambda: "/nonexistent/cbcbox-cbc"  # a cbcbox without a build for here
    assert cbc_path() == every_source["path"]


def test_no_cbc_anywhere_says_what_to_install(monkeypatch, tmp_path):
    _without_bundled(monkeypatch)
    monkeypatch.setitem(sys.modules, "cbcbox", None)  # makes `import cbcbox` fail
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MemoptError, match=r"no CBC solver found .*'/nonexistent/cbc'.*pip install 'pulp\[cbc\]'"):
        cbc_path()


@pytest.mark.skipif(not HAS_BUNDLED, reason="no bundled CBC to compare with")
def test_cbcbox_solves_like_the_bundled_binary(monkeypatch):
    """Where PuLP bundles no CBC, ``pip install 'pulp[cbc]'`` serves: the same program, the same answer up to
    the development build's tolerance."""
    box = pytest.importorskip("cbcbox")
    graph = random_graph(10, 4)
    bundled = solve(graph, _middle_budget(graph), mip_gap=0.0)
    _without_bundled(monkeypatch)
    assert cbc_path() == box.cbc_bin_path()
    boxed = solve(graph, _middle_budget(graph), mip_gap=0.0)
    assert (boxed.status, bundled.status) == ("optimal", "optimal")
    assert boxed.predicted_step_s == pytest.approx(bundled.predicted_step_s, rel=1e-4)
