/*
 * Checked allocation and free over the TLSF core: argument validation, classification of bad frees,
 * the quarantine, canaries and poison, the invariant walk and statistics. Every operation validates
 * and reserves metadata before it changes anything, so a rejected call leaves the arena untouched.
 */
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

static uint64_t find_bad_poison(const mo_arena *a, uint64_t from, uint64_t to) {
    const uint8_t *m = a->base;
    uint8_t b = a->poison_byte;
    uint64_t word = 0x0101010101010101ull * b, p = from;
    for (; p < to && (p & 7u); p++)
        if (m[p] != b) return p;
    for (; p + 8 <= to; p += 8) {
        uint64_t w;
        memcpy(&w, m + p, 8);
        if (w != word) break;
    }
    for (; p < to; p++)
        if (m[p] != b) return p;
    return to;
}

static int canaries_on(const mo_arena *a) { return (a->flags & MO_F_CANARIES) && a->base; }
static int poison_on(const mo_arena *a) { return (a->flags & MO_F_POISON) && a->base; }

static inline uint32_t cache_class(uint64_t span) { return (uint32_t)(span / MO_GRANULE_BYTES) - 1u; }

/* A block leaves use (or the quarantine): small ones wait whole in the cache, others merge back. */
static void retire(mo_arena *a, uint32_t idx) {
    mo_node *n = &a->nodes[idx];
    if (n->size <= MO_CACHE_MAX_SPAN) {
        uint32_t c = cache_class(n->size);
        if (a->cache_count[c] < MO_CACHE_DEPTH) {
            n->state = MO_STATE_CACHED;
            a->cache[c][a->cache_count[c]++] = idx;
            a->st.cached_bytes += n->size;
            a->st.cached_blocks++;
            return;
        }
    }
    mo_core_hash_remove(a, n->offset);
    mo_core_release(a, idx);
}

/* First run of non-used blocks (free or quarantined) that could hold the request once the quarantine
 * is released. Sets *run to the run's first node and *start to the aligned offset. */
static int find_gap_with_quarantine(const mo_arena *a, uint64_t span, uint64_t align, uint32_t *run,
                                    uint64_t *start) {
    uint32_t i = a->phys_head;
    while (i != MO_NIL) {
        if (a->nodes[i].state == MO_STATE_USED) {
            i = a->nodes[i].next_phys;
            continue;
        }
        uint32_t first = i;
        uint64_t begin = a->nodes[i].offset, end = begin;
        while (i != MO_NIL && a->nodes[i].state != MO_STATE_USED) {
            end = a->nodes[i].offset + a->nodes[i].size;
            i = a->nodes[i].next_phys;
        }
        uint64_t s = mo_round_up(begin, align);
        if (s + span <= end) {
            *run = first;
            *start = s;
            return 1;
        }
    }
    return 0;
}

/* Release every held-back block (quarantined or cached) so that they can merge. */
static void flush_held(mo_arena *a) {
    while (a->q_count) {
        uint32_t q = a->quarantine[a->q_head];
        if (++a->q_head == a->q_cap) a->q_head = 0;
        a->q_count--;
        a->st.quarantined_bytes -= a->nodes[q].size;
        a->st.quarantined_blocks--;
        mo_core_hash_remove(a, a->nodes[q].offset);
        mo_core_release(a, q);
    }
    for (uint32_t c = 0; c < MO_CACHE_CLASSES; c++) {
        while (a->cache_count[c]) {
            uint32_t i = a->cache[c][--a->cache_count[c]];
            a->st.cached_bytes -= a->nodes[i].size;
            a->st.cached_blocks--;
            mo_core_hash_remove(a, a->nodes[i].offset);
            mo_core_release(a, i);
        }
    }
    a->st.quarantine_flushes++;
}

