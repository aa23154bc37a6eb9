/*
 * Checked allocation and free over the TLSF core and its small-object slabs: argument validation,
 * classification of bad frees, the quarantine, canaries and poison, the invariant walk and
 * statistics. Every operation validates and reserves metadata before it changes anything, so a
 * rejected call leaves the arena untouched.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moalloc_internal.h"

typedef unsigned long long ull;
static inline uint8_t canary_byte(const mo_arena *a, uint64_t pos) {
    return (uint8_t)(a->canary_key >> ((pos & 7u) * 8u));
}

/* The 8 canary bytes starting at pos as one word: the key rotated so that every byte is still
 * canary_byte() of its own offset, whatever the alignment of pos. */
static inline uint64_t canary_word(const mo_arena *a, uint64_t pos) {
    uint32_t r = (uint32_t)(pos & 7u) * 8u;
    uint64_t w = (a->canary_key >> r) | (a->canary_key << ((64u - r) & 63u));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

/*
 * The guard of a block starts at the first byte past its requested bytes. Its first
 * MO_CANARY_MIN_BYTES bytes -- one 8-byte word, wherever it starts -- are the canary proper: written
 * on allocation and compared on free and by check() with one unaligned store and one load, which is
 * all a one-byte (or any contiguous) overflow needs to be caught. The rest of the slack, up to the
 * granule boundary, is rounding; filling it too used to cost a per-byte loop (and then two more
 * words, often on another cache line), so it is guarded only with poison on, the opt-in mode that
 * already pays for touching whole blocks.
 */
static inline void store_word(uint8_t *p, uint64_t w) { memcpy(p, &w, 8); }

static inline uint64_t load_word(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* End of the guarded bytes of a block whose guard is [from, to). */
static inline uint64_t guard_end(const mo_arena *a, uint64_t from, uint64_t to) {
    return (a->flags & MO_F_POISON) ? to : from + MO_CANARY_MIN_BYTES;
}

static inline void write_canary(mo_arena *a, uint64_t from, uint64_t to) {
    store_word(a->base + from, canary_word(a, from));
    /* Poison on: the rest of the slack, by aligned words (to is a granule boundary; at most two). */
    if (a->flags & MO_F_POISON)
        for (uint64_t p = to - 8u; p > from; p -= 8u) store_word(a->base + p, canary_word(a, p));
}

/* Offset of the first guarded byte in [from, to) that is not the canary, or `to`. */
static inline uint64_t find_bad_canary(const mo_arena *a, uint64_t from, uint64_t to) {
    const uint8_t *m = a->base;
    uint64_t diff = load_word(m + from) ^ canary_word(a, from);
    if (a->flags & MO_F_POISON)
        for (uint64_t p = to - 8u; p > from; p -= 8u) diff |= load_word(m + p) ^ canary_word(a, p);
    if (__builtin_expect(diff == 0, 1)) return to;
    /* Rare: name the first bad byte for the message. */
    for (uint64_t p = from, stop = guard_end(a, from, to); p < stop; p++)
        if (m[p] != canary_byte(a, p)) return p;
    return to;
}

static int canaries_on(const mo_arena *a) { return (a->flags & MO_F_CANARIES) && a->base; }
static int poison_on(const mo_arena *a) { return (a->flags & MO_F_POISON) && a->base; }
/* Freed slab slots are filled: the poison byte (verified on reuse and by check), or zero under
 * MO_F_ZERO_SMALL (verified by check only: a pass over every reused slot cost more than the zeroing). */
static inline int slots_filled(const mo_arena *a) { return (a->flags & (MO_F_POISON | MO_F_ZERO_SMALL)) && a->base; }
static inline uint8_t fill_byte(const mo_arena *a) { return (a->flags & MO_F_POISON) ? a->poison_byte : 0; }
/* Whether a block of this span is filled when freed: every block with poison, small ones when zeroing. */
static inline int filled_when_freed(const mo_arena *a, uint64_t span) {
    return poison_on(a) || (slots_filled(a) && span <= MO_SMALL_MAX_SPAN_BYTES);
}

static uint64_t find_bad_fill(const mo_arena *a, uint64_t from, uint64_t to) {
    const uint8_t *m = a->base;
    uint8_t b = fill_byte(a);
    uint64_t word = 0x0101010101010101ull * b, p = from;
    for (; p < to && (p & 7u); p++)
        if (m[p] != b) return p;
    for (; p + 8 <= to; p += 8)
        if (load_word(m + p) != word) break;
    for (; p < to; p++)
        if (m[p] != b) return p;
    return to;
}

static int verify_poison(const mo_arena *a, uint64_t start, uint64_t span) {
    uint64_t bad = find_bad_fill(a, start, start + span);
    if (bad == start + span) return MO_OK;
    return mo_fail(MO_E_CORRUPTION,
                   "freed memory was written after free: byte at offset %llu differs from the poison pattern "
                   "(found while reusing [%llu, %llu))",
                   (ull)bad, (ull)start, (ull)(start + span));
}

/* -- small-object slabs ----------------------------------------------------------------------------- */

static inline uint32_t ref_slab(uint32_t ref) { return (ref & ~MO_SLOT_REF) >> MO_SLOT_BITS; }
static inline uint32_t ref_slot(uint32_t ref) { return ref & ((1u << MO_SLOT_BITS) - 1u); }
static inline uint32_t slot_ref(uint32_t si, uint32_t k) { return MO_SLOT_REF | si << MO_SLOT_BITS | k; }

static inline int slab_eligible(uint64_t span, uint64_t align) {
    return span <= MO_SLAB_MAX_SPAN && (span & (align - 1)) == 0;
}


static void partial_push(mo_arena *a, uint32_t si) {
    mo_slab *s = a->slabs[si];
    uint32_t head = a->partial[s->cls];
    s->prev = MO_NIL;
    s->next = head;
    if (head != MO_NIL) a->slabs[head]->prev = si;
    a->partial[s->cls] = si;
}

static void partial_remove(mo_arena *a, uint32_t si) {
    mo_slab *s = a->slabs[si];
    if (s->prev != MO_NIL) a->slabs[s->prev]->next = s->next;
    else a->partial[s->cls] = s->next;
    if (s->next != MO_NIL) a->slabs[s->next]->prev = s->prev;
    s->next = s->prev = MO_NIL;
}

/* An empty slab goes back to the free lists (with poison on, its slots are poisoned already, as free memory is). */
static void release_slab(mo_arena *a, uint32_t si) {
    mo_slab *s = a->slabs[si];
    partial_remove(a, si);
    a->st.cached_blocks -= s->slots;
    a->st.cached_bytes -= (uint64_t)s->slots * s->span;
    mo_core_hash_remove(a, s->start);
    mo_core_release(a, s->node);
    mo_core_slab_drop(a, si);
}

/* Slot k of slab si has just left use or the quarantine. A slab that empties while its class has
 * another slab with a free slot goes back to the free lists; so each class keeps at most one empty
 * slab, and a block allocated and freed in a loop does not make and unmake a slab every time. */
static void slot_released(mo_arena *a, uint32_t si, uint32_t k) {
    mo_slab *s = a->slabs[si];
    s->taken_map[k >> 6] &= ~(1ull << (k & 63u));
    a->st.cached_blocks++;
    a->st.cached_bytes += s->span;
    if (s->taken-- == s->slots) partial_push(a, si);
    if (s->taken == 0 && (s->prev != MO_NIL || s->next != MO_NIL)) release_slab(a, si);
}

/* Slot k of slab s (index si), already marked taken and not held, becomes a live block of nbytes. */
static inline __attribute__((always_inline)) void commit_slot(mo_arena *a, mo_slab *s, uint32_t si, uint32_t k,
                                                              uint64_t nbytes, uint64_t *offset, uint64_t *span_out,
                                                              uint64_t *serial) {
    uint64_t span = s->span, start = s->start + k * span;
    s->live++;
    if ((++a->serial & 0xFFFFFFFFu) == 0) ++a->serial;
    uint8_t *meta = mo_slot_meta(s, k);
    meta[0] = (uint8_t)a->serial;
    meta[1] = (uint8_t)(a->serial >> 8);
    meta[2] = (uint8_t)(span - nbytes);
    if (canaries_on(a)) write_canary(a, start + nbytes, start + span);
    a->st.cached_blocks--;
    a->st.cached_bytes -= span;
    a->st.allocated_bytes += span;
    a->st.requested_bytes += nbytes;
    a->st.live_blocks++;
    a->st.alloc_count++;
    if (a->st.allocated_bytes > a->st.peak_bytes) a->st.peak_bytes = a->st.allocated_bytes;
    *offset = start;
    *span_out = span;
    *serial = (a->serial << 32) | slot_ref(si, k);
}

/* Hand out a free slot of slab si (which has one). */
static int take_slot(mo_arena *a, uint32_t si, uint64_t nbytes, uint64_t *offset, uint64_t *span_out, uint64_t *serial) {
    mo_slab *s = a->slabs[si];
    uint32_t w = s->taken_map[0] == ~0ull; /* the slab has a free slot */
    uint64_t free_bits = ~s->taken_map[w];
    uint32_t k = w * 64u + (uint32_t)__builtin_ctzll(free_bits);
    if (poison_on(a)) {
        int rc = verify_poison(a, s->start + k * s->span, s->span);
        if (rc != MO_OK) return rc;
    }
    s->taken_map[w] |= free_bits & -free_bits;
    if (++s->taken == s->slots) partial_remove(a, si);
    commit_slot(a, s, si, k, nbytes, offset, span_out, serial);
    return MO_OK;
}

/* Hand out the slot last put in the cache of class cls (which has one). */
static inline __attribute__((always_inline)) int take_cached(mo_arena *a, uint32_t cls, uint64_t nbytes,
                                                             uint64_t *offset, uint64_t *span_out, uint64_t *serial) {
    uint32_t ref = a->cache[cls][a->cache_count[cls] - 1u], si = ref_slab(ref), k = ref_slot(ref);
    mo_slab *s = a->slabs[si];
    if (poison_on(a)) {
        int rc = verify_poison(a, s->start + k * s->span, s->span);
        if (rc != MO_OK) return rc;
    }
    a->cache_count[cls]--;
    commit_slot(a, s, si, k, nbytes, offset, span_out, serial);
    return MO_OK;
}

/* Slot k of slab si, held (its held bit set), leaves use or the quarantine: onto its class's cache
 * while that has room, else back to the slab. */
static inline __attribute__((always_inline)) void retire_slot(mo_arena *a, uint32_t si, uint32_t k) {
    mo_slab *s = a->slabs[si];
    if (a->cache_count[s->cls] < MO_CACHE_DEPTH) {
        a->cache[s->cls][a->cache_count[s->cls]++] = slot_ref(si, k);
        a->st.cached_blocks++;
        a->st.cached_bytes += s->span;
        return;
    }
    mo_slot_unhold(s, k);
    slot_released(a, si, k);
}

/* Carve a new slab of class cls from free block idx at start; returns its index or MO_NIL (NOMEM). */
static uint32_t make_slab(mo_arena *a, uint32_t cls, uint32_t idx, uint64_t start) {
    if (mo_core_reserve(a, 2) != MO_OK) return MO_NIL;
    uint32_t si = mo_core_slab_new(a, cls);
    if (si == MO_NIL) return MO_NIL;
    mo_slab *s = a->slabs[si];
    uint64_t bytes = mo_slab_bytes(s->span);
    mo_core_carve(a, idx, start, bytes);
    /* Free slots hold the fill of freed memory from the start, as check() expects. */
    if (slots_filled(a) && !poison_on(a)) memset(a->base + start, 0, bytes);
    a->nodes[idx].state = MO_STATE_SLAB;
    a->nodes[idx].serial = si;
    mo_core_hash_insert(a, idx);
    s->start = start;
    s->node = idx;
    partial_push(a, si);
    a->st.cached_blocks += s->slots;
    a->st.cached_bytes += (uint64_t)s->slots * s->span;
    if (start + bytes > a->st.high_water_bytes) a->st.high_water_bytes = start + bytes;
    return si;
}

/* The free block that holds span bytes at align, or MO_NIL. */
static uint32_t find_free(const mo_arena *a, uint64_t span, uint64_t align) {
    uint64_t need = span + (align > MO_GRANULE_BYTES ? align - MO_GRANULE_BYTES : 0);
    uint32_t idx = mo_core_find_fast(a, need);
    return idx != MO_NIL ? idx : mo_core_find_exhaustive(a, span, align, need);
}

/* -- allocation ------------------------------------------------------------------------------------- */

/* A quarantined block (node index or slot reference) leaves the quarantine for good. */
static inline void release_ref(mo_arena *a, uint32_t ref) {
    if (ref & MO_SLOT_REF) {
        a->st.quarantined_bytes -= a->slabs[ref_slab(ref)]->span;
        a->st.quarantined_blocks--;
        retire_slot(a, ref_slab(ref), ref_slot(ref));
    } else {
        a->st.quarantined_bytes -= a->nodes[ref].size;
        a->st.quarantined_blocks--;
        mo_core_hash_remove(a, a->nodes[ref].offset);
        mo_core_release(a, ref);
    }
}

/* Release every held-back block: the quarantine, the slot caches, then every empty slab, so that they can merge. */
static void flush_held(mo_arena *a) {
    while (a->q_count) {
        uint32_t ref = a->quarantine[a->q_head];
        if (++a->q_head == a->q_cap) a->q_head = 0;
        a->q_count--;
        release_ref(a, ref);
    }
    for (uint32_t c = 0; c < MO_SLAB_CLASSES; c++) {
        while (a->cache_count[c]) {
            uint32_t ref = a->cache[c][--a->cache_count[c]];
            mo_slab *s = a->slabs[ref_slab(ref)];
            mo_slot_unhold(s, ref_slot(ref));
            a->st.cached_blocks--;
            a->st.cached_bytes -= s->span;
            slot_released(a, ref_slab(ref), ref_slot(ref));
        }
    }
    for (uint32_t c = 0; c < MO_SLAB_CLASSES; c++) {
        for (uint32_t si = a->partial[c]; si != MO_NIL;) {
            uint32_t next = a->slabs[si]->next;
            if (a->slabs[si]->taken == 0) release_slab(a, si);
            si = next;
        }
    }
    a->st.quarantine_flushes++;
}

/* Whether the request would fit once flush_held ran: a slab of its class that keeps a live block and
 * has a slot not in use, or a run of free, quarantined and emptied blocks that holds the span. */
static int fits_after_flush(const mo_arena *a, uint64_t span, uint64_t align, int eligible) {
    if (eligible) {
        uint32_t cls = (uint32_t)(span / MO_GRANULE_BYTES) - 1u;
        for (uint32_t si = 0; si < a->slab_used; si++) {
            const mo_slab *s = a->slabs[si];
            if (s && s->cls == cls && s->live && s->live < s->slots) return 1;
        }
    }
    uint32_t i = a->phys_head;
    while (i != MO_NIL) {
        const mo_node *n = &a->nodes[i];
        int gone = n->state == MO_STATE_FREE || n->state == MO_STATE_QUARANTINED ||
                   (n->state == MO_STATE_SLAB && a->slabs[n->serial]->live == 0);
        if (!gone) {
            i = n->next_phys;
            continue;
        }
        uint64_t begin = n->offset, end = begin;
        while (i != MO_NIL) {
            n = &a->nodes[i];
            if (!(n->state == MO_STATE_FREE || n->state == MO_STATE_QUARANTINED ||
                  (n->state == MO_STATE_SLAB && a->slabs[n->serial]->live == 0)))
                break;
            end = n->offset + n->size;
            i = n->next_phys;
        }
        if (mo_round_up(begin, align) + span <= end) return 1;
    }
    return 0;
}

/* Mark block idx (already at its place, in the hash table) used for nbytes of its span. */
static inline __attribute__((always_inline)) void commit_used(mo_arena *a, uint32_t idx, uint64_t nbytes,
                                                              uint64_t *offset, uint64_t *span_out, uint64_t *serial) {
    mo_node *n = &a->nodes[idx];
    uint64_t start = n->offset, span = n->size;
    n->state = MO_STATE_USED;
    n->slack = (uint8_t)(span - nbytes);
    /* The serial carries the node index in its low half, so a free that passes it back finds the
     * node without a hash-table probe; the high half counts allocations (never 0). */
    if ((++a->serial & 0xFFFFFFFFu) == 0) ++a->serial;
    n->serial = (a->serial << 32) | idx;
    if (canaries_on(a)) write_canary(a, start + nbytes, start + span);
    a->st.allocated_bytes += span;
    a->st.requested_bytes += nbytes;
    a->st.live_blocks++;
    a->st.alloc_count++;
    if (a->st.allocated_bytes > a->st.peak_bytes) a->st.peak_bytes = a->st.allocated_bytes;
    if (start + span > a->st.high_water_bytes) a->st.high_water_bytes = start + span;
    *offset = start;
    *span_out = span;
    *serial = n->serial;
}

/* Cut a used block of span bytes for nbytes at start in free node idx (poisoned memory verified first);
 * nothing changes unless MO_OK. */
static inline int place_at(mo_arena *a, uint32_t idx, uint64_t start, uint64_t nbytes, uint64_t span, uint64_t *offset,
                           uint64_t *span_out, uint64_t *serial) {
    if (poison_on(a)) {
        int rc = verify_poison(a, start, span);
        if (rc != MO_OK) return rc;
    }
    int rc = mo_core_reserve(a, 2);
    if (rc != MO_OK) return rc;
    mo_core_carve(a, idx, start, span);
    mo_core_hash_insert(a, idx);
    commit_used(a, idx, nbytes, offset, span_out, serial);
    return MO_OK;
}

/* place_at the first multiple of align in free node idx. */
static inline int place(mo_arena *a, uint32_t idx, uint64_t nbytes, uint64_t span, uint64_t align, uint64_t *offset,
                        uint64_t *span_out, uint64_t *serial) {
    return place_at(a, idx, mo_round_up(a->nodes[idx].offset, align), nbytes, span, offset, span_out, serial);
}

/* One attempt without releasing anything (the caller tried the slot cache): a free slot of one of the
 * class's slabs, else a new slab, else a block of its own. MO_E_EXHAUSTED (with no message) when nothing fits; nothing changes unless MO_OK. */
static int try_alloc(mo_arena *a, uint64_t nbytes, uint64_t span, uint64_t align, int eligible, uint64_t *offset,
                     uint64_t *span_out, uint64_t *serial) {
    if (eligible) {
        uint32_t cls = (uint32_t)(span / MO_GRANULE_BYTES) - 1u;
        if (a->partial[cls] != MO_NIL) return take_slot(a, a->partial[cls], nbytes, offset, span_out, serial);
        /* A slab starts at a multiple of its size (which is at most the capacity, so at most align_cap). */
        uint64_t bytes = mo_slab_bytes(span), salign = bytes;
        uint32_t idx = MO_NIL;
        if (bytes <= a->capacity) {
            /* Exact-fit lists first: a slab's size is its alignment, so the hole a released slab left
             * is found there, while the padded fast search would only look at larger blocks. */
            uint64_t need = bytes + salign - MO_GRANULE_BYTES;
            idx = mo_core_find_exhaustive(a, bytes, salign, need);
            if (idx == MO_NIL) idx = mo_core_find_fast(a, need);
        }
        if (idx != MO_NIL) {
            uint64_t start = mo_round_up(a->nodes[idx].offset, salign);
            if (poison_on(a)) { /* the slot about to be handed out, before anything changes */
                int rc = verify_poison(a, start, span);
                if (rc != MO_OK) return rc;
            }
            uint32_t si = make_slab(a, cls, idx, start);
            return si == MO_NIL ? MO_E_NOMEM : take_slot(a, si, nbytes, offset, span_out, serial);
        }
    }
    uint32_t idx = find_free(a, span, align);
    if (idx == MO_NIL) return MO_E_EXHAUSTED;
    return place(a, idx, nbytes, span, align, offset, span_out, serial);
}

static inline __attribute__((always_inline)) int alloc_block(mo_arena *a, uint64_t nbytes, uint64_t alignment,
                                                             uint64_t *offset, uint64_t *span_out, uint64_t *serial) {
    if (nbytes == 0) return mo_fail(MO_E_INVALID_ARG, "size 0 requested; ask for at least 1 byte");
    if (alignment == 0 || (alignment & (alignment - 1)))
        return mo_fail(MO_E_INVALID_ARG, "alignment %llu is not a power of two; use e.g. 256", (ull)alignment);
    if (nbytes > a->capacity)
        return mo_fail(MO_E_EXHAUSTED, "request of %llu bytes exceeds the capacity of %llu bytes", (ull)nbytes,
                       (ull)a->capacity);
    uint64_t align = alignment < MO_GRANULE_BYTES ? MO_GRANULE_BYTES : alignment;
    if (align > a->align_cap) align = a->align_cap;
    uint64_t guard = canaries_on(a) ? MO_CANARY_MIN_BYTES : 0;
    uint64_t span = mo_round_up(nbytes + guard, MO_GRANULE_BYTES);
    if (span > a->capacity)
        return mo_fail(MO_E_EXHAUSTED, "request of %llu bytes (%llu with guard bytes) exceeds the capacity of %llu bytes",
                       (ull)nbytes, (ull)span, (ull)a->capacity);
    int eligible = slab_eligible(span, align);
    if (eligible) { /* the common case first: a slot of this span waits in the cache */
        uint32_t cls = (uint32_t)(span / MO_GRANULE_BYTES) - 1u;
        if (a->cache_count[cls]) return take_cached(a, cls, nbytes, offset, span_out, serial);
    }
    int rc = try_alloc(a, nbytes, span, align, eligible, offset, span_out, serial);
    if (rc != MO_E_EXHAUSTED) return rc;
    if (!fits_after_flush(a, span, align, eligible))
        return mo_fail(MO_E_EXHAUSTED,
                       "no free block holds %llu bytes at alignment %llu (free %llu of %llu bytes, largest free "
                       "block smaller)",
                       (ull)nbytes, (ull)alignment, (ull)(a->capacity - a->st.allocated_bytes - a->st.quarantined_bytes),
                       (ull)a->capacity);
    /* Fits once the held-back blocks merge. Only a failure to get host memory, or poison damage found
     * in the memory about to be handed out, can still stop it; the flush itself stays done then. */
    flush_held(a);
    rc = try_alloc(a, nbytes, span, align, eligible, offset, span_out, serial);
    return rc == MO_E_EXHAUSTED ? mo_fail(MO_E_CORRUPTION, "metadata invariant broken: a flush did not make room") : rc;
}

/* The check of a handle: a keyed hash of its other three words. Each word goes through a bijection
 * before the three are mixed, so altering any one of them always changes the check; never 0, which
 * stands for "no check". */
static inline uint64_t handle_check(const mo_arena *a, uint64_t offset, uint64_t nbytes, uint64_t serial) {
    uint64_t h = ((offset ^ a->check_key) * 0x9E3779B97F4A7C15ull) ^ nbytes ^ (serial * 0xC2B2AE3D27D4EB4Full);
    h = (h ^ (h >> 32)) * 0xD6E8FEB86659FD93ull;
    return (h ^ (h >> 32)) | 1u;
}

int mo_arena_alloc(mo_arena *a, uint64_t nbytes, uint64_t alignment, uint64_t *offset, uint64_t *span_out,
                   uint64_t *serial, uint64_t *check) {
    uint64_t at, span, number; /* locals: the out-pointers may alias, so their values would be read back */
    int rc = alloc_block(a, nbytes, alignment, &at, &span, &number);
    if (rc != MO_OK) return rc;
    if (check) *check = handle_check(a, at, nbytes, number);
    *offset = at;
    *span_out = span;
    *serial = number;
    return MO_OK;
}

/* The lowest free block that holds span bytes at align, or MO_NIL. */
static uint32_t find_lowest(const mo_arena *a, uint64_t span, uint64_t align) {
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys) {
        const mo_node *n = &a->nodes[i];
        if (n->state == MO_STATE_FREE && mo_round_up(n->offset, align) + span <= n->offset + n->size) return i;
    }
    return MO_NIL;
}

/* As mo_arena_alloc, at the lowest address that fits. Never a slab slot; O(blocks). With release_held the
 * held-back blocks (quarantine) are released first, as they would only push it up: a device pool's planned
 * region, placed once, low, so that the part of the region in use stays short. Without, they are released only
 * when nothing fits without them, as alloc_block does: a heap placing every block lowest first for a whole
 * warm-up must not hand a just-freed block straight back. */
int mo_arena_alloc_lowest(mo_arena *a, uint64_t nbytes, uint64_t alignment, int release_held, uint64_t *offset,
                          uint64_t *span_out, uint64_t *serial) {
    if (nbytes == 0 || alignment == 0 || (alignment & (alignment - 1)))
        return mo_fail(MO_E_INVALID_ARG, "size %llu at alignment %llu: ask for at least 1 byte at a power of two",
                       (ull)nbytes, (ull)alignment);
    uint64_t align = alignment < MO_GRANULE_BYTES ? MO_GRANULE_BYTES : alignment;
    if (align > a->align_cap) align = a->align_cap;
    uint64_t span = mo_round_up(nbytes + (canaries_on(a) ? MO_CANARY_MIN_BYTES : 0), MO_GRANULE_BYTES);
    if (span > a->capacity)
        return mo_fail(MO_E_EXHAUSTED, "request of %llu bytes exceeds the capacity of %llu bytes", (ull)nbytes, (ull)a->capacity);
    if (release_held && a->q_count) flush_held(a);
    uint32_t idx = find_lowest(a, span, align);
    if (idx == MO_NIL && a->q_count && fits_after_flush(a, span, align, 0)) {
        flush_held(a);
        idx = find_lowest(a, span, align);
    }
    if (idx == MO_NIL)
        return mo_fail(MO_E_EXHAUSTED, "no free run of %llu bytes at alignment %llu (free %llu of %llu bytes)", (ull)nbytes,
                       (ull)alignment, (ull)(a->capacity - a->st.allocated_bytes - a->st.quarantined_bytes), (ull)a->capacity);
    return place(a, idx, nbytes, span, align, offset, span_out, serial);
}

/* As mo_arena_alloc_lowest, at exactly offset (a multiple of the granule), which must lie in one free block
 * once the held-back blocks are released: a device pool's planned ranges, laid out among the live blocks. */
int mo_arena_alloc_at(mo_arena *a, uint64_t offset, uint64_t nbytes, uint64_t *span_out, uint64_t *serial) {
    if (nbytes == 0 || offset % MO_GRANULE_BYTES)
        return mo_fail(MO_E_INVALID_ARG, "%llu bytes at offset %llu: ask for at least 1 byte at a multiple of %llu",
                       (ull)nbytes, (ull)offset, (ull)MO_GRANULE_BYTES);
    uint64_t span = mo_round_up(nbytes + (canaries_on(a) ? MO_CANARY_MIN_BYTES : 0), MO_GRANULE_BYTES);
    if (offset > a->capacity || span > a->capacity - offset)
        return mo_fail(MO_E_EXHAUSTED, "%llu bytes at offset %llu end past the capacity of %llu bytes", (ull)nbytes,
                       (ull)offset, (ull)a->capacity);
    if (a->q_count) flush_held(a);
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys) {
        const mo_node *n = &a->nodes[i];
        if (n->offset + n->size <= offset) continue;
        if (n->state != MO_STATE_FREE || n->offset > offset || offset + span > n->offset + n->size) break;
        uint64_t at;
        return place_at(a, i, offset, nbytes, span, &at, span_out, serial);
    }
    return mo_fail(MO_E_EXHAUSTED, "[%llu, +%llu) is not free: a live or held block overlaps it", (ull)offset, (ull)span);
}

