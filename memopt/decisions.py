"""``Decision``: what happens to one unit's saved activations, in one explicit ``Mode``.

A decision is built, loaded from JSON and read in one way only. ``__post_init__`` rejects every state the
runtime and the simulator could read differently (fractions that name no tensors or rows, a row split
that does not add up, a selective recompute with rows), naming the field. ``Decision.effective`` is the
one decoder: the runtime (``memopt.api.policy_for``), the simulator (``planners.simulator.unit_amounts``)
and the reports read a decision through it, so a row split that keeps every row runs, simulates and prints
as a keep.

Torch-free, like the rest of ``memopt.graph``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Decision", "Mode"]

_TOLERANCE = 1e-6


class Mode(str, Enum):
    """How a unit's saved activations are handled (``Decision.mode``)."""

    #: Every saved tensor stays on the device.
    KEEP = "keep"
    #: The saved tensors named by ``swap_tensors`` (pack-order indices) go to host memory, the rest stay.
    SWAP = "swap"
    #: Nothing is saved; the unit's forward runs again in backward from its held inputs.
    RECOMPUTE = "recompute"
    #: The outputs of the unit's expensive ops (matmuls, attention, convolutions) are kept, the rest rerun.
    SELECTIVE = "selective"
    #: Token rows ``[0, keep_rows)`` stay, the next ``swap_rows`` go to host memory, the rest are recomputed.
    TOKEN_WISE = "token-wise"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    """What happens to one unit's saved activations.

    Build it with the mode and the fields that mode uses; ``keep``, ``swap`` and ``recompute`` are the
    fractions of the unit's saved bytes (of its token rows, for ``TOKEN_WISE``) each part takes, summing to 1.
    With ``mode`` left out it is told from the fields: ``swap_tensors`` means ``SWAP``, ``rows`` means
    ``TOKEN_WISE``, ``recompute=1`` means ``RECOMPUTE``, ``keep=1`` (the default) means ``KEEP``. Plans made
    by the planner hold realised decisions (``memopt.planners.realize``).

    Args:
        unit (str): the unit's name.
        keep (float, default 1.0): fraction kept on the device.
        swap (float, default 0.0): fraction copied to host memory.
        recompute (float, default 0.0): fraction recomputed in backward.
        mode (Mode | str | None, default None): the mode; None tells it from the other fields.
        keep_rows (int, default 0): ``TOKEN_WISE``: rows kept.
        swap_rows (int, default 0): ``TOKEN_WISE``: rows swapped, after the kept ones.
        rows (int, default 0): ``TOKEN_WISE``: the unit's token rows in all.
        token_dims (list[int | None], default []): ``TOKEN_WISE``: per saved tensor, its token dimension.
        swap_tensors (list[int], default []): ``SWAP``: pack-order indices of the saved tensors swapped.

    Raises:
        ValueError: a combination of fields the runtime cannot carry out exactly as the simulator counts it;
            the message names the field.

    Example:
        >>> Decision("layers.0", mode="token-wise", keep=0.5, swap=0.25, recompute=0.25,
        ...          keep_rows=64, swap_rows=32, rows=128, token_dims=[0]).effective
        <Mode.TOKEN_WISE: 'token-wise'>
        >>> Decision("layers.0", keep=0.5, swap=0.5)
        Traceback (most recent call last):
        ...
        ValueError: decision for 'layers.0': keep=0.5, swap=0.5, recompute=0.0 say how much but not which tensors or rows; give swap_tensors (mode 'swap') or rows (mode 'token-wise'), or realise fractions with memopt.planners.realize
    """

    unit: str
    keep: float = 1.0
    swap: float = 0.0
    recompute: float = 0.0
    mode: Mode | None = None
    keep_rows: int = 0
    swap_rows: int = 0
    rows: int = 0
    token_dims: list[int | None] = field(default_factory=list)
    swap_tensors: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("keep", "swap", "recompute"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_TOLERANCE <= value <= 1 + _TOLERANCE:
                self._fail(f"{name} must be a fraction in [0, 1], got {value!r}")
        for name in ("keep_rows", "swap_rows", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._fail(f"{name} must be an int >= 0, got {value!r}")
        object.__setattr__(self, "token_dims", list(self.token_dims))
        object.__setattr__(self, "swap_tensors", list(self.swap_tensors))
        if abs(self.keep + self.swap + self.recompute - 1.0) > _TOLERANCE:
            self._fail(f"keep, swap and recompute must sum to 1, got {self.keep!r} + {self.swap!r} + {self.recompute!r}")
        object.__setattr__(self, "mode", self._mode())
        _CHECKS[self.mode](self)

    def _fail(self, message: str):
        raise ValueError(f"decision for {self.unit!r}: {message}")

    def _mode(self) -> Mode:
        if self.mode is not None:
            try:
                return Mode(self.mode)
            except ValueError:
                self._fail(f"mode must be one of {', '.join(repr(m.value) for m in Mode)}, got {self.mode!r}")
        if self.swap_tensors:
            return Mode.SWAP
        if self.rows:
            return Mode.TOKEN_WISE
        if self.recompute >= 1 - _TOLERANCE:
            return Mode.RECOMPUTE
        if self.keep >= 1 - _TOLERANCE:
            return Mode.KEEP
        self._fail(f"keep={self.keep!r}, swap={self.swap!r}, recompute={self.recompute!r} say how much but not which "
                   "tensors or rows; give swap_tensors (mode 'swap') or rows (mode 'token-wise'), or realise fractions "
                   "with memopt.planners.realize")

    def _only(self, *allowed: str) -> None:
        """The fields of other modes are at their defaults."""
        for name in ("keep_rows", "swap_rows", "rows", "token_dims", "swap_tensors"):
            if name not in allowed and getattr(self, name):
                self._fail(f"{name}={getattr(self, name)!r} has no meaning for mode {self.mode.value!r}")

    def _fractions(self, keep: float, swap: float, recompute: float) -> None:
        got = (self.keep, self.swap, self.recompute)
        if any(abs(a - b) > _TOLERANCE for a, b in zip(got, (keep, swap, recompute))):
            self._fail(f"mode {self.mode.value!r} means keep, swap, recompute = {keep!r}, {swap!r}, {recompute!r}, "
                       f"got {got[0]!r}, {got[1]!r}, {got[2]!r}")

    def _check_keep(self) -> None:
        self._only()
        self._fractions(1.0, 0.0, 0.0)

    def _check_whole_recompute(self) -> None:
        self._only()
        self._fractions(0.0, 0.0, 1.0)

    def _check_swap(self) -> None:
        self._only("swap_tensors")
        indices = self.swap_tensors
        if not indices:
            self._fail("mode 'swap' needs swap_tensors, the pack-order indices of the tensors to swap")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices) or len(set(indices)) != len(indices):
            self._fail(f"swap_tensors must be distinct ints >= 0, got {indices!r}")
        if self.recompute > _TOLERANCE or self.swap <= _TOLERANCE:
            self._fail(f"mode 'swap' has recompute=0 and swap > 0 (the swapped tensors' share of the saved bytes), "
                       f"got swap={self.swap!r}, recompute={self.recompute!r}")

    def _check_rows(self) -> None:
        self._only("keep_rows", "swap_rows", "rows", "token_dims")
        if self.rows <= 0:
            self._fail("mode 'token-wise' needs rows, the unit's token rows in all")
        if self.keep_rows + self.swap_rows > self.rows:
            self._fail(f"keep_rows + swap_rows = {self.keep_rows + self.swap_rows} is more than rows={self.rows}")
        if not self.token_dims or any(d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0)
                                      for d in self.token_dims):
            self._fail(f"mode 'token-wise' needs token_dims, one token dimension (or None) per saved tensor, got "
                       f"{self.token_dims!r}")
        rest = self.rows - self.keep_rows - self.swap_rows
        self._fractions(self.keep_rows / self.rows, self.swap_rows / self.rows, rest / self.rows)

    @property
    def effective(self) -> Mode:
        """What runs, simulates and prints: the mode, except that a row split keeping every row is ``KEEP`` and
        one keeping and swapping none is ``RECOMPUTE``."""
        if self.mode is Mode.TOKEN_WISE:
            if self.keep_rows >= self.rows:
                return Mode.KEEP
            if self.keep_rows == 0 and self.swap_rows == 0:
                return Mode.RECOMPUTE
        return self.mode

    @property
    def token_wise(self) -> bool:
        """The unit's rows are split between keep, swap and recompute."""
        return self.effective is Mode.TOKEN_WISE

    @property
    def selective(self) -> bool:
        return self.mode is Mode.SELECTIVE

    @property
    def label(self) -> str:
        """One word for tables: keep, swap, recompute, selective, token-wise, or mixed (some tensors swapped).
        A row split that swaps every row reads as swap."""
        mode = self.effective
        if mode is Mode.SWAP and self.keep > _TOLERANCE:
            return "mixed"
        if mode is Mode.TOKEN_WISE and self.swap_rows == self.rows:
            return Mode.SWAP.value
        return mode.value

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mode"] = self.mode.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        """A decision from JSON: this version's, or a version 2 plan's (``token_wise`` and ``selective`` flags
        instead of ``mode``), validated like any other.

        Raises:
            ValueError: unknown keys, or fields that make no realisable decision (named).
        """
        data = dict(data)
        token_wise, selective = data.pop("token_wise", None), data.pop("selective", None)
        if "mode" not in data and (token_wise is not None or selective is not None):
            data["mode"] = (Mode.SELECTIVE if selective else Mode.TOKEN_WISE if token_wise
                            else None)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"decision for {data.get('unit')!r} has unknown fields {unknown}; it was written by another "
                             "memopt version or edited by hand")
        return cls(**data)


_CHECKS = {
    Mode.KEEP: Decision._check_keep,
    Mode.SWAP: Decision._check_swap,
    Mode.RECOMPUTE: Decision._check_whole_recompute,
    Mode.SELECTIVE: Decision._check_whole_recompute,
    Mode.TOKEN_WISE: Decision._check_rows,
}
