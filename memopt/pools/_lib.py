"""Loading the C allocator (``memopt/_moalloc.so``) with ctypes, and its status codes.

``pip install -e .`` (or a wheel build) compiles the library next to the package. A checkout whose
library is missing or older than its sources (``mo_abi_version`` differs) gets it compiled on first
use with the machine's C compiler into a per-user cache, so a fresh clone works after one command.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from memopt.errors import AllocatorError, ArenaExhausted, CorruptionError, DoubleFree, InvalidFree

__all__ = ["ABI_VERSION", "GRANULE_BYTES", "UNPLANNED", "InvalidRequest", "MoDeparture", "MoDevOps", "MoDevStats", "MoStats", "error_for",
           "library", "library_path"]

ABI_VERSION = 6
GRANULE_BYTES = 16
OK, E_INVALID_ARG, E_EXHAUSTED, E_DOUBLE_FREE, E_INVALID_FREE, E_CORRUPTION, E_BAD_HANDLE, E_NOMEM, E_CUDA = range(9)
F_CANARIES, F_POISON, F_ZERO_SMALL = 1, 2, 4
SMALL_MAX_SPAN_BYTES = 1024
UNPLANNED = 2**64 - 1  # MO_UNPLANNED: a plan position left to the heap

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_CSRC = _PACKAGE_DIR / "csrc"
_SOURCES = ("core.c", "arena.c", "api.c", "map.c", "device.c", "device_api.c", "replay.c", "cuda.c")
_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"


class InvalidRequest(AllocatorError, ValueError):
    """An allocation request that can never be valid: size 0 or negative, alignment not a power of two."""


class MoStats(ctypes.Structure):
    """Mirror of ``mo_stats_t`` in moalloc.h (same order)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "capacity_bytes", "allocated_bytes", "requested_bytes", "quarantined_bytes", "free_bytes",
        "largest_free_bytes", "peak_bytes", "high_water_bytes", "metadata_bytes", "peak_metadata_bytes",
        "live_blocks", "free_blocks", "quarantined_blocks", "alloc_count", "free_count", "quarantine_flushes",
        "cached_bytes", "cached_blocks",
    )]


class MoDevStats(ctypes.Structure):
    """Mirror of ``mo_dev_stats_t`` in moalloc.h (same order)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "capacity_bytes", "live_bytes", "peak_live_bytes", "live_blocks", "reserved_bytes", "peak_reserved_bytes",
        "pending_bytes", "pending_blocks", "peak_pending_bytes", "deferred_frees", "stream_reuses", "markers_recorded",
        "marker_waits", "marker_errors", "sync_frees", "overflow_allocs", "overflow_bytes", "failed_allocs",
        "plan_bytes", "plan_positions", "replay_steps", "planned_allocs", "fallback_allocs", "unplanned_allocs",
        "stream_conflicts", "recorded_allocs", "recording", "lowest_first", "size_departures", "busy_departures",
    )]


class MoDeparture(ctypes.Structure):
    """Mirror of ``mo_departure_t`` in moalloc.h."""

    _fields_ = [(name, ctypes.c_uint64) for name in ("step", "position", "nbytes", "planned_nbytes", "reason")]


RECORD_FN = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)
QUERY_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64)
RELEASE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)
OVERFLOW_ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)


class MoDevOps(ctypes.Structure):
    """Mirror of ``mo_dev_ops`` in moalloc.h: markers (events) and optional memory outside the region."""

    _fields_ = [("ctx", ctypes.c_void_p), ("record", RECORD_FN), ("query", QUERY_FN), ("wait", QUERY_FN),
                ("release", RELEASE_FN), ("overflow_alloc", OVERFLOW_ALLOC_FN), ("overflow_free", RELEASE_FN)]


_ERRORS: dict[int, type[AllocatorError]] = {
    E_INVALID_ARG: InvalidRequest,
    E_EXHAUSTED: ArenaExhausted,
    E_DOUBLE_FREE: DoubleFree,
    E_INVALID_FREE: InvalidFree,
    E_CORRUPTION: CorruptionError,
    E_BAD_HANDLE: AllocatorError,
    E_NOMEM: AllocatorError,
    E_CUDA: AllocatorError,
}


def error_for(code: int) -> type[AllocatorError]:
    """The exception class of a non-zero status code."""
    return _ERRORS.get(code, AllocatorError)


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_path: Path | None = None


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, "moalloc.h", "moalloc_internal.h", "device_internal.h"):
        digest.update((_CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler_argv = compiler.split()
    if shutil.which(compiler_argv[0]) is None:
        raise ImportError(
            f"memopt's allocator library is not built and no C compiler ({compiler_argv[0]!r}) was found; "
            "install one (e.g. apt-get install gcc) and run: pip install -e ."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        argv = [*compiler_argv, "-O2", "-flto", "-std=c11", "-D_GNU_SOURCE", "-fPIC", "-shared", "-fvisibility=hidden",
                "-o", str(out), *(str(_CSRC / s) for s in _SOURCES), "-lpthread"]
        if sys.platform.startswith("linux"):
            argv.append("-ldl")
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            # A toolchain without link-time optimisation (no lto-wrapper or plugin): the same library, less inlined.
            lto_error = result.stderr.strip()
            result = subprocess.run([a for a in argv if a != "-flto"], capture_output=True, text=True)
            if result.returncode != 0:
                raise ImportError(f"compiling memopt's allocator failed:\n{result.stderr.strip()}\n"
                                  f"(with -flto:\n{lto_error})")
        os.replace(out, target)  # atomic, so concurrent first uses never load a half-written file


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memopt"


def _abi_of(path: Path) -> int | None:
    """The library's ABI version; None when it does not load or lacks an entry point memopt declares (a build
    from an older list of sources)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if not all(hasattr(lib, name) for name in _signatures()):
        return None
    lib.mo_abi_version.restype = ctypes.c_uint32
    return int(lib.mo_abi_version())


