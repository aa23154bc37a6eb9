"""Builds memopt's C allocator (memopt/csrc) as a plain shared library inside the package.

All package metadata lives in pyproject.toml; this file only adds the native library. The library
links no Python symbols and is loaded with ctypes, so its file name carries no ABI tag and one build
serves every Python version on the machine.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CompileError, LinkError
except ImportError:  # setuptools < 59
    from distutils.errors import CompileError, LinkError

CSRC = os.path.join("memopt", "csrc")
SOURCES = [os.path.join(CSRC, name) for name in ("core.c", "arena.c", "api.c", "map.c", "device.c", "device_api.c", "replay.c",
                                               "cuda.c")]


class BuildSharedLibrary(build_ext):
    """build_ext that names the output ``memopt/_moalloc.so`` (``.dylib`` on macOS) instead of a
    CPython extension module, and exports only the library's own symbols."""

    def get_ext_filename(self, fullname: str) -> str:
        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        return os.path.join(*fullname.split(".")) + suffix

    def get_export_symbols(self, ext):
        # build_ext would add PyInit__moalloc, which a ctypes library does not have.
        return ext.export_symbols or []

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CompileError, LinkError) as exc:
            # A toolchain without link-time optimisation (no lto-wrapper or plugin): the same library, less inlined.
            print(f"memopt: building with -flto failed ({exc}); building without it", file=sys.stderr)
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-flto"]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != "-flto"]
            self.force = True  # objects compiled for LTO would not link without it
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "memopt._moalloc",
            sources=SOURCES,
            depends=[os.path.join(CSRC, "moalloc.h"), os.path.join(CSRC, "moalloc_internal.h")],
            # Link-time optimisation lets the hot paths inline across the core's files.
            extra_compile_args=["-O2", "-flto", "-std=c11", "-D_GNU_SOURCE", "-fvisibility=hidden"],
            extra_link_args=["-O2", "-flto"],
            libraries=["dl", "pthread"] if sys.platform.startswith("linux") else [],
        )
    ],
    cmdclass={"build_ext": BuildSharedLibrary},
)
