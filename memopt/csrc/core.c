/*
 * The TLSF core: segregated free lists with two-level bitmaps (O(1) search), a pool of block
 * descriptors addressed by index, and the offset -> block hash table. Nothing here locks or
 * validates; arena.c decides what is allowed and api.c serialises calls.
 */
#include <stdlib.h>
#include <string.h>

#include "moalloc_internal.h"

#define GRANULE_SHIFT 4 /* log2(MO_GRANULE_BYTES) */

static inline uint32_t fls64(uint64_t x) { return 63u - (uint32_t)__builtin_clzll(x); }
static inline uint32_t ctz64(uint64_t x) { return (uint32_t)__builtin_ctzll(x); }
static inline uint32_t ctz32(uint32_t x) { return (uint32_t)__builtin_ctz(x); }

/* First level: log2 of the size in granules; second level: MO_SL_COUNT linear steps inside it. Sizes
 * under MO_SL_COUNT granules map to first level 0, one list per granule count. */
void mo_core_mapping(uint64_t size, uint32_t *fl, uint32_t *sl) {
    uint64_t g = size >> GRANULE_SHIFT;
    if (g < MO_SL_COUNT) {
        *fl = 0;
        *sl = (uint32_t)g;
    } else {
        uint32_t f = fls64(g);
        *sl = (uint32_t)((g >> (f - MO_SL_LOG2)) ^ MO_SL_COUNT);
        *fl = f - MO_SL_LOG2 + 1;
    }
}

static inline uint64_t hash_key(uint64_t offset) { return (offset >> GRANULE_SHIFT) + 1; }

static inline uint64_t hash_home(uint32_t bits, uint64_t key) {
    return (key * 0x9E3779B97F4A7C15ull) >> (64 - bits);
}

uint64_t mo_core_metadata_bytes(const mo_arena *a) {
    return (uint64_t)sizeof(mo_arena) + (uint64_t)a->node_cap * sizeof(mo_node) +
           ((uint64_t)1 << a->hash_bits) * (sizeof(uint64_t) + sizeof(uint32_t)) +
           (uint64_t)a->q_cap * sizeof(uint32_t);
}

static void note_metadata(mo_arena *a) {
    a->st.metadata_bytes = mo_core_metadata_bytes(a);
    if (a->st.metadata_bytes > a->st.peak_metadata_bytes) a->st.peak_metadata_bytes = a->st.metadata_bytes;
}

static uint32_t node_take(mo_arena *a) {
    uint32_t i;
    if (a->spare_head != MO_NIL) {
        i = a->spare_head;
        a->spare_head = a->nodes[i].next_free;
        a->spare_count--;
    } else {
        i = a->node_used++;
    }
    mo_node *n = &a->nodes[i];
    memset(n, 0, sizeof(*n));
    n->prev_phys = n->next_phys = n->prev_free = n->next_free = MO_NIL;
    return i;
}

static void node_put(mo_arena *a, uint32_t i) {
    mo_node *n = &a->nodes[i];
    memset(n, 0, sizeof(*n));
    n->prev_phys = n->next_phys = n->prev_free = MO_NIL;
    n->next_free = a->spare_head;
    a->spare_head = i;
    a->spare_count++;
}

static int hash_rebuild(mo_arena *a, uint32_t bits) {
    uint64_t *keys = calloc((size_t)1 << bits, sizeof(uint64_t));
    uint32_t *vals = malloc(((size_t)1 << bits) * sizeof(uint32_t));
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return mo_fail(MO_E_NOMEM, "no host memory for a hash table of %llu slots", 1ull << bits);
    }
    uint64_t old_cap = a->hash_keys ? (uint64_t)1 << a->hash_bits : 0, mask = ((uint64_t)1 << bits) - 1;
    for (uint64_t i = 0; i < old_cap; i++) {
        uint64_t key = a->hash_keys[i];
        if (!key) continue;
        uint64_t j = hash_home(bits, key);
        while (keys[j]) j = (j + 1) & mask;
        keys[j] = key;
        vals[j] = a->hash_vals[i];
    }
    free(a->hash_keys);
    free(a->hash_vals);
    a->hash_keys = keys;
    a->hash_vals = vals;
    a->hash_bits = bits;
    return MO_OK;
}

/* Grow metadata ahead of a change so the change itself cannot fail half way. */
int mo_core_reserve(mo_arena *a, uint32_t nodes_needed) {
    uint64_t available = (uint64_t)(a->node_cap - a->node_used) + a->spare_count;
    if (available < nodes_needed) {
        uint64_t cap = (uint64_t)a->node_cap * 2;
        if (cap < (uint64_t)a->node_used + nodes_needed) cap = (uint64_t)a->node_used + nodes_needed;
        if (cap >= MO_NIL) return mo_fail(MO_E_NOMEM, "more than %u blocks in one arena", MO_NIL - 1);
        mo_node *grown = realloc(a->nodes, (size_t)cap * sizeof(mo_node));
        if (!grown) return mo_fail(MO_E_NOMEM, "no host memory for %llu block descriptors", (unsigned long long)cap);
        a->nodes = grown;
        a->node_cap = (uint32_t)cap;
    }
    /* Load factor at most 1/2 keeps linear probes short. */
    if ((a->hash_count + 1) * 2 > ((uint64_t)1 << a->hash_bits)) {
        int rc = hash_rebuild(a, a->hash_bits + 1);
        if (rc != MO_OK) return rc;
    }
    note_metadata(a);
    return MO_OK;
}

