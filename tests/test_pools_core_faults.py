"""Allocator faults only C can stage (tests/csrc/core_faults.c): host memory running out at every point of
an allocation leaves the arena consistent and unchanged, and corrupted bookkeeping is reported by check();
the same for device pools (stream-ordered frees, recording, planning and replay)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memopt.pools import _lib

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "memopt" / "csrc"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fault injection wraps malloc with GNU ld")
def test_core_faults(tmp_path):
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    sources = [str(ROOT / "tests" / "csrc" / "core_faults.c")] + [str(CSRC / n) for n in _lib._SOURCES]
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built with the GNU toolchain's sanitizers")
def test_fuzz_core_random_programs(tmp_path):
    """tests/fuzz/fuzz_core.c without libFuzzer: seeded random programs on arenas and on device pools (streams,
    record and replay), with a shadow model of overlap and of what each stream may still use."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    sources = [str(ROOT / "tests" / "fuzz" / "fuzz_core.c")] + [str(CSRC / n) for n in _lib._SOURCES]
    base = [compiler, "-O1", "-g", "-std=c11", "-D_GNU_SOURCE", "-DMO_FUZZ_STANDALONE", f"-I{CSRC}", *sources, "-ldl",
            "-lpthread", "-o", str(tmp_path / "fuzz_core")]
    built = subprocess.run(base[:2] + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"] + base[2:],
                           capture_output=True, text=True)
    if built.returncode != 0:
        subprocess.run(base, check=True, capture_output=True, text=True)
    run = subprocess.run([str(tmp_path / "fuzz_core"), "4000"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    assert run.returncode == 0 and "4000 random programs passed" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
