"""Every misuse of an arena, each in its own process so that a crash fails the test.

Each case sets up an arena named "victim" with one block that must survive, commits one misuse, and
reports: the exception (class and message), whether the process lived, whether the arena's counters
are exactly as before the misuse, and what ``check()`` says afterwards.

A forged handle is a ``Block`` from ``alloc`` with one field altered (``dataclasses.replace``): it is an
``InvalidFree`` whatever its block's state, and only a free through an unaltered copy of a freed block
is a ``DoubleFree``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import dataclasses, json, torch
from memopt.pools import Arena, Block
arena = Arena(1 << 20, name="victim", {options})
keep = arena.alloc(1000)
arena.tensor(keep, torch.uint8, (1000,)).fill_(7)
checked = arena
{setup}
before = checked.stats()
out = {{"exception": None}}
try:
{misuse}
except Exception as exc:
    out["exception"], out["message"] = type(exc).__name__, str(exc)
out["unchanged"] = checked.stats() == before
out["keep_intact"] = bool((arena.buffer[keep.offset:keep.offset + 1000] == 7).all())
try:
    checked.check()
    out["check"] = "ok"
except Exception as exc:
    out["check"] = type(exc).__name__
{after}
print(json.dumps(out))
"""

# name: (arena options, setup, misuse, exception, offset named in the message, check() afterwards, after)
CASES = {
    "double_free": ("", "b = arena.alloc(64); arena.free(b)", "arena.free(b)", "DoubleFree", "b.offset", "ok", ""),
    "double_free_after_reuse": (
        "hardened=False",
        "b = arena.alloc(64); arena.free(b); b2 = arena.alloc(64); assert b2.offset == b.offset",
        "arena.free(b)", "DoubleFree", "b.offset", "ok",
        "arena.free(b2); out['reused_block_freed'] = True",
    ),
    "double_free_without_handle": (
        "", "b = arena.alloc(64); arena.free(b)", "arena.free(Block(b.offset, 64))", "DoubleFree", "b.offset", "ok", "",
    ),
    "free_never_returned": ("", "", "arena.free(Block(65536, 8))", "InvalidFree", "65536", "ok", ""),
    "free_beyond_capacity": ("", "", "arena.free(Block(1 << 40, 8))", "InvalidFree", "1099511627776", "ok", ""),
    "free_negative_offset": ("", "", "arena.free(Block(-16, 8))", "InvalidFree", "-16", "ok", ""),
    "free_not_a_block": ("", "", "arena.free(keep.offset)", "InvalidFree", "", "ok", ""),
    "free_interior": ("", "b = arena.alloc(4096)", "arena.free(Block(b.offset + 256, 8))", "InvalidFree",
                      "b.offset + 256", "ok", ""),
    "free_interior_unaligned": ("", "b = arena.alloc(4096)", "arena.free(Block(b.offset + 3, 8))", "InvalidFree",
                                "b.offset + 3", "ok", ""),
    "free_foreign_block": ("", "other = Arena(4096, name='other'); b = other.alloc(64)", "arena.free(b)",
                           "InvalidFree", "b.offset", "ok", ""),
    "free_after_close": (
        "", "other = Arena(1 << 16, name='victim'); b = other.alloc(64); other.close()", "other.free(b)",
        "InvalidFree", "b.offset", "ok", "",
    ),
    "alloc_after_close": ("", "other = Arena(1 << 16, name='victim'); other.close()", "other.alloc(64)",
                          "AllocatorError", "", "ok", ""),
    "size_zero": ("", "", "arena.alloc(0)", "InvalidRequest", "", "ok", ""),
    "size_negative": ("", "", "arena.alloc(-4096)", "InvalidRequest", "", "ok", ""),
    "size_not_int": ("", "", "arena.alloc(12.5)", "InvalidRequest", "", "ok", ""),
    "size_beyond_capacity": ("", "", "arena.alloc((1 << 20) + 1)", "ArenaExhausted", "", "ok", ""),
    "size_beyond_64_bits": ("", "", "arena.alloc(1 << 70)", "InvalidRequest", "", "ok", ""),
    "alignment_not_power_of_two": ("", "", "arena.alloc(64, alignment=48)", "InvalidRequest", "", "ok", ""),
    "alignment_zero": ("", "", "arena.alloc(64, alignment=0)", "InvalidRequest", "", "ok", ""),
    "alignment_negative": ("", "", "arena.alloc(64, alignment=-256)", "InvalidRequest", "", "ok", ""),
    "exhausted": ("", "big = arena.alloc(1 << 19)", "arena.alloc(1 << 19)", "ArenaExhausted", "", "ok", ""),
    # Overflow by one byte: the block stays allocated and check() keeps reporting the corruption.
    "overflow_one_byte": (
        "", "b = arena.alloc(1000); i = b.offset + 1000; arena.buffer[i] = int(arena.buffer[i]) ^ 0xFF",
        "arena.free(b)", "CorruptionError", "b.offset", "CorruptionError", "",
    ),
    "write_after_free_check": (
        "poison=True", "b = arena.alloc(256); arena.free(b); arena.buffer[b.offset + 5] = int(arena.buffer[b.offset + 5]) ^ 0xFF",
        "arena.check()", "CorruptionError", "b.offset + 5", "CorruptionError", "",
    ),
    "write_after_free_reuse": (
        "poison=True, quarantine=0",
        "b = arena.alloc(256); arena.free(b); arena.buffer[b.offset + 5] = int(arena.buffer[b.offset + 5]) ^ 0xFF",
        "arena.alloc(256)", "CorruptionError", "b.offset + 5", "CorruptionError", "",
    ),
    # The same misuses on small blocks, which are slots of a slab (alignment 16: the slot's span is a
    # multiple of it) and, once freed, wait in quarantine or in the per-span slot cache.
    "slot_double_free": ("", "b = arena.alloc(40, alignment=16); arena.free(b)", "arena.free(b)", "DoubleFree",
                         "b.offset", "ok", ""),
    "slot_double_free_after_reuse": (
        "hardened=False",
        "b = arena.alloc(40, alignment=16); arena.free(b); b2 = arena.alloc(40, alignment=16); assert b2.offset == b.offset",
        "arena.free(b)", "DoubleFree", "b.offset", "ok",
        "arena.free(b2); out['reused_block_freed'] = True",
    ),
    "slot_double_free_without_handle": (
        "", "b = arena.alloc(40, alignment=16); arena.free(b)", "arena.free(Block(b.offset, 40))", "DoubleFree",
        "b.offset", "ok", "",
    ),
    "slot_free_interior": ("", "b = arena.alloc(40, alignment=16)", "arena.free(Block(b.offset + 16, 8))",
                           "InvalidFree", "b.offset + 16", "ok", ""),
    "slot_free_never_returned": ("", "b = arena.alloc(40, alignment=16)", "arena.free(Block(b.offset + 5 * 48, 8))",
                                 "InvalidFree", "b.offset + 5 * 48", "ok", ""),
    "slot_overflow_one_byte": (
        "", "b = arena.alloc(40, alignment=16); i = b.offset + 40; arena.buffer[i] = int(arena.buffer[i]) ^ 0xFF",
        "arena.free(b)", "CorruptionError", "b.offset", "CorruptionError", "",
    ),
    "slot_write_after_free_check": (
        "poison=True",
        "b = arena.alloc(40, alignment=16); arena.free(b); arena.buffer[b.offset + 5] = int(arena.buffer[b.offset + 5]) ^ 0xFF",
        "arena.check()", "CorruptionError", "b.offset + 5", "CorruptionError", "",
    ),
    # Forged handles: a Block with one field altered is never taken for its block, nor for a freed one.
    "forged_offset_of_live_block": ("", "", "arena.free(dataclasses.replace(keep, offset=keep.offset + 16384))",
                                    "InvalidFree", "keep.offset + 16384", "ok", ""),
    "forged_offset_onto_another_live_block": (
        "", "b = arena.alloc(4096); other = arena.alloc(4096)", "arena.free(dataclasses.replace(b, offset=other.offset))",
        "InvalidFree", "other.offset", "ok", "out['other_live'] = arena.stats().live_blocks == 3",
    ),
    "forged_offset_of_freed_block": ("", "b = arena.alloc(64); arena.free(b)",
                                     "arena.free(dataclasses.replace(b, offset=b.offset + 256))", "InvalidFree",
                                     "b.offset + 256", "ok", ""),
    "forged_offset_of_released_block": (
        "hardened=False", "b = arena.alloc(4096); arena.free(b)",
        "arena.free(dataclasses.replace(b, offset=b.offset + 4096))", "InvalidFree", "b.offset + 4096", "ok", "",
    ),
    "stale_handle_of_released_block": (
        "hardened=False", "b = arena.alloc(4096); arena.free(b); big = arena.alloc(8192); assert big.offset == b.offset",
        "arena.free(b)", "DoubleFree", "b.offset", "ok", "",
    ),
    "forged_size": ("", "b = arena.alloc(4096)", "arena.free(dataclasses.replace(b, nbytes=b.nbytes + 1))",
                    "InvalidFree", "b.offset", "ok", ""),
    "forged_size_of_freed_block": ("hardened=False", "b = arena.alloc(4096); arena.free(b)",
                                   "arena.free(dataclasses.replace(b, nbytes=8))", "InvalidFree", "b.offset", "ok", ""),
    "forged_serial_of_another_block": (
        "", "b = arena.alloc(4096); other = arena.alloc(64)", "arena.free(dataclasses.replace(b, serial=other.serial))",
        "InvalidFree", "b.offset", "ok", "",
    ),
    "forged_serial_of_a_freed_block": (
        "", "old = arena.alloc(64); arena.free(old); b = arena.alloc(4096)",
        "arena.free(dataclasses.replace(b, serial=old.serial))", "InvalidFree", "b.offset", "ok", "",
    ),
    "forged_check": ("", "b = arena.alloc(4096)", "arena.free(dataclasses.replace(b, check=b.check ^ 2))",
                     "InvalidFree", "b.offset", "ok", ""),
    "forged_serial_zero": ("", "b = arena.alloc(4096)", "arena.free(dataclasses.replace(b, serial=0))", "InvalidFree",
                           "b.offset", "ok", ""),
    "forged_arena_key": (
        "", "other = Arena(1 << 20, name='other'); twin = other.alloc(1000); assert twin.offset == keep.offset",
        "arena.free(dataclasses.replace(twin, arena_key=keep.arena_key))", "InvalidFree", "keep.offset", "ok", "",
    ),
    "hand_made_wrong_size": ("", "b = arena.alloc(4096)", "arena.free(Block(b.offset, 8))", "InvalidFree", "b.offset",
                             "ok", ""),
    "tensor_of_forged_block": ("", "", "arena.tensor(dataclasses.replace(keep, offset=keep.offset + 16384), torch.uint8, 8)",
                               "AllocatorError", "keep.offset + 16384", "ok", ""),
    "slot_forged_offset_of_free_slot": (
        "", "b = arena.alloc(40, alignment=16)", "arena.free(dataclasses.replace(b, offset=b.offset + 5 * 48))",
        "InvalidFree", "b.offset + 5 * 48", "ok", "",
    ),
    "slot_forged_offset_onto_live_slot": (
        "", "b = arena.alloc(40, alignment=16); c = arena.alloc(40, alignment=16)",
        "arena.free(dataclasses.replace(b, offset=c.offset))", "InvalidFree", "c.offset", "ok", "",
    ),
    "slot_forged_serial": (
        "", "b = arena.alloc(40, alignment=16); c = arena.alloc(40, alignment=16)",
        "arena.free(dataclasses.replace(b, serial=c.serial))", "InvalidFree", "b.offset", "ok", "",
    ),
    "slot_forged_offset_of_freed_slot": (
        "", "b = arena.alloc(40, alignment=16); arena.free(b)",
        "arena.free(dataclasses.replace(b, offset=b.offset + 48))", "InvalidFree", "b.offset + 48", "ok", "",
    ),
    "slot_write_after_free_reuse": (
        "poison=True, quarantine=0",
        "b = arena.alloc(40, alignment=16); arena.free(b); arena.buffer[b.offset + 5] = int(arena.buffer[b.offset + 5]) ^ 0xFF",
        "arena.alloc(40, alignment=16)", "CorruptionError", "b.offset + 5", "CorruptionError", "",
    ),
}