static int verify_poison(const mo_arena *a, uint64_t start, uint64_t span) {
    uint64_t bad = find_bad_poison(a, start, start + span);
    if (bad == start + span) return MO_OK;
    return mo_fail(MO_E_CORRUPTION,
                   "freed memory was written after free: byte at offset %llu differs from the poison pattern "
                   "(found while reusing [%llu, %llu))",
                   (ull)bad, (ull)start, (ull)(start + span));
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

int mo_arena_alloc(mo_arena *a, uint64_t nbytes, uint64_t alignment, uint64_t *offset, uint64_t *span_out,
                   uint64_t *serial) {
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
    uint64_t need = span + (align > MO_GRANULE_BYTES ? align - MO_GRANULE_BYTES : 0);

    if (span <= MO_CACHE_MAX_SPAN) {
        uint32_t c = cache_class(span);
        if (a->cache_count[c]) {
            uint32_t top = a->cache[c][a->cache_count[c] - 1u];
            if ((a->nodes[top].offset & (align - 1)) == 0) {
                if (poison_on(a)) {
                    int rc = verify_poison(a, a->nodes[top].offset, span);
                    if (rc != MO_OK) return rc;
                }
                a->cache_count[c]--;
                a->st.cached_bytes -= span;
                a->st.cached_blocks--;
                commit_used(a, top, nbytes, offset, span_out, serial);
                return MO_OK;
            }
        }
    }

    int flush = 0;
    uint64_t start = 0;
    uint32_t idx = mo_core_find_fast(a, need);
    if (idx == MO_NIL) idx = mo_core_find_exhaustive(a, span, align, need);
    if (idx != MO_NIL) {
        start = mo_round_up(a->nodes[idx].offset, align);
    } else if ((a->q_count || a->st.cached_blocks) && find_gap_with_quarantine(a, span, align, &idx, &start)) {
        flush = 1;
    } else {
        return mo_fail(MO_E_EXHAUSTED,
                       "no free block holds %llu bytes at alignment %llu (free %llu of %llu bytes, largest free "
                       "block smaller)",
                       (ull)nbytes, (ull)alignment, (ull)(a->capacity - a->st.allocated_bytes - a->st.quarantined_bytes),
                       (ull)a->capacity);
    }
    if (poison_on(a)) {
        int rc = verify_poison(a, start, span);
        if (rc != MO_OK) return rc;
    }
    int rc = mo_core_reserve(a, 2);
    if (rc != MO_OK) return rc;

    /* Nothing below can fail. */
    if (flush) flush_held(a);
    mo_core_carve(a, idx, start, span);
    mo_core_hash_insert(a, idx);
    commit_used(a, idx, nbytes, offset, span_out, serial);
    return MO_OK;
}

static uint32_t find_containing(const mo_arena *a, uint64_t offset) {
    for (uint32_t i = a->phys_head; i != MO_NIL; i = a->nodes[i].next_phys)
        if (offset < a->nodes[i].offset + a->nodes[i].size) return i;
    return MO_NIL;
}

static int classify_unknown_free(const mo_arena *a, uint64_t offset, uint64_t serial) {
    if ((serial >> 32) != 0 && (serial >> 32) <= a->serial)
        return mo_fail(MO_E_DOUBLE_FREE, "block at offset %llu (allocation #%llu) was already freed", (ull)offset,
                       (ull)serial);
    uint32_t c = find_containing(a, offset);
    const mo_node *n = &a->nodes[c];
    uint64_t end = n->offset + n->size;
    if (n->state == MO_STATE_USED)
        return mo_fail(MO_E_INVALID_FREE,
                       "offset %llu is inside the live block [%llu, %llu), not its start (an interior offset)",
                       (ull)offset, (ull)n->offset, (ull)end);
    if (n->state == MO_STATE_QUARANTINED || n->state == MO_STATE_CACHED)
        return mo_fail(MO_E_INVALID_FREE, "offset %llu is inside the freed block [%llu, %llu)",
                       (ull)offset, (ull)n->offset, (ull)end);
    return mo_fail(MO_E_INVALID_FREE, "offset %llu was never returned by this arena (it lies in free space [%llu, %llu))",
                   (ull)offset, (ull)n->offset, (ull)end);
}

int mo_arena_free(mo_arena *a, uint64_t offset, uint64_t serial) {
    if (offset >= a->capacity)
        return mo_fail(MO_E_INVALID_FREE, "offset %llu is beyond the capacity of %llu bytes", (ull)offset,
                       (ull)a->capacity);
    if (offset % MO_GRANULE_BYTES)
        return mo_fail(MO_E_INVALID_FREE, "offset %llu was never returned by this arena (blocks start at multiples of %u)",
                       (ull)offset, MO_GRANULE_BYTES);
    uint32_t idx = (uint32_t)serial;
    if (!(serial && idx < a->node_used && a->nodes[idx].state == MO_STATE_USED && a->nodes[idx].serial == serial &&
          a->nodes[idx].offset == offset)) {
        idx = mo_core_hash_find(a, offset);
        if (idx == MO_NIL) return classify_unknown_free(a, offset, serial);
    }
    mo_node *n = &a->nodes[idx];
    if (n->state == MO_STATE_QUARANTINED || n->state == MO_STATE_CACHED)
        return mo_fail(MO_E_DOUBLE_FREE, "block at offset %llu was already freed%s", (ull)offset,
                       n->state == MO_STATE_QUARANTINED ? " (it is still in quarantine)" : "");
    if (serial != 0 && serial != n->serial)
        return mo_fail(MO_E_DOUBLE_FREE,
                       "block at offset %llu (allocation #%llu) was already freed; the offset now holds allocation #%llu",
                       (ull)offset, (ull)serial, (ull)n->serial);
    uint64_t nbytes = n->size - n->slack;
    if (canaries_on(a)) {
        uint64_t end = n->offset + n->size;
        uint64_t bad = find_bad_canary(a, offset + nbytes, end);
        if (bad != end)
            return mo_fail(MO_E_CORRUPTION,
                           "guard canary of block [%llu, %llu) overwritten at offset %llu, %llu byte(s) past its "
                           "%llu requested bytes: a buffer overflow",
                           (ull)offset, (ull)(offset + nbytes), (ull)bad, (ull)(bad - offset - nbytes + 1), (ull)nbytes);
    }

    /* Nothing below can fail: releasing blocks only returns nodes to the pool. */
    if (poison_on(a)) memset(a->base + offset, a->poison_byte, n->size);
    a->st.allocated_bytes -= n->size;
    a->st.requested_bytes -= nbytes;
    a->st.live_blocks--;
    a->st.free_count++;
    if (a->q_cap == 0) {
        retire(a, idx);
        return MO_OK;
    }
    if (a->q_count == a->q_cap) {
        uint32_t old = a->quarantine[a->q_head];
        if (++a->q_head == a->q_cap) a->q_head = 0;
        a->q_count--;
        a->st.quarantined_bytes -= a->nodes[old].size;
        a->st.quarantined_blocks--;
        retire(a, old);
        n = &a->nodes[idx];
    }
    n->state = MO_STATE_QUARANTINED;
    uint32_t tail = a->q_head + a->q_count; /* a ring index; no division on this path */
    a->quarantine[tail >= a->q_cap ? tail - a->q_cap : tail] = idx;
    a->q_count++;
    a->st.quarantined_bytes += n->size;
    a->st.quarantined_blocks++;
    return MO_OK;
}

int mo_arena_query(const mo_arena *a, uint64_t offset, uint64_t serial, uint64_t *nbytes, uint64_t *span) {
    uint32_t idx = offset < a->capacity ? mo_core_hash_find(a, offset) : MO_NIL;
    if (idx == MO_NIL || a->nodes[idx].state != MO_STATE_USED || (serial && serial != a->nodes[idx].serial))
        return mo_fail(MO_E_INVALID_FREE, "no live block starts at offset %llu (it was freed or never allocated)",
                       (ull)offset);
    *nbytes = a->nodes[idx].size - a->nodes[idx].slack;
    *span = a->nodes[idx].size;
    return MO_OK;
}

#define BROKEN(...) return mo_fail(MO_E_CORRUPTION, "metadata invariant broken: " __VA_ARGS__)

static int check_free_lists(const mo_arena *a, uint64_t free_blocks) {
    uint64_t listed = 0;
    for (uint32_t fl = 0; fl < MO_FL_COUNT; fl++) {
        if (((a->fl_bitmap >> fl) & 1u) != (a->sl_bitmap[fl] != 0)) BROKEN("first-level bitmap bit %u is wrong", fl);
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

int mo_arena_check(const mo_arena *a) {
    uint64_t expect = 0, steps = 0, used = 0, quarantined = 0, free_blocks = 0;
    uint64_t allocated = 0, requested = 0, quarantined_bytes = 0, cached = 0, cached_bytes = 0;
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
        } else if (n->state == MO_STATE_USED || n->state == MO_STATE_QUARANTINED || n->state == MO_STATE_CACHED) {
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
            } else if (n->state == MO_STATE_QUARANTINED) {
                quarantined++;
                quarantined_bytes += n->size;
            } else {
                if (n->size > MO_CACHE_MAX_SPAN) BROKEN("cached block at offset %llu is too large", (ull)n->offset);
                cached++;
                cached_bytes += n->size;
            }
        } else {
            BROKEN("block at offset %llu has state %u", (ull)n->offset, n->state);
        }
        if (n->state == MO_STATE_USED && canaries_on(a)) {
            /* find_bad_canary reads whole words: it needs the guard the allocation reserved. */
            if (n->slack < MO_CANARY_MIN_BYTES)
                BROKEN("block at offset %llu has slack %u, no room for its canary", (ull)n->offset, n->slack);
            uint64_t from = end - n->slack, bad = find_bad_canary(a, from, end);
            if (bad != end)
                return mo_fail(MO_E_CORRUPTION,
                               "guard canary of block [%llu, %llu) overwritten at offset %llu: a buffer overflow",
                               (ull)n->offset, (ull)from, (ull)bad);
        }
        if (n->state != MO_STATE_USED && poison_on(a)) {
            uint64_t bad = find_bad_poison(a, n->offset, end);
            if (bad != end)
                return mo_fail(MO_E_CORRUPTION,
                               "freed memory was written after free: byte at offset %llu (in freed block [%llu, %llu)) "
                               "differs from the poison pattern",
                               (ull)bad, (ull)n->offset, (ull)end);
        }
        expect = end;
        prev = i;
    }
    if (expect != a->capacity) BROKEN("blocks cover %llu of %llu bytes", (ull)expect, (ull)a->capacity);
    int rc = check_free_lists(a, free_blocks);
    if (rc != MO_OK) return rc;
    if (a->hash_count != used + quarantined + cached)
        BROKEN("hash table holds %llu blocks, chain has %llu live, %llu quarantined and %llu cached",
               (ull)a->hash_count, (ull)used, (ull)quarantined, (ull)cached);
    uint64_t stacked = 0;
    for (uint32_t c = 0; c < MO_CACHE_CLASSES; c++) {
        if (a->cache_count[c] > MO_CACHE_DEPTH) BROKEN("cache %u holds %u blocks", c, a->cache_count[c]);
        for (uint32_t k = 0; k < a->cache_count[c]; k++) {
            uint32_t i = a->cache[c][k];
            if (i >= a->node_used || a->nodes[i].state != MO_STATE_CACHED || cache_class(a->nodes[i].size) != c)
                BROKEN("cache %u slot %u names a block that is not cached there", c, k);
            for (uint32_t m = 0; m < k; m++)
                if (a->cache[c][m] == i) BROKEN("block at offset %llu is cached twice", (ull)a->nodes[i].offset);
        }
        stacked += a->cache_count[c];
    }
    if (stacked != cached) BROKEN("caches hold %llu blocks, chain %llu", (ull)stacked, (ull)cached);
    if (a->q_count != quarantined || a->q_count > a->q_cap) BROKEN("quarantine ring holds %u blocks, chain %llu", a->q_count, (ull)quarantined);
    for (uint32_t k = 0; k < a->q_count; k++) {
        uint32_t q = a->quarantine[(a->q_head + k) % a->q_cap];
        if (q >= a->node_used || a->nodes[q].state != MO_STATE_QUARANTINED) BROKEN("quarantine slot %u names a block not in quarantine", k);
    }
    if (a->spare_count + (uint64_t)steps != a->node_used) BROKEN("%u spare and %llu chained nodes of %u", a->spare_count, (ull)steps, a->node_used);
    const mo_stats_t *s = &a->st;
    if (s->allocated_bytes != allocated || s->requested_bytes != requested || s->live_blocks != used ||
        s->quarantined_bytes != quarantined_bytes || s->quarantined_blocks != quarantined || s->free_blocks != free_blocks ||
        s->cached_bytes != cached_bytes || s->cached_blocks != cached)
        BROKEN("counters disagree with the blocks (allocated %llu vs %llu, live %llu vs %llu)", (ull)s->allocated_bytes,
               (ull)allocated, (ull)s->live_blocks, (ull)used);
    if (s->peak_bytes < allocated) BROKEN("peak %llu below allocated %llu", (ull)s->peak_bytes, (ull)allocated);
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
