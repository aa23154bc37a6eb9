/*
 * Device pools' handles and entry points (moalloc.h): a pool is named by a handle (slot and generation, as
 * arenas are), and every call holds the pool's mutex. The ops (markers, overflow memory) run under it, as the
 * caching allocator runs its events under its own lock. Also the invariant walk and the statistics.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device_internal.h"

typedef unsigned long long ull;

#define MO_MAX_DEVS 256u
#define MO_DEV_TAG 0x80000000u /* in a handle's low word: a device pool's, never an arena's */

typedef struct dev_slot {
    pthread_mutex_t lock;
    uint32_t generation;
    mo_dev *dev;
} dev_slot;

static dev_slot dev_slots[MO_MAX_DEVS];
static pthread_mutex_t dev_table_lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((constructor)) static void init_dev_slots(void) {
    for (uint32_t i = 0; i < MO_MAX_DEVS; i++) {
        pthread_mutex_init(&dev_slots[i].lock, NULL);
        dev_slots[i].generation = 1;
    }
}

static dev_slot *dev_acquire(uint64_t handle, mo_dev **d) {
    uint32_t low = (uint32_t)handle, index = low & ~MO_DEV_TAG;
    if (!(low & MO_DEV_TAG) || index == 0 || index > MO_MAX_DEVS) {
        mo_fail(MO_E_BAD_HANDLE, "handle %llu was never returned by mo_dev_create", (ull)handle);
        return NULL;
    }
    dev_slot *s = &dev_slots[index - 1];
    pthread_mutex_lock(&s->lock);
    if (!s->dev || s->generation != (uint32_t)(handle >> 32)) {
        pthread_mutex_unlock(&s->lock);
        mo_fail(MO_E_BAD_HANDLE, "the device pool was destroyed (closed); its blocks can no longer be used or freed");
        return NULL;
    }
    *d = s->dev;
    return s;
}

/* The pool behind a handle, unlocked: for tests of the checks (tests/csrc/core_faults.c), never the API. */
mo_dev *mo_dev_unlocked(uint64_t handle) {
    mo_dev *d;
    dev_slot *s = dev_acquire(handle, &d);
    if (!s) return NULL;
    pthread_mutex_unlock(&s->lock);
    return d;
}

#define WITH_DEV(handle, body)                   \
    do {                                         \
        mo_dev *d;                               \
        dev_slot *slot_ = dev_acquire(handle, &d); \
        if (!slot_) return MO_E_BAD_HANDLE;      \
        int rc_ = (body);                        \
        pthread_mutex_unlock(&slot_->lock);      \
        return rc_;                              \
    } while (0)

static void dev_delete(mo_dev *d) {
    if (!d) return;
    mo_replay_free_all(d);
    if (d->arena) mo_core_delete(d->arena);
    free(d->markers);
    free(d->marker_free);
    free(d->pend);
    free(d->streams);
    free(d->uses);
    mo_map_free(&d->pending_map);
    mo_map_free(&d->overflow_map);
    mo_map_free(&d->uses_map);
    free(d);
}

MO_API size_t mo_dev_stats_size(void) { return sizeof(mo_dev_stats_t); }

