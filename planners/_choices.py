"""The decisions ``realize`` can produce for one unit, as a small discrete set the planners search.

A unit with a row step (token-separable, enough rows) is cut at row steps: ``keep_steps`` steps kept,
``recompute_steps`` recomputed, the rest swapped. Any other unit is either recomputed whole or keeps
its saved tensors except a prefix (in pack order) that is swapped, which is what ``realize`` makes of
a swap fraction. Enumerating exactly these lets the MIP's optimum be a plan that runs as simulated.
"""

from __future__ import annotations

from dataclasses import dataclass

from memopt.graph import Decision, Mode, Unit

from .realize import realize, row_step

__all__ = ["UnitChoices"]


@dataclass(frozen=True)
class UnitChoices:
    """Realisable decisions of one unit under the planner's switches.

    Args:
        unit (Unit): the unit.
        row_multiple (int): token-wise cuts fall on multiples of this many rows.
        allow_swap (bool): swapping to host memory is allowed.
        allow_recompute (bool): recomputation is allowed.
    """

    unit: Unit
    row_multiple: int
    allow_swap: bool
    allow_recompute: bool

    @property
    def step(self) -> int:
        """Rows per token-wise step, 0 when the unit is not cut by rows."""
        return row_step(self.unit, self.row_multiple)

    @property
    def n_steps(self) -> int:
        return self.unit.tokens // self.step if self.step else 0

    @property
    def prefix_bytes(self) -> list[int]:
        """Bytes swapped by each swappable prefix of saved tensors, from 0 (keep all) upwards."""
        out = [0]
        if self.allow_swap:
            total = 0
            for nbytes in self.unit.tensor_bytes:
                if nbytes:
                    total += nbytes
                    out.append(total)
        return out

    def rows(self, keep_steps: int, recompute_steps: int) -> Decision:
        """The token-wise decision keeping and recomputing these many steps and swapping the rest."""
        n = self.n_steps
        return realize(self.unit, keep_steps / n, (n - keep_steps - recompute_steps) / n, recompute_steps / n,
                       self.row_multiple)

    def prefix(self, index: int) -> Decision:
        """The decision swapping the first ``index`` non-empty saved tensors and keeping the rest."""
        swapped = self.prefix_bytes[index]
        saved = self.unit.saved_bytes
        if swapped == 0:
            return Decision(self.unit.name)
        return realize(self.unit, 1.0 - swapped / saved, swapped / saved, 0.0, self.row_multiple)

    def recompute(self) -> Decision:
        return realize(self.unit, 0.0, 0.0, 1.0, self.row_multiple)

    @property
    def allow_selective(self) -> bool:
        """Selective recompute (keep the expensive ops' outputs, rerun the cheap ops) is on offer: the unit
        is not cut by rows, recompute is allowed, and its expensive outputs were measured."""
        return self.allow_recompute and not self.step and self.unit.selective_bytes > 0

    def selective(self) -> Decision:
        return Decision(self.unit.name, 0.0, 0.0, 1.0, Mode.SELECTIVE)

    def steps_of(self, decision: Decision) -> tuple[int, int]:
        """``(keep_steps, recompute_steps)`` of a decision of this row-cut unit (keep and recompute included)."""
        if decision.effective is Mode.KEEP:
            return self.n_steps, 0
        if decision.effective is Mode.RECOMPUTE:
            return 0, self.n_steps
        step = self.step
        recompute_rows = self.unit.tokens - decision.keep_rows - decision.swap_rows
        return decision.keep_rows // step, recompute_rows // step

    def prefix_of(self, decision: Decision) -> int | None:
        """Index of the swap prefix a non-recompute decision is, or None when it is no prefix."""
        swapped = sum(self.unit.tensor_bytes[i] for i in set(decision.swap_tensors))
        nonzero = [i for i, b in enumerate(self.unit.tensor_bytes) if b]
        chosen = sorted(i for i in set(decision.swap_tensors) if self.unit.tensor_bytes[i])
        if chosen != nonzero[:len(chosen)]:
            return None
        prefixes = self.prefix_bytes
        return prefixes.index(swapped) if swapped in prefixes else None

    def all(self) -> list[Decision]:
        """Every realisable decision (for brute force on tiny graphs and for local search)."""
        if self.step:
            n = self.n_steps
            max_recompute = n if self.allow_recompute else 0
            out = []
            for keep in range(n + 1):
                for rec in range(min(max_recompute, n - keep) + 1):
                    if self.allow_swap or keep + rec == n:
                        out.append(self.rows(keep, rec))
            return out
        out = [self.prefix(j) for j in range(len(self.prefix_bytes))]
        if self.allow_recompute:
            out.append(self.recompute())
        return out

    def neighbours(self, decision: Decision) -> list[Decision]:
        """Decisions one step away: one row step or one tensor moved, or switched to or from recompute."""
        out: list[Decision] = []
        if self.step:
            n = self.n_steps
            keep, rec = self.steps_of(decision)
            moves = [(-1, 0), (0, 1), (-1, 1), (1, 0), (0, -1), (1, -1), (0, n)]
            for dk, dr in moves:
                k2, r2 = keep + dk, min(rec + dr, n - keep - dk)
                if (k2, r2) == (keep, rec) or k2 < 0 or r2 < 0 or k2 + r2 > n:
                    continue
                if (r2 and not self.allow_recompute) or (k2 + r2 < n and not self.allow_swap):
                    continue
                out.append(self.rows(k2, r2))
            return out
        n_prefixes = len(self.prefix_bytes)
        if decision.recompute >= 1.0 - 1e-9:
            return [self.prefix(j) for j in range(n_prefixes)]
        index = self.prefix_of(decision)
        if index is None:
            index = 0
        out = [self.prefix(j) for j in (index - 1, index + 1) if 0 <= j < n_prefixes]
        if self.allow_recompute:
            out.append(self.recompute())
        return out