def library_path() -> Path:
    """The shared library in use: the one built by ``pip install``, else one compiled into the cache."""
    packaged = _PACKAGE_DIR / f"_moalloc{_SUFFIX}"
    if packaged.exists() and _abi_of(packaged) == ABI_VERSION:
        return packaged
    if not (_CSRC / "core.c").exists():
        raise ImportError("memopt's allocator library is missing and its C sources are not installed; "
                          "reinstall memopt (pip install memopt)")
    cached = _cache_dir() / f"_moalloc-{_sources_digest()}{_SUFFIX}"
    if not cached.exists():
        _compile(cached)
    return cached


def _signatures() -> dict[str, tuple]:
    u64, u32, p64 = ctypes.c_uint64, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)
    vp, i = ctypes.c_void_p, ctypes.c_int
    return {
        "mo_abi_version": (u32, []),
        "mo_stats_size": (ctypes.c_size_t, []),
        "mo_last_error": (ctypes.c_char_p, []),
        "mo_arena_create": (ctypes.c_int, [u64, ctypes.c_void_p, u32, u32, u64, p64]),
        "mo_arena_destroy": (ctypes.c_int, [u64]),
        "mo_alloc": (ctypes.c_int, [u64, u64, u64, p64, p64, p64, p64]),
        "mo_free": (ctypes.c_int, [u64, u64, u64, u64, u64]),
        "mo_query": (ctypes.c_int, [u64, u64, u64, u64, u64, p64, p64]),
        "mo_check": (ctypes.c_int, [u64]),
        "mo_stats": (ctypes.c_int, [u64, ctypes.POINTER(MoStats)]),
        "mo_dev_stats_size": (ctypes.c_size_t, []),
        "mo_dev_create": (i, [u64, u64, vp, u64, u32, u32, u64, ctypes.POINTER(MoDevOps), p64]),
        "mo_dev_destroy": (i, [u64]),
        "mo_dev_alloc": (i, [u64, u64, u64, p64]),
        "mo_dev_free": (i, [u64, u64, u64]),
        "mo_dev_record_stream": (i, [u64, u64, u64]),
        "mo_dev_collect": (i, [u64, i]),
        "mo_dev_record_begin": (i, [u64]),
        "mo_dev_record_end": (i, [u64, p64]),
        "mo_dev_trace": (i, [u64, u64, p64, p64, p64]),
        "mo_dev_plan": (i, [u64, u64, p64, p64, u64]),
        "mo_dev_plan_at": (i, [u64, u64, p64, p64, u64, p64, p64]),
        "mo_dev_free_runs": (i, [u64, u64, p64, p64, p64]),
        "mo_dev_set_lowest_first": (i, [u64, i]),
        "mo_dev_departures": (i, [u64, u64, ctypes.POINTER(MoDeparture), p64]),
        "mo_dev_unplan": (i, [u64]),
        "mo_dev_step": (i, [u64]),
        "mo_dev_check": (i, [u64]),
        "mo_dev_stats": (i, [u64, ctypes.POINTER(MoDevStats)]),
        "mo_dev_arena_stats": (i, [u64, ctypes.POINTER(MoStats)]),
        "mo_dev_reset_peaks": (i, [u64]),
        "mo_cuda_init": (i, [i, u64, u32, u64, p64, p64]),
        "mo_cuda_shutdown": (i, [i]),
        "mo_cuda_set_process_wide": (i, [i, i]),
        "mo_cuda_pool": (u64, [i]),
        "mo_cuda_record_stream": (i, [vp, i, vp]),
        "mo_cuda_malloc": (vp, [ctypes.c_size_t, i, vp]),
        "mo_cuda_free": (None, [vp, ctypes.c_size_t, i, vp]),
        "mo_cuda_rejected_frees": (u64, [i, ctypes.c_char_p, ctypes.c_size_t]),
    }


def _declare(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in _signatures().items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def library() -> ctypes.CDLL:
    """The loaded allocator library (loaded once per process)."""
    global _library, _path
    with _lock:
        if _library is None:
            path = library_path()
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.mo_abi_version() != ABI_VERSION:
                raise ImportError(f"{path} has allocator ABI {lib.mo_abi_version()}, memopt needs {ABI_VERSION}; "
                                  "rebuild: pip install -e .")
            if lib.mo_stats_size() != ctypes.sizeof(MoStats) or lib.mo_dev_stats_size() != ctypes.sizeof(MoDevStats):
                raise ImportError(f"{path} has a different mo_stats_t or mo_dev_stats_t than memopt {ABI_VERSION=}; "
                                  "rebuild: pip install -e .")
            _library, _path = lib, path
        return _library


def last_error() -> str:
    """The C library's message for the last failed call on this thread."""
    return (library().mo_last_error() or b"").decode("utf-8", "replace")