MO_API int mo_dev_create(uint64_t capacity_bytes, uint64_t base_address, void *base, uint64_t alignment,
                         uint32_t quarantine_blocks, uint32_t flags, uint64_t seed, const mo_dev_ops *ops,
                         uint64_t *handle_out) {
    if (alignment < MO_GRANULE_BYTES || (alignment & (alignment - 1)) || alignment > MO_SLAB_MAX_BYTES)
        return mo_fail(MO_E_INVALID_ARG, "alignment %llu is not a power of two in [16, 16384]; e.g. 512", (ull)alignment);
    if (base_address == 0 || base_address % alignment || base_address + capacity_bytes < base_address)
        return mo_fail(MO_E_INVALID_ARG, "base address 0x%llx is 0, not a multiple of the alignment %llu, or the region wraps",
                       (ull)base_address, (ull)alignment);
    if (ops && (!ops->record || !ops->query || !ops->wait || !ops->release || (!ops->overflow_alloc != !ops->overflow_free)))
        return mo_fail(MO_E_INVALID_ARG, "ops need record, query, wait and release, and overflow_alloc with overflow_free or neither");
    if (capacity_bytes % alignment)
        return mo_fail(MO_E_INVALID_ARG, "capacity %llu bytes is not a multiple of the alignment %llu", (ull)capacity_bytes,
                       (ull)alignment);
    uint64_t arena;
    int rc = mo_arena_create(capacity_bytes, base, quarantine_blocks, flags, seed, &arena);
    if (rc != MO_OK) return rc;
    /* Take the core over from the handle table: the pool's mutex serialises it. */
    mo_dev *d = calloc(1, sizeof(mo_dev));
    if (!d) {
        mo_arena_destroy(arena);
        return mo_fail(MO_E_NOMEM, "no host memory for a device pool");
    }
    d->arena = mo_api_detach(arena);
    d->base_address = base_address;
    d->capacity = capacity_bytes;
    d->alignment = alignment;
    d->has_ops = ops != NULL;
    if (ops) d->ops = *ops;
    d->marker_used = 1; /* 0 is "no marker" */
    d->pend_spare = d->slow_head = d->uses_spare = MO_NIL;
    d->st.capacity_bytes = capacity_bytes;
    pthread_mutex_lock(&dev_table_lock);
    for (uint32_t i = 0; i < MO_MAX_DEVS; i++) {
        dev_slot *s = &dev_slots[i];
        pthread_mutex_lock(&s->lock);
        if (!s->dev) {
            s->dev = d;
            *handle_out = (uint64_t)s->generation << 32 | MO_DEV_TAG | (i + 1);
            pthread_mutex_unlock(&s->lock);
            pthread_mutex_unlock(&dev_table_lock);
            return MO_OK;
        }
        pthread_mutex_unlock(&s->lock);
    }
    pthread_mutex_unlock(&dev_table_lock);
    dev_delete(d);
    return mo_fail(MO_E_NOMEM, "all %u device pool slots are in use; close pools you no longer need", MO_MAX_DEVS);
}

static int live_blocks_error(const mo_dev *d) {
    return mo_fail(MO_E_INVALID_ARG, "the device pool still has %llu live blocks (%llu bytes); free them first",
                   (ull)d->st.live_blocks, (ull)d->st.live_bytes);
}

MO_API int mo_dev_destroy(uint64_t handle) {
    mo_dev *d;
    dev_slot *s = dev_acquire(handle, &d);
    if (!s) return MO_E_BAD_HANDLE;
    if (d->st.live_blocks) {
        int rc = live_blocks_error(d);
        pthread_mutex_unlock(&s->lock);
        return rc;
    }
    mo_dev_drain(d);
    if (d->plan.armed) mo_replay_unplan(d);
    s->dev = NULL;
    if (++s->generation == 0) s->generation = 1;
    pthread_mutex_unlock(&s->lock);
    dev_delete(d);
    return MO_OK;
}

MO_API int mo_dev_alloc(uint64_t handle, uint64_t nbytes, uint64_t stream, uint64_t *address_out) {
    WITH_DEV(handle, mo_dev_do_alloc(d, nbytes, stream, address_out));
}

MO_API int mo_dev_free(uint64_t handle, uint64_t address, uint64_t stream) { WITH_DEV(handle, mo_dev_do_free(d, address, stream)); }

MO_API int mo_dev_record_stream(uint64_t handle, uint64_t address, uint64_t stream) {
    WITH_DEV(handle, mo_dev_do_record_stream(d, address, stream));
}

MO_API int mo_dev_collect(uint64_t handle, int wait) { WITH_DEV(handle, mo_dev_do_collect(d, wait)); }

static int dev_record_begin(mo_dev *d) {
    if (d->plan.armed) return mo_fail(MO_E_INVALID_ARG, "a plan is armed; unplan before recording another step");
    if (d->recording) return mo_fail(MO_E_INVALID_ARG, "a step is being recorded already; end it first");
    mo_map_free(&d->rec_map);
    d->trace_len = d->clock = 0;
    d->trace_failed = 0;
    d->recording = 1;
    d->st.recording = 1;
    return MO_OK;
}

MO_API int mo_dev_record_begin(uint64_t handle) { WITH_DEV(handle, dev_record_begin(d)); }

