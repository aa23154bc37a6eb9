"""memopt: fit training in far less accelerator memory.

``handle = memopt.optimize(model, sample, budget="12GiB")`` profiles one step, plans which activations
to keep, swap to host memory or recompute, and applies the plan through torch hooks.

Importing memopt pulls in torch and nothing heavier: pulp, transformers, deepspeed and bitsandbytes are
imported where they are used, and CUDA is not initialised.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AllocatorError": "memopt.errors",
    "Arena": "memopt.pools",
    "ArenaExhausted": "memopt.errors",
    "BudgetError": "memopt.errors",
    "CorruptionError": "memopt.errors",
    "Decision": "memopt.graph",
    "DoubleFree": "memopt.errors",
    "Handle": "memopt.api",
    "Hardware": "memopt.hardware",
    "InvalidFree": "memopt.errors",
    "MemoptConfig": "memopt.config",
    "MemoptError": "memopt.errors",
    "Plan": "memopt.graph",
    "TrainingGraph": "memopt.graph",
    "Unit": "memopt.graph",
    "apply": "memopt.api",
    "optimize": "memopt.api",
    "plan": "memopt.api",
    "profile": "memopt.api",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'memopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
