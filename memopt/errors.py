"""Exceptions raised by memopt. Each message names the bad value and the fix."""

from __future__ import annotations

__all__ = [
    "AllocatorError",
    "ArenaExhausted",
    "BudgetError",
    "CorruptionError",
    "DoubleFree",
    "InvalidFree",
    "MemoptError",
]


class MemoptError(Exception):
    """Base class of every error memopt raises on purpose."""


class BudgetError(MemoptError, ValueError):
    """No plan fits the budget.

    Attributes:
        budget_bytes: the budget that was asked for, in bytes.
        min_feasible_bytes: the smallest budget a plan fits in, in bytes.
        dominated_by: what dominates that minimum (e.g. ``"model states"``).
    """

    def __init__(self, message: str, *, budget_bytes: int, min_feasible_bytes: int, dominated_by: str):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes
        self.dominated_by = dominated_by


class AllocatorError(MemoptError, RuntimeError):
    """A memopt allocator rejected a call; the arena is left exactly as it was."""


class DoubleFree(AllocatorError):
    """A block was freed twice."""


class InvalidFree(AllocatorError):
    """A free named an offset the arena never returned (unknown, interior or from a closed arena), or a handle
    whose offset, size, serial or check was altered."""


class CorruptionError(AllocatorError):
    """A guard canary, or the poison or zero fill of freed memory, was overwritten: memory outside a live block
    was written."""


class ArenaExhausted(AllocatorError):
    """No free block of the requested size (and alignment) is left in the arena."""