static int dev_record_end(mo_dev *d, uint64_t *count) {
    if (!d->recording) return mo_fail(MO_E_INVALID_ARG, "no step is being recorded; call mo_dev_record_begin first");
    d->recording = 0;
    d->st.recording = 0;
    mo_map_free(&d->rec_map);
    if (d->trace_failed) {
        d->trace_len = 0;
        return mo_fail(MO_E_NOMEM, "recording ran out of host memory; the step was not recorded (record another)");
    }
    d->st.recorded_allocs = d->trace_len;
    *count = d->trace_len;
    return MO_OK;
}

MO_API int mo_dev_record_end(uint64_t handle, uint64_t *count_out) { WITH_DEV(handle, dev_record_end(d, count_out)); }

static int dev_trace(mo_dev *d, uint64_t count, uint64_t *nbytes, uint64_t *starts, uint64_t *ends) {
    if (d->recording) return mo_fail(MO_E_INVALID_ARG, "the step is still being recorded; end it first");
    if (count != d->trace_len)
        return mo_fail(MO_E_INVALID_ARG, "the trace has %llu allocations, not %llu", (ull)d->trace_len, (ull)count);
    for (uint64_t i = 0; i < count; i++) {
        nbytes[i] = d->trace[i].nbytes;
        starts[i] = d->trace[i].start;
        ends[i] = d->trace[i].end;
    }
    return MO_OK;
}

MO_API int mo_dev_trace(uint64_t handle, uint64_t count, uint64_t *nbytes, uint64_t *starts, uint64_t *ends) {
    WITH_DEV(handle, dev_trace(d, count, nbytes, starts, ends));
}

MO_API int mo_dev_plan(uint64_t handle, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets,
                       uint64_t region_bytes) {
    WITH_DEV(handle, mo_replay_plan(d, count, nbytes, offsets, region_bytes));
}

MO_API int mo_dev_plan_at(uint64_t handle, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets,
                          uint64_t n_regions, const uint64_t *region_offsets, const uint64_t *region_bytes) {
    WITH_DEV(handle, mo_replay_plan_at(d, count, nbytes, offsets, n_regions, region_offsets, region_bytes));
}

static int dev_free_runs(mo_dev *d, uint64_t cap, uint64_t *offsets, uint64_t *sizes, uint64_t *count) {
    int rc = mo_dev_do_collect(d, 1);
    return rc != MO_OK ? rc : mo_arena_free_runs(d->arena, cap, offsets, sizes, count);
}

MO_API int mo_dev_free_runs(uint64_t handle, uint64_t cap, uint64_t *offsets, uint64_t *sizes, uint64_t *count) {
    WITH_DEV(handle, dev_free_runs(d, cap, offsets, sizes, count));
}

static int dev_set_lowest_first(mo_dev *d, int on) {
    d->lowest_first = on != 0;
    return MO_OK;
}

MO_API int mo_dev_set_lowest_first(uint64_t handle, int on) { WITH_DEV(handle, dev_set_lowest_first(d, on)); }

MO_API int mo_dev_unplan(uint64_t handle) { WITH_DEV(handle, mo_replay_unplan(d)); }

static int dev_departures(mo_dev *d, uint64_t cap, mo_departure_t *out, uint64_t *count) {
    const mo_plan *p = &d->plan;
    if (cap && !out) return mo_fail(MO_E_INVALID_ARG, "no buffer for %llu departures", (unsigned long long)cap);
    uint64_t n = p->n_departures < cap ? p->n_departures : cap;
    if (n) memcpy(out, p->departures, n * sizeof(mo_departure_t));
    *count = p->n_departures;
    return MO_OK;
}

MO_API int mo_dev_departures(uint64_t handle, uint64_t cap, mo_departure_t *out, uint64_t *count) {
    if (!count) return mo_fail(MO_E_INVALID_ARG, "count must not be NULL");
    WITH_DEV(handle, dev_departures(d, cap, out, count));
}

static int dev_step(mo_dev *d) {
    if (d->plan.armed) {
        d->plan.cursor = 0;
        d->st.replay_steps++;
    }
    return MO_OK;
}

MO_API int mo_dev_step(uint64_t handle) { WITH_DEV(handle, dev_step(d)); }

