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
#define MO_ABI_VERSION 6u

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
 * Device pools: an arena that hands out addresses (base + offset) to a caller that runs work on streams
 * (torch on a GPU), with three things a plain arena lacks:
 *   - stream-ordered frees: a block freed on a stream stays out of use until a marker recorded on that
 *     stream (and on every other stream mo_dev_record_stream named) says the work queued before the free
 *     is done; an allocation on the freeing stream itself may take it back at once (same size), since
 *     its own work runs after;
 *   - record and replay (MEMO): the allocations of one step are recorded, laid out offline (Python,
 *     planners/layout.py), and the following steps' allocations are served at the planned offsets of
 *     one region, falling back to the heap (and counting it) when the sequence departs from the plan;
 *   - when the region is full: waits for pending frees, then memory from outside the region (ops).
 * Markers, waits and outside memory come from the caller's ops, so the same code runs on host memory
 * with fake markers (the tests) and on a GPU with CUDA events (cuda.c). Without ops, frees are immediate.
 */
typedef struct mo_dev_ops {
    void *ctx;
    /* A marker recorded on stream after the work queued on it so far; 0 when none could be recorded. */
    uint64_t (*record)(void *ctx, uint64_t stream);
    /* 1 when the marker's work is done, 0 while it is pending, negative on an error (taken as done). */
    int (*query)(void *ctx, uint64_t marker);
    /* Block until the marker's work is done; 0 on success. */
    int (*wait)(void *ctx, uint64_t marker);
    void (*release)(void *ctx, uint64_t marker);
    /* Optional (NULL): memory outside the region once it is full and no pending free makes room; 0 when
     * there is none. Freed through overflow_free once the streams that used it are done. */
    uint64_t (*overflow_alloc)(void *ctx, uint64_t nbytes);
    void (*overflow_free)(void *ctx, uint64_t address);
} mo_dev_ops;

/* The planned-offset value of an allocation the plan leaves to the heap (it outlives the recorded step). */
#define MO_UNPLANNED UINT64_MAX
/* Streams a block may name through mo_dev_record_stream besides the one it is freed on. */
#define MO_DEV_MAX_USES 4u

typedef struct mo_dev_stats {
    uint64_t capacity_bytes;       /* bytes of the region */
    uint64_t live_bytes;           /* bytes of the live allocations (heap, plan and overflow), each rounded up
                                    * to the alignment, as torch counts its allocated bytes */
    uint64_t peak_live_bytes;      /* highest live_bytes since creation or mo_dev_reset_peaks */
    uint64_t live_blocks;
    uint64_t reserved_bytes;       /* end of the highest region byte in use (live, pending, held back or
                                    * planned) plus the overflow bytes live: what the region must hold */
    uint64_t peak_reserved_bytes;  /* highest reserved_bytes since creation or mo_dev_reset_peaks */
    uint64_t pending_bytes;        /* heap and overflow bytes freed but waiting for their streams' work */
    uint64_t pending_blocks;
    uint64_t peak_pending_bytes;
    uint64_t deferred_frees;       /* frees that had to wait for a stream */
    uint64_t stream_reuses;        /* allocations given a block freed on their own stream while it waited */
    uint64_t markers_recorded;
    uint64_t marker_waits;         /* times an allocation blocked on a marker to find room */
    uint64_t marker_errors;        /* markers whose query or wait failed (taken as done) */
    uint64_t sync_frees;           /* frees done by waiting at once (no host memory to defer them) */
    uint64_t overflow_allocs;      /* allocations served outside the region */
    uint64_t overflow_bytes;       /* bytes live outside the region now */
    uint64_t failed_allocs;
    uint64_t plan_bytes;           /* bytes of the planned region; 0 without a plan */
    uint64_t plan_positions;       /* allocations in the plan (planned and unplanned) */
    uint64_t replay_steps;         /* steps begun with a plan armed */
    uint64_t planned_allocs;       /* allocations served at their planned offset */
    uint64_t fallback_allocs;      /* allocations of a replayed step served by the heap: another size than
                                    * the plan's next ones, past the plan's end, or their range still in use */
    uint64_t unplanned_allocs;     /* allocations the plan leaves to the heap */
    uint64_t stream_conflicts;     /* fallbacks because the planned range waited for another stream's work */
    uint64_t recorded_allocs;      /* allocations in the last recorded step */
    uint64_t recording;            /* 1 while a step is being recorded */
    uint64_t lowest_first;         /* 1 while the heap places blocks lowest first (mo_dev_set_lowest_first) */
    uint64_t size_departures;      /* fallbacks asking bytes no plan position near the cursor asks (or past its end) */
    uint64_t busy_departures;      /* fallbacks whose planned range still held a live planned block */
} mo_dev_stats_t;

