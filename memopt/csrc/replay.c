/*
 * Record and replay (MEMO) for device pools: one step's allocations are recorded (bytes and lifetime in
 * events), laid out offline (Python: planners/layout.py), either into one region carved wherever the heap
 * has room or among the blocks alive when the plan is armed (the regions are then the free runs between
 * them that the layout uses), and the following steps' allocations are served at the planned offsets.
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

/* A departure from the plan: counted (the reason's own counter too) and, among the first ones, logged. */
static void depart(mo_dev *d, uint64_t position, uint64_t nbytes, uint64_t reason) {
    mo_plan *p = &d->plan;
    d->st.fallback_allocs++;
    if (reason == MO_DEPART_SIZE) d->st.size_departures++;
    else if (reason == MO_DEPART_BUSY) d->st.busy_departures++;
    else if (reason == MO_DEPART_STREAM) d->st.stream_conflicts++;
    if (p->n_departures < MO_DEV_DEPARTURES)
        p->departures[p->n_departures++] = (mo_departure_t){
            d->st.replay_steps, position, nbytes, position < p->count ? p->nbytes[position] : 0, reason};
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
        depart(d, p->cursor, nbytes, MO_DEPART_SIZE);
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
            depart(d, pos, nbytes, waits ? MO_DEPART_STREAM : MO_DEPART_BUSY);
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
            depart(d, pos, nbytes, MO_DEPART_NOMEM);
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
    *address = d->base_address + offset;
    return 1;
}

/* The region holding pool offset x, or n_regions. */
static uint64_t region_of(const mo_plan *p, uint64_t x) {
    uint64_t lo = 0, hi = p->n_regions;
    while (lo < hi) { /* the first region that ends above x */
        uint64_t mid = lo + (hi - lo) / 2;
        if (p->region_offsets[mid] + p->region_bytes[mid] <= x) lo = mid + 1;
        else hi = mid;
    }
    return lo < p->n_regions && p->region_offsets[lo] <= x ? lo : p->n_regions;
}

/* The index of the range starting at address, or n_ranges; -1 when address is in no region of the plan. */
static int64_t range_at(const mo_dev *d, uint64_t address) {
    const mo_plan *p = &d->plan;
    if (address < d->base_address || region_of(p, address - d->base_address) == p->n_regions) return -1;
    uint64_t x = address - d->base_address, k = first_after(p, x);
    return (k < p->n_ranges && p->ranges[k].offset == x) ? (int64_t)k : (int64_t)p->n_ranges;
}