/* The free runs, by offset, once the held-back blocks are released: up to cap of them in offsets/sizes,
 * *count all of them (call again with room for *count when it exceeds cap). Free neighbours are always merged
 * (mo_arena_check), so a run is one free block; with canaries each is reported short of the canary a block
 * placed in it takes (mo_arena_alloc_at), so a region laid out to fill it still fits. */
int mo_arena_free_runs(mo_arena *a, uint64_t cap, uint64_t *offsets, uint64_t *sizes, uint64_t *count) {
    if (a->q_count) flush_held(a);
    uint64_t k = 0, guard = canaries_on(a) ? mo_round_up(MO_CANARY_MIN_BYTES, MO_GRANULE_BYTES) : 0;
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys) {
        const mo_node *n = &a->nodes[i];
        if (n->state != MO_STATE_FREE || n->size <= guard) continue;
        if (k < cap) {
            offsets[k] = n->offset;
            sizes[k] = n->size - guard;
        }
        k++;
    }
    *count = k;
    return MO_OK;
}

/* End of the highest block that is not free (live, held back or a slab): the part of the region in use. */
uint64_t mo_arena_extent(const mo_arena *a) {
    uint64_t end = 0;
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys)
        if (a->nodes[i].state != MO_STATE_FREE) end = a->nodes[i].offset + a->nodes[i].size;
    return end;
}

