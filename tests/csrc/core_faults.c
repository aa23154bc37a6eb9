/*
 * Faults the Python tests cannot reach, against the allocator's internals:
 *   1. host memory running out at every point of an allocation (new slabs, grown node and slab tables,
 *      a rebuilt hash table): the call fails with MO_E_NOMEM, the arena's counters are as before, and
 *      mo_arena_check passes;
 *   2. corrupted bookkeeping (slab spare stack, quarantine ring head, slot cache, slot bits): each is
 *      reported by mo_arena_check.
 *   3. the same for device pools (device.c, replay.c): host memory running out at every point of recording a
 *      step, arming its plan, replaying it with stream-ordered frees and record_stream: an allocation fails
 *      with MO_E_NOMEM and changes no counter, a free never fails (it waits for its stream instead), a lost
 *      recording is reported at its end, and mo_dev_check passes after every call;
 *   4. corrupted device-pool bookkeeping (pending counters, overlapping planned ranges, marker references):
 *      each is reported by mo_dev_check.
 * Built with -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc (GNU ld) by tests/test_pools_core_faults.py;
 * prints one line per failure and exits non-zero if there was any.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device_internal.h"

void *__real_malloc(size_t);
void *__real_calloc(size_t, size_t);
void *__real_realloc(void *, size_t);
static long calls, fail_at = -1;
void *__wrap_malloc(size_t n) { return ++calls == fail_at ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t s) { return ++calls == fail_at ? NULL : __real_calloc(n, s); }
void *__wrap_realloc(void *p, size_t n) { return ++calls == fail_at ? NULL : __real_realloc(p, n); }

#include "expect.h"

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

/* -- device pools ---------------------------------------------------------------------------------- */

/* Markers of fake streams 1..3: stream << 32 | position; done once the test runs the stream past it. */
static uint64_t fk_queued[4], fk_done[4];
static uint64_t fk_record(void *ctx, uint64_t stream) {
    (void)ctx;
    return stream << 32 | ++fk_queued[stream];
}
static int fk_query(void *ctx, uint64_t m) {
    (void)ctx;
    return fk_done[m >> 32] >= (uint32_t)m;
}
static int fk_wait(void *ctx, uint64_t m) {
    (void)ctx;
    if (fk_done[m >> 32] < (uint32_t)m) fk_done[m >> 32] = (uint32_t)m;
    return 0;
}
static void fk_release(void *ctx, uint64_t m) { (void)ctx, (void)m; }
static const mo_dev_ops FAKE_OPS = {NULL, fk_record, fk_query, fk_wait, fk_release, NULL, NULL};

#define DEV_OPS 48

static int dev_checked(uint64_t h, long fail, const char *where) {
    long saved = fail_at;
    fail_at = -1; /* the check's own scratch memory is not what is under test */
    int rc = mo_dev_check(h);
    fail_at = saved;
    EXPECT(rc == MO_OK, "fault %ld: check after %s: %s", fail, where, mo_last_error());
    return rc == MO_OK;
}

/* One step: blocks of varied sizes on streams 1 and 2, each freed three allocations later, some used on
 * stream 3 as well; streams run now and then. */
static void dev_step(uint64_t h, long fail) {
    uint64_t addr[DEV_OPS + 3] = {0};
    for (int i = 0; i < DEV_OPS + 3; i++) {
        if (i < DEV_OPS) {
            uint64_t nbytes = 512u * (1u + (uint32_t)(i * 7) % 13u) - (uint32_t)i % 3u, stream = 1u + (uint32_t)i % 2u;
            mo_dev_stats_t before, after;
            mo_dev_stats(h, &before);
            int rc = mo_dev_alloc(h, nbytes, stream, &addr[i]);
            if (rc != MO_OK) {
                mo_dev_stats(h, &after);
                EXPECT(rc == MO_E_NOMEM, "fault %ld: alloc %d returned %d (%s)", fail, i, rc, mo_last_error());
                EXPECT(after.live_bytes == before.live_bytes && after.live_blocks == before.live_blocks,
                       "fault %ld: the failed alloc %d changed the live counters", fail, i);
                dev_checked(h, fail, "a failed alloc");
                rc = mo_dev_alloc(h, nbytes, stream, &addr[i]); /* the fault was one call: it works again */
                EXPECT(rc == MO_OK, "fault %ld: no recovery: %s", fail, mo_last_error());
            }
            if (i % 5 == 0 && mo_dev_record_stream(h, addr[i], 3) != MO_OK)
                EXPECT(0 == strncmp(mo_last_error(), "no host memory", 14) || strstr(mo_last_error(), "host memory"),
                       "fault %ld: record_stream: %s", fail, mo_last_error());
        }
        if (i >= 3 && addr[i - 3]) {
            int rc = mo_dev_free(h, addr[i - 3], 1u + (uint32_t)(i - 3) % 2u);
            EXPECT(rc == MO_OK, "fault %ld: free %d failed: %s", fail, i - 3, mo_last_error());
        }
        if (i % 11 == 10) fk_done[1 + i % 3] = fk_queued[1 + i % 3];
        if (!dev_checked(h, fail, "a step's call")) return;
    }
}

static int armed_among; /* faults after which a plan among the live blocks was armed */

