/*
 * Record and replay (MEMO) for device pools: one step's allocations are recorded (bytes and lifetime in
 * events), laid out offline into one region (Python: planners/layout.py), and the following steps'
 * allocations are served at the planned offsets.
 *
 * Replay never trusts the plan for safety. Each position is served at its offset only when it asks for the
 * plan's bytes (a few positions ahead are tried, so one inserted or missing allocation does not end the
 * replay) and its range holds no live planned block and no freed one whose streams may still use it: the
 * region's ranges are kept sorted, and a placement checks the ones it overlaps. Anything else goes to the
 * heap and is counted (another shape, other control flow, a tensor kept longer than in the recorded step).
 */
#include <stdlib.h>
#include <string.h>

#include "device_internal.h"

typedef unsigned long long ull;

/* -- recording ----------------------------------------------------------------------------------------- */

void mo_replay_note_alloc(mo_dev *d, uint64_t address, uint64_t nbytes) {
    if (d->trace_failed) return;
    if (d->trace_len == d->trace_cap) {
        uint64_t cap = d->trace_cap ? d->trace_cap * 2 : 1024;
        mo_trace_rec *grown = realloc(d->trace, cap * sizeof(mo_trace_rec));
        if (!grown) {
            d->trace_failed = 1; /* the allocation itself stands; record_end reports the lost step */
            return;
        }
        d->trace = grown;
        d->trace_cap = cap;
    }
    if (mo_map_reserve(&d->rec_map, 1) != MO_OK) {
        d->trace_failed = 1;
        return;
    }
    d->trace[d->trace_len] = (mo_trace_rec){nbytes, d->clock++, MO_UNPLANNED};
    mo_map_put(&d->rec_map, address, d->trace_len++);
}

void mo_replay_note_free(mo_dev *d, uint64_t address) {
    uint64_t i;
    if (d->trace_failed || !mo_map_get(&d->rec_map, address, &i)) return; /* allocated before the recording */
    mo_map_remove(&d->rec_map, address);
    d->trace[i].end = d->clock++;
}

/* -- the planned region's ranges ----------------------------------------------------------------------- */

