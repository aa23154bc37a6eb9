"""Every ``Example:`` block in memopt's docstrings runs, and says what it shows."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import memopt
import memopt.integrations
import memopt.planners


def _python_modules(package) -> set[str]:
    found = {package.__name__}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and (spec.origin or "").endswith(".py"):
            found.add(info.name)
    return found


# planners/ and integrations/ are installed as subpackages of memopt from their own folders: walk each.
MODULES = sorted(_python_modules(memopt) | _python_modules(memopt.planners) | _python_modules(memopt.integrations))
# Modules whose public functions carry examples (STYLE.md rule 7): each must have at least one that runs.
DOCUMENTED = {"memopt.api", "memopt.units", "memopt.meter", "memopt.planners.mip", "memopt.planners.simulator",
              "memopt.planners.baselines", "memopt.fake_profile", "memopt.roofline"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name in DOCUMENTED:
        assert result.attempted > 0, f"{name} lost its examples"


def test_the_walk_finds_the_packages():
    assert DOCUMENTED <= set(MODULES) and "memopt.integrations.hf" in MODULES