static void device_out_of_host_memory(long fail) {
    calls = 0;
    fail_at = -1;
    memset(fk_queued, 0, sizeof(fk_queued));
    memset(fk_done, 0, sizeof(fk_done));
    uint64_t h;
    if (mo_dev_create(1u << 22, 1ull << 30, NULL, 512, 2, 0, 1, &FAKE_OPS, &h) != MO_OK) return;
    fail_at = calls + fail;
    int rc = mo_dev_record_begin(h);
    EXPECT(rc == MO_OK, "fault %ld: record_begin: %s", fail, mo_last_error());
    dev_step(h, fail);
    uint64_t count = 0;
    rc = mo_dev_record_end(h, &count);
    EXPECT(rc == MO_OK || rc == MO_E_NOMEM, "fault %ld: record_end returned %d", fail, rc);
    if (rc == MO_OK) {
        uint64_t nbytes[DEV_OPS], starts[DEV_OPS], ends[DEV_OPS], offsets[DEV_OPS], region = 0;
        EXPECT(count == DEV_OPS && mo_dev_trace(h, count, nbytes, starts, ends) == MO_OK, "fault %ld: trace", fail);
        for (uint64_t i = 0; i < count && count == DEV_OPS; i++) { /* a plan without reuse: valid by construction */
            offsets[i] = region;
            region += (nbytes[i] + 511u) & ~511ull;
        }
        uint64_t run_offsets[8], run_sizes[8], runs = 0;
        if (fail % 2 && count == DEV_OPS && mo_dev_free_runs(h, 8, run_offsets, run_sizes, &runs) == MO_OK && runs &&
            runs <= 8) {
            /* Among the live blocks: the same layout in two regions of the highest free run, 512 bytes apart. */
            uint64_t base = run_offsets[runs - 1], half = offsets[count / 2];
            uint64_t region_offsets[2] = {base, base + half + 512}, region_bytes[2] = {half, region - half};
            for (uint64_t i = 0; i < count; i++) offsets[i] += base + (i >= count / 2 ? 512 : 0);
            rc = mo_dev_plan_at(h, count, nbytes, offsets, 2, region_offsets, region_bytes);
            armed_among += rc == MO_OK;
        } else {
            rc = mo_dev_plan(h, count, nbytes, offsets, region);
        }
        EXPECT(rc == MO_OK || rc == MO_E_NOMEM, "fault %ld: plan returned %d (%s)", fail, rc, mo_last_error());
    }
    dev_checked(h, fail, "arming");
    for (int step = 0; step < 3; step++) {
        mo_dev_step(h);
        dev_step(h, fail);
    }
    fail_at = -1;
    for (int s = 1; s < 4; s++) fk_done[s] = fk_queued[s];
    EXPECT(mo_dev_collect(h, 1) == MO_OK && dev_checked(h, fail, "collect"), "fault %ld: collect", fail);
    mo_dev_stats_t st;
    mo_dev_stats(h, &st);
    EXPECT(st.live_blocks == 0 && st.pending_blocks == 0, "fault %ld: %llu live, %llu pending at the end", fail,
           (unsigned long long)st.live_blocks, (unsigned long long)st.pending_blocks);
    if (st.plan_bytes) EXPECT(mo_dev_unplan(h) == MO_OK, "fault %ld: unplan: %s", fail, mo_last_error());
    EXPECT(mo_dev_destroy(h) == MO_OK, "fault %ld: destroy: %s", fail, mo_last_error());
}

static void device_corruption_is_reported(void) {
    uint64_t h, a, b, c;
    memset(fk_queued, 0, sizeof(fk_queued));
    memset(fk_done, 0, sizeof(fk_done));
    mo_dev_create(1u << 20, 1ull << 30, NULL, 512, 0, 0, 1, &FAKE_OPS, &h);
    mo_dev *d = mo_dev_unlocked(h);
    uint64_t nbytes[2] = {4096, 4096}, offsets[2] = {0, 4096};
    mo_dev_plan(h, 2, nbytes, offsets, 8192);
    mo_dev_step(h);
    mo_dev_alloc(h, 4096, 1, &a);
    mo_dev_alloc(h, 4096, 1, &b);
    mo_dev_alloc(h, 100000, 1, &c); /* past the plan: the heap */
    mo_dev_free(h, c, 1);
    mo_dev_collect(h, 0);
    EXPECT(mo_dev_check(h) == MO_OK, "clean pool: %s", mo_last_error());
    d->st.pending_bytes += 512;
    EXPECT(mo_dev_check(h) == MO_E_CORRUPTION, "a pending counter off by 512 passed");
    d->st.pending_bytes -= 512;
    d->plan.ranges[1].offset -= 512;
    EXPECT(mo_dev_check(h) == MO_E_CORRUPTION, "overlapping planned ranges passed");
    d->plan.ranges[1].offset += 512;
    uint32_t m = d->pend[d->streams[0].head].marker;
    EXPECT(m != 0, "setup: the pending free has no marker");
    if (m) {
        d->markers[m].refs++;
        EXPECT(mo_dev_check(h) == MO_E_CORRUPTION, "a marker reference too many passed");
        d->markers[m].refs--;
    }
    d->heap_live_bytes += 512;
    EXPECT(mo_dev_check(h) == MO_E_CORRUPTION, "live heap bytes off by 512 passed");
    d->heap_live_bytes -= 512;
    EXPECT(mo_dev_check(h) == MO_OK, "restored pool: %s", mo_last_error());
    mo_dev_free(h, a, 1);
    mo_dev_free(h, b, 1);
    fk_done[1] = fk_queued[1];
    mo_dev_collect(h, 1);
    EXPECT(mo_dev_destroy(h) == MO_OK, "destroy: %s", mo_last_error());
}

int main(void) {
    for (long fail = 1; fail <= 300; fail++) out_of_host_memory(fail);
    corruption_is_reported();
    for (long fail = 1; fail <= 300; fail++) device_out_of_host_memory(fail); /* about 240 host allocations in all */
    EXPECT(armed_among > 50, "a plan among the live blocks was armed after only %d faults", armed_among);
    device_corruption_is_reported();
    if (failures) printf("%d failure(s)\n", failures);
    else printf("ok\n");
    return failures != 0;
}