# Imports torch once, then forks one child per case: each case still runs in a process of its own
# (a crash shows as a signal in its exit status), without paying torch's import for every case.
FORK_SERVER = """
import json, os, sys, torch
import memopt.pools
torch.set_num_threads(1)
results = {}
for name, script in json.load(sys.stdin).items():
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.dup2(write_fd, 1)
        code = 0
        try:
            exec(compile(script, name, "exec"), {"__name__": "__main__"})
        except BaseException as exc:
            sys.stderr.write(repr(exc))
            code = 3
        sys.stdout.flush()
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    results[name] = {"status": os.waitstatus_to_exitcode(status), "stdout": output}
print(json.dumps(results))
"""


CRASH_CONTROL = "control: a segfaulting child"


def _case_script(name: str) -> str:
    options, setup, misuse, _, offset_expr, _, after = CASES[name]
    script = SCRIPT.format(options=options, setup=setup, misuse=textwrap.indent(misuse, "    "), after=after)
    if offset_expr:  # evaluated in the child, where the block exists
        script = script.replace("print(json.dumps(out))", f"out['offset'] = str({offset_expr})\nprint(json.dumps(out))")
    return script


@pytest.fixture(scope="module")
def outcomes() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    scripts = {name: _case_script(name) for name in CASES}
    scripts[CRASH_CONTROL] = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"
    scripts = json.dumps(scripts)
    proc = subprocess.run([sys.executable, "-c", FORK_SERVER], input=scripts, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for name, result in results.items():
        out[name] = {"returncode": result["status"], "stderr": proc.stderr[-2000:]}
        if result["status"] == 0 and name != CRASH_CONTROL:
            out[name].update(json.loads(result["stdout"].strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_misuse(outcomes, name):
    expected_exception, offset_named, expected_check = CASES[name][3], CASES[name][4], CASES[name][5]
    out = outcomes[name]
    assert out["returncode"] == 0, f"the process died: {out['stderr']}"
    assert out["exception"] == expected_exception, out
    assert "'victim'" in out["message"] or "'other'" in out["message"], out["message"]
    if offset_named:
        assert out["offset"] in out["message"], out["message"]
    assert out["unchanged"], "a rejected call changed the arena"
    assert out["keep_intact"], "a rejected call touched a live block's memory"
    assert out["check"] == expected_check
    if name.endswith("double_free_after_reuse"):
        assert out["reused_block_freed"]
    if name == "forged_offset_onto_another_live_block":
        assert out["other_live"]
    if "forged" in name:  # the message says what happened, not that a live block was freed already
        assert "altered" in out["message"], out["message"]


def test_a_crash_fails_the_case(outcomes):
    """The harness must see a crash as a crash, or the cases above could not fail on one."""
    assert outcomes[CRASH_CONTROL]["returncode"] < 0
