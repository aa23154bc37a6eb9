/*
 * Faults the Python tests cannot reach, against the allocator's internals:
 *   1. host memory running out at every point of an allocation (new slabs, grown node and slab tables,
 *      a rebuilt hash table): the call fails with MO_E_NOMEM, the arena's counters are as before, and
 *      mo_arena_check passes;
 *   2. corrupted bookkeeping (slab spare stack, quarantine ring head, slot cache, slot bits): each is
 *      reported by mo_arena_check.
 * Built with -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc (GNU ld) by tests/test_pools_core_faults.py;
 * prints one line per failure and exits non-zero if there was any.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moalloc_internal.h"

void *__real_malloc(size_t);
void *__real_calloc(size_t, size_t);
void *__real_realloc(void *, size_t);
static long calls, fail_at = -1;
void *__wrap_malloc(size_t n) { return ++calls == fail_at ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t s) { return ++calls == fail_at ? NULL : __real_calloc(n, s); }
void *__wrap_realloc(void *p, size_t n) { return ++calls == fail_at ? NULL : __real_realloc(p, n); }

static int failures;
#define EXPECT(cond, ...)                                  \
    do {                                                   \
        if (!(cond)) {                                     \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
            printf(__VA_ARGS__);                           \
            printf("\n");                                  \
            failures++;                                    \
        }                                                  \
    } while (0)

/* The counters a failed call must leave alone (metadata may have grown for good). */
static int same_counters(const mo_stats_t *x, const mo_stats_t *y) {
    return x->allocated_bytes == y->allocated_bytes && x->requested_bytes == y->requested_bytes &&
           x->live_blocks == y->live_blocks && x->quarantined_blocks == y->quarantined_blocks &&
           x->cached_blocks == y->cached_blocks && x->cached_bytes == y->cached_bytes &&
           x->free_blocks == y->free_blocks && x->alloc_count == y->alloc_count && x->high_water_bytes == y->high_water_bytes;
}

/* Small blocks of every class (a new slab each), then large ones (nodes, hash table), with frees in
 * between; host allocation number `fail` after the arena's creation fails. */
static void out_of_host_memory(long fail) {
    calls = 0;
    fail_at = -1;
    mo_arena *a = mo_core_new(1u << 24, NULL, 4, 0, 1);
    if (!a) return;
    fail_at = calls + fail;
    uint64_t off[400], span, serial[400];
    int n = 0, failed = 0;
    for (int i = 0; i < 400 && !failed; i++) {
        mo_stats_t before, after;
        mo_arena_stats(a, &before);
        uint64_t nbytes = i < 200 ? 16u * (1u + (uint32_t)i % 64u) : 4096u * (1u + (uint32_t)i % 7u);
        int rc = mo_arena_alloc(a, nbytes, 16, &off[n], &span, &serial[n], NULL);
        if (rc == MO_OK) {
            n++;
            if (i % 3 == 0) {
                n--;
                mo_arena_free(a, (mo_handle){off[n], 0, serial[n], 0});
            }
            continue;
        }
        failed = 1;
        mo_arena_stats(a, &after);
        EXPECT(rc == MO_E_NOMEM, "fault %ld: alloc %d returned %d (%s)", fail, i, rc, mo_last_error());
        EXPECT(same_counters(&before, &after), "fault %ld: the failed alloc %d changed the counters", fail, i);
        fail_at = -1;
        EXPECT(mo_arena_check(a) == MO_OK, "fault %ld: check after the failed alloc %d: %s", fail, i, mo_last_error());
        /* The arena goes on working. */
        EXPECT(mo_arena_alloc(a, nbytes, 16, &off[n], &span, &serial[n], NULL) == MO_OK, "fault %ld: no recovery", fail);
    }
    fail_at = -1;
    mo_core_delete(a);
}

static mo_arena *arena_with_slabs(uint32_t quarantine) {
    mo_arena *a = mo_core_new(1u << 20, NULL, quarantine, 0, 1);
    uint64_t off, span, serial;
    for (int i = 0; i < 300; i++) mo_arena_alloc(a, 16u * (1u + (uint32_t)i % 3u), 16, &off, &span, &serial, NULL);
    return a;
}

static void corruption_is_reported(void) {
    uint64_t off, span, serial, off2, serial2;
    /* A spare slab index that names a live record (the next new slab would overwrite it). */
    mo_arena *a = arena_with_slabs(0);
    EXPECT(mo_arena_check(a) == MO_OK, "clean arena: %s", mo_last_error());
    a->slab_spare[a->slab_spare_count++] = 0;
    EXPECT(mo_arena_check(a) == MO_E_CORRUPTION, "a spare index naming a live slab passed");
    a->slab_spare_count--;
    mo_core_delete(a);
    /* The same free record listed twice: 70 blocks of 16 bytes fill one slab and start a second; freed
     * (no quarantine), 16 wait in the cache and the second slab empties and goes back. */
    a = mo_core_new(1u << 20, NULL, 0, 0, 1);
    uint64_t offs[70], serials[70];
    for (int i = 0; i < 70; i++) mo_arena_alloc(a, 16, 16, &offs[i], &span, &serials[i], NULL);
    for (int i = 0; i < 70; i++) mo_arena_free(a, (mo_handle){offs[i], 16, serials[i], 0});
    EXPECT(a->slab_spare_count == 1 && mo_arena_check(a) == MO_OK, "setup: no slab was released");
    a->slab_spare[a->slab_spare_count++] = a->slab_spare[0];
    EXPECT(mo_arena_check(a) == MO_E_CORRUPTION, "a spare index listed twice passed");
    a->slab_spare_count--;
    EXPECT(mo_arena_check(a) == MO_OK, "restored arena: %s", mo_last_error());
    mo_core_delete(a);

    /* The quarantine ring head out of range. */
    a = arena_with_slabs(4);
    a->q_head = 7;
    EXPECT(mo_arena_check(a) == MO_E_CORRUPTION, "a quarantine head beyond the ring passed");
    mo_core_delete(a);

    /* A cached slot whose held bit was lost (it would read as live), and one freed to its slab. */
    a = mo_core_new(1u << 20, NULL, 0, 0, 1);
    mo_arena_alloc(a, 40, 16, &off, &span, &serial, NULL);
    mo_arena_alloc(a, 40, 16, &off2, &span, &serial2, NULL);
    mo_arena_free(a, (mo_handle){off, 40, serial, 0}); /* no quarantine: straight to the slot cache */
    mo_slab *s = a->slabs[0];
    EXPECT(a->cache_count[2] == 1 && mo_slot_held(s, 0), "setup: slot 0 is not cached");
    mo_slot_unhold(s, 0);
    EXPECT(mo_arena_check(a) == MO_E_CORRUPTION, "a cached slot without its held bit passed");
    mo_slot_hold(s, 0);
    s->taken_map[0] &= ~1ull;
    EXPECT(mo_arena_check(a) == MO_E_CORRUPTION, "a cached slot that is not taken passed");
    s->taken_map[0] |= 1ull;
    EXPECT(mo_arena_check(a) == MO_OK, "restored arena: %s", mo_last_error());
    mo_core_delete(a);
}

int main(void) {
    for (long fail = 1; fail <= 300; fail++) out_of_host_memory(fail);
    corruption_is_reported();
    if (failures) printf("%d failure(s)\n", failures);
    else printf("ok\n");
    return failures != 0;
}