#define MO_DEV_DEPARTURES 64u /* departures from a plan logged (mo_dev_departures) */

/* Why an allocation of a replayed step left the plan (mo_dev_departures). */
enum {
    MO_DEPART_SIZE = 1,   /* no position within the lookahead asks these bytes, or the plan's end was passed */
    MO_DEPART_BUSY = 2,   /* its position's range still holds a live planned block (one kept longer than recorded) */
    MO_DEPART_STREAM = 3, /* its range was freed on another stream whose work may still use it */
    MO_DEPART_NOMEM = 4   /* no host memory to split the planned ranges */
};

/* One departure from the plan: the replayed step it happened in (mo_dev_stats_t.replay_steps then), the plan
 * position the cursor was at (the position taken, for BUSY and STREAM), the bytes asked for and the bytes that
 * position was planned for (0 past the plan's end). */
typedef struct mo_departure {
    uint64_t step, position, nbytes, planned_nbytes, reason;
} mo_departure_t;

MO_API size_t mo_dev_stats_size(void);
/* A device pool over [base_address, base_address + capacity_bytes). base is the host address of the memory
 * when the arena may write it (flags as for mo_arena_create), else NULL. alignment (a power of two, at least
 * 16) applies to every block; ops (may be NULL) is copied. */
MO_API int mo_dev_create(uint64_t capacity_bytes, uint64_t base_address, void *base, uint64_t alignment,
                         uint32_t quarantine_blocks, uint32_t flags, uint64_t seed, const mo_dev_ops *ops,
                         uint64_t *handle_out);
/* Fails while allocations are live; waits for the pending frees. */
MO_API int mo_dev_destroy(uint64_t handle);
MO_API int mo_dev_alloc(uint64_t handle, uint64_t nbytes, uint64_t stream, uint64_t *address_out);
MO_API int mo_dev_free(uint64_t handle, uint64_t address, uint64_t stream);
/* The live block at address is used on stream too (torch's Tensor.record_stream): its free waits for it. */
MO_API int mo_dev_record_stream(uint64_t handle, uint64_t address, uint64_t stream);
/* Mark every pending free (a marker on each stream with open ones) and release those whose streams are
 * done; with wait != 0, wait for all of them first. */
MO_API int mo_dev_collect(uint64_t handle, int wait);
MO_API int mo_dev_record_begin(uint64_t handle);
/* Stops recording; *count_out: allocations recorded (the trace stays readable until the next begin). */
MO_API int mo_dev_record_end(uint64_t handle, uint64_t *count_out);
/* Copies the recorded trace: per allocation its bytes, and its lifetime [start, end) in events (one event
 * per allocation or free of the step); end is MO_UNPLANNED for one still live when recording ended. */
MO_API int mo_dev_trace(uint64_t handle, uint64_t count, uint64_t *nbytes, uint64_t *starts, uint64_t *ends);
/* Arms replay: position i of every following step is served at offsets[i] of a region of region_bytes
 * (carved from the heap at its lowest fitting address) when it asks for nbytes[i] bytes and the range is
 * free; MO_UNPLANNED leaves a position to the heap. */
MO_API int mo_dev_plan(uint64_t handle, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets,
                       uint64_t region_bytes);