static int not_planned(const mo_dev *d, uint64_t address, int64_t k) {
    const mo_plan *p = &d->plan;
    if (k < (int64_t)p->n_ranges && !p->ranges[k].piece)
        return mo_fail(MO_E_DOUBLE_FREE, "planned block at 0x%llx (%llu bytes) was already freed", (ull)address,
                       (ull)p->ranges[k].nbytes);
    uint64_t r = region_of(p, address - d->base_address);
    return mo_fail(MO_E_INVALID_FREE, "address 0x%llx is inside the planned region [0x%llx, +%llu) but starts no live "
                   "planned block", (ull)address, (ull)(d->base_address + p->region_offsets[r]), (ull)p->region_bytes[r]);
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

/* Positions against regions (sorted, disjoint): each planned one aligned and inside one region. */
static int check_positions(const mo_dev *d, const mo_plan *p, const uint64_t *nbytes, const uint64_t *offsets) {
    for (uint64_t i = 0; i < p->count; i++) {
        if (nbytes[i] == 0)
            return mo_fail(MO_E_INVALID_ARG, "position %llu asks for 0 bytes; give at least 1", (ull)i);
        if (offsets[i] == MO_UNPLANNED) continue;
        uint64_t span = mo_round_up(nbytes[i], d->alignment), r = region_of(p, offsets[i]);
        if (span < nbytes[i] || offsets[i] % d->alignment || r == p->n_regions || span > p->region_bytes[r] ||
            offsets[i] - p->region_offsets[r] > p->region_bytes[r] - span)
            return mo_fail(MO_E_INVALID_ARG, "position %llu: offset %llu with %llu bytes is not aligned to %llu or ends past "
                           "the region of the plan it starts in (or starts in none)", (ull)i, (ull)offsets[i], (ull)nbytes[i], (ull)d->alignment);
    }
    return MO_OK;
}

static void drop_plan(mo_plan *p) {
    free(p->nbytes);
    free(p->offsets);
    free(p->ranges);
    free(p->region_offsets);
    free(p->region_bytes);
    memset(p, 0, sizeof(*p));
}

/* A plan of count positions over n_regions regions, its arrays allocated and copied (offsets as given) and its
 * positions checked against the regions; nothing is left allocated unless MO_OK. */
static int new_plan(const mo_dev *d, mo_plan *p, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets,
                    uint64_t n_regions, const uint64_t *region_offsets, const uint64_t *region_bytes) {
    if (count == 0 || count >= MO_NIL)
        return mo_fail(MO_E_INVALID_ARG, "a plan of %llu positions; give between 1 and %u", (ull)count, MO_NIL - 1);
    memset(p, 0, sizeof(*p));
    p->nbytes = malloc(count * sizeof(uint64_t));
    p->offsets = malloc(count * sizeof(uint64_t));
    p->ranges = malloc(count * sizeof(mo_range));
    p->region_offsets = malloc(n_regions * sizeof(uint64_t));
    p->region_bytes = malloc(n_regions * sizeof(uint64_t));
    if (!p->nbytes || !p->offsets || !p->ranges || !p->region_offsets || !p->region_bytes) {
        drop_plan(p);
        return mo_fail(MO_E_NOMEM, "no host memory for a plan of %llu positions", (ull)count);
    }
    memcpy(p->nbytes, nbytes, count * sizeof(uint64_t));
    memcpy(p->offsets, offsets, count * sizeof(uint64_t));
    memcpy(p->region_offsets, region_offsets, n_regions * sizeof(uint64_t));
    memcpy(p->region_bytes, region_bytes, n_regions * sizeof(uint64_t));
    p->count = p->range_cap = count;
    p->n_regions = n_regions;
    int rc = check_positions(d, p, nbytes, offsets);
    if (rc != MO_OK) drop_plan(p);
    return rc;
}

static int can_arm(const mo_dev *d) {
    if (d->recording) return mo_fail(MO_E_INVALID_ARG, "a step is being recorded; end the recording before planning");
    if (d->plan.armed) return mo_fail(MO_E_INVALID_ARG, "a plan is armed already; unplan it first");
    return MO_OK;
}

static void arm(mo_dev *d, mo_plan *p) {
    p->armed = 1;
    for (uint64_t r = 0; r < p->n_regions; r++) {
        p->region_total += p->region_bytes[r];
        mo_dev_note_extent(d, p->region_offsets[r] + p->region_bytes[r]);
    }
    d->plan = *p;
}

int mo_replay_plan(mo_dev *d, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets, uint64_t region_bytes) {
    int rc = can_arm(d);
    if (rc != MO_OK) return rc;
    if (region_bytes == 0 || region_bytes % d->alignment || region_bytes > d->capacity)
        return mo_fail(MO_E_INVALID_ARG, "region_bytes %llu must be a positive multiple of the alignment %llu, at most the "
                       "capacity %llu", (ull)region_bytes, (ull)d->alignment, (ull)d->capacity);
    mo_plan p;
    const uint64_t at_start = 0; /* the layout's offsets are in the region until it is placed */
    if ((rc = new_plan(d, &p, count, nbytes, offsets, 1, &at_start, &region_bytes)) != MO_OK) return rc;
    uint64_t span, serial;
    if ((rc = mo_arena_alloc_lowest(d->arena, region_bytes, d->alignment, 1, &p.region_offsets[0], &span, &serial)) != MO_OK) {
        drop_plan(&p);
        return rc;
    }
    for (uint64_t i = 0; i < count; i++) /* the layout's offsets are in the region; the pool's are absolute */
        if (p.offsets[i] != MO_UNPLANNED) p.offsets[i] += p.region_offsets[0];
    arm(d, &p);
    return MO_OK;
}

int mo_replay_plan_at(mo_dev *d, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets, uint64_t n_regions,
                      const uint64_t *region_offsets, const uint64_t *region_bytes) {
    int rc = can_arm(d);
    if (rc != MO_OK) return rc;
    if (n_regions == 0 || n_regions >= MO_NIL)
        return mo_fail(MO_E_INVALID_ARG, "%llu regions; give between 1 and %u", (ull)n_regions, MO_NIL - 1);
    for (uint64_t r = 0; r < n_regions; r++)
        if (region_bytes[r] == 0 || region_bytes[r] % d->alignment || region_offsets[r] % d->alignment ||
            region_offsets[r] > d->capacity || region_bytes[r] > d->capacity - region_offsets[r] ||
            (r && region_offsets[r] < region_offsets[r - 1] + region_bytes[r - 1]))
            return mo_fail(MO_E_INVALID_ARG, "region %llu [%llu, +%llu): regions must be multiples of the alignment %llu, "
                           "sorted, disjoint and inside the capacity %llu", (ull)r, (ull)region_offsets[r],
                           (ull)region_bytes[r], (ull)d->alignment, (ull)d->capacity);
    mo_plan p;
    if ((rc = new_plan(d, &p, count, nbytes, offsets, n_regions, region_offsets, region_bytes)) != MO_OK) return rc;
    uint64_t r = 0, span, serial;
    for (; r < n_regions && rc == MO_OK; r++)
        rc = mo_arena_alloc_at(d->arena, region_offsets[r], region_bytes[r], &span, &serial);
    if (rc != MO_OK) { /* the heap changed since the layout saw it: give back what was reserved */
        for (uint64_t k = 0; k + 1 < r; k++) mo_dev_heap_free_now(d, region_offsets[k]);
        drop_plan(&p);
        return rc;
    }
    arm(d, &p);
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
    /* The regions go back to the heap, where any stream may get them: every use of them must be done. */
    for (uint64_t k = 0; k < p->n_ranges && d->has_ops; k++) {
        mo_range *g = &p->ranges[k];
        if (g->marker) mo_dev_marker_wait(d, g->marker);
        else sync_stream(d, g->stream);
        for (uint32_t j = 0; j < g->n_extra; j++) mo_dev_marker_wait(d, g->extra[j]);
        range_unref(d, g);
    }
    for (uint64_t r = 0; r < p->n_regions; r++) mo_dev_heap_free_now(d, p->region_offsets[r]);
    drop_plan(p);
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
        uint64_t r = region_of(p, g->offset);
        if ((k && g->offset < end) || g->offset % d->alignment || g->span != g->nbytes || !g->nbytes ||
            r == p->n_regions || g->offset + g->span > p->region_offsets[r] + p->region_bytes[r])
            BROKEN("range %llu [%llu, +%llu) overlaps the one before it or leaves its region", (ull)k, (ull)g->offset,
                   (ull)g->span);
        if (!d->has_ops && (g->marker || g->n_extra)) BROKEN("range %llu has markers in a pool without ops", (ull)k);
        if (g->piece && !g->freed) BROKEN("range %llu is a live piece", (ull)k);
        if (!g->freed) live += g->nbytes;
        end = g->offset + g->span;
    }
    if (live != p->live_bytes) BROKEN("%llu planned bytes live, %llu counted", (ull)live, (ull)p->live_bytes);
    if (p->cursor > p->count) BROKEN("cursor %llu past %llu positions", (ull)p->cursor, (ull)p->count);
    uint64_t total = 0;
    for (uint64_t r = 0; r < p->n_regions; r++) {
        if ((r && p->region_offsets[r] < p->region_offsets[r - 1] + p->region_bytes[r - 1]) ||
            mo_arena_query(d->arena, (mo_handle){p->region_offsets[r], 0, 0, 0}, &nbytes, &span) != MO_OK ||
            nbytes != p->region_bytes[r])
            BROKEN("region %llu at offset %llu is not a live heap block of %llu bytes after the one before it", (ull)r,
                   (ull)p->region_offsets[r], (ull)p->region_bytes[r]);
        total += p->region_bytes[r];
    }
    if (total != p->region_total) BROKEN("regions of %llu bytes, %llu counted", (ull)total, (ull)p->region_total);
    return MO_OK;
}

void mo_replay_free_all(mo_dev *d) {
    drop_plan(&d->plan);
    free(d->trace);
    d->trace = NULL;
    d->trace_len = d->trace_cap = 0;
    mo_map_free(&d->rec_map);
}

uint64_t mo_replay_bytes(const mo_dev *d) {
    return d->trace_cap * sizeof(mo_trace_rec) + mo_map_bytes(&d->rec_map) + d->plan.count * 2 * sizeof(uint64_t) +
           d->plan.range_cap * sizeof(mo_range) + d->plan.n_regions * 2 * sizeof(uint64_t);
}
