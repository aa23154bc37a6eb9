"""Fuzz the arena's Python API against the reference model (atheris / libFuzzer).

Each input is read as a program of operations (allocate, free a live block, free a stale, interior,
invented or forged handle, write past a block, write into a freed small block, check) on a small
arena; the reference model checks every outcome and ``check()`` runs after every operation. Any
mismatch or crash is a finding.

Run (outside the default test suite):
    pip install atheris
    python tests/fuzz/fuzz_arena.py -atheris_runs=200000            # libFuzzer options follow
    python tests/fuzz/fuzz_arena.py --random 20000                   # no atheris: seeded random inputs

tests/fuzz/fuzz_core.c fuzzes the C library directly with libFuzzer (build line in that file).
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys

import torch  # imported before instrumentation: only memopt's own code needs coverage feedback

AllocatorError = CorruptionError = Arena = Block = ReferenceArena = None


def _load() -> None:
    global AllocatorError, CorruptionError, Arena, Block, ReferenceArena
    from memopt.errors import AllocatorError, CorruptionError
    from memopt.pools import Arena, Block
    from memopt.pools._reference import ReferenceArena

CAPACITY_BYTES = 1 << 16
ALIGNMENTS = (1, 16, 256, 4096)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise EOFError
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() | self.byte() << 8


def run_program(data: bytes) -> None:
    """Execute one fuzz input; raises on any disagreement with the reference model."""
    reader = _Reader(data)
    config = reader.byte() if data else 0
    quarantine, canaries, zeroing = config & 7, bool(config & 8), bool(config & 16)
    arena = Arena(CAPACITY_BYTES, hardened=False, quarantine=quarantine, canaries=canaries, zero_small_on_free=zeroing)
    ref = ReferenceArena(CAPACITY_BYTES, quarantine, canaries)
    live: list[Block] = []
    freed: list[Block] = []
    corrupted = False
    try:
        while True:
            op = reader.byte() % 8
            if op <= 2:
                nbytes = reader.u16() % (CAPACITY_BYTES + 64) if op < 2 else reader.u16() % 64
                alignment = ALIGNMENTS[reader.byte() % len(ALIGNMENTS)]
                try:
                    block = arena.alloc(nbytes, alignment=alignment)
                    result = (block.offset, block.span_bytes, block.serial, block.check)
                    live.append(block)
                except AllocatorError as exc:
                    result = exc
                ref.on_alloc(nbytes, alignment, result, arena.stats().quarantine_flushes)
            elif op <= 4 and live:
                block = live.pop(reader.byte() % len(live))
                error = None
                try:
                    arena.free(block)
                    freed.append(block)
                except CorruptionError as exc:
                    error = exc
                if error is not None:
                    if not corrupted:
                        raise AssertionError(f"free reported corruption nobody caused: {error}")
                    live.append(block)
                    return  # the model does not follow a corrupted arena further
                ref.on_free(block, None)
            elif op == 5:
                kind = reader.byte() % 4
                if kind == 0 and freed:
                    block = freed[reader.byte() % len(freed)]
                elif kind == 1 and live:
                    victim = live[reader.byte() % len(live)]
                    block = Block(victim.offset + 1 + reader.byte() % (victim.span_bytes - 1), 1)
                elif kind == 2 and (live or freed):
                    pool = live + freed
                    source, other = pool[reader.byte() % len(pool)], pool[reader.byte() % len(pool)]
                    name = ("offset", "nbytes", "serial", "check")[reader.byte() % 4]
                    block = dataclasses.replace(source, **{name: getattr(other, name) ^ (reader.byte() % 3 * 16)})
                    if ref.expected_free_error(block) is None:
                        continue  # the exact handle of a live block: freeing it is legitimate
                else:
                    offset = reader.u16() * 16
                    if ref.is_live(offset):
                        continue
                    block = Block(offset, 1)
                ref.reject_free(arena, block)
            elif op == 6 and live and canaries:
                # Overflow one byte past a block: the next check() or free must report it.
                block = live[reader.byte() % len(live)]
                index = block.offset + block.nbytes
                arena.buffer[index] = int(arena.buffer[index]) ^ 0xFF
                try:
                    arena.check()
                except CorruptionError:
                    return
                raise AssertionError(f"overflow past block at {block.offset} went unnoticed")
            elif op == 7 and live and zeroing and quarantine:
                # Free a small block and write into it while it waits in quarantine: check() must see it.
                block = live.pop(reader.byte() % len(live))
                if block.span_bytes > 1024:
                    live.append(block)
                    continue
                arena.free(block)
                ref.on_free(block, None)
                freed_bytes = arena.buffer[block.offset:block.offset + block.span_bytes]
                if freed_bytes.any():
                    raise AssertionError(f"freed small block at {block.offset} kept nonzero bytes")
                index = block.offset + reader.byte() % block.span_bytes
                arena.buffer[index] = 0xA5
                try:
                    arena.check()
                except CorruptionError:
                    return
                raise AssertionError(f"write after free at {index} went unnoticed")
            ref.compare_stats(arena.stats(), largest_free=True)
            arena.check()
    except EOFError:
        pass
    finally:
        arena.close()


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[1] == "--random":
        count = int(argv[2]) if len(argv) > 2 else 10_000
        _load()
        rng = random.Random(0)
        for _ in range(count):
            run_program(rng.randbytes(rng.randrange(1, 400)))
        print(f"{count} random programs passed")
        return
    import atheris

    # Coverage feedback for the Python side (the bindings and the model); the C library gets its own in
    # the libFuzzer harness fuzz_core.c.
    with atheris.instrument_imports(include=["memopt"]):
        _load()
    atheris.Setup(argv, run_program)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv)
