"""Seeded differential test of the C allocator against the Python reference model.

Random allocations, frees and misuses (stale, interior, invented and forged handles: a ``Block`` with
one field altered): after every operation no two live blocks overlap, every outcome is the one the
model requires and the counters equal the model's; ``check()`` walks every invariant at intervals. The default run does 1,000,000 operations on a hardened arena (quarantine
and canaries) and 200,000 on a plain one; the slow run adds 1,000,000 on the plain one.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from memopt.errors import AllocatorError, ArenaExhausted, DoubleFree, InvalidFree
from memopt.pools import Arena, Block
from memopt.pools._reference import ReferenceArena, ReferenceMismatch

CAPACITY_BYTES = 1 << 22
CONFIGS = {
    "hardened": dict(hardened=True, quarantine=8, canaries=True),  # zeroing of freed small blocks too
    "plain": dict(hardened=False, quarantine=0, canaries=False),
}
ALIGNMENTS = (1, 16, 64, 256, 4096, 1 << 16)


def _size(rng: random.Random) -> int:
    # Log-uniform over 1 B .. 256 KiB with some exact class boundaries, so size classes, splits and
    # exhaustion all get exercised in a 4 MiB arena.
    if rng.random() < 0.1:
        return rng.choice((16, 512, 4096, 65536)) - rng.choice((0, 8))
    return max(1, int(2 ** rng.uniform(0, 18)))


def forge(rng: random.Random, source: Block, others: list[Block]) -> Block:
    """``source`` with one field altered, as a caller's bug would: another offset, size, serial or check
    (from another block or nearby), or the offset and size alone (a Block made by hand) with a wrong size."""
    other = rng.choice(others)
    field = rng.randrange(5)
    if field == 0:
        offset = rng.choice((other.offset, source.offset + rng.choice((16, 48, 256, 4096, 16384)), source.offset - 16))
        return dataclasses.replace(source, offset=max(0, offset))
    if field == 1:
        return dataclasses.replace(source, nbytes=rng.choice((other.nbytes, source.nbytes + 1, max(1, source.nbytes - 1))))
    if field == 2:
        serial = rng.choice((other.serial, source.serial ^ 1, source.serial + (1 << 32), source.serial - (1 << 32)))
        return dataclasses.replace(source, serial=serial)
    if field == 3:
        return dataclasses.replace(source, check=rng.choice((other.check, source.check ^ 2)))
    return Block(source.offset, source.nbytes + rng.choice((1, 16, -1)) or 2)


def run_differential(ops: int, seed: int, config: dict) -> dict[str, int]:
    rng = random.Random(seed)
    arena = Arena(CAPACITY_BYTES, **config)
    ref = ReferenceArena(CAPACITY_BYTES, arena.config.quarantine, arena.config.canaries)
    live: list[Block] = []
    freed: list[Block] = []
    counts = {"alloc": 0, "exhausted": 0, "free": 0, "misuse": 0, "forged": 0, "flush": 0}
    for step in range(ops):
        r = rng.random()
        if r < 0.05:
            counts["misuse"] += 1
            kind = rng.randrange(6)
            if kind == 0 and freed:
                block = rng.choice(freed)  # double free through a stale handle
            elif kind == 1 and live:
                victim = rng.choice(live)
                block = Block(victim.offset + rng.randrange(1, victim.span_bytes), 1)  # an interior offset
            elif kind == 2:
                offset = rng.randrange(0, CAPACITY_BYTES + 4096)
                if ref.is_live(offset):
                    continue  # a live block's start: freeing it would be legitimate
                block = Block(offset, 1)  # an offset never returned
            elif kind == 3:
                nbytes = rng.choice((0, -1, CAPACITY_BYTES + 1))
                before = arena.stats()
                try:
                    arena.alloc(nbytes, alignment=rng.choice(ALIGNMENTS))
                except AllocatorError:
                    pass
                else:
                    raise AssertionError(f"alloc({nbytes}) succeeded")
                assert arena.stats() == before
                continue
            elif kind == 4:
                before = arena.stats()
                with pytest.raises(AllocatorError):
                    arena.alloc(64, alignment=rng.choice((3, 0, -8, 48)))
                assert arena.stats() == before
                continue
            else:
                recent = live[-64:] + freed[-64:]
                if not recent:
                    continue
                block = forge(rng, rng.choice(recent), recent)
                if ref.expected_free_error(block) is None:
                    continue  # the alteration gave back a live block's exact handle: freeing it is legitimate
                counts["forged"] += 1
            ref.reject_free(arena, block)
            continue
        # The live-block target swings between 32 and 432, so the arena fills up (exhaustion, quarantine
        # flushes) and drains again (merging) many times.
        target = 32 + 400 * (0.5 + 0.5 * math.sin(step / 4000))
        if r < (0.7 if len(live) < target else 0.3):
            nbytes, alignment = _size(rng), rng.choice(ALIGNMENTS)
            flushes_before = ref.flushes
            try:
                block = arena.alloc(nbytes, alignment=alignment)
                result = (block.offset, block.span_bytes, block.serial, block.check)
                live.append(block)
                counts["alloc"] += 1
            except AllocatorError as exc:
                result = exc
                counts["exhausted"] += 1
            stats = arena.stats()
            ref.on_alloc(nbytes, alignment, result, stats.quarantine_flushes)
            counts["flush"] += ref.flushes - flushes_before
        elif live:
            block = live.pop(rng.randrange(len(live)))
            arena.free(block)
            ref.on_free(block, None)
            freed.append(block)
            if len(freed) > 256:
                freed.pop(0)
            counts["free"] += 1
            stats = arena.stats()
        else:
            continue
        ref.compare_stats(stats, largest_free=step % 97 == 0)
        if step % 20_000 == 0:
            arena.check()
    arena.check()
    ref.compare_stats(arena.stats(), largest_free=True)
    for block in live:
        arena.free(block)
    stats = arena.stats()
    assert stats.allocated_bytes == 0 and stats.live_blocks == 0
    arena.check()
    arena.close()
    return counts


@pytest.mark.parametrize(("config", "ops"), [("hardened", 1_000_000), ("plain", 200_000)])
def test_differential(config, ops):
    counts = run_differential(ops, seed=1234, config=CONFIGS[config])
    # The trace must really reach every path, or passing it proves little.
    assert counts["alloc"] > ops // 4 and counts["free"] > ops // 4
    assert counts["exhausted"] > ops // 1000 and counts["misuse"] > ops // 40 and counts["forged"] > ops // 400
    assert counts["flush"] > 10 or CONFIGS[config]["quarantine"] == 0


@pytest.mark.slow
def test_differential_million_ops_plain():
    counts = run_differential(1_000_000, seed=20240601, config=CONFIGS["plain"])
    assert counts["alloc"] + counts["exhausted"] + counts["free"] + counts["misuse"] >= 900_000


def test_reference_rejects_overlap_and_bad_stats():
    """The oracle itself must be able to fail, or the differential test proves nothing."""
    ref = ReferenceArena(4096, quarantine=2, canaries=False)
    serial = [n << 32 for n in range(1, 6)]  # allocation count in the high half, as the allocator does
    ref.on_alloc(100, 16, (0, 112, serial[0], 7), flushes_after=0)
    with pytest.raises(ReferenceMismatch, match="overlaps"):
        ref.on_alloc(100, 16, (96, 112, serial[1], 7), flushes_after=0)
    with pytest.raises(ReferenceMismatch, match="spans"):
        ref.on_alloc(100, 16, (1024, 128, serial[2], 7), flushes_after=0)
    with pytest.raises(ReferenceMismatch, match="not fresh"):
        ref.on_alloc(100, 16, (1024, 112, serial[0], 7), flushes_after=0)
    with pytest.raises(ReferenceMismatch, match="reported exhaustion"):
        ref.on_alloc(100, 16, ArenaExhausted("x"), flushes_after=0)
    block = Block(0, 100, 112, arena_key=1, serial=serial[0], check=7)
    # An altered field makes any handle invalid, even one of a live block: a DoubleFree or a success is wrong.
    for forged in (dataclasses.replace(block, offset=4096 - 16), dataclasses.replace(block, nbytes=99),
                   dataclasses.replace(block, check=8), Block(0, 99)):
        with pytest.raises(ReferenceMismatch, match="expected InvalidFree"):
            ref.on_free(forged, DoubleFree("x"))
        with pytest.raises(ReferenceMismatch, match="expected InvalidFree"):
            ref.on_free(forged, None)
    ref.on_free(block, None)
    with pytest.raises(ReferenceMismatch, match="overlaps"):
        ref.on_alloc(16, 16, (0, 16, serial[3], 7), flushes_after=0)  # quarantined memory reused
    with pytest.raises(ReferenceMismatch, match="expected DoubleFree"):
        ref.on_free(block, InvalidFree("x"))
    with pytest.raises(ReferenceMismatch, match="expected InvalidFree"):
        ref.on_free(dataclasses.replace(block, offset=16), DoubleFree("x"))  # a freed block's handle, altered
    arena = Arena(4096, hardened=False)
    arena.alloc(100)
    with pytest.raises(ReferenceMismatch, match="stat"):
        ref.compare_stats(arena.stats())
    arena.close()