/* -- free ------------------------------------------------------------------------------------------- */

/* Put a just-freed block (node index or slot reference) in quarantine, evicting the oldest entry. */
static inline __attribute__((always_inline)) void quarantine_push(mo_arena *a, uint32_t ref) {
    if (a->q_count == a->q_cap) {
        uint32_t old = a->quarantine[a->q_head];
        if (++a->q_head == a->q_cap) a->q_head = 0;
        a->q_count--;
        release_ref(a, old);
    }
    uint32_t tail = a->q_head + a->q_count; /* a ring index; no division on this path */
    a->quarantine[tail >= a->q_cap ? tail - a->q_cap : tail] = ref;
    a->q_count++;
}

/* The slot of slab s that starts at offset, or -1 (inside a slot, or past the last one). */
static inline int slot_at(const mo_slab *s, uint64_t offset) {
    uint64_t diff = offset - s->start;
    if (offset < s->start || diff >= (uint64_t)s->slots * s->span) return -1; /* also the tail past the last slot */
    uint32_t k = (uint32_t)((diff * mo_slab_recip[s->cls]) >> 32);
    return (uint64_t)k * s->span == diff ? (int)k : -1;
}

/* What starts at offset (a granule multiple below the capacity), found without the serial: a block of
 * the core that is used or held back (*node), or a slab slot in any state (*si, *k); 0 when neither. */
