"""A hardened arena in five steps: allocate, view as a tensor, copy in, catch misuse, read the stats.

This is how memopt's swap runtime parks activations in host memory: one arena (pinned when CUDA is
there), a block per tensor, and ``arena.tensor(block, dtype, shape).copy_(activation)`` into it.

Run: python examples/arena_basics.py
"""

from __future__ import annotations

import torch

import memopt
from memopt.pools import Arena
from memopt.units import format_bytes


def main() -> None:
    arena = Arena("64MiB", pin_memory=torch.cuda.is_available(), name="activations")

    # Park two "activations" in the arena and bring one back.
    activations = [torch.randn(64, 256), torch.randn(128, 512)]
    blocks = []
    for act in activations:
        block = arena.alloc(act.numel() * act.element_size())
        arena.tensor(block, act.dtype, act.shape).copy_(act)
        blocks.append(block)
    restored = arena.tensor(blocks[1], torch.float32, (128, 512)).clone()
    assert torch.equal(restored, activations[1])
    print(f"parked {len(blocks)} tensors at offsets {[b.offset for b in blocks]}")

    # Misuse is reported, never undefined behaviour; the arena stays intact.
    arena.free(blocks[0])
    try:
        arena.free(blocks[0])
    except memopt.DoubleFree as exc:
        print(f"caught: {exc}")

    # Writing one byte past a block trips its guard canary.
    end = blocks[1].offset + blocks[1].nbytes
    arena.buffer[end] = int(arena.buffer[end]) ^ 0xFF
    try:
        arena.free(blocks[1])
    except memopt.CorruptionError as exc:
        print(f"caught: {exc}")
    arena.buffer[end] = int(arena.buffer[end]) ^ 0xFF  # repair it, so the block can be freed
    arena.free(blocks[1])
    arena.check()

    stats = arena.stats()
    print(f"peak {format_bytes(stats.peak_bytes)} of {format_bytes(stats.capacity_bytes)}, "
          f"{stats.live_blocks} live, fragmentation {stats.fragmentation:.3f}, "
          f"metadata {format_bytes(stats.metadata_bytes)}")
    arena.close()


if __name__ == "__main__":
    main()
