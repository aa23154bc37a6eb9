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

__all__ = ["ABI_VERSION", "GRANULE_BYTES", "InvalidRequest", "MoStats", "error_for", "library", "library_path"]

ABI_VERSION = 4
GRANULE_BYTES = 16
OK, E_INVALID_ARG, E_EXHAUSTED, E_DOUBLE_FREE, E_INVALID_FREE, E_CORRUPTION, E_BAD_HANDLE, E_NOMEM, E_CUDA = range(9)
F_CANARIES, F_POISON, F_ZERO_SMALL = 1, 2, 4
SMALL_MAX_SPAN_BYTES = 1024

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_CSRC = _PACKAGE_DIR / "csrc"
_SOURCES = ("core.c", "arena.c", "api.c", "cuda.c")
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
    for name in (*_SOURCES, "moalloc.h", "moalloc_internal.h"):
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
            raise ImportError(f"compiling memopt's allocator failed:\n{result.stderr.strip()}")
        os.replace(out, target)  # atomic, so concurrent first uses never load a half-written file


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memopt"


def _abi_of(path: Path) -> int | None:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
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


def _declare(lib: ctypes.CDLL) -> None:
    u64, u32, p64 = ctypes.c_uint64, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)
    signatures = {
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
        "mo_cuda_init": (ctypes.c_int, [ctypes.c_int, u64, u32, u64, p64, p64]),
        "mo_cuda_shutdown": (ctypes.c_int, [ctypes.c_int]),
        "mo_cuda_rejected_frees": (u64, [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (restype, argtypes) in signatures.items():
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
            if lib.mo_stats_size() != ctypes.sizeof(MoStats):
                raise ImportError(f"{path} has a different mo_stats_t than memopt {ABI_VERSION=}; rebuild: pip install -e .")
            _library, _path = lib, path
        return _library


def last_error() -> str:
    """The C library's message for the last failed call on this thread."""
    return (library().mo_last_error() or b"").decode("utf-8", "replace")