static int locate_by_offset(const mo_arena *a, uint64_t offset, uint32_t *node, uint32_t *si, int *k) {
    uint32_t idx = mo_core_hash_find(a, offset);
    /* Not a block's start: it may be a slot inside a slab, which starts at a multiple of its size. Largest
     * first: every span from 256 bytes up (all of a device pool's, at 512-byte alignment) has 16 KiB slabs. */
    for (uint64_t bytes = MO_SLAB_MAX_BYTES; idx == MO_NIL && bytes >= MO_SLAB_MIN_BYTES; bytes >>= 1) {
        uint64_t candidate = offset & ~(bytes - 1);
        if (candidate == offset) continue;
        uint32_t i = mo_core_hash_find(a, candidate);
        if (i != MO_NIL && a->nodes[i].state == MO_STATE_SLAB && a->nodes[i].size == bytes) idx = i;
    }
    *node = *si = MO_NIL;
    if (idx == MO_NIL) return 0;
    if (a->nodes[idx].state != MO_STATE_SLAB) {
        *node = idx;
        return 1;
    }
    *si = (uint32_t)a->nodes[idx].serial;
    *k = slot_at(a->slabs[*si], offset);
    return *k >= 0;
}

/* As locate_by_offset; a serial that names the node or slot at offset spares the hash-table probes. */
static inline __attribute__((always_inline)) int locate(const mo_arena *a, uint64_t offset, uint64_t serial,
                                                        uint32_t *node, uint32_t *si, int *k) {
    uint32_t low = (uint32_t)serial;
    if (serial && (low & MO_SLOT_REF)) {
        uint32_t i = ref_slab(low), slot = ref_slot(low);
        const mo_slab *s = i < a->slab_used ? a->slabs[i] : NULL;
        if (s && slot < s->slots && s->start + (uint64_t)slot * s->span == offset) {
            *node = MO_NIL;
            *si = i;
            *k = (int)slot;
            return 1;
        }
    } else if (serial && low < a->node_used && a->nodes[low].offset == offset &&
               (a->nodes[low].state == MO_STATE_USED || a->nodes[low].state == MO_STATE_QUARANTINED)) {
        *node = low;
        *si = MO_NIL;
        return 1;
    }
    return locate_by_offset(a, offset, node, si, k);
}

