/*
 * moalloc: memopt's hardened offset allocator.
 *
 * It hands out offsets in [0, capacity) of a region it never needs to touch: every byte of
 * metadata lives in host heap memory of its own, so the same core manages pinned host memory and
 * GPU memory. Free blocks are kept in TLSF segregated lists (O(1) allocation and free); live blocks
 * are found by offset in an open-addressing hash table, which is what lets a free of an unknown,
 * interior or already freed offset be reported instead of corrupting the lists.
 *
 * Requests of up to 1 KiB take a slot of a small-object slab (a block of the core cut into about 64
 * equal slots), which needs 3 bytes of metadata a slot instead of a descriptor and a hash slot a block;
 * recently freed slots wait in a per-span cache for the next request of their span.
 *
 * A block is named by a handle of four words that mo_alloc hands out: its offset, the bytes asked for,
 * a serial (the allocation number and where the allocator keeps the block) and a check (a keyed hash
 * of the other three). A free or query is judged by them: the block it names is freed; a handle of a
 * block that was freed is a double free; any other handle (an altered offset, size or serial, another
 * arena's block, an offset that never started a block) is an invalid free. A caller that keeps only
 * some of the words passes 0 for the others and is judged by what it gave (by the offset alone, at
 * least), as far as the arena still holds the blocks concerned.
 *
 * Arenas are named by handles (slot index and generation), never by raw pointers, so a call on a
 * destroyed arena is detected. Every call is serialised by a per-arena mutex. A call that fails
 * leaves the arena exactly as it was and describes the failure in mo_last_error(), a thread-local
 * string.
 */
#ifndef MOALLOC_H
#define MOALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MO_API __declspec(dllexport)
#else
#define MO_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature or mo_stats_t changes; the Python loader refuses a mismatch. */
#define MO_ABI_VERSION 4u

/* Offsets and block spans are multiples of this many bytes. */
#define MO_GRANULE_BYTES 16u
/* With canaries on, at least this many guard bytes follow the requested bytes of every block; these
 * first ones hold the canary (with poison on as well, the canary fills the block's whole slack). */
#define MO_CANARY_MIN_BYTES 8u
/* Blocks of at most this span are small: slab slots when their alignment allows, zeroed when freed under
 * MO_F_ZERO_SMALL. */
#define MO_SMALL_MAX_SPAN_BYTES 1024u
/* Largest capacity an arena accepts: keeps every offset + alignment sum far from overflow. */
#define MO_MAX_CAPACITY_BYTES (1ull << 60)

enum mo_status {
    MO_OK = 0,
    MO_E_INVALID_ARG = 1,  /* size 0, alignment not a power of two, bad capacity or flags */
    MO_E_EXHAUSTED = 2,    /* no free block fits (or the request exceeds the capacity) */
    MO_E_DOUBLE_FREE = 3,  /* the handle's block was freed already */
    MO_E_INVALID_FREE = 4, /* no block of this arena has this handle: unknown, interior or out-of-range offset,
                            * or an altered offset, size, serial or check */
    MO_E_CORRUPTION = 5,   /* a canary, or a poisoned or zeroed byte of freed memory, was overwritten, or an
                            * invariant broke */
    MO_E_BAD_HANDLE = 6,   /* the arena was destroyed, or the handle was never valid */
    MO_E_NOMEM = 7,        /* host memory for metadata could not be obtained */
    MO_E_CUDA = 8          /* the CUDA driver is missing or a driver call failed */
};

enum mo_flags {
    MO_F_CANARIES = 1u,  /* a canary right after each block, checked on free and by mo_check (host only) */
    MO_F_POISON = 2u,    /* fill all free memory with a poison byte, verified on reuse and by mo_check (host only) */
    MO_F_ZERO_SMALL = 4u /* zero each freed block of span <= MO_SMALL_MAX_SPAN_BYTES (and each new slab); mo_check
                          * verifies the zeros of the free and held-back ones, reuse does not (host only;
                          * MO_F_POISON, which covers every block, takes its place when both are set) */
};