uint32_t mo_core_hash_find(const mo_arena *a, uint64_t offset) {
    uint64_t key = hash_key(offset), mask = ((uint64_t)1 << a->hash_bits) - 1;
    for (uint64_t j = hash_home(a->hash_bits, key);; j = (j + 1) & mask) {
        uint64_t k = a->hash_keys[j];
        if (k == key) return a->hash_vals[j];
        if (!k) return MO_NIL;
    }
}

void mo_core_hash_insert(mo_arena *a, uint32_t idx) {
    uint64_t key = hash_key(a->nodes[idx].offset), mask = ((uint64_t)1 << a->hash_bits) - 1;
    uint64_t j = hash_home(a->hash_bits, key);
    while (a->hash_keys[j]) j = (j + 1) & mask;
    a->hash_keys[j] = key;
    a->hash_vals[j] = idx;
    a->hash_count++;
}

/* Backward-shift deletion: no tombstones, so probe lengths never degrade. */
void mo_core_hash_remove(mo_arena *a, uint64_t offset) {
    uint64_t key = hash_key(offset), mask = ((uint64_t)1 << a->hash_bits) - 1;
    uint64_t i = hash_home(a->hash_bits, key);
    while (a->hash_keys[i] && a->hash_keys[i] != key) i = (i + 1) & mask;
    if (!a->hash_keys[i]) return;
    for (uint64_t j = (i + 1) & mask; a->hash_keys[j]; j = (j + 1) & mask) {
        uint64_t home = hash_home(a->hash_bits, a->hash_keys[j]);
        /* Move slot j back to the hole at i unless its home lies cyclically in (i, j]. */
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            a->hash_keys[i] = a->hash_keys[j];
            a->hash_vals[i] = a->hash_vals[j];
            i = j;
        }
    }
    a->hash_keys[i] = 0;
    a->hash_count--;
}

void mo_core_insert_free(mo_arena *a, uint32_t idx) {
    uint32_t fl, sl;
    mo_node *n = &a->nodes[idx];
    mo_core_mapping(n->size, &fl, &sl);
    uint32_t head = a->heads[fl][sl];
    n->prev_free = MO_NIL;
    n->next_free = head;
    if (head != MO_NIL) a->nodes[head].prev_free = idx;
    a->heads[fl][sl] = idx;
    a->sl_bitmap[fl] |= 1u << sl;
    a->fl_bitmap |= 1ull << fl;
    a->st.free_blocks++;
}

void mo_core_remove_free(mo_arena *a, uint32_t idx) {
    uint32_t fl, sl;
    mo_node *n = &a->nodes[idx];
    mo_core_mapping(n->size, &fl, &sl);
    if (n->prev_free != MO_NIL) a->nodes[n->prev_free].next_free = n->next_free;
    else a->heads[fl][sl] = n->next_free;
    if (n->next_free != MO_NIL) a->nodes[n->next_free].prev_free = n->prev_free;
    if (a->heads[fl][sl] == MO_NIL) {
        a->sl_bitmap[fl] &= ~(1u << sl);
        if (!a->sl_bitmap[fl]) a->fl_bitmap &= ~(1ull << fl);
    }
    n->prev_free = n->next_free = MO_NIL;
    a->st.free_blocks--;
}

/* Head of the first non-empty list whose every block is at least `size` bytes. */
uint32_t mo_core_find_fast(const mo_arena *a, uint64_t size) {
    uint64_t g = size >> GRANULE_SHIFT;
    if (g >= MO_SL_COUNT) size += ((uint64_t)1 << (fls64(g) - MO_SL_LOG2 + GRANULE_SHIFT)) - 1;
    uint32_t fl, sl;
    mo_core_mapping(size, &fl, &sl);
    if (fl >= MO_FL_COUNT) return MO_NIL;
    uint32_t slmap = a->sl_bitmap[fl] & (~0u << sl);
    if (!slmap) {
        uint64_t flmap = (fl + 1 < MO_FL_COUNT) ? a->fl_bitmap & (~0ull << (fl + 1)) : 0;
        if (!flmap) return MO_NIL;
        fl = ctz64(flmap);
        slmap = a->sl_bitmap[fl];
    }
    return a->heads[fl][ctz32(slmap)];
}

/* The lists the fast search skips may still hold a block that fits (it rounds the request up to a
 * whole size class, and assumes the worst alignment padding). Walk them so that an allocation fails
 * only when no free block can hold it. */