/* Whether handle h names the live block in slot k of slab si, or the live block at node n: the serial
 * and the size are that block's (each when given), and the check is right (when given). */
static inline int handle_valid(const mo_arena *a, mo_handle h) {
    return !h.check || h.check == handle_check(a, h.offset, h.nbytes, h.serial);
}

static inline int slot_matches(const mo_arena *a, mo_slab *s, uint32_t si, uint32_t k, mo_handle h) {
    return mo_slot_live(s, k) &&
           (!h.serial || ((uint32_t)h.serial == slot_ref(si, k) && (uint16_t)(h.serial >> 32) == mo_slot_gen(s, k))) &&
           (!h.nbytes || h.nbytes == (uint64_t)(s->span - mo_slot_slack(s, k))) && handle_valid(a, h);
}

static inline int node_matches(const mo_arena *a, const mo_node *n, mo_handle h) {
    return n->state == MO_STATE_USED && (!h.serial || h.serial == n->serial) &&
           (!h.nbytes || h.nbytes == n->size - n->slack) && handle_valid(a, h);
}

/* -- rejected frees: what the handle names, and what lies at its offset (cold paths) ----------------- */

static const mo_node *find_containing(const mo_arena *a, uint64_t offset) {
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys)
        if (offset < a->nodes[i].offset + a->nodes[i].size) return &a->nodes[i];
    return NULL;
}

/* What is at offset now, as the end of a sentence about it ("offset 4096 ..."). */
static void describe_offset(const mo_arena *a, uint64_t offset, char *out, size_t size) {
    if (offset >= a->capacity) {
        snprintf(out, size, "is beyond the capacity of %llu bytes", (ull)a->capacity);
        return;
    }
    const mo_node *n = find_containing(a, offset);
    uint64_t end = n->offset + n->size;
    const char *unaligned = offset % MO_GRANULE_BYTES ? " (blocks start at multiples of 16 bytes)" : "";
    if (n->state == MO_STATE_SLAB) {
        const mo_slab *s = a->slabs[n->serial];
        uint64_t slot_end = s->start + (uint64_t)s->slots * s->span;
        if (offset >= slot_end) {
            snprintf(out, size, "lies past the last slot of the small-object slab [%llu, %llu) of %u-byte slots",
                     (ull)n->offset, (ull)end, (unsigned)s->span);
            return;
        }
        uint32_t k = (uint32_t)((offset - s->start) / s->span);
        uint64_t start = s->start + (uint64_t)k * s->span;
        const char *state = !mo_slot_taken(s, k) ? "free" : mo_slot_held((mo_slab *)s, k) ? "freed (held back)" : "live";
        if (offset != start)
            snprintf(out, size, "lies inside the %s slot [%llu, %llu) of the small-object slab [%llu, %llu) of %u-byte slots%s",
                     state, (ull)start, (ull)(start + s->span), (ull)n->offset, (ull)end, (unsigned)s->span, unaligned);
        else
            snprintf(out, size, "starts a %s slot of the small-object slab [%llu, %llu) of %u-byte slots", state,
                     (ull)n->offset, (ull)end, (unsigned)s->span);
        return;
    }
    if (n->state == MO_STATE_FREE) {
        snprintf(out, size, "lies in free space [%llu, %llu)%s", (ull)n->offset, (ull)end, unaligned);
        return;
    }
    const char *state = n->state == MO_STATE_USED ? "live" : "freed (in quarantine)";
    if (offset != n->offset)
        snprintf(out, size, "lies inside the %s block [%llu, %llu), not at its start%s", state, (ull)n->offset, (ull)end,
                 unaligned);
    else
        snprintf(out, size, "starts the %s block of allocation #%llu ([%llu, %llu))", state, (ull)(n->serial >> 32),
                 (ull)n->offset, (ull)end);
}

/* The block the serial names, while the arena still holds it (live or held back): its offset, requested
 * bytes and whether it is held back. 0 once it was released, or when the serial names nothing. */
static int find_named(const mo_arena *a, uint64_t serial, uint64_t *offset, uint64_t *nbytes, int *held) {
    uint32_t low = (uint32_t)serial;
    if (low & MO_SLOT_REF) {
        uint32_t si = ref_slab(low), k = ref_slot(low);
        mo_slab *s = si < a->slab_used ? a->slabs[si] : NULL;
        if (!s || k >= s->slots || !mo_slot_taken(s, k) || mo_slot_gen(s, k) != (uint16_t)(serial >> 32)) return 0;
        *offset = s->start + (uint64_t)k * s->span;
        *nbytes = s->span - mo_slot_slack(s, k);
        *held = mo_slot_held(s, k);
        return 1;
    }
    if (low >= a->node_used) return 0;
    const mo_node *n = &a->nodes[low];
    if ((n->state != MO_STATE_USED && n->state != MO_STATE_QUARANTINED) || n->serial != serial) return 0;
    *offset = n->offset;
    *nbytes = n->size - n->slack;
    *held = n->state == MO_STATE_QUARANTINED;
    return 1;
}

/*
 * Why a free (or query) of handle h, which names no live block, fails. A double free only when the
 * handle is one this arena handed out and its block was freed; anything else is an invalid free. A
 * handle with a check is judged by it (a missing serial is then a wrong one). Without a check (a caller
 * that keeps none), a serial naming a block still held is judged against that block, and one whose
 * block was released passes for genuine when its number was handed out; without a serial either, the
 * handle is judged by what starts at its offset.
 */
