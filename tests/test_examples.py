"""Every example script runs to completion on its small default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Arguments that keep each example small enough for the default test run.
ARGS = {
    "quickstart.py": ["--steps", "3"],
    "hf_causal_lm.py": ["--layers", "4", "--seq", "128"],
    "qst_finetune.py": [],
    "arena_basics.py": [],
    "hf_trainer.py": ["--steps", "4"],
    "deepspeed_train.py": ["--ranks", "2", "--layers", "2", "--seq", "128", "--steps", "2"],
    "fsdp_train.py": ["--ranks", "2", "--layers", "2", "--seq", "128", "--steps", "2", "--budget", "0.7"],
}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *ARGS.get(script, [])], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
