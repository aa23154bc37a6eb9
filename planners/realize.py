"""Turn a planner's fractions into what the runtime can do exactly: whole saved tensors or row cuts.

The MIP decides continuous fractions; the runtime swaps whole tensors (or rows at multiples of
``row_multiple`` tokens, where a matmul on a slice keeps its BLAS path). Planner and runtime both go
through ``realize`` so the simulated plan is the one that runs.
"""

from __future__ import annotations

import math

from memopt.graph import Decision, Mode, Unit

__all__ = ["realize", "row_step"]


def row_step(unit: Unit, row_multiple: int) -> int:
    """The granularity of a token-wise cut for this unit: ``row_multiple`` rows, or 0 when too few."""
    if not unit.token_separable or unit.tokens < 2 * row_multiple or unit.tokens % row_multiple:
        return 0
    return row_multiple


def realize(unit: Unit, keep: float, swap: float, recompute: float, row_multiple: int = 64) -> Decision:
    """Round fractions to what runs; the result's fractions are the realised ones.

    Rounding never adds device bytes: kept rows round down and recomputed rows up (token-wise), and
    swapped tensors are whole ones chosen until their bytes reach the asked fraction. A row split that keeps
    every row is a ``KEEP`` decision, one that recomputes every row ``RECOMPUTE``: one decision per state.

    Args:
        unit (Unit): the unit decided for.
        keep (float): fraction kept on the device.
        swap (float): fraction swapped to host memory.
        recompute (float): fraction recomputed in backward.
        row_multiple (int, default 64): token-wise cuts fall on multiples of this many rows.
    """
    total = keep + swap + recompute
    if total <= 0:
        raise ValueError(f"decision for {unit.name!r} has no positive fraction: {keep!r}, {swap!r}, {recompute!r}")
    keep, swap, recompute = keep / total, swap / total, recompute / total
    step = row_step(unit, row_multiple)
    if step:
        rows = unit.tokens
        keep_rows = int(math.floor(keep * rows / step + 1e-9)) * step
        recompute_rows = min(rows - keep_rows, int(math.ceil(recompute * rows / step - 1e-9)) * step)
        swap_rows = rows - keep_rows - recompute_rows
        if keep_rows == rows:
            return Decision(unit.name)
        if recompute_rows == rows:
            return Decision(unit.name, 0.0, 0.0, 1.0, Mode.RECOMPUTE)
        return Decision(unit.name, keep_rows / rows, swap_rows / rows, recompute_rows / rows, Mode.TOKEN_WISE,
                        keep_rows=keep_rows, swap_rows=swap_rows, rows=rows, token_dims=list(unit.token_dims))
    if recompute >= 0.5 or (recompute > 1e-9 and not unit.token_separable and keep + swap < 1e-9):
        return Decision(unit.name, 0.0, 0.0, 1.0)
    if recompute > 1e-9:
        # A fractional recompute on a unit that cannot be cut by rows becomes swap: same device bytes.
        swap += recompute
    saved = unit.saved_bytes
    if saved == 0 or swap <= 1e-9:
        return Decision(unit.name, 1.0, 0.0, 0.0)
    target = swap * saved
    chosen, swapped = [], 0
    for index, nbytes in enumerate(unit.tensor_bytes):
        if swapped >= target - 1e-6 * saved:
            break
        if nbytes:
            chosen.append(index)
            swapped += nbytes
    fraction = swapped / saved
    return Decision(unit.name, 1.0 - fraction, fraction, 0.0, swap_tensors=chosen)