static __attribute__((cold, noinline)) int reject(const mo_arena *a, mo_handle h) {
    char where[192];
    describe_offset(a, h.offset, where, sizeof(where));
    ull offset = h.offset, number = h.serial >> 32;
    if (!h.serial && !h.check) {
        uint32_t idx, si;
        int k = 0;
        if (h.offset < a->capacity && h.offset % MO_GRANULE_BYTES == 0 && locate_by_offset(a, h.offset, &idx, &si, &k)) {
            int held, live;
            uint64_t nbytes;
            if (si != MO_NIL) {
                mo_slab *s = a->slabs[si];
                held = mo_slot_held(s, (uint32_t)k);
                live = mo_slot_live(s, (uint32_t)k);
                nbytes = s->span - mo_slot_slack(s, (uint32_t)k);
            } else {
                held = a->nodes[idx].state == MO_STATE_QUARANTINED;
                live = !held;
                nbytes = a->nodes[idx].size - a->nodes[idx].slack;
            }
            if (held)
                return mo_fail(MO_E_DOUBLE_FREE, "block at offset %llu was already freed (it is still in quarantine or "
                               "waiting for reuse)", offset);
            if (live)
                return mo_fail(MO_E_INVALID_FREE, "the block at offset %llu was asked for %llu bytes, not the handle's %llu: "
                               "the handle's size is wrong", offset, (ull)nbytes, (ull)h.nbytes);
        }
        return mo_fail(MO_E_INVALID_FREE, "no block starts at offset %llu: it %s", offset, where);
    }
    uint64_t at, nbytes;
    int held, named = find_named(a, h.serial, &at, &nbytes, &held);
    int genuine = h.check ? h.check == handle_check(a, h.offset, h.nbytes, h.serial)
                          : named ? at == h.offset && (!h.nbytes || h.nbytes == nbytes) : number && number <= a->serial;
    if (genuine) /* not live, or it would have been freed: still held back, or released */
        return named ? mo_fail(MO_E_DOUBLE_FREE, "block at offset %llu (allocation #%llu) was already freed (it is still "
                               "in quarantine or waiting for reuse)", offset, number)
                     : mo_fail(MO_E_DOUBLE_FREE, "block at offset %llu (allocation #%llu) was already freed; offset %llu "
                               "now %s", offset, number, offset, where);
    if (named && at != h.offset)
        return mo_fail(MO_E_INVALID_FREE, "the handle names allocation #%llu, the %s block at offset %llu, but carries "
                       "offset %llu (which %s): the handle's offset or serial was altered",
                       number, held ? "freed (held back)" : "live", (ull)at, offset, where);
    if (named && h.nbytes != nbytes)
        return mo_fail(MO_E_INVALID_FREE, "the block at offset %llu (allocation #%llu) was asked for %llu bytes, not the "
                       "handle's %llu: the handle's size was altered", offset, number, (ull)nbytes, (ull)h.nbytes);
    if (named)
        return mo_fail(MO_E_INVALID_FREE, "the handle of the block at offset %llu (allocation #%llu) has a check that is "
                       "not the one this arena gave it: the handle was altered", offset, number);
    if (h.check)
        return mo_fail(MO_E_INVALID_FREE, "no block of this arena had this handle (offset %llu, %llu bytes, allocation "
                       "#%llu): its offset, size or serial was altered, or it is another arena's; offset %llu %s",
                       offset, (ull)h.nbytes, number, offset, where);
    return mo_fail(MO_E_INVALID_FREE, "serial %#llx was never handed out by this arena; offset %llu %s", (ull)h.serial,
                   offset, where);
}

static int guard_broken(const mo_arena *a, uint64_t offset, uint64_t nbytes, uint64_t span) {
    uint64_t bad = find_bad_canary(a, offset + nbytes, offset + span);
    return mo_fail(MO_E_CORRUPTION,
                   "guard canary of block [%llu, %llu) overwritten at offset %llu, %llu byte(s) past its %llu requested "
                   "bytes: a buffer overflow",
                   (ull)offset, (ull)(offset + nbytes), (ull)bad, (ull)(bad - offset - nbytes + 1), (ull)nbytes);
}

/* Free the live block in slot k of slab si, which the handle names. */
static inline __attribute__((always_inline)) int free_slot(mo_arena *a, uint32_t si, uint32_t k, uint64_t offset) {
    mo_slab *s = a->slabs[si];
    uint64_t span = s->span, nbytes = span - mo_slot_slack(s, k);
    if (canaries_on(a) && find_bad_canary(a, offset + nbytes, offset + span) != offset + span)
        return guard_broken(a, offset, nbytes, span);

    /* Nothing below can fail. */
    if (slots_filled(a)) memset(a->base + offset, fill_byte(a), span);
    a->st.allocated_bytes -= span;
    a->st.requested_bytes -= nbytes;
    a->st.live_blocks--;
    a->st.free_count++;
    s->live--;
    /* The slot stays taken while held, so the eviction the push may do cannot empty (and drop) this slab. */
    mo_slot_hold(s, k);
    if (a->q_cap == 0) {
        retire_slot(a, si, k);
        return MO_OK;
    }
    a->st.quarantined_bytes += span;
    a->st.quarantined_blocks++;
    quarantine_push(a, slot_ref(si, k));
    return MO_OK;
}

/* Free the live block at node idx, which the handle names. */
static inline __attribute__((always_inline)) int free_node(mo_arena *a, uint32_t idx, uint64_t offset) {
    mo_node *n = &a->nodes[idx];
    uint64_t nbytes = n->size - n->slack;
    if (canaries_on(a) && find_bad_canary(a, offset + nbytes, offset + n->size) != offset + n->size)
        return guard_broken(a, offset, nbytes, n->size);

    /* Nothing below can fail: releasing blocks only returns nodes to the pool. */
    if (filled_when_freed(a, n->size)) memset(a->base + offset, fill_byte(a), n->size);
    a->st.allocated_bytes -= n->size;
    a->st.requested_bytes -= nbytes;
    a->st.live_blocks--;
    a->st.free_count++;
    if (a->q_cap == 0) {
        mo_core_hash_remove(a, offset);
        mo_core_release(a, idx);
        return MO_OK;
    }
    n->state = MO_STATE_QUARANTINED;
    a->st.quarantined_bytes += n->size;
    a->st.quarantined_blocks++;
    quarantine_push(a, idx);
    return MO_OK;
}

int mo_arena_free(mo_arena *a, mo_handle h) {
    uint32_t idx, si;
    int k;
    if (h.offset < a->capacity && h.offset % MO_GRANULE_BYTES == 0 && locate(a, h.offset, h.serial, &idx, &si, &k)) {
        if (si != MO_NIL) {
            if (slot_matches(a, a->slabs[si], si, (uint32_t)k, h)) return free_slot(a, si, (uint32_t)k, h.offset);
        } else if (node_matches(a, &a->nodes[idx], h)) {
            return free_node(a, idx, h.offset);
        }
    }
    return reject(a, h);
}

int mo_arena_query(const mo_arena *a, mo_handle h, uint64_t *nbytes, uint64_t *span) {
    uint32_t idx, si;
    int k;
    if (h.offset < a->capacity && h.offset % MO_GRANULE_BYTES == 0 && locate(a, h.offset, h.serial, &idx, &si, &k)) {
        if (si != MO_NIL) {
            mo_slab *s = a->slabs[si];
            if (slot_matches(a, s, si, (uint32_t)k, h)) {
                *span = s->span;
                *nbytes = s->span - mo_slot_slack(s, (uint32_t)k);
                return MO_OK;
            }
        } else if (node_matches(a, &a->nodes[idx], h)) {
            *nbytes = a->nodes[idx].size - a->nodes[idx].slack;
            *span = a->nodes[idx].size;
            return MO_OK;
        }
    }
    return reject(a, h);
}
#define BROKEN(...) return mo_fail(MO_E_CORRUPTION, "metadata invariant broken: " __VA_ARGS__)

static int check_free_lists(const mo_arena *a, uint64_t free_blocks) {
    uint64_t listed = 0;
    for (uint32_t fl = 0; fl < MO_FL_COUNT; fl++) {
        if (((a->fl_bitmap >> fl) & 1u) != (a->sl_bitmap[fl] != 0)) BROKEN("first-level bitmap bit %u is wrong", fl);
        if (fl >= a->fl_count) {
            if (a->sl_bitmap[fl]) BROKEN("free list of first level %u, beyond the capacity's %u", fl, a->fl_count);
            continue;
        }
        for (uint32_t sl = 0; sl < MO_SL_COUNT; sl++) {
            uint32_t head = a->heads[fl][sl];
            if (((a->sl_bitmap[fl] >> sl) & 1u) != (head != MO_NIL)) BROKEN("bitmap bit of list (%u, %u) is wrong", fl, sl);
            uint32_t prev = MO_NIL;
            for (uint32_t i = head; i != MO_NIL; i = a->nodes[i].next_free) {
                if (i >= a->node_used) BROKEN("free list (%u, %u) links to unused node %u", fl, sl, i);
                if (++listed > free_blocks) BROKEN("free lists hold more blocks than the block chain (a cycle?)");
                const mo_node *n = &a->nodes[i];
                uint32_t f, s;
                mo_core_mapping(n->size, &f, &s);
                if (n->state != MO_STATE_FREE) BROKEN("block at offset %llu is in a free list but not free", (ull)n->offset);
                if (f != fl || s != sl) BROKEN("free block at offset %llu is in the wrong size class", (ull)n->offset);
                if (n->prev_free != prev) BROKEN("free list back link of offset %llu is wrong", (ull)n->offset);
                prev = i;
            }
        }
    }
    if (listed != free_blocks) BROKEN("%llu free blocks in the chain but %llu in the lists", (ull)free_blocks, (ull)listed);
    return MO_OK;
}

