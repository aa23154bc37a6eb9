/* Internal layout of an arena, shared by the core (core.c, arena.c) and the handle layer (api.c). */
#ifndef MOALLOC_INTERNAL_H
#define MOALLOC_INTERNAL_H

#include "moalloc.h"

#define MO_NIL 0xFFFFFFFFu
#define MO_SL_LOG2 5
#define MO_SL_COUNT (1u << MO_SL_LOG2)
#define MO_FL_COUNT 64

enum { MO_STATE_FREE = 0, MO_STATE_USED = 1, MO_STATE_QUARANTINED = 2, MO_STATE_CACHED = 3 };

/* Small-block cache: a freed block whose span is at most MO_CACHE_MAX_SPAN stays whole (and in the
 * hash table) on a per-span LIFO stack, so the next request of that span skips the TLSF split, the
 * merge and two hash-table updates. Blocks reach it only after the quarantine. */
#define MO_CACHE_MAX_SPAN 1024u
#define MO_CACHE_CLASSES (MO_CACHE_MAX_SPAN / 16u)
#define MO_CACHE_DEPTH 16u

/* One block of the arena, free or not. Blocks tile [0, capacity) in address order. */
typedef struct mo_node {
    uint64_t offset;
    uint64_t size; /* span in bytes, a multiple of the granule */
    /* A free block needs its list links, any other its allocation number, never both: sharing the
     * space keeps a node at 40 bytes, and more of them in cache. */
    union {
        struct {
            uint32_t prev_free; /* segregated free list; next_free also chains unused nodes */
            uint32_t next_free;
        };
        uint64_t serial; /* allocation number << 32 | node index, of a used, quarantined or cached block */
    };
    uint32_t prev_phys; /* neighbours in address order */
    uint32_t next_phys;
    uint8_t slack;      /* span - requested bytes of a used block (< granule + canary bytes) */
    uint8_t state;
} mo_node;

typedef struct mo_arena {
    uint64_t capacity;
    uint64_t align_cap; /* power of two >= capacity: larger alignments only ever admit offset 0 */
    uint8_t *base;
    uint32_t flags;
    uint64_t canary_key;
    uint8_t poison_byte;

    mo_node *nodes;
    uint32_t node_cap;    /* nodes allocated */
    uint32_t node_used;   /* nodes ever handed out (high-water index) */
    uint32_t spare_head;  /* chain of recycled nodes */
    uint32_t spare_count;
    uint32_t phys_head;   /* the block at offset 0 */

    /* Open addressing over the blocks that are not free (used, quarantined, cached): keys are
     * offset / granule + 1 (0 marks an empty slot), values node indices. Keys sit apart from the
     * nodes so probing never touches a node. */
    uint64_t *hash_keys;
    uint32_t *hash_vals;
    uint32_t hash_bits;
    uint64_t hash_count;

    uint32_t *quarantine; /* FIFO ring of node indices */
    uint32_t q_cap, q_head, q_count;

    uint64_t fl_bitmap;
    uint32_t sl_bitmap[MO_FL_COUNT];
    uint32_t heads[MO_FL_COUNT][MO_SL_COUNT];

    uint32_t cache[MO_CACHE_CLASSES][MO_CACHE_DEPTH];
    uint8_t cache_count[MO_CACHE_CLASSES];

    uint64_t serial;      /* allocations so far: the high half of the serials handed out */
    mo_stats_t st;        /* counters kept up to date on every change */
} mo_arena;

/* api.c */
int mo_fail(int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* core.c: TLSF lists, node pool, hash table, split and merge. None of them lock. */
mo_arena *mo_core_new(uint64_t capacity, void *base, uint32_t quarantine_blocks, uint32_t flags, uint64_t seed);
void mo_core_delete(mo_arena *a);
int mo_core_reserve(mo_arena *a, uint32_t nodes_needed);
void mo_core_insert_free(mo_arena *a, uint32_t idx);
void mo_core_remove_free(mo_arena *a, uint32_t idx);
uint32_t mo_core_find_fast(const mo_arena *a, uint64_t size);
uint32_t mo_core_find_exhaustive(const mo_arena *a, uint64_t span, uint64_t align, uint64_t need);
void mo_core_carve(mo_arena *a, uint32_t idx, uint64_t start, uint64_t span);
void mo_core_release(mo_arena *a, uint32_t idx);
uint32_t mo_core_hash_find(const mo_arena *a, uint64_t offset);
void mo_core_hash_insert(mo_arena *a, uint32_t idx);
void mo_core_hash_remove(mo_arena *a, uint64_t offset);
void mo_core_mapping(uint64_t size, uint32_t *fl, uint32_t *sl);
uint64_t mo_core_metadata_bytes(const mo_arena *a);

/* arena.c: the checked operations. */
int mo_arena_alloc(mo_arena *a, uint64_t nbytes, uint64_t alignment, uint64_t *offset, uint64_t *span,
                   uint64_t *serial);
int mo_arena_free(mo_arena *a, uint64_t offset, uint64_t serial);
int mo_arena_query(const mo_arena *a, uint64_t offset, uint64_t serial, uint64_t *nbytes, uint64_t *span);
int mo_arena_check(const mo_arena *a);
void mo_arena_stats(const mo_arena *a, mo_stats_t *out);

static inline uint64_t mo_round_up(uint64_t x, uint64_t align) { return (x + align - 1) & ~(align - 1); }

#endif /* MOALLOC_INTERNAL_H */