/* The heap's free runs, by offset, once every pending free is done (waits for them) and the held-back
 * blocks are released: up to cap (offset, size) pairs, *count all of them. What a layout among the blocks
 * alive now (mo_dev_plan_at) must avoid is the rest. */
MO_API int mo_dev_free_runs(uint64_t handle, uint64_t cap, uint64_t *offsets, uint64_t *sizes, uint64_t *count);
/* As mo_dev_plan, with offsets in the pool inside n_regions regions (sorted, disjoint, multiples of the
 * alignment) that must be free in the heap now: each is reserved at its place, so a layout can fill the
 * gaps between the blocks alive when it is armed instead of a region above them. */
MO_API int mo_dev_plan_at(uint64_t handle, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets,
                          uint64_t n_regions, const uint64_t *region_offsets, const uint64_t *region_bytes);
/* With on != 0 the heap places each block at the lowest address that fits (O(blocks) an allocation, no slab
 * slots): for the steps before a replay is armed, so that the blocks they leave alive (optimizer state, say)
 * pack low instead of wherever a best fit found room, and the layout among them reserves little above. */
MO_API int mo_dev_set_lowest_first(uint64_t handle, int on);
/* Disarms replay and gives the regions back (fails while a planned block is live). */
MO_API int mo_dev_unplan(uint64_t handle);
/* The first departures from the armed plan (at most MO_DEV_DEPARTURES of them, in order; fallback_allocs counts
 * them all, size_departures, busy_departures and stream_conflicts by reason): up to cap are written to out and
 * *count says how many were logged. */
MO_API int mo_dev_departures(uint64_t handle, uint64_t cap, mo_departure_t *out, uint64_t *count);
/* A step begins: the next allocation is the plan's first. */
MO_API int mo_dev_step(uint64_t handle);
MO_API int mo_dev_check(uint64_t handle);
MO_API int mo_dev_stats(uint64_t handle, mo_dev_stats_t *out);
/* The heap arena's own counters (the planned region counts there as one live block). */
MO_API int mo_dev_arena_stats(uint64_t handle, mo_stats_t *out);
MO_API int mo_dev_reset_peaks(uint64_t handle);

/*
 * CUDA backend for torch.cuda.memory.CUDAPluggableAllocator. libcuda is opened at run time, so this
 * library loads on machines without CUDA; mo_cuda_init then fails with MO_E_CUDA.
 */
MO_API int mo_cuda_init(int device, uint64_t capacity_bytes, uint32_t quarantine_blocks, uint64_t seed,
                        uint64_t *handle_out, uint64_t *base_out);
MO_API int mo_cuda_shutdown(int device);
/* torch's malloc and free (the pluggable allocator's pair). A block freed on a stream is reused by another
 * stream only once a CUDA event recorded on it is done. */
MO_API void *mo_cuda_malloc(size_t nbytes, int device, void *stream);
MO_API void mo_cuda_free(void *ptr, size_t nbytes, int device, void *stream);
/* Tensor.record_stream for memory of this backend (torch's is a no-op under a pluggable allocator). */
MO_API int mo_cuda_record_stream(void *ptr, int device, void *stream);
/* process_wide != 0: every CUDA tensor comes from here (change_current_allocator), where torch cannot take
 * a NULL: a full region overflows to cuMemAlloc, and when the driver refuses too the process aborts with a
 * message. 0 (the default, inside a torch.cuda.MemPool): NULL, which torch turns into OutOfMemoryError. */
MO_API int mo_cuda_set_process_wide(int device, int process_wide);
/* The device pool behind a device's backend (for the mo_dev_* calls), or 0. */
MO_API uint64_t mo_cuda_pool(int device);
/* Frees torch asked for that the arena rejected (they cannot raise); the last one's message. */
MO_API uint64_t mo_cuda_rejected_frees(int device, char *message, size_t message_bytes);

#ifdef __cplusplus
}
#endif

#endif /* MOALLOC_H */