static int check_canary(const mo_arena *a, uint64_t offset, uint64_t nbytes, uint64_t span) {
    /* find_bad_canary reads whole words: it needs the guard the allocation reserved. */
    if (span - nbytes < MO_CANARY_MIN_BYTES)
        BROKEN("block at offset %llu has slack %llu, no room for its canary", (ull)offset, (ull)(span - nbytes));
    uint64_t bad = find_bad_canary(a, offset + nbytes, offset + span);
    if (bad == offset + span) return MO_OK;
    return mo_fail(MO_E_CORRUPTION, "guard canary of block [%llu, %llu) overwritten at offset %llu: a buffer overflow",
                   (ull)offset, (ull)(offset + nbytes), (ull)bad);
}

static int check_freed(const mo_arena *a, uint64_t start, uint64_t end) {
    uint64_t bad = find_bad_fill(a, start, end);
    if (bad == end) return MO_OK;
    return mo_fail(MO_E_CORRUPTION,
                   "freed memory was written after free: byte at offset %llu (in freed block [%llu, %llu)) is 0x%02x, "
                   "not the fill 0x%02x of freed memory",
                   (ull)bad, (ull)start, (ull)end, a->base[bad], fill_byte(a));
}

/* One slab: its record, bitmaps, per-slot data, guard words and poison. Adds to the walk's counts. */
static int check_slab(const mo_arena *a, uint32_t i, uint64_t counts[5]) {
    const mo_node *n = &a->nodes[i];
    uint64_t si = n->serial;
    if (si >= a->slab_used || !a->slabs[si]) BROKEN("slab block at offset %llu names slab record %llu", (ull)n->offset, (ull)si);
    mo_slab *s = a->slabs[si];
    if (s->node != i || s->start != n->offset || s->span != (s->cls + 1u) * MO_GRANULE_BYTES ||
        s->slots != mo_slab_bytes(s->span) / s->span || n->size != mo_slab_bytes(s->span) ||
        n->offset % n->size)
        BROKEN("slab record %llu disagrees with its block at offset %llu", (ull)si, (ull)n->offset);
    uint32_t tail = s->slots & 63u;
    if ((s->taken_map[s->slots >> 6] >> tail) != ~0ull >> tail || (s->slots < 64u && s->taken_map[1] != ~0ull))
        BROKEN("slab at offset %llu lost the marks past its last slot", (ull)n->offset);
    uint64_t live = 0, taken = 0;
    for (uint32_t k = 0; k < s->slots; k++) {
        uint64_t start = s->start + (uint64_t)k * s->span, nbytes = s->span - mo_slot_slack(s, k);
        int is_held = mo_slot_held(s, k), is_used = mo_slot_taken(s, k) && !is_held;
        if (is_held && !mo_slot_taken(s, k)) BROKEN("slot at offset %llu is held back but not taken", (ull)start);
        if (is_used) {
            if (mo_slot_slack(s, k) >= MO_GRANULE_BYTES + MO_CANARY_MIN_BYTES)
                BROKEN("block at offset %llu has slack %u", (ull)start, mo_slot_slack(s, k));
            live++;
            counts[1] += s->span;
            counts[2] += nbytes;
            if (canaries_on(a) && check_canary(a, start, nbytes, s->span) != MO_OK) return MO_E_CORRUPTION;
        } else {
            counts[is_held ? 3 : 4]++; /* quarantined or free; bytes follow from the span */
            if (slots_filled(a) && check_freed(a, start, start + s->span) != MO_OK) return MO_E_CORRUPTION;
        }
        taken += is_used || is_held;
    }
    if (live != s->live || taken != s->taken)
        BROKEN("slab at offset %llu counts %u live and %u taken slots, has %llu and %llu", (ull)n->offset, s->live,
               s->taken, (ull)live, (ull)taken);
    if (slots_filled(a) && check_freed(a, s->start + (uint64_t)s->slots * s->span, s->start + n->size) != MO_OK)
        return MO_E_CORRUPTION;
    counts[0] += live;
    return MO_OK;
}