uint32_t mo_core_find_exhaustive(const mo_arena *a, uint64_t span, uint64_t align, uint64_t need) {
    uint32_t fl0, sl0, fl1, sl1;
    mo_core_mapping(span, &fl0, &sl0);
    mo_core_mapping(need, &fl1, &sl1);
    for (uint32_t fl = fl0; fl <= fl1 && fl < MO_FL_COUNT; fl++) {
        uint32_t lists = a->sl_bitmap[fl];
        if (fl == fl0) lists &= ~0u << sl0;
        if (fl == fl1 && sl1 + 1 < 32) lists &= (1u << (sl1 + 1)) - 1;
        while (lists) {
            uint32_t sl = ctz32(lists);
            lists &= lists - 1;
            for (uint32_t i = a->heads[fl][sl]; i != MO_NIL; i = a->nodes[i].next_free) {
                const mo_node *n = &a->nodes[i];
                if (mo_round_up(n->offset, align) + span <= n->offset + n->size) return i;
            }
        }
    }
    return MO_NIL;
}

/* Take [start, start + span) out of free block idx; what is left before and after stays free. The
 * caller reserved two nodes. idx ends up describing the carved block, not yet marked used. */
void mo_core_carve(mo_arena *a, uint32_t idx, uint64_t start, uint64_t span) {
    mo_core_remove_free(a, idx);
    mo_node *n = &a->nodes[idx];
    uint64_t front = start - n->offset;
    if (front) {
        uint32_t f = node_take(a);
        n = &a->nodes[idx];
        mo_node *fn = &a->nodes[f];
        fn->offset = n->offset;
        fn->size = front;
        fn->prev_phys = n->prev_phys;
        fn->next_phys = idx;
        if (n->prev_phys != MO_NIL) a->nodes[n->prev_phys].next_phys = f;
        else a->phys_head = f;
        n->prev_phys = f;
        n->offset = start;
        n->size -= front;
        mo_core_insert_free(a, f);
    }
    uint64_t back = n->size - span;
    if (back) {
        uint32_t b = node_take(a);
        n = &a->nodes[idx];
        mo_node *bn = &a->nodes[b];
        bn->offset = start + span;
        bn->size = back;
        bn->prev_phys = idx;
        bn->next_phys = n->next_phys;
        if (n->next_phys != MO_NIL) a->nodes[n->next_phys].prev_phys = b;
        n->next_phys = b;
        n->size = span;
        mo_core_insert_free(a, b);
    }
}

/* Return a block (already out of the hash table) to the free lists, merging with free neighbours.
 * The lowest-addressed block of a merged run survives, so a run's first node stays its node. */
void mo_core_release(mo_arena *a, uint32_t idx) {
    mo_node *n = &a->nodes[idx];
    n->state = MO_STATE_FREE;
    n->slack = 0;
    uint32_t p = n->prev_phys;
    if (p != MO_NIL && a->nodes[p].state == MO_STATE_FREE) {
        mo_core_remove_free(a, p);
        a->nodes[p].size += n->size;
        a->nodes[p].next_phys = n->next_phys;
        if (n->next_phys != MO_NIL) a->nodes[n->next_phys].prev_phys = p;
        node_put(a, idx);
        idx = p;
        n = &a->nodes[idx];
    }
    uint32_t x = n->next_phys;
    if (x != MO_NIL && a->nodes[x].state == MO_STATE_FREE) {
        mo_core_remove_free(a, x);
        n->size += a->nodes[x].size;
        n->next_phys = a->nodes[x].next_phys;
        if (n->next_phys != MO_NIL) a->nodes[n->next_phys].prev_phys = idx;
        node_put(a, x);
    }
    mo_core_insert_free(a, idx);
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

mo_arena *mo_core_new(uint64_t capacity, void *base, uint32_t quarantine_blocks, uint32_t flags, uint64_t seed) {
    mo_arena *a = calloc(1, sizeof(mo_arena));
    if (!a) return NULL;
    a->capacity = capacity;
    a->align_cap = 1;
    while (a->align_cap < capacity) a->align_cap <<= 1;
    a->base = base;
    a->flags = flags;
    uint64_t state = seed;
    a->canary_key = splitmix64(&state);
    /* Never 0: zero-filled memory must not pass for poison. */
    a->poison_byte = (uint8_t)(splitmix64(&state) | 1u);
    memset(a->heads, 0xFF, sizeof(a->heads));
    a->node_cap = 64;
    a->nodes = malloc(a->node_cap * sizeof(mo_node));
    a->q_cap = quarantine_blocks;
    a->quarantine = quarantine_blocks ? calloc(quarantine_blocks, sizeof(uint32_t)) : NULL;
    if (!a->nodes || hash_rebuild(a, 6) != MO_OK || (quarantine_blocks && !a->quarantine)) {
        mo_core_delete(a);
        return NULL;
    }
    a->spare_head = MO_NIL;
    uint32_t root = node_take(a);
    a->nodes[root].offset = 0;
    a->nodes[root].size = capacity;
    a->phys_head = root;
    mo_core_insert_free(a, root);
    a->st.capacity_bytes = capacity;
    note_metadata(a);
    return a;
}

void mo_core_delete(mo_arena *a) {
    if (!a) return;
    free(a->nodes);
    free(a->hash_keys);
    free(a->hash_vals);
    free(a->quarantine);
    free(a);
}
