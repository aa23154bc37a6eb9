"""Arena behaviour in process: views, statistics, quarantine, alignment, options, build and loading."""

from __future__ import annotations

import ctypes
import doctest
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memopt.pools
import memopt.pools.arena
from memopt.errors import AllocatorError, ArenaExhausted, CorruptionError, InvalidFree
from memopt.pools import Arena, ArenaConfig, ArenaStats, Block, InvalidRequest, _lib
from memopt.pools._reference import slab_bytes

REPO = Path(__file__).resolve().parent.parent


def test_tensor_is_a_view_of_the_buffer():
    with Arena("1MiB") as arena:
        block = arena.alloc(64 * 4, alignment=64)
        view = arena.tensor(block, torch.float32, (8, 8))
        source = torch.arange(64, dtype=torch.float32).reshape(8, 8)
        view.copy_(source)
        assert view.data_ptr() == arena.buffer.data_ptr() + block.offset
        raw = arena.buffer[block.offset:block.offset + 256].view(torch.float32).reshape(8, 8)
        assert torch.equal(raw, source)
        assert arena.tensor(arena.alloc(8), torch.float64, ()).shape == ()
        assert arena.tensor(arena.alloc(1), torch.float32, (0, 3)).numel() == 0


def test_tensor_rejects_bad_views():
    with Arena("1MiB", hardened=False) as arena:
        block = arena.alloc(100, alignment=16)
        with pytest.raises(ValueError, match="needs 128 bytes"):
            arena.tensor(block, torch.float32, (32,))
        odd = arena.alloc(8, alignment=1)
        unaligned = Block(odd.offset + 2, 4, arena_key=0)
        with pytest.raises(ValueError, match="not aligned"):
            arena.tensor(unaligned, torch.float32, (1,))
        arena.free(block)
        with pytest.raises(AllocatorError, match=r"tensor\(\) of block at offset 0: block at offset 0 \(allocation #1\) was already freed"):
            arena.tensor(block, torch.uint8, (4,))


def test_stats_and_fragmentation():
    kib = 1024
    with Arena(32 * kib, hardened=False) as arena:
        blocks = [arena.alloc(2 * kib, alignment=16) for _ in range(8)]
        for i in (1, 3, 5):
            arena.free(blocks[i])
        stats = arena.stats()
        assert isinstance(stats, ArenaStats)
        assert stats.capacity_bytes == 32 * kib
        assert stats.allocated_bytes == stats.requested_bytes == 10 * kib
        assert stats.live_blocks == 5 and stats.peak_bytes == 16 * kib
        # Free space: three 2 KiB holes and the 16 KiB tail.
        assert stats.free_bytes == 22 * kib and stats.largest_free_bytes == 16 * kib
        assert stats.fragmentation == pytest.approx(1 - 16 / 22)
        assert stats.high_water_bytes == 16 * kib
        assert 0 < stats.metadata_bytes <= stats.peak_metadata_bytes
        for i in (0, 2, 4, 6, 7):
            arena.free(blocks[i])
        stats = arena.stats()
        assert stats.free_bytes == stats.largest_free_bytes == 32 * kib and stats.fragmentation == 0.0
        arena.check()


def test_small_blocks_share_a_slab():
    with Arena(1 << 16, hardened=False) as arena:
        block = arena.alloc(100, alignment=16)
        neighbour = arena.alloc(100, alignment=16)
        SLAB_BYTES = slab_bytes(112)
        assert SLAB_BYTES == 8192  # the power of two that holds 64 slots
        slots = SLAB_BYTES // 112  # one slab of 112-byte slots
        assert neighbour.offset - block.offset == 112 and block.offset % SLAB_BYTES == 0
        stats = arena.stats()
        assert stats.cached_blocks == slots - 2 and stats.cached_bytes == (slots - 2) * 112
        assert stats.high_water_bytes == block.offset + SLAB_BYTES and stats.largest_free_bytes == (1 << 16) - SLAB_BYTES
        arena.free(block)
        assert arena.stats().cached_blocks == slots - 1 and arena.stats().free_bytes == (1 << 16) - 112
        with pytest.raises(memopt.DoubleFree):
            arena.free(block)
        again = arena.alloc(97, alignment=16)  # same span: the freed slot comes back
        assert again.offset == block.offset
        # A request whose span is not a multiple of its alignment gets a block of its own.
        assert arena.alloc(100, alignment=256).offset >= block.offset + SLAB_BYTES
        arena.free(again)
        arena.free(neighbour)
        stats = arena.stats()
        # The class's only slab stays when it empties (no make-and-unmake in a loop).
        assert stats.cached_blocks == slots and stats.live_blocks == 1
        arena.check()