/* The first range that ends above offset (disjoint ranges sorted by offset have sorted ends too). */
static uint64_t first_after(const mo_plan *p, uint64_t offset) {
    uint64_t lo = 0, hi = p->n_ranges;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (p->ranges[mid].offset + p->ranges[mid].span <= offset) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Whether freed range g may be handed to an allocation on stream: its freeing stream is that stream or its
 * marker is done, and so are the markers of the other streams that used it. *waits: a stream was not done. */
static int range_reusable(mo_dev *d, mo_range *g, uint64_t stream, int *waits) {
    if (!d->has_ops) return 1; /* no streams: free at once (the range is kept to name a double free) */
    if (g->stream != stream) {
        if (!g->marker) { /* recorded only now that another stream needs the range: covers every use before it */
            if (mo_dev_marker_reserve(d, 1) != MO_OK || !(g->marker = mo_dev_marker_new(d, g->stream))) return 0;
            d->markers[g->marker].refs++;
        }
        if (!mo_dev_marker_done(d, g->marker)) {
            *waits = 1;
            return 0;
        }
    }
    for (uint32_t k = 0; k < g->n_extra; k++)
        if (d->markers[g->extra[k]].stream != stream && !mo_dev_marker_done(d, g->extra[k])) {
            *waits = 1;
            return 0;
        }
    return 1;
}

static void range_ref(mo_dev *d, const mo_range *g) {
    if (g->marker) d->markers[g->marker].refs++;
    for (uint32_t k = 0; k < g->n_extra; k++) d->markers[g->extra[k]].refs++;
}

static void range_unref(mo_dev *d, mo_range *g) {
    mo_dev_marker_unref(d, g->marker);
    for (uint32_t k = 0; k < g->n_extra; k++) mo_dev_marker_unref(d, g->extra[k]);
}

/* The plan position this allocation is: the cursor's, else one of the next few asking for these bytes. */
static int next_position(mo_plan *p, uint64_t nbytes, uint64_t *pos) {
    uint64_t q = p->cursor, end = p->cursor + 1 + MO_DEV_LOOKAHEAD;
    if (end > p->count) end = p->count;
    while (q < end && p->nbytes[q] != nbytes) q++;
    if (q >= end) return 0;
    *pos = q;
    p->cursor = q + 1;
    return 1;
}

int mo_replay_alloc(mo_dev *d, uint64_t nbytes, uint64_t stream, uint64_t *address) {
    mo_plan *p = &d->plan;
    uint64_t pos;
    if (!next_position(p, nbytes, &pos)) {
        d->st.fallback_allocs++;
        return 0;
    }
    uint64_t offset = p->offsets[pos];
    if (offset == MO_UNPLANNED) {
        d->st.unplanned_allocs++;
        return 0;
    }
    uint64_t span = mo_round_up(nbytes, d->alignment), first = first_after(p, offset), last = first;
    int waits = 0;
    for (; last < p->n_ranges && p->ranges[last].offset < offset + span; last++) {
        mo_range *g = &p->ranges[last];
        if (!g->freed || !range_reusable(d, g, stream, &waits)) {
            d->st.fallback_allocs++;
            d->st.stream_conflicts += waits;
            return 0;
        }
    }
    /* The overlapped ranges [first, last) give way to the new one; what sticks out of it on either side stays
     * freed, with the same markers: reusable on this stream is not reusable on every stream. */
    mo_range left = {0}, right = {0};
    int has_left = last > first && p->ranges[first].offset < offset;
    int has_right = last > first && p->ranges[last - 1].offset + p->ranges[last - 1].span > offset + span;
    uint64_t removed = last - first, added = 1u + (uint64_t)has_left + (uint64_t)has_right;
    if (p->n_ranges - removed + added > p->range_cap) {
        uint64_t cap = p->range_cap * 2;
        mo_range *grown = realloc(p->ranges, cap * sizeof(mo_range));
        if (!grown) {
            d->st.fallback_allocs++;
            return 0;
        }
        p->ranges = grown;
        p->range_cap = cap;
    }
    if (has_left) {
        left = p->ranges[first];
        left.span = left.nbytes = offset - left.offset;
        left.piece = 1;
    }
    if (has_right) {
        right = p->ranges[last - 1];
        right.span = right.nbytes = right.offset + right.span - (offset + span);
        right.offset = offset + span;
        right.piece = 1;
    }
    if (has_left) range_ref(d, &left);
    if (has_right) range_ref(d, &right);
    for (uint64_t k = first; k < last; k++) range_unref(d, &p->ranges[k]);
    memmove(&p->ranges[first + added], &p->ranges[last], (p->n_ranges - last) * sizeof(mo_range));
    p->n_ranges = p->n_ranges - removed + added;
    mo_range *at = &p->ranges[first];
    if (has_left) *at++ = left;
    memset(at, 0, sizeof(mo_range));
    at->offset = offset;
    at->span = at->nbytes = span;
    if (has_right) at[1] = right;
    p->live_bytes += span;
    d->st.planned_allocs++;
    *address = d->base_address + p->region_offset + offset;
    return 1;
}

/* The index of the range starting at address, or n_ranges; -1 when address is outside the region. */
static int64_t range_at(const mo_dev *d, uint64_t address) {
    const mo_plan *p = &d->plan;
    uint64_t lo = d->base_address + p->region_offset;
    if (address < lo || address - lo >= p->region_bytes) return -1;
    uint64_t k = first_after(p, address - lo);
    return (k < p->n_ranges && p->ranges[k].offset == address - lo) ? (int64_t)k : (int64_t)p->n_ranges;
}

static int not_planned(const mo_dev *d, uint64_t address, int64_t k) {
    if (k < (int64_t)d->plan.n_ranges && !d->plan.ranges[k].piece)
        return mo_fail(MO_E_DOUBLE_FREE, "planned block at 0x%llx (%llu bytes) was already freed", (ull)address,
                       (ull)d->plan.ranges[k].nbytes);
    return mo_fail(MO_E_INVALID_FREE, "address 0x%llx is inside the planned region [0x%llx, +%llu) but starts no live "
                   "planned block", (ull)address, (ull)(d->base_address + d->plan.region_offset), (ull)d->plan.region_bytes);
}

/* Record and wait for a marker at once, without host memory (a marker record could not be had). */
static void sync_stream(mo_dev *d, uint64_t stream) {
    uint64_t token = d->ops.record(d->ops.ctx, stream);
    if (!token || d->ops.wait(d->ops.ctx, token) != 0) d->st.marker_errors++;
    if (token) d->ops.release(d->ops.ctx, token);
}

int mo_replay_free(mo_dev *d, uint64_t address, uint64_t stream, uint64_t *nbytes) {
    mo_plan *p = &d->plan;
    int64_t k = range_at(d, address);
    if (k < 0) return -1;
    if (k == (int64_t)p->n_ranges || p->ranges[k].freed) return not_planned(d, address, k);
    mo_range *g = &p->ranges[k];
    *nbytes = g->nbytes;
    p->live_bytes -= g->nbytes;
    g->freed = 1;
    g->stream = stream;
    if (!d->has_ops) return MO_OK;
    uint64_t extra[MO_DEV_MAX_USES];
    uint32_t n = mo_dev_take_uses(d, address, extra);
    for (uint32_t j = 0; j < n; j++) {
        if (extra[j] == stream) continue;
        uint32_t m = mo_dev_marker_reserve(d, 1) == MO_OK ? mo_dev_marker_new(d, extra[j]) : 0;
        if (m) {
            d->markers[m].refs++;
            g->extra[g->n_extra++] = m;
        } else {
            sync_stream(d, extra[j]);
        }
    }
    return MO_OK;
}

int mo_replay_record_stream(mo_dev *d, uint64_t address, int *found) {
    int64_t k = range_at(d, address);
    *found = k >= 0;
    if (k < 0) return MO_OK;
    if (k == (int64_t)d->plan.n_ranges || d->plan.ranges[k].freed) return not_planned(d, address, k);
    return MO_OK;
}

/* -- arming -------------------------------------------------------------------------------------------- */

int mo_replay_plan(mo_dev *d, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets, uint64_t region_bytes) {
    if (d->recording) return mo_fail(MO_E_INVALID_ARG, "a step is being recorded; end the recording before planning");
    if (d->plan.armed) return mo_fail(MO_E_INVALID_ARG, "a plan is armed already; unplan it first");
    if (count == 0 || count >= MO_NIL)
        return mo_fail(MO_E_INVALID_ARG, "a plan of %llu positions; give between 1 and %u", (ull)count, MO_NIL - 1);
    if (region_bytes == 0 || region_bytes % d->alignment || region_bytes > d->capacity)
        return mo_fail(MO_E_INVALID_ARG, "region_bytes %llu must be a positive multiple of the alignment %llu, at most the "
                       "capacity %llu", (ull)region_bytes, (ull)d->alignment, (ull)d->capacity);
    for (uint64_t i = 0; i < count; i++) {
        if (nbytes[i] == 0 || nbytes[i] > region_bytes) {
            if (nbytes[i] && offsets[i] == MO_UNPLANNED) continue;
            return mo_fail(MO_E_INVALID_ARG, "position %llu asks for %llu bytes; give 1 to the region's %llu", (ull)i,
                           (ull)nbytes[i], (ull)region_bytes);
        }
        if (offsets[i] != MO_UNPLANNED &&
            (offsets[i] % d->alignment || offsets[i] > region_bytes - mo_round_up(nbytes[i], d->alignment)))
            return mo_fail(MO_E_INVALID_ARG, "position %llu: offset %llu with %llu bytes is not aligned to %llu or ends past "
                           "the region of %llu bytes", (ull)i, (ull)offsets[i], (ull)nbytes[i], (ull)d->alignment,
                           (ull)region_bytes);
    }
    mo_plan p = {0};
    p.nbytes = malloc(count * sizeof(uint64_t));
    p.offsets = malloc(count * sizeof(uint64_t));
    p.range_cap = count;
    p.ranges = malloc(count * sizeof(mo_range));
    int rc = (p.nbytes && p.offsets && p.ranges) ? MO_OK : mo_fail(MO_E_NOMEM, "no host memory for a plan of %llu positions",
                                                                   (ull)count);
    uint64_t span, serial;
    if (rc == MO_OK) rc = mo_arena_alloc_lowest(d->arena, region_bytes, d->alignment, &p.region_offset, &span, &serial);
    if (rc != MO_OK) {
        free(p.nbytes);
        free(p.offsets);
        free(p.ranges);
        return rc;
    }
    memcpy(p.nbytes, nbytes, count * sizeof(uint64_t));
    memcpy(p.offsets, offsets, count * sizeof(uint64_t));
    p.count = count;
    p.region_bytes = region_bytes;
    p.armed = 1;
    d->plan = p;
    mo_dev_note_extent(d, p.region_offset + span);
    return MO_OK;
}

int mo_replay_unplan(mo_dev *d) {
    mo_plan *p = &d->plan;
    if (!p->armed) return mo_fail(MO_E_INVALID_ARG, "no plan is armed");
    if (p->live_bytes) {
        uint64_t live = 0;
        for (uint64_t k = 0; k < p->n_ranges; k++) live += !p->ranges[k].freed;
        return mo_fail(MO_E_INVALID_ARG, "%llu planned blocks (%llu bytes) are live; free them before unplanning", (ull)live,
                       (ull)p->live_bytes);
    }
    /* The region goes back to the heap, where any stream may get it: every use of it must be done. */
    for (uint64_t k = 0; k < p->n_ranges && d->has_ops; k++) {
        mo_range *g = &p->ranges[k];
        if (g->marker) mo_dev_marker_wait(d, g->marker);
        else sync_stream(d, g->stream);
        for (uint32_t j = 0; j < g->n_extra; j++) mo_dev_marker_wait(d, g->extra[j]);
        range_unref(d, g);
    }
    mo_dev_heap_free_now(d, p->region_offset);
    free(p->nbytes);
    free(p->offsets);
    free(p->ranges);
    memset(p, 0, sizeof(*p));
    return MO_OK;
}

#define BROKEN(...) return mo_fail(MO_E_CORRUPTION, "replay invariant broken: " __VA_ARGS__)

int mo_replay_check(const mo_dev *d) {
    const mo_plan *p = &d->plan;
    if (!p->armed) {
        if (p->n_ranges || p->live_bytes) BROKEN("no plan is armed but %llu ranges are kept", (ull)p->n_ranges);
        return MO_OK;
    }
    if (p->n_ranges > p->range_cap) BROKEN("%llu ranges in room for %llu", (ull)p->n_ranges, (ull)p->range_cap);
    uint64_t end = 0, live = 0, nbytes, span;
    for (uint64_t k = 0; k < p->n_ranges; k++) {
        const mo_range *g = &p->ranges[k];
        if ((k && g->offset < end) || g->offset % d->alignment || g->span != g->nbytes ||
            !g->nbytes || g->offset + g->span > p->region_bytes)
            BROKEN("range %llu [%llu, +%llu) overlaps the one before it or leaves the region", (ull)k, (ull)g->offset,
                   (ull)g->span);
        if (!d->has_ops && (g->marker || g->n_extra)) BROKEN("range %llu has markers in a pool without ops", (ull)k);
        if (g->piece && !g->freed) BROKEN("range %llu is a live piece", (ull)k);
        if (!g->freed) live += g->nbytes;
        end = g->offset + g->span;
    }
    if (live != p->live_bytes) BROKEN("%llu planned bytes live, %llu counted", (ull)live, (ull)p->live_bytes);
    if (p->cursor > p->count) BROKEN("cursor %llu past %llu positions", (ull)p->cursor, (ull)p->count);
    if (mo_arena_query(d->arena, (mo_handle){p->region_offset, 0, 0, 0}, &nbytes, &span) != MO_OK || nbytes != p->region_bytes)
        BROKEN("the region at offset %llu is not a live heap block of %llu bytes", (ull)p->region_offset, (ull)p->region_bytes);
    return MO_OK;
}

void mo_replay_free_all(mo_dev *d) {
    free(d->plan.nbytes);
    free(d->plan.offsets);
    free(d->plan.ranges);
    memset(&d->plan, 0, sizeof(d->plan));
    free(d->trace);
    d->trace = NULL;
    d->trace_len = d->trace_cap = 0;
    mo_map_free(&d->rec_map);
}

uint64_t mo_replay_bytes(const mo_dev *d) {
    return d->trace_cap * sizeof(mo_trace_rec) + mo_map_bytes(&d->rec_map) + d->plan.count * 2 * sizeof(uint64_t) +
           d->plan.range_cap * sizeof(mo_range);
}