typedef struct mo_stats {
    uint64_t capacity_bytes;     /* managed bytes (the requested capacity rounded down to the granule) */
    uint64_t allocated_bytes;    /* bytes in live blocks (spans, including rounding and canaries) */
    uint64_t requested_bytes;    /* bytes the live blocks were asked for */
    uint64_t quarantined_bytes;  /* bytes freed but held back from reuse */
    uint64_t free_bytes;         /* capacity - allocated - quarantined (free and cached slab slots, and the
                                  * few bytes past a slab's last slot, count as free) */
    uint64_t largest_free_bytes; /* span of the largest free block */
    uint64_t peak_bytes;         /* highest allocated_bytes seen */
    uint64_t high_water_bytes;   /* highest end offset of any block or slab ever allocated */
    uint64_t metadata_bytes;     /* host bytes of metadata now (nodes, hash table, quarantine, slabs, arena) */
    uint64_t peak_metadata_bytes;
    uint64_t live_blocks;
    uint64_t free_blocks;
    uint64_t quarantined_blocks;
    uint64_t alloc_count;        /* successful allocations */
    uint64_t free_count;         /* successful frees */
    uint64_t quarantine_flushes; /* times an allocation released the quarantine, slot caches and empty slabs to fit */
    uint64_t cached_bytes;       /* bytes of free slots in small-object slabs, cached or not (reusable by their span only) */
    uint64_t cached_blocks;      /* free slots in small-object slabs */
} mo_stats_t;

MO_API uint32_t mo_abi_version(void);
MO_API size_t mo_stats_size(void);
/* The message of the last failed call on this thread ("" when none failed yet). */
MO_API const char *mo_last_error(void);

/*
 * Create an arena over [0, capacity_bytes). base is the host address of the managed memory when the
 * arena may read and write it (canaries, poison, zeroing); NULL for memory the host cannot touch (GPU).
 * quarantine_blocks freed blocks are held back from reuse, oldest released first. seed randomises
 * the canary and poison patterns and the key of the handle checks (0 picks one from the clock and
 * addresses).
 */
MO_API int mo_arena_create(uint64_t capacity_bytes, void *base, uint32_t quarantine_blocks, uint32_t flags,
                           uint64_t seed, uint64_t *handle_out);
MO_API int mo_arena_destroy(uint64_t handle);

/* Allocate nbytes at an offset that is a multiple of alignment (a power of two). serial_out is unique
 * to this allocation: passed back, it tells a stale handle from a live block that reuses the offset and
 * saves the free a hash-table probe. check_out (may be NULL) is a keyed hash of (offset, nbytes,
 * serial): passed back, it tells a handle of a block freed long ago (a double free) from an altered one
 * (an invalid free) after the arena has forgotten that block. */
MO_API int mo_alloc(uint64_t handle, uint64_t nbytes, uint64_t alignment, uint64_t *offset_out,
                    uint64_t *span_out, uint64_t *serial_out, uint64_t *check_out);
/* Free the block at offset. nbytes, serial and check are mo_alloc's values, each 0 when unknown: with
 * nbytes the block must have been asked for that many bytes; a check is verified against all three. */
MO_API int mo_free(uint64_t handle, uint64_t offset, uint64_t nbytes, uint64_t serial, uint64_t check);
/* MO_OK when the handle (as for mo_free) names a live block; gives its requested bytes and span. A
 * handle that does not fails as mo_free would, with the same code and message. */
MO_API int mo_query(uint64_t handle, uint64_t offset, uint64_t nbytes, uint64_t serial, uint64_t check,
                    uint64_t *nbytes_out, uint64_t *span_out);
/* Walk every invariant: block chain, free lists and bitmaps, hash table, quarantine, counters,
 * canaries and poison. */
MO_API int mo_check(uint64_t handle);
MO_API int mo_stats(uint64_t handle, mo_stats_t *out);

/*
 * CUDA backend for torch.cuda.memory.CUDAPluggableAllocator. libcuda is opened at run time, so this
 * library loads on machines without CUDA; mo_cuda_init then fails with MO_E_CUDA.
 */
MO_API int mo_cuda_init(int device, uint64_t capacity_bytes, uint32_t quarantine_blocks, uint64_t seed,
                        uint64_t *handle_out, uint64_t *base_out);
MO_API int mo_cuda_shutdown(int device);
MO_API void *mo_cuda_malloc(size_t nbytes, int device, void *stream);
MO_API void mo_cuda_free(void *ptr, size_t nbytes, int device, void *stream);
/* Frees torch asked for that the arena rejected (they cannot raise); the last one's message. */
MO_API uint64_t mo_cuda_rejected_frees(int device, char *message, size_t message_bytes);

#ifdef __cplusplus
}
#endif

#endif /* MOALLOC_H */