def test_freed_slots_come_back_last_in_first_out():
    with Arena(1 << 16, hardened=False) as arena:
        a, b, c = (arena.alloc(40, alignment=16) for _ in range(3))
        arena.free(a)
        arena.free(c)
        with pytest.raises(memopt.DoubleFree, match="waiting for reuse"):
            arena.free(c)
        assert [arena.alloc(33, alignment=16).offset for _ in range(3)] == [c.offset, a.offset, c.offset + 48]
        arena.check()


def test_slot_cache_overflow_returns_slots_to_their_slab_and_a_flush_empties_it():
    SLAB_BYTES = slab_bytes(1008)
    capacity = 4 * SLAB_BYTES
    with Arena(capacity, hardened=False, quarantine=4) as arena:
        blocks = [arena.alloc(1000, alignment=16) for _ in range(3 * (SLAB_BYTES // 1008))]
        for block in blocks:
            arena.free(block)
        stats = arena.stats()
        assert stats.live_blocks == 0 and stats.quarantined_blocks == 4
        # Every slot but the quarantined ones waits in the cache or is free in its slab again.
        assert stats.cached_blocks == 3 * (SLAB_BYTES // 1008) - 4
        arena.check()
        big = arena.alloc(capacity - SLAB_BYTES)  # fits only once the quarantine, caches and empty slabs go
        stats = arena.stats()
        assert stats.quarantine_flushes == 1 and stats.cached_blocks == 0 and stats.quarantined_blocks == 0
        arena.free(big)
        arena.check()


def test_small_block_metadata_is_a_few_bytes_a_block():
    with Arena("4MiB", hardened=False) as arena:
        blocks = [arena.alloc(48, alignment=16) for _ in range(20_000)]
        stats = arena.stats()
        assert stats.metadata_bytes / len(blocks) < 6, stats.metadata_bytes  # 3 bytes a slot and a share of a slab
        for b in blocks[::2]:
            arena.free(b)
        arena.check()


def test_metadata_stays_under_5_percent_of_live_bytes_on_small_objects():
    """The bench's small-object trace in miniature (8 B - 1 KiB, ~5,000 live, random frees): the peak
    out-of-band metadata is under 5 % of the peak live requested bytes (it was ~49 % with a descriptor
    and a hash slot a block)."""
    import random

    rng = random.Random(1)
    with Arena("16MiB") as arena:  # hardened: quarantine and canaries
        live: list[tuple] = []
        requested = peak_requested = 0
        for _ in range(60_000):
            if live and rng.random() < len(live) / 10_000:
                block, nbytes = live.pop(rng.randrange(len(live)))
                arena.free(block)
                requested -= nbytes
            else:
                nbytes = max(1, int(2 ** rng.uniform(3, 10)))
                live.append((arena.alloc(nbytes, alignment=16), nbytes))
                requested += nbytes
                peak_requested = max(peak_requested, requested)
        stats = arena.stats()
        assert stats.requested_bytes == requested and len(live) > 4_000
        assert stats.peak_metadata_bytes < 0.05 * peak_requested, stats.peak_metadata_bytes / peak_requested
        arena.check()


def test_interior_and_free_slot_offsets_are_rejected():
    with Arena(1 << 16, hardened=False) as arena:
        block = arena.alloc(40, alignment=16)
        arena.alloc(40, alignment=16)
        for offset in (block.offset + 16, block.offset + 48 * 3):  # inside a slot; a slot never handed out
            with pytest.raises(InvalidFree, match="small-object slab"):
                arena.free(Block(offset, 8))
        assert arena.stats().live_blocks == 2
        arena.check()


def test_quarantine_delays_reuse_and_is_released_when_full():
    with Arena(4096, hardened=False, quarantine=2) as arena:
        first = arena.alloc(1024, alignment=16)
        arena.free(first)
        assert arena.alloc(1024, alignment=16).offset != first.offset  # still quarantined
        arena.alloc(2048, alignment=16)
        stats = arena.stats()
        assert stats.quarantined_blocks == 1 and stats.free_bytes == 0 and stats.quarantine_flushes == 0
        # Only the quarantined kilobyte is left: taking it releases the quarantine instead of failing.
        assert arena.alloc(1024, alignment=16).offset == first.offset
        stats = arena.stats()
        assert stats.quarantine_flushes == 1 and stats.quarantined_blocks == 0 and stats.free_bytes == 0
        arena.check()


def test_quarantine_evicts_oldest():
    with Arena(1 << 16, hardened=False, quarantine=2) as arena:
        blocks = [arena.alloc(256) for _ in range(3)]
        for b in blocks:
            arena.free(b)
        stats = arena.stats()
        assert stats.quarantined_blocks == 2 and stats.quarantined_bytes == 512
        arena.check()


def test_exhaustion_fails_only_when_nothing_fits():
    with Arena(4096, hardened=False) as arena:
        a = arena.alloc(1024, alignment=16)
        arena.alloc(1024, alignment=16)
        arena.free(a)
        # 3 KiB free, but only in pieces of 1 KiB and 2 KiB.
        with pytest.raises(ArenaExhausted, match="no free block holds 3000 bytes"):
            arena.alloc(3000, alignment=16)
        assert arena.alloc(2048, alignment=16).offset == 2048
        with pytest.raises(ArenaExhausted):
            arena.alloc(2048)


@pytest.mark.parametrize("alignment", [1, 2, 16, 64, 256, 4096, 1 << 16])
def test_alignment(alignment):
    with Arena("1MiB", hardened=False) as arena:
        arena.alloc(24, alignment=16)
        for nbytes in (1, 17, 1000):
            assert arena.alloc(nbytes, alignment=alignment).offset % max(alignment, 16) == 0
        arena.check()


def test_alignment_beyond_capacity_gives_offset_zero():
    with Arena(4096, hardened=False) as arena:
        assert arena.alloc(64, alignment=1 << 40).offset == 0
        with pytest.raises(ArenaExhausted):
            arena.alloc(64, alignment=1 << 40)


def test_hardened_defaults():
    hardened = Arena(4096)
    assert hardened.config.canaries and hardened.config.quarantine == 16 and not hardened.config.poison
    assert hardened.config.zero_small_on_free
    block = hardened.alloc(16, alignment=16)
    assert block.span_bytes == 32  # 16 bytes asked, guard bytes after them
    plain = Arena(4096, hardened=False)
    assert not plain.config.canaries and plain.config.quarantine == 0 and not plain.config.zero_small_on_free
    assert plain.alloc(16, alignment=16).span_bytes == 16
    hardened.close()
    plain.close()


def test_canary_catches_overflow_but_not_in_bounds_writes():
    with Arena(1 << 16) as arena:
        block = arena.alloc(100)
        arena.tensor(block, torch.uint8, (100,)).fill_(0xFF)  # in bounds
        arena.check()
        arena.buffer[block.offset + 100 + 3] = int(arena.buffer[block.offset + 103]) ^ 1
        with pytest.raises(CorruptionError, match=rf"arena '{arena.name}'.*offset {block.offset + 103}"):
            arena.check()
        with pytest.raises(CorruptionError, match="buffer overflow"):
            arena.free(block)
        assert arena.stats().live_blocks == 1  # the rejected free left the block allocated


@pytest.mark.parametrize("poison", [False, True])
def test_canary_catches_every_overflowed_guard_byte(poison):
    # Every requested size over two granules (every slack and every start of the canary word within a
    # word), every byte of the canary; with poison on, the rest of the slack is guarded too.
    with Arena(1 << 16, poison=poison, quarantine=0) as arena:
        for nbytes in range(1, 2 * _lib.GRANULE_BYTES + 1):
            span = arena.alloc(nbytes)
            guarded = (arena.stats().allocated_bytes if poison else nbytes + 8) - nbytes
            arena.free(span)
            for k in range(guarded):
                block = arena.alloc(nbytes)
                index = block.offset + nbytes + k
                arena.buffer[index] = int(arena.buffer[index]) ^ 0x01
                with pytest.raises(CorruptionError, match=rf"offset {index}"):
                    arena.check()
                with pytest.raises(CorruptionError, match=rf"overwritten at offset {index}, {k + 1} byte\(s\) past"):
                    arena.free(block)
                arena.buffer[index] = int(arena.buffer[index]) ^ 0x01
                arena.check()
                arena.free(block)


# (bytes, alignment): slab slots (span a multiple of the alignment) and blocks of their own, up to the
# largest span that is still small (1 KiB with the 8 guard bytes).
SMALL_BLOCKS = [(1, 16), (40, 16), (100, 256), (248, 256), (1000, 256), (1016, 16), (1016, 512)]


@pytest.mark.parametrize("quarantine", [None, 0])
def test_hardened_host_arena_zeroes_freed_small_blocks(quarantine):
    """Freed small blocks never keep their contents, whether they wait in quarantine or go straight
    back to their slab or slot cache; a larger block keeps them (``poison`` covers those)."""
    with Arena(1 << 20, quarantine=quarantine) as arena:
        for nbytes, alignment in SMALL_BLOCKS + [(1017, 16), (4096, 256)]:
            block = arena.alloc(nbytes, alignment=alignment)
            arena.tensor(block, torch.uint8, (nbytes,)).fill_(0xAB)
            arena.free(block)
            freed = arena.buffer[block.offset:block.offset + block.span_bytes]
            if block.span_bytes <= 1024:
                assert not freed.any(), f"freed {nbytes}-byte block still holds {freed.unique().tolist()}"
            else:
                assert (freed[:nbytes] == 0xAB).all()
        arena.check()


@pytest.mark.parametrize("quarantine", [None, 0])
@pytest.mark.parametrize(("nbytes", "alignment"), SMALL_BLOCKS)
def test_write_after_free_into_a_small_block_is_reported_by_check(nbytes, alignment, quarantine):
    # Held back in quarantine, or (quarantine=0) a slot back in its cache: check() verifies the zeros.
    # A block of its own is verified only while in quarantine; once released, its bytes are free space.
    if quarantine == 0 and (nbytes + 8 + 15) // 16 * 16 % alignment:
        pytest.skip("a block of its own is released at once without a quarantine")
    with Arena(1 << 20, quarantine=quarantine) as arena:
        block = arena.alloc(nbytes, alignment=alignment)
        arena.free(block)
        index = block.offset + nbytes // 2
        arena.buffer[index] = 0x5A
        with pytest.raises(CorruptionError, match=rf"arena '{arena.name}': check: freed memory was written after free: "
                                                  rf"byte at offset {index}"):
            arena.check()
        arena.buffer[index] = 0
        arena.check()


@pytest.mark.parametrize("options", [dict(hardened=False), dict(zero_small_on_free=False)])
def test_freed_small_blocks_keep_their_contents_with_zeroing_off(options):
    with Arena(1 << 16, **options) as arena:
        block = arena.alloc(100, alignment=16)
        arena.tensor(block, torch.uint8, (100,)).fill_(0xAB)
        arena.free(block)
        assert (arena.buffer[block.offset:block.offset + 100] == 0xAB).all()


def test_poison_fills_freed_memory():
    with Arena(1 << 16, poison=True, quarantine=0) as arena:
        block = arena.alloc(256)
        view = arena.tensor(block, torch.uint8, (256,))
        view.fill_(0)
        arena.free(block)
        # One byte, never 0: poison supersedes the zeroing a hardened arena does otherwise.
        assert len(set(arena.buffer[block.offset:block.offset + 256].tolist())) == 1 and arena.buffer[block.offset] != 0
        again = arena.alloc(256)
        assert again.offset == block.offset
        arena.check()


def test_foreign_and_closed():
    one, two = Arena(4096, name="one"), Arena(4096, name="two")
    block = one.alloc(64)
    with pytest.raises(InvalidFree, match="belongs to another arena"):
        two.free(block)
    one.close()
    one.close()  # closing twice is allowed
    assert one.closed and "closed" in repr(one)
    with pytest.raises(InvalidFree, match="arena 'one': free of offset 0: the arena is closed"):
        one.free(block)
    for call in (one.check, one.stats, lambda: one.alloc(1), lambda: one.tensor(block, torch.uint8, (1,))):
        with pytest.raises(AllocatorError, match="closed"):
            call()
    two.check()
    two.close()


CONFIG_ERRORS = [
    (dict(capacity_bytes=0), "must be positive"),
    (dict(capacity_bytes="lots"), "is not a byte count"),
    (dict(capacity_bytes=8), "at least 16"),
    (dict(capacity_bytes=4096, device="meta"), "device must be 'cpu' or a CUDA device"),
    (dict(capacity_bytes=4096, device="nonsense"), "device must be"),
    (dict(capacity_bytes=4096, quarantine=-1), "quarantine must be"),
    (dict(capacity_bytes=4096, quarantine=True), "quarantine must be"),
    (dict(capacity_bytes=4096, quarantine=2.5), "quarantine must be"),
    (dict(capacity_bytes=4096, device="cuda", canaries=True), "canaries, poison and zeroing need host memory"),
    (dict(capacity_bytes=4096, device="cuda", poison=True), "canaries, poison and zeroing need host memory"),
    (dict(capacity_bytes=4096, device="cuda", zero_small_on_free=True), "canaries, poison and zeroing need host memory"),
    (dict(capacity_bytes=4096, device="cuda", pin_memory=True), "applies to host arenas"),
]


@pytest.mark.parametrize(("kwargs", "match"), CONFIG_ERRORS)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArenaConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_pin_memory_without_cuda_is_refused():
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        Arena(4096, pin_memory=True)


def test_config_parses_byte_strings():
    assert ArenaConfig("2MiB").capacity_bytes == 2 << 20


def test_public_names():
    assert memopt.pools.__all__ == sorted(memopt.pools.__all__)
    for name in memopt.pools.__all__:
        assert hasattr(memopt.pools, name)
    assert memopt.pools.DoubleFree is memopt.DoubleFree
    assert issubclass(InvalidRequest, AllocatorError) and issubclass(InvalidRequest, ValueError)


def test_docstring_examples_run():
    for module in (memopt.pools, memopt.pools.arena):
        result = doctest.testmod(module, extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_library_loads_and_reports_missing_cuda():
    lib = _lib.library()
    handle, base = ctypes.c_uint64(), ctypes.c_uint64()
    rc = lib.mo_cuda_init(0, 1 << 20, 0, 1, ctypes.byref(handle), ctypes.byref(base))
    assert rc == _lib.E_CUDA and "CUDA" in _lib.last_error()
    assert lib.mo_cuda_malloc is not None  # the pluggable-allocator entry points exist without CUDA
    with pytest.raises(ValueError, match="needs a CUDA device"):
        memopt.pools.cuda_allocator("1MiB")


def test_setup_py_builds_a_plain_shared_library(tmp_path):
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    built = list((tmp_path / "lib" / "memopt").glob("_moalloc.*"))
    assert [p.name for p in built] in (["_moalloc.so"], ["_moalloc.dylib"])
    # Loadable by a process that has no Python symbols to offer.
    check = subprocess.run(["python3", "-c", "import ctypes,sys; print(ctypes.CDLL(sys.argv[1]).mo_abi_version())",
                            str(built[0])], capture_output=True, text=True)
    assert check.stdout.strip() == str(_lib.ABI_VERSION), check.stderr
    if shutil.which("nm"):
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(built[0])], capture_output=True, text=True)
        assert "Py" not in undefined.stdout


def test_compile_fallback(tmp_path):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    target = tmp_path / "_moalloc.so"
    _lib._compile(target)
    lib = ctypes.CDLL(str(target))
    assert lib.mo_abi_version() == _lib.ABI_VERSION


def _no_lto_compiler(tmp_path, real: str) -> str:
    """A compiler whose link-time optimisation is broken, as on toolchains without an lto-wrapper."""
    wrapper = tmp_path / "cc-no-lto"
    wrapper.write_text(f"""#!/bin/sh
for a in "$@"; do [ "$a" = -flto ] && {{ echo "could not run lto-wrapper" >&2; exit 1; }}; done
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_compile_without_lto_when_the_toolchain_has_none(tmp_path, monkeypatch):
    real = shutil.which(os.environ.get("CC", "cc"))
    if real is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", _no_lto_compiler(tmp_path, real))
    target = tmp_path / "lib" / "_moalloc.so"
    _lib._compile(target)
    assert ctypes.CDLL(str(target)).mo_abi_version() == _lib.ABI_VERSION


def test_setup_builds_without_lto_when_the_toolchain_has_none(tmp_path):
    real = shutil.which(os.environ.get("CC", "cc"))
    if real is None:
        pytest.skip("no C compiler")
    env = {**os.environ, "CC": _no_lto_compiler(tmp_path, real), "LDSHARED": f"{_no_lto_compiler(tmp_path, real)} -shared"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert "building without it" in build.stderr
    built = next((tmp_path / "lib" / "memopt").glob("_moalloc.*"))
    assert ctypes.CDLL(str(built)).mo_abi_version() == _lib.ABI_VERSION


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_and_device_arenas():
    pinned = Arena("4MiB", pin_memory=True)
    assert pinned.buffer.is_pinned()
    block = pinned.alloc(4096)
    device_tensor = torch.randn(1024, device="cuda")
    pinned.tensor(block, torch.float32, (1024,)).copy_(device_tensor, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(pinned.tensor(block, torch.float32, (1024,)).cuda(), device_tensor)
    pinned.free(block)
    pinned.check()
    gpu = Arena("4MiB", device="cuda")
    assert not gpu.config.canaries and gpu.config.quarantine == 16
    b = gpu.alloc(4096)
    gpu.tensor(b, torch.float32, (1024,)).copy_(device_tensor)
    assert torch.equal(gpu.tensor(b, torch.float32, (1024,)), device_tensor)
    gpu.free(b)
    with pytest.raises(memopt.DoubleFree):
        gpu.free(b)
    gpu.check()
