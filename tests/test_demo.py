"""``memopt demo`` runs the whole pipeline, trains every plan bit-exactly, and chooses the same plans each run."""

from __future__ import annotations

import contextlib
import io
import re

from memopt import demo

ARGS = ["--steps", "2"]  # the default model and budgets, one timed round


def _run() -> tuple[int, list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(ARGS)
    # Each plan row: run name and its mix of decisions (the columns before the figures).
    rows = [re.split(r"\s{2,}", line)[:2] for line in out.getvalue().splitlines() if re.match(r"memopt \d+%", line)]
    return code, rows


def test_two_demo_runs_choose_the_same_plans_and_train_exactly():
    first_code, first = _run()
    second_code, second = _run()
    assert first_code == second_code == 0, "every plan trains bit for bit as without memopt"
    assert len(first) == 3 and first == second, (first, second)
    assert not any("no plan fits" in mix for _, mix in first)


def test_the_demo_says_when_its_step_times_are_noise():
    def run(name, times):
        fake = demo._Run.__new__(demo._Run)
        fake.name, fake.times = name, times
        return fake

    quiet = [run("none (no memopt)", [1.00, 1.02, 1.01]), run("memopt 50%", [1.10, 1.12, 1.11])]
    assert demo.noise_note(quiet) == ""
    faster = [run("none (no memopt)", [1.00, 1.02, 1.01]), run("memopt 75%", [0.90, 0.91, 0.92])]
    assert demo.noise_note(faster).startswith("memopt 75% measured faster than no saving")
    spread = [run("none (no memopt)", [1.0, 1.5, 1.2]), run("memopt 50%", [1.3, 1.3, 1.3])]
    assert "varied by 42% between rounds" in demo.noise_note(spread)