#define BROKEN(...) return mo_fail(MO_E_CORRUPTION, "device pool invariant broken: " __VA_ARGS__)

/* One stream's FIFO: links, sealed entries before open ones, the open count; adds to the totals. */
static int check_stream(const mo_dev *d, uint32_t si, uint64_t *blocks, uint64_t *bytes, uint64_t *heap_bytes) {
    const mo_stream *s = &d->streams[si];
    uint32_t prev = MO_NIL, open = 0;
    uint64_t open_bytes = 0, steps = 0;
    for (uint32_t i = s->head; i != MO_NIL; prev = i, i = d->pend[i].next) {
        if (i >= d->pend_used || ++steps > d->pend_used) BROKEN("stream %u's pending list leaves the records or loops", si);
        const mo_pending *e = &d->pend[i];
        if (!e->in_use || e->stream != si || e->prev != prev || e->n_extra) BROKEN("pending entry %u is in the wrong list", i);
        if (e->marker) {
            if (open) BROKEN("stream %u has a sealed entry after an open one", si);
        } else {
            open++;
            open_bytes += e->nbytes;
        }
        *blocks += 1;
        *bytes += e->nbytes;
        if (e->kind == MO_PEND_HEAP) *heap_bytes += e->nbytes;
    }
    if (prev != s->tail || open != s->open || open_bytes != s->open_bytes)
        BROKEN("stream %u counts %u open entries (%llu bytes), its list %u (%llu)", si, s->open, (ull)s->open_bytes, open,
               (ull)open_bytes);
    return MO_OK;
}

static int check_entry(const mo_dev *d, uint32_t i, uint32_t *refs) {
    const mo_pending *e = &d->pend[i];
    uint64_t at, nbytes, span;
    if (!mo_map_get(&d->pending_map, e->address, &at) || at != i) BROKEN("pending block 0x%llx is not in the table", (ull)e->address);
    if (e->kind == MO_PEND_HEAP) {
        if (mo_arena_query(d->arena, (mo_handle){e->address - d->base_address, 0, 0, 0}, &nbytes, &span) != MO_OK ||
            nbytes != e->nbytes)
            BROKEN("pending block 0x%llx is not a live heap block of %llu bytes", (ull)e->address, (ull)e->nbytes);
    } else if (!mo_map_get(&d->overflow_map, e->address, &nbytes) || nbytes != e->nbytes) {
        BROKEN("pending block 0x%llx is not an overflow block of %llu bytes", (ull)e->address, (ull)e->nbytes);
    }
    if (e->marker) refs[e->marker]++;
    for (uint32_t k = 0; k < e->n_extra; k++) refs[e->extra[k]]++;
    return MO_OK;
}

