"""The wheel installs planners/ and integrations/ only as memopt.planners / memopt.integrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("memopt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert not tops & {"planners", "integrations", "tests", "bench", "examples"}, tops
    for module in ("memopt/planners/mip.py", "memopt/integrations/__init__.py", "memopt/py.typed",
                   "memopt/runtime/engine.py"):
        assert module in names, module