int mo_arena_check(const mo_arena *a) {
    uint64_t expect = 0, steps = 0, used = 0, quarantined = 0, free_blocks = 0, slabs = 0;
    uint64_t allocated = 0, requested = 0, quarantined_bytes = 0, free_slots = 0, free_slot_bytes = 0;
    uint64_t held_slots = 0, held_slot_bytes = 0; /* slab slots in quarantine or in the slot cache */
    uint32_t prev = MO_NIL;
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys) {
        if (i >= a->node_used || ++steps > a->node_used) BROKEN("block chain leaves the node pool or loops");
        const mo_node *n = &a->nodes[i];
        uint64_t end = n->offset + n->size;
        if (n->offset != expect) BROKEN("block at offset %llu follows a block ending at %llu", (ull)n->offset, (ull)expect);
        if (n->size == 0 || n->size % MO_GRANULE_BYTES || end > a->capacity)
            BROKEN("block at offset %llu has span %llu", (ull)n->offset, (ull)n->size);
        if (n->prev_phys != prev) BROKEN("back link of block at offset %llu is wrong", (ull)n->offset);
        if (n->state == MO_STATE_FREE) {
            if (prev != MO_NIL && a->nodes[prev].state == MO_STATE_FREE)
                BROKEN("free blocks at %llu and before it were not merged", (ull)n->offset);
            free_blocks++;
            if (poison_on(a) && check_freed(a, n->offset, end) != MO_OK) return MO_E_CORRUPTION;
        } else if (n->state == MO_STATE_SLAB) {
            if (mo_core_hash_find(a, n->offset) != i) BROKEN("slab at offset %llu is missing from the hash table", (ull)n->offset);
            if (end > a->st.high_water_bytes) BROKEN("slab at offset %llu ends above the high-water mark", (ull)n->offset);
            uint64_t counts[5] = {0};
            int rc = check_slab(a, i, counts);
            if (rc != MO_OK) return rc;
            const mo_slab *s = a->slabs[n->serial];
            used += counts[0];
            allocated += counts[1];
            requested += counts[2];
            held_slots += counts[3];
            held_slot_bytes += counts[3] * s->span;
            free_slots += counts[4];
            free_slot_bytes += counts[4] * s->span;
            slabs++;
        } else if (n->state == MO_STATE_USED || n->state == MO_STATE_QUARANTINED) {
            if (mo_core_hash_find(a, n->offset) != i) BROKEN("block at offset %llu is missing from the hash table", (ull)n->offset);
            if ((uint32_t)n->serial != i || (n->serial >> 32) == 0 || (a->serial < (1ull << 32) && (n->serial >> 32) > a->serial))
                BROKEN("block at offset %llu has serial %llu", (ull)n->offset, (ull)n->serial);
            if (n->slack >= n->size || n->slack >= MO_GRANULE_BYTES + MO_CANARY_MIN_BYTES)
                BROKEN("block at offset %llu has slack %u", (ull)n->offset, n->slack);
            if (n->state == MO_STATE_USED) {
                used++;
                allocated += n->size;
                requested += n->size - n->slack;
                if (end > a->st.high_water_bytes) BROKEN("block at offset %llu ends above the high-water mark", (ull)n->offset);
                if (canaries_on(a) && check_canary(a, n->offset, n->size - n->slack, n->size) != MO_OK) return MO_E_CORRUPTION;
            } else {
                quarantined++;
                quarantined_bytes += n->size;
                if (filled_when_freed(a, n->size) && check_freed(a, n->offset, end) != MO_OK) return MO_E_CORRUPTION;
            }
        } else {
            BROKEN("block at offset %llu has state %u", (ull)n->offset, n->state);
        }
        expect = end;
        prev = i;
    }
    if (expect != a->capacity) BROKEN("blocks cover %llu of %llu bytes", (ull)expect, (ull)a->capacity);
    int rc = check_free_lists(a, free_blocks);
    if (rc != MO_OK) return rc;
    if (a->hash_count != steps - free_blocks)
        BROKEN("hash table holds %llu blocks, the chain %llu that are not free", (ull)a->hash_count, (ull)(steps - free_blocks));
    /* Slab records: each live one is chained; each class list holds exactly its slabs with a free slot
     * (at most one of them empty), linked both ways. */
    uint64_t records = 0, listed = 0;
    for (uint32_t si = 0; si < a->slab_used; si++) records += a->slabs[si] != NULL;
    if (records != slabs || records + a->slab_spare_count != a->slab_used)
        BROKEN("%llu slab records, %llu slabs in the chain, %u spare of %u", (ull)records, (ull)slabs, a->slab_spare_count,
               a->slab_used);
    for (uint32_t c = 0; c < MO_SLAB_CLASSES; c++) {
        uint32_t back = MO_NIL, empty = 0;
        for (uint32_t si = a->partial[c]; si != MO_NIL; si = a->slabs[si]->next) {
            if (si >= a->slab_used || !a->slabs[si] || ++listed > records) BROKEN("slab list %u is broken or loops", c);
            const mo_slab *s = a->slabs[si];
            if (s->cls != c || s->prev != back || s->taken == s->slots)
                BROKEN("slab at offset %llu is in the wrong list, has a bad back link or no free slot", (ull)s->start);
            empty += s->taken == 0;
            back = si;
        }
        if (empty > 1) BROKEN("class of %u-byte slots keeps %u empty slabs", (c + 1) * MO_GRANULE_BYTES, empty);
    }
    uint64_t with_free = 0;
    for (uint32_t si = 0; si < a->slab_used; si++)
        if (a->slabs[si]) with_free += a->slabs[si]->taken != a->slabs[si]->slots;
    if (with_free != listed) BROKEN("%llu slabs have a free slot but %llu are listed", (ull)with_free, (ull)listed);
    /* The held slots are exactly the quarantine's slot entries and the caches' entries, each once. */
    if (a->q_count > a->q_cap) BROKEN("quarantine ring holds %u of %u blocks", a->q_count, a->q_cap);
    uint64_t queued_slots = 0, queued_slot_bytes = 0, cached = 0, cached_bytes = 0;
    for (uint32_t k = 0; k < a->q_count; k++) {
        uint32_t ref = a->quarantine[(a->q_head + k) % a->q_cap];
        if (ref & MO_SLOT_REF) {
            uint32_t si = ref_slab(ref), slot = ref_slot(ref);
            if (si >= a->slab_used || !a->slabs[si] || slot >= a->slabs[si]->slots || !mo_slot_held(a->slabs[si], slot))
                BROKEN("quarantine slot %u names a slab slot not held back", k);
            queued_slots++;
            queued_slot_bytes += a->slabs[si]->span;
        } else if (ref >= a->node_used || a->nodes[ref].state != MO_STATE_QUARANTINED) {
            BROKEN("quarantine slot %u names a block not in quarantine", k);
        }
        for (uint32_t m = 0; m < k; m++)
            if (a->quarantine[(a->q_head + m) % a->q_cap] == ref) BROKEN("quarantine holds entry %u twice", ref);
    }
    if (a->q_count != quarantined + queued_slots)
        BROKEN("quarantine ring holds %u blocks, the arena %llu", a->q_count, (ull)(quarantined + queued_slots));
    quarantined += queued_slots;
    quarantined_bytes += queued_slot_bytes;
    for (uint32_t c = 0; c < MO_SLAB_CLASSES; c++) {
        if (a->cache_count[c] > MO_CACHE_DEPTH) BROKEN("slot cache %u holds %u entries", c, a->cache_count[c]);
        for (uint32_t k = 0; k < a->cache_count[c]; k++) {
            uint32_t ref = a->cache[c][k], si = ref_slab(ref), slot = ref_slot(ref);
            if (!(ref & MO_SLOT_REF) || si >= a->slab_used || !a->slabs[si] || a->slabs[si]->cls != c ||
                slot >= a->slabs[si]->slots || !mo_slot_held(a->slabs[si], slot))
                BROKEN("slot cache %u entry %u names a slot that is not held back in a slab of its class", c, k);
            for (uint32_t m = 0; m < k; m++)
                if (a->cache[c][m] == ref) BROKEN("slot cache %u holds entry %u twice", c, ref);
            for (uint32_t q = 0; q < a->q_count; q++)
                if (a->quarantine[(a->q_head + q) % a->q_cap] == ref) BROKEN("slot %u is both cached and in quarantine", ref);
            cached++;
            cached_bytes += a->slabs[si]->span;
        }
    }
    if (queued_slots + cached != held_slots || queued_slot_bytes + cached_bytes != held_slot_bytes)
        BROKEN("%llu slab slots are held back, the quarantine and caches name %llu", (ull)held_slots, (ull)(queued_slots + cached));
    if (a->q_cap ? a->q_head >= a->q_cap : a->q_head != 0) BROKEN("quarantine ring head %u of %u", a->q_head, a->q_cap);
    /* Spare slab indices name empty record slots, each once: a duplicate would hand one out twice. */
    for (uint32_t k = 0; k < a->slab_spare_count; k++) {
        uint32_t si = a->slab_spare[k];
        if (si >= a->slab_used || a->slabs[si]) BROKEN("spare slab index %u is out of range or names a live record", si);
    }
    if (a->slab_spare_count) {
        uint8_t *seen = calloc(a->slab_used, 1);
        if (seen) {
            uint32_t twice = MO_NIL;
            for (uint32_t k = 0; k < a->slab_spare_count && twice == MO_NIL; k++)
                if (seen[a->slab_spare[k]]++) twice = a->slab_spare[k];
            free(seen);
            if (twice != MO_NIL) BROKEN("spare slab index %u is listed twice", twice);
        }
    }
    if (a->spare_count + (uint64_t)steps != a->node_used) BROKEN("%u spare and %llu chained nodes of %u", a->spare_count, (ull)steps, a->node_used);
    const mo_stats_t *s = &a->st;
    if (s->allocated_bytes != allocated || s->requested_bytes != requested || s->live_blocks != used ||
        s->quarantined_bytes != quarantined_bytes || s->quarantined_blocks != quarantined || s->free_blocks != free_blocks ||
        s->cached_bytes != free_slot_bytes + cached_bytes || s->cached_blocks != free_slots + cached)
        BROKEN("counters disagree with the blocks (allocated %llu vs %llu, live %llu vs %llu)", (ull)s->allocated_bytes,
               (ull)allocated, (ull)s->live_blocks, (ull)used);
    if (s->peak_bytes < allocated) BROKEN("peak %llu below allocated %llu", (ull)s->peak_bytes, (ull)allocated);
    if (s->metadata_bytes != mo_core_metadata_bytes(a)) BROKEN("metadata counter %llu, actual %llu", (ull)s->metadata_bytes, (ull)mo_core_metadata_bytes(a));
    return MO_OK;
}

void mo_arena_stats(const mo_arena *a, mo_stats_t *out) {
    *out = a->st;
    out->free_bytes = a->capacity - a->st.allocated_bytes - a->st.quarantined_bytes;
    out->largest_free_bytes = 0;
    if (a->fl_bitmap) {
        /* Only the highest non-empty list can hold the largest block. */
        uint32_t fl = 63u - (uint32_t)__builtin_clzll(a->fl_bitmap);
        uint32_t sl = 31u - (uint32_t)__builtin_clz(a->sl_bitmap[fl]);
        for (uint32_t i = a->heads[fl][sl]; i != MO_NIL; i = a->nodes[i].next_free)
            if (a->nodes[i].size > out->largest_free_bytes) out->largest_free_bytes = a->nodes[i].size;
    }
}
