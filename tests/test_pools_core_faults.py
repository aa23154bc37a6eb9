"""Allocator faults only C can stage (tests/csrc/core_faults.c): host memory running out at every point of
an allocation leaves the arena consistent and unchanged, and corrupted bookkeeping is reported by check()."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "memopt" / "csrc"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fault injection wraps malloc with GNU ld")
def test_core_faults(tmp_path):
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    sources = [str(ROOT / "tests" / "csrc" / "core_faults.c")] + [str(CSRC / f"{n}.c") for n in ("core", "arena", "api", "cuda")]
    base = [compiler, "-O1", "-g", "-std=c11", "-D_GNU_SOURCE", f"-I{CSRC}", *sources, "-ldl", "-lpthread",
            "-Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc", "-o", str(tmp_path / "core_faults")]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    # With the sanitizers where the toolchain has them, so a memory error in a fault path fails too.
    built = subprocess.run(base[:2] + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"] + base[2:],
                           capture_output=True, text=True)
    if built.returncode != 0:
        subprocess.run(base, check=True, capture_output=True, text=True)
    run = subprocess.run([str(tmp_path / "core_faults")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]
