/*
 * The TLSF core: segregated free lists with two-level bitmaps (O(1) search), a pool of block
 * descriptors addressed by index, the offset -> block hash table, and the records of small-object
 * slabs. Nothing here locks or validates; arena.c decides what is allowed and api.c serialises calls.
 */
#include <stddef.h>
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
    return (uint64_t)sizeof(mo_arena) + (uint64_t)a->fl_count * sizeof(*a->heads) + (uint64_t)a->node_cap * sizeof(mo_node) +
           ((uint64_t)1 << a->hash_bits) * (sizeof(uint64_t) + sizeof(uint32_t)) +
           (uint64_t)a->q_cap * sizeof(uint32_t) +
           (uint64_t)a->slab_cap * (sizeof(mo_slab *) + sizeof(uint32_t)) + a->slab_bytes;
}

void mo_core_note_metadata(mo_arena *a) {
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
        /* Grow by a quarter: the array is metadata, and a doubling leaves up to half of it unused. */
        uint64_t cap = (uint64_t)a->node_cap + a->node_cap / 4;
        if (cap < (uint64_t)a->node_used + nodes_needed) cap = (uint64_t)a->node_used + nodes_needed;
        /* Node indices stay below MO_SLOT_REF, so a serial's low half tells a node from a slab slot. */
        if (cap >= MO_SLOT_REF) return mo_fail(MO_E_NOMEM, "more than %u blocks in one arena", MO_SLOT_REF - 1);
        mo_node *grown = realloc(a->nodes, (size_t)cap * sizeof(mo_node));
        if (!grown) return mo_fail(MO_E_NOMEM, "no host memory for %llu block descriptors", (unsigned long long)cap);
        a->nodes = grown;
        a->node_cap = (uint32_t)cap;
        mo_core_note_metadata(a); /* grown for good, even if the hash rebuild below fails */
    }
    /* Load factor at most 3/4: linear probes stay short (about 2.5 slots for a hit), and the table
     * costs at most 32 bytes a block (slabs, not their slots, are its entries for small blocks). */
    if ((a->hash_count + 1) * 4 > ((uint64_t)3 << a->hash_bits)) {
        int rc = hash_rebuild(a, a->hash_bits + 1);
        if (rc != MO_OK) return rc;
    }
    mo_core_note_metadata(a);
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
    if (fl >= a->fl_count) return MO_NIL;
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
    for (uint32_t fl = fl0; fl <= fl1 && fl < a->fl_count; fl++) {
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

static inline uint64_t slab_record_bytes(uint32_t slots) { return offsetof(mo_slab, meta) + 3u * (uint64_t)slots; }

uint32_t mo_slab_recip[MO_SLAB_CLASSES];

__attribute__((constructor)) static void init_recips(void) {
    for (uint32_t c = 0; c < MO_SLAB_CLASSES; c++) mo_slab_recip[c] = (uint32_t)((1ull << 32) / ((c + 1u) * MO_GRANULE_BYTES) + 1u);
}

/* A record for a new slab of class cls (not yet placed: start and node are the caller's), or MO_NIL
 * when host memory runs out. The only step of making a slab that can fail, so it comes first. */
uint32_t mo_core_slab_new(mo_arena *a, uint32_t cls) {
    if (a->slab_spare_count == 0 && a->slab_used == a->slab_cap) {
        uint32_t cap = a->slab_cap ? a->slab_cap + a->slab_cap / 4 : 16;
        if (cap > MO_MAX_SLABS) cap = MO_MAX_SLABS;
        if (cap <= a->slab_cap) {
            mo_fail(MO_E_NOMEM, "more than %u small-object slabs in one arena", MO_MAX_SLABS);
            return MO_NIL;
        }
        mo_slab **slabs = realloc(a->slabs, cap * sizeof(*slabs));
        if (slabs) a->slabs = slabs;
        uint32_t *spare = slabs ? realloc(a->slab_spare, cap * sizeof(*spare)) : NULL;
        if (!spare) {
            mo_fail(MO_E_NOMEM, "no host memory for %u slab records", cap);
            return MO_NIL;
        }
        a->slab_spare = spare;
        a->slab_cap = cap;
        mo_core_note_metadata(a); /* grown for good, even if the record below cannot be had */
    }
    uint64_t span = (uint64_t)(cls + 1) * MO_GRANULE_BYTES;
    uint32_t slots = (uint32_t)(mo_slab_bytes(span) / span);
    mo_slab *s = calloc(1, slab_record_bytes(slots));
    if (!s) {
        mo_fail(MO_E_NOMEM, "no host memory for a slab record");
        return MO_NIL;
    }
    s->span = (uint16_t)span;
    s->slots = (uint8_t)slots;
    s->cls = (uint8_t)cls;
    /* Bits past the last slot are marked taken, so a search never stops on them. */
    s->taken_map[slots >> 6] = ~0ull << (slots & 63u);
    if (slots < 64u) s->taken_map[1] = ~0ull;
    s->next = s->prev = s->node = MO_NIL;
    uint32_t si = a->slab_spare_count ? a->slab_spare[--a->slab_spare_count] : a->slab_used++;
    a->slabs[si] = s;
    a->slab_bytes += slab_record_bytes(slots);
    mo_core_note_metadata(a);
    return si;
}

void mo_core_slab_drop(mo_arena *a, uint32_t si) {
    a->slab_bytes -= slab_record_bytes(a->slabs[si]->slots);
    free(a->slabs[si]);
    a->slabs[si] = NULL;
    a->slab_spare[a->slab_spare_count++] = si;
    mo_core_note_metadata(a);
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
    a->check_key = splitmix64(&state);
    uint32_t top_fl, top_sl;
    mo_core_mapping(capacity, &top_fl, &top_sl);
    a->fl_count = top_fl + 1;
    a->heads = malloc(a->fl_count * sizeof(*a->heads));
    if (a->heads) memset(a->heads, 0xFF, a->fl_count * sizeof(*a->heads));
    a->node_cap = 64;
    a->nodes = malloc(a->node_cap * sizeof(mo_node));
    a->q_cap = quarantine_blocks;
    a->quarantine = quarantine_blocks ? calloc(quarantine_blocks, sizeof(uint32_t)) : NULL;
    if (!a->heads || !a->nodes || hash_rebuild(a, 6) != MO_OK || (quarantine_blocks && !a->quarantine)) {
        mo_core_delete(a);
        return NULL;
    }
    a->spare_head = MO_NIL;
    memset(a->partial, 0xFF, sizeof(a->partial));
    uint32_t root = node_take(a);
    a->nodes[root].offset = 0;
    a->nodes[root].size = capacity;
    a->phys_head = root;
    mo_core_insert_free(a, root);
    a->st.capacity_bytes = capacity;
    mo_core_note_metadata(a);
    return a;
}

void mo_core_delete(mo_arena *a) {
    if (!a) return;
    free(a->heads);
    free(a->nodes);
    free(a->hash_keys);
    free(a->hash_vals);
    free(a->quarantine);
    for (uint32_t i = 0; i < a->slab_used; i++) free(a->slabs[i]);
    free(a->slabs);
    free(a->slab_spare);
    free(a);
}
