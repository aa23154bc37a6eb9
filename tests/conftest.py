"""Shared test setup: deterministic single-threaded CPU math, CUDA tests skip without a GPU."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # Bitwise comparisons need one thread: chunking across threads can change the last bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    """Deterministic algorithms for bitwise comparisons; strict (errors, not warnings) when
    ``CUBLAS_WORKSPACE_CONFIG`` is set as torch requires for it (bench/gpu_session.py sets ``:4096:8``)."""
    strict = os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    yield
    torch.use_deterministic_algorithms(False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
