/* Internal layout of an arena, shared by the core (core.c, arena.c) and the handle layer (api.c). */
#ifndef MOALLOC_INTERNAL_H
#define MOALLOC_INTERNAL_H

#include "moalloc.h"

#define MO_NIL 0xFFFFFFFFu
#define MO_SL_LOG2 5
#define MO_SL_COUNT (1u << MO_SL_LOG2)
#define MO_FL_COUNT 64

/* A SLAB node is a block carved for a small-object slab; its `serial` field holds the slab's index. */
enum { MO_STATE_FREE = 0, MO_STATE_USED = 1, MO_STATE_QUARANTINED = 2, MO_STATE_SLAB = 3 };

/* Small-object layer. A request whose span is at most MO_SLAB_MAX_SPAN (and a multiple of its
 * alignment) takes a slot of a slab: a block of the TLSF core cut into equal slots of one span, sized
 * for about MO_SLAB_TARGET_SLOTS slots (a power of two, at most MO_SLAB_MAX_BYTES) and placed at a
 * multiple of its size. A slab keeps two bitmaps and 3 bytes a slot out of band, where a block of its
 * own costs a 40-byte node and a hash slot, so tiny blocks no longer cost more metadata than memory;
 * sizing slabs by slot count keeps the half-used last slab of each class small. An offset finds its
 * slab by rounding down to each slab size in turn, without a per-slot table. */
#define MO_SLAB_MAX_SPAN MO_SMALL_MAX_SPAN_BYTES
#define MO_SLAB_CLASSES (MO_SLAB_MAX_SPAN / 16u)
#define MO_SLAB_TARGET_SLOTS 64u
#define MO_SLAB_MIN_BYTES 1024u /* MO_SLAB_TARGET_SLOTS granules */
#define MO_SLAB_MAX_BYTES 16384u
/* A quarantine entry or a serial's low half with this bit names a slab slot (MO_SLOT_REF | slab <<
 * MO_SLOT_BITS | slot), not a node. */
#define MO_SLOT_REF 0x80000000u
#define MO_SLOT_BITS 7u /* a slot index: a slab has fewer than 2 * MO_SLAB_TARGET_SLOTS slots */
#define MO_MAX_SLABS (1u << (31u - MO_SLOT_BITS))
_Static_assert(2u * MO_SLAB_TARGET_SLOTS <= (1u << MO_SLOT_BITS), "a slot index (below 2 * MO_SLAB_TARGET_SLOTS) must fit MO_SLOT_BITS");
_Static_assert(MO_SLAB_MAX_SPAN / MO_GRANULE_BYTES == MO_SLAB_CLASSES, "one slab class per granule count");

/* Bytes of a slab of span-byte slots: the power of two at or above MO_SLAB_TARGET_SLOTS slots. */
static inline uint64_t mo_slab_bytes(uint64_t span) {
    uint64_t want = span * MO_SLAB_TARGET_SLOTS, bytes = MO_SLAB_MIN_BYTES;
    while (bytes < want && bytes < MO_SLAB_MAX_BYTES) bytes <<= 1;
    return bytes;
}

/* Slot cache: a slot that leaves use (after the quarantine) waits on a per-class LIFO stack of this
 * depth, still marked taken, so the next request of its span gets it back without a bitmap search,
 * and a slab does not empty and refill at every allocate-free cycle. */
#define MO_CACHE_DEPTH 16u

typedef struct mo_slab {
    uint64_t start;
    uint64_t taken_map[2]; /* slots not free (live or held back); bits past the last slot set too */
    uint32_t node;         /* the TLSF block the slab occupies */
    uint32_t next;         /* the class's list of slabs with a free slot */
    uint32_t prev;
    uint16_t span;
    uint8_t slots;         /* fewer than 2 * MO_SLAB_TARGET_SLOTS */
    uint8_t live;          /* slots holding live blocks */
    uint8_t taken;         /* slots live or held back (in quarantine or in the slot cache) */
    uint8_t cls;
    /* 3 bytes a slot: the low 16 bits of its block's allocation number (tells a stale handle from the
     * block now in the slot), then the slack (span - requested bytes, below 32) with MO_SLOT_HELD set
     * while the slot is held back. */
    uint8_t meta[];
} mo_slab;

#define MO_SLOT_HELD 0x80u
#define MO_SLOT_SLACK 0x7Fu

static inline uint8_t *mo_slot_meta(mo_slab *s, uint32_t k) { return s->meta + 3u * k; }
static inline uint16_t mo_slot_gen(mo_slab *s, uint32_t k) {
    const uint8_t *m = mo_slot_meta(s, k);
    return (uint16_t)(m[0] | m[1] << 8);
}
static inline uint8_t mo_slot_slack(mo_slab *s, uint32_t k) { return mo_slot_meta(s, k)[2] & MO_SLOT_SLACK; }
static inline int mo_slot_held(mo_slab *s, uint32_t k) { return (mo_slot_meta(s, k)[2] & MO_SLOT_HELD) != 0; }
static inline void mo_slot_hold(mo_slab *s, uint32_t k) { mo_slot_meta(s, k)[2] |= MO_SLOT_HELD; }
static inline void mo_slot_unhold(mo_slab *s, uint32_t k) { mo_slot_meta(s, k)[2] &= MO_SLOT_SLACK; }
static inline int mo_slot_taken(const mo_slab *s, uint32_t k) { return (int)(s->taken_map[k >> 6] >> (k & 63u) & 1u); }
static inline int mo_slot_live(mo_slab *s, uint32_t k) { return mo_slot_taken(s, k) && !mo_slot_held(s, k); }