static int dev_check(mo_dev *d) {
    int rc = mo_arena_check(d->arena);
    if (rc != MO_OK) return rc;
    uint64_t blocks = 0, bytes = 0, heap_bytes = 0;
    for (uint32_t si = 0; si < d->stream_count; si++)
        if ((rc = check_stream(d, si, &blocks, &bytes, &heap_bytes)) != MO_OK) return rc;
    uint64_t steps = 0;
    for (uint32_t i = d->slow_head, prev = MO_NIL; i != MO_NIL; prev = i, i = d->pend[i].next) {
        if (i >= d->pend_used || ++steps > d->pend_used) BROKEN("the slow pending list leaves the records or loops");
        const mo_pending *e = &d->pend[i];
        if (!e->in_use || !e->n_extra || e->prev != prev) BROKEN("pending entry %u is in the wrong list", i);
        blocks++;
        bytes += e->nbytes;
        if (e->kind == MO_PEND_HEAP) heap_bytes += e->nbytes;
    }
    if (blocks != d->st.pending_blocks || bytes != d->st.pending_bytes || d->pending_map.count != blocks)
        BROKEN("%llu pending blocks (%llu bytes) counted, %llu (%llu) listed, %llu in the table", (ull)d->st.pending_blocks,
               (ull)d->st.pending_bytes, (ull)blocks, (ull)bytes, (ull)d->pending_map.count);
    uint32_t *refs = calloc(d->marker_used ? d->marker_used : 1, sizeof(uint32_t));
    if (!refs) return mo_fail(MO_E_NOMEM, "no host memory to check the markers");
    for (uint32_t i = 0; i < d->pend_used && rc == MO_OK; i++)
        if (d->pend[i].in_use) rc = check_entry(d, i, refs);
    for (uint64_t r = 0; r < d->plan.n_ranges && rc == MO_OK; r++) {
        const mo_range *g = &d->plan.ranges[r];
        if (g->marker) refs[g->marker]++;
        for (uint32_t k = 0; k < g->n_extra; k++) refs[g->extra[k]]++;
    }
    for (uint32_t m = 1; m < d->marker_used && rc == MO_OK; m++)
        if (refs[m] != d->markers[m].refs) rc = mo_fail(MO_E_CORRUPTION, "device pool invariant broken: marker %u has %u "
                                                         "references, %u counted", m, refs[m], d->markers[m].refs);
    free(refs);
    if (rc != MO_OK) return rc;
    mo_stats_t as;
    mo_arena_stats(d->arena, &as);
    uint64_t region = d->plan.region_total, overflow_live = 0;
    for (uint64_t j = 0; d->overflow_map.keys && j < ((uint64_t)1 << d->overflow_map.bits); j++)
        if (d->overflow_map.keys[j]) overflow_live += d->overflow_map.vals[j];
    if (overflow_live != d->st.overflow_bytes) BROKEN("%llu overflow bytes counted, %llu held", (ull)d->st.overflow_bytes, (ull)overflow_live);
    overflow_live -= bytes - heap_bytes;
    if (as.requested_bytes != d->heap_live_bytes + heap_bytes + region)
        BROKEN("the heap holds %llu requested bytes; live %llu + pending %llu + region %llu", (ull)as.requested_bytes,
               (ull)d->heap_live_bytes, (ull)heap_bytes, (ull)region);
    if (d->st.live_bytes != d->heap_live_bytes + d->plan.live_bytes + overflow_live)
        BROKEN("%llu live bytes counted; heap %llu + planned %llu + overflow %llu", (ull)d->st.live_bytes,
               (ull)d->heap_live_bytes, (ull)d->plan.live_bytes, (ull)overflow_live);
    return mo_replay_check(d);
}

MO_API int mo_dev_check(uint64_t handle) { WITH_DEV(handle, dev_check(d)); }

static int dev_stats(mo_dev *d, mo_dev_stats_t *out) {
    *out = d->st;
    out->reserved_bytes = mo_arena_extent(d->arena) + d->st.overflow_bytes;
    out->plan_bytes = d->plan.region_total;
    out->plan_positions = d->plan.armed ? d->plan.count : 0;
    out->lowest_first = (uint64_t)d->lowest_first;
    return MO_OK;
}

MO_API int mo_dev_stats(uint64_t handle, mo_dev_stats_t *out) { WITH_DEV(handle, dev_stats(d, out)); }

static int dev_arena_stats(mo_dev *d, mo_stats_t *out) {
    mo_arena_stats(d->arena, out);
    out->metadata_bytes += sizeof(mo_dev) + (uint64_t)d->marker_cap * (sizeof(mo_marker) + sizeof(uint32_t)) +
                           (uint64_t)d->pend_cap * sizeof(mo_pending) + (uint64_t)d->stream_cap * sizeof(mo_stream) +
                           (uint64_t)d->uses_cap * sizeof(mo_uses) + mo_map_bytes(&d->pending_map) +
                           mo_map_bytes(&d->overflow_map) + mo_map_bytes(&d->uses_map) + mo_replay_bytes(d);
    return MO_OK;
}

MO_API int mo_dev_arena_stats(uint64_t handle, mo_stats_t *out) { WITH_DEV(handle, dev_arena_stats(d, out)); }

static int dev_reset_peaks(mo_dev *d) {
    d->st.peak_live_bytes = d->st.live_bytes;
    d->st.peak_pending_bytes = d->st.pending_bytes;
    d->peak_extent = mo_arena_extent(d->arena);
    d->st.peak_reserved_bytes = d->peak_extent + d->st.overflow_bytes;
    return MO_OK;
}

MO_API int mo_dev_reset_peaks(uint64_t handle) { WITH_DEV(handle, dev_reset_peaks(d)); }