/* floor(2**32 / span) + 1 for each class: slot index = (offset - start) * recip >> 32, exact for any
 * offset inside a slab (filled once at load time). */
extern uint32_t mo_slab_recip[MO_SLAB_CLASSES];

/* One block of the arena, free or not. Blocks tile [0, capacity) in address order. */
typedef struct mo_node {
    uint64_t offset;
    uint64_t size; /* span in bytes, a multiple of the granule */
    /* A free block needs its list links, any other its allocation number (a slab: its slab index),
     * never both: sharing the space keeps a node at 40 bytes, and more of them in cache. */
    union {
        struct {
            uint32_t prev_free; /* segregated free list; next_free also chains unused nodes */
            uint32_t next_free;
        };
        uint64_t serial; /* allocation number << 32 | node index, of a used or quarantined block */
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
    uint64_t check_key;  /* keys the handle checks mo_alloc hands out */
    uint8_t poison_byte;

    mo_node *nodes;
    uint32_t node_cap;    /* nodes allocated */
    uint32_t node_used;   /* nodes ever handed out (high-water index) */
    uint32_t spare_head;  /* chain of recycled nodes */
    uint32_t spare_count;
    uint32_t phys_head;   /* the block at offset 0 */

    /* Open addressing over the blocks that are not free (used, quarantined, slabs): keys are
     * offset / granule + 1 (0 marks an empty slot), values node indices. Keys sit apart from the
     * nodes so probing never touches a node. */
    uint64_t *hash_keys;
    uint32_t *hash_vals;
    uint32_t hash_bits;
    uint64_t hash_count;

    uint32_t *quarantine; /* FIFO ring of node indices and MO_SLOT_REF | slab << MO_SLOT_BITS | slot entries */
    uint32_t q_cap, q_head, q_count;

    uint64_t fl_bitmap;
    uint32_t fl_count; /* first levels the capacity needs: heads has this many rows */
    uint32_t sl_bitmap[MO_FL_COUNT];
    uint32_t (*heads)[MO_SL_COUNT];

    mo_slab **slabs;       /* by index; NULL for a free record */
    uint32_t *slab_spare;  /* stack of free indices below slab_used */
    uint32_t slab_cap, slab_used, slab_spare_count;
    uint64_t slab_bytes;   /* host bytes of the slab records themselves */
    uint32_t partial[MO_SLAB_CLASSES]; /* per class: head of the list of slabs with a free slot */
    uint32_t cache[MO_SLAB_CLASSES][MO_CACHE_DEPTH]; /* slot references (MO_SLOT_REF | slab << MO_SLOT_BITS | slot) */
    uint8_t cache_count[MO_SLAB_CLASSES];

    uint64_t serial;      /* allocations so far: the high half of the serials handed out */
    mo_stats_t st;        /* counters kept up to date on every change */
} mo_arena;

/* api.c */
/* Take an arena out of the handle table (its handle stops working) and hand its core to the caller. */
mo_arena *mo_api_detach(uint64_t handle);
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
void mo_core_note_metadata(mo_arena *a);
uint32_t mo_core_slab_new(mo_arena *a, uint32_t cls);
void mo_core_slab_drop(mo_arena *a, uint32_t si);

/* arena.c: the checked operations. */
/* A block's handle as the caller passes it back: mo_alloc's four values, each 0 when unknown but the offset. */
typedef struct mo_handle {
    uint64_t offset, nbytes, serial, check;
} mo_handle;

int mo_arena_alloc(mo_arena *a, uint64_t nbytes, uint64_t alignment, uint64_t *offset, uint64_t *span,
                   uint64_t *serial, uint64_t *check);
int mo_arena_alloc_lowest(mo_arena *a, uint64_t nbytes, uint64_t alignment, int release_held, uint64_t *offset,
                          uint64_t *span, uint64_t *serial);
int mo_arena_alloc_at(mo_arena *a, uint64_t offset, uint64_t nbytes, uint64_t *span, uint64_t *serial);
int mo_arena_free_runs(mo_arena *a, uint64_t cap, uint64_t *offsets, uint64_t *sizes, uint64_t *count);
uint64_t mo_arena_extent(const mo_arena *a);
int mo_arena_free(mo_arena *a, mo_handle h);
int mo_arena_query(const mo_arena *a, mo_handle h, uint64_t *nbytes, uint64_t *span);
int mo_arena_check(const mo_arena *a);
void mo_arena_stats(const mo_arena *a, mo_stats_t *out);

static inline uint64_t mo_round_up(uint64_t x, uint64_t align) { return (x + align - 1) & ~(align - 1); }

#endif /* MOALLOC_INTERNAL_H */
