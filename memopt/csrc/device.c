/*
 * Device pools (moalloc.h): stream-ordered frees over a heap arena that hands out addresses, and overflow
 * outside the region. device_api.c holds the handles and entry points, replay.c the record and replay.
 *
 * Why frees wait: a GPU runs the work queued on a stream after the CPU has moved on, so a block freed
 * by the CPU may still be read by kernels queued before the free. On the freeing stream itself that is
 * harmless (new work queues behind the old), so an allocation there may take a just-freed block of its
 * size back at once; any other allocation waits for a marker recorded on the freeing stream (and on each
 * stream mo_dev_record_stream named) to be done. Markers are recorded per batch of frees, not per free.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device_internal.h"

typedef unsigned long long ull;

/* -- growable record pools ----------------------------------------------------------------------------- */

/* Grow *arr (elem bytes each, *cap of them) to hold at least need; MO_E_NOMEM leaves it as it was. */
static int grow(void **arr, uint32_t *cap, uint64_t need, size_t elem, const char *what) {
    if (need <= *cap) return MO_OK;
    uint64_t cap2 = *cap ? (uint64_t)*cap + *cap / 2 : 16;
    if (cap2 < need) cap2 = need;
    if (cap2 >= MO_NIL) return mo_fail(MO_E_NOMEM, "more than %u %s in one device pool", MO_NIL - 1, what);
    void *p = realloc(*arr, (size_t)cap2 * elem);
    if (!p) return mo_fail(MO_E_NOMEM, "no host memory for %llu %s", (ull)cap2, what);
    *arr = p;
    *cap = (uint32_t)cap2;
    return MO_OK;
}

/* -- markers ------------------------------------------------------------------------------------------- */

int mo_dev_marker_reserve(mo_dev *d, uint32_t n) {
    uint64_t unused = d->marker_cap > d->marker_used ? d->marker_cap - d->marker_used : 0;
    if (d->marker_free_count + unused >= n) return MO_OK;
    uint32_t cap = d->marker_cap, cap_free = d->marker_cap;
    uint64_t need = (uint64_t)d->marker_used + n;
    int rc = grow((void **)&d->markers, &cap, need, sizeof(mo_marker), "markers");
    if (rc != MO_OK) return rc;
    rc = grow((void **)&d->marker_free, &cap_free, cap, sizeof(uint32_t), "markers");
    if (rc != MO_OK) return rc; /* the marker array grew for good; the cap stays the old one */
    d->marker_cap = cap;
    return MO_OK;
}

uint32_t mo_dev_marker_new(mo_dev *d, uint64_t stream) {
    uint64_t token = d->ops.record(d->ops.ctx, stream);
    if (!token) {
        d->st.marker_errors++;
        return 0;
    }
    uint32_t m = d->marker_free_count ? d->marker_free[--d->marker_free_count] : d->marker_used++;
    d->markers[m] = (mo_marker){token, stream, 0, 0};
    d->st.markers_recorded++;
    return m;
}

int mo_dev_marker_done(mo_dev *d, uint32_t m) {
    mo_marker *k = &d->markers[m];
    if (!k->done) {
        int r = d->ops.query(d->ops.ctx, k->token);
        if (r < 0) d->st.marker_errors++;
        k->done = r != 0;
    }
    return k->done;
}

void mo_dev_marker_wait(mo_dev *d, uint32_t m) {
    mo_marker *k = &d->markers[m];
    if (k->done) return;
    if (d->ops.wait(d->ops.ctx, k->token) != 0) d->st.marker_errors++;
    d->st.marker_waits++;
    k->done = 1;
}

void mo_dev_marker_unref(mo_dev *d, uint32_t m) {
    if (!m || --d->markers[m].refs) return;
    d->ops.release(d->ops.ctx, d->markers[m].token);
    d->markers[m].token = 0;
    d->marker_free[d->marker_free_count++] = m;
}

/* -- streams and pending frees ------------------------------------------------------------------------- */

static uint32_t stream_find(const mo_dev *d, uint64_t stream) {
    for (uint32_t i = 0; i < d->stream_count; i++)
        if (d->streams[i].stream == stream) return i;
    return MO_NIL;
}

static uint32_t stream_get(mo_dev *d, uint64_t stream) {
    uint32_t i = stream_find(d, stream);
    if (i != MO_NIL) return i;
    if (grow((void **)&d->streams, &d->stream_cap, (uint64_t)d->stream_count + 1, sizeof(mo_stream), "streams") != MO_OK)
        return MO_NIL;
    d->streams[d->stream_count] = (mo_stream){stream, MO_NIL, MO_NIL, 0, 0};
    return d->stream_count++;
}

static int pend_reserve(mo_dev *d) {
    if (d->pend_spare != MO_NIL || d->pend_used < d->pend_cap) return MO_OK;
    return grow((void **)&d->pend, &d->pend_cap, (uint64_t)d->pend_used + 1, sizeof(mo_pending), "pending frees");
}

static uint32_t pend_take(mo_dev *d) {
    uint32_t i = d->pend_spare;
    if (i != MO_NIL) d->pend_spare = d->pend[i].next;
    else i = d->pend_used++;
    memset(&d->pend[i], 0, sizeof(mo_pending));
    d->pend[i].prev = d->pend[i].next = MO_NIL;
    d->pend[i].in_use = 1;
    return i;
}

static void pend_put(mo_dev *d, uint32_t i) {
    d->pend[i].in_use = 0;
    d->pend[i].next = d->pend_spare;
    d->pend_spare = i;
}

/* Take entry i out of its list (its stream's FIFO, or the slow list). */
static void pend_unlink(mo_dev *d, uint32_t i) {
    mo_pending *e = &d->pend[i];
    if (e->n_extra) {
        if (e->prev != MO_NIL) d->pend[e->prev].next = e->next;
        else d->slow_head = e->next;
        if (e->next != MO_NIL) d->pend[e->next].prev = e->prev;
    } else {
        mo_stream *s = &d->streams[e->stream];
        if (e->prev != MO_NIL) d->pend[e->prev].next = e->next;
        else s->head = e->next;
        if (e->next != MO_NIL) d->pend[e->next].prev = e->prev;
        else s->tail = e->prev;
        if (!e->marker) {
            s->open--;
            s->open_bytes -= e->nbytes;
        }
    }
    e->prev = e->next = MO_NIL;
}

/* Entry i leaves the pending state: its block is live again (reused) or released (done). */
static void pend_drop(mo_dev *d, uint32_t i) {
    mo_pending *e = &d->pend[i];
    pend_unlink(d, i);
    mo_map_remove(&d->pending_map, e->address);
    mo_dev_marker_unref(d, e->marker);
    for (uint32_t k = 0; k < e->n_extra; k++) mo_dev_marker_unref(d, e->extra[k]);
    d->st.pending_bytes -= e->nbytes;
    d->st.pending_blocks--;
    pend_put(d, i);
}

int mo_dev_heap_free_now(mo_dev *d, uint64_t offset) {
    return mo_arena_free(d->arena, (mo_handle){offset, 0, 0, 0});
}

/* The streams that used entry i are done with it: give its memory back. */
/* Give a block back at once: to the heap, or an overflow allocation to the driver. */
static void free_now(mo_dev *d, int kind, uint64_t address, uint64_t nbytes) {
    if (kind == MO_PEND_HEAP) {
        mo_dev_heap_free_now(d, address - d->base_address);
    } else {
        mo_map_remove(&d->overflow_map, address);
        d->st.overflow_bytes -= nbytes;
        d->ops.overflow_free(d->ops.ctx, address);
    }
}

static void pend_release(mo_dev *d, uint32_t i) {
    uint64_t address = d->pend[i].address, nbytes = d->pend[i].nbytes;
    int kind = d->pend[i].kind;
    pend_drop(d, i);
    free_now(d, kind, address, nbytes);
}

/* One marker for the open entries of stream si (all of them queued their work before now). */
static void seal(mo_dev *d, uint32_t si) {
    mo_stream *s = &d->streams[si];
    if (!s->open || mo_dev_marker_reserve(d, 1) != MO_OK) return; /* still open: sealed at the next chance */
    uint32_t m = mo_dev_marker_new(d, s->stream);
    if (!m) return;
    uint32_t i = s->tail;
    for (uint32_t k = 0; k < s->open; k++, i = d->pend[i].prev) {
        d->pend[i].marker = m;
        d->markers[m].refs++;
    }
    s->open = 0;
    s->open_bytes = 0;
}

static void seal_all(mo_dev *d) {
    for (uint32_t si = 0; si < d->stream_count; si++) seal(d, si);
}

static int slow_done(mo_dev *d, const mo_pending *e) {
    if (e->marker && !mo_dev_marker_done(d, e->marker)) return 0;
    for (uint32_t k = 0; k < e->n_extra; k++)
        if (!mo_dev_marker_done(d, e->extra[k])) return 0;
    return 1;
}

/* Release every pending entry whose markers are done. A stream's markers complete in order, so its FIFO
 * is read from the oldest entry to the first one not done. */
static void collect(mo_dev *d) {
    for (uint32_t si = 0; si < d->stream_count; si++) {
        uint32_t i = d->streams[si].head;
        while (i != MO_NIL && d->pend[i].marker && mo_dev_marker_done(d, d->pend[i].marker)) {
            uint32_t next = d->pend[i].next;
            pend_release(d, i);
            i = next;
        }
    }
    for (uint32_t i = d->slow_head; i != MO_NIL;) {
        uint32_t next = d->pend[i].next;
        if (slow_done(d, &d->pend[i])) pend_release(d, i);
        i = next;
    }
}

/* Wait for the oldest sealed marker not yet done; 0 when there is none to wait for. */
static int wait_oldest(mo_dev *d) {
    for (uint32_t si = 0; si < d->stream_count; si++) {
        uint32_t i = d->streams[si].head;
        if (i != MO_NIL && d->pend[i].marker && !d->markers[d->pend[i].marker].done) {
            mo_dev_marker_wait(d, d->pend[i].marker);
            return 1;
        }
    }
    for (uint32_t i = d->slow_head; i != MO_NIL; i = d->pend[i].next) {
        mo_pending *e = &d->pend[i];
        if (e->marker && !d->markers[e->marker].done) {
            mo_dev_marker_wait(d, e->marker);
            return 1;
        }
        for (uint32_t k = 0; k < e->n_extra; k++)
            if (!d->markers[e->extra[k]].done) {
                mo_dev_marker_wait(d, e->extra[k]);
                return 1;
            }
    }
    return 0;
}

/* -- uses (record_stream) ------------------------------------------------------------------------------ */

uint32_t mo_dev_take_uses(mo_dev *d, uint64_t address, uint64_t *streams) {
    uint64_t u;
    if (!d->uses_map.count || !mo_map_get(&d->uses_map, address, &u)) return 0;
    mo_map_remove(&d->uses_map, address);
    uint32_t n = d->uses[u].n;
    memcpy(streams, d->uses[u].stream, n * sizeof(uint64_t));
    d->uses[u].next_free = d->uses_spare;
    d->uses_spare = (uint32_t)u;
    return n;
}

static int add_use(mo_dev *d, uint64_t address, uint64_t stream) {
    uint64_t u;
    if (mo_map_get(&d->uses_map, address, &u)) {
        mo_uses *x = &d->uses[u];
        for (uint32_t k = 0; k < x->n; k++)
            if (x->stream[k] == stream) return MO_OK;
        if (x->n == MO_DEV_MAX_USES)
            return mo_fail(MO_E_INVALID_ARG, "block at 0x%llx is already used on %u other streams, the most a block may be",
                           (ull)address, MO_DEV_MAX_USES);
        x->stream[x->n++] = stream;
        return MO_OK;
    }
    int rc = mo_map_reserve(&d->uses_map, 1);
    if (rc == MO_OK && d->uses_spare == MO_NIL)
        rc = grow((void **)&d->uses, &d->uses_cap, (uint64_t)d->uses_used + 1, sizeof(mo_uses), "stream uses");
    if (rc != MO_OK) return rc;
    if (d->uses_spare != MO_NIL) {
        u = d->uses_spare;
        d->uses_spare = d->uses[u].next_free;
    } else {
        u = d->uses_used++;
    }
    memset(&d->uses[u], 0, sizeof(mo_uses));
    d->uses[u].stream[0] = stream;
    d->uses[u].n = 1;
    mo_map_put(&d->uses_map, address, u);
    return MO_OK;
}

/* -- allocation and free ------------------------------------------------------------------------------- */

void mo_dev_note_extent(mo_dev *d, uint64_t end) {
    if (end > d->peak_extent) d->peak_extent = end;
    if (d->peak_extent + d->st.overflow_bytes > d->st.peak_reserved_bytes)
        d->st.peak_reserved_bytes = d->peak_extent + d->st.overflow_bytes;
}

/* End of the region the heap block [offset, offset + span) made part of the used extent: its slab's end
 * when it is a slab slot (the arena's rule: a small span that is a multiple of the alignment). */
static uint64_t block_extent(const mo_dev *d, uint64_t offset, uint64_t span) {
    if (span <= MO_SLAB_MAX_SPAN && span % d->alignment == 0) {
        uint64_t bytes = mo_slab_bytes(span), end = (offset & ~(bytes - 1)) + bytes;
        return end < d->capacity ? end : d->capacity;
    }
    return offset + span;
}

/* A block freed on stream whose work may still be queued: the newest few of its FIFO, of the same size. */
static int reuse_pending(mo_dev *d, uint64_t nbytes, uint64_t stream, uint64_t *address) {
    uint32_t si = stream_find(d, stream);
    if (si == MO_NIL) return 0;
    uint32_t i = d->streams[si].tail;
    for (uint32_t k = 0; k < MO_DEV_REUSE_WINDOW && i != MO_NIL; k++, i = d->pend[i].prev) {
        mo_pending *e = &d->pend[i];
        if (e->nbytes != nbytes || e->kind != MO_PEND_HEAP) continue;
        *address = e->address;
        pend_drop(d, i);
        d->heap_live_bytes += nbytes;
        d->st.stream_reuses++;
        return 1;
    }
    return 0;
}

/* A heap block: the arena's own placement, or the lowest address that fits (lowest_first: the steps before a
 * replay is armed, so that what they leave alive packs low and a layout among it has no high block to clear). */
static int heap_place(mo_dev *d, uint64_t nbytes, uint64_t *offset, uint64_t *span, uint64_t *serial) {
    if (d->lowest_first) return mo_arena_alloc_lowest(d->arena, nbytes, d->alignment, 0, offset, span, serial);
    return mo_arena_alloc(d->arena, nbytes, d->alignment, offset, span, serial, NULL);
}

static int heap_alloc(mo_dev *d, uint64_t nbytes, uint64_t stream, uint64_t *address) {
    if (d->st.pending_blocks && reuse_pending(d, nbytes, stream, address)) return MO_OK;
    uint64_t offset, span, serial;
    int rc = heap_place(d, nbytes, &offset, &span, &serial);
    if (rc == MO_E_EXHAUSTED && d->st.pending_blocks) {
        /* Room may come back from pending frees: mark them all, then wait for the oldest until it fits. */
        seal_all(d);
        for (;;) {
            collect(d);
            rc = heap_place(d, nbytes, &offset, &span, &serial);
            if (rc != MO_E_EXHAUSTED || !wait_oldest(d)) break;
        }
    }
    if (rc == MO_OK) {
        d->heap_live_bytes += nbytes;
        mo_dev_note_extent(d, block_extent(d, offset, span));
        *address = d->base_address + offset;
        return MO_OK;
    }
    if (rc != MO_E_EXHAUSTED || !d->has_ops || !d->ops.overflow_alloc) return rc;
    if (mo_map_reserve(&d->overflow_map, 1) != MO_OK) return rc;
    uint64_t outside = d->ops.overflow_alloc(d->ops.ctx, nbytes);
    if (!outside)
        return mo_fail(MO_E_EXHAUSTED, "the region of %llu bytes is full and no memory outside it could be had for %llu bytes",
                       (ull)d->capacity, (ull)nbytes);
    mo_map_put(&d->overflow_map, outside, nbytes);
    d->st.overflow_bytes += nbytes;
    d->st.overflow_allocs++;
    mo_dev_note_extent(d, d->peak_extent);
    *address = outside;
    return MO_OK;
}

int mo_dev_do_alloc(mo_dev *d, uint64_t nbytes, uint64_t stream, uint64_t *address) {
    if (nbytes == 0) return mo_fail(MO_E_INVALID_ARG, "size 0 requested; ask for at least 1 byte");
    if (d->st.pending_blocks) {
        collect(d);
        /* Another stream's open frees get their marker now, so this stream can have them once done. */
        for (uint32_t si = 0; si < d->stream_count; si++)
            if (d->streams[si].open && d->streams[si].stream != stream) seal(d, si);
    }
    /* Every block is a multiple of the alignment (torch rounds to 512 too): small ones are then slab slots. */
    uint64_t span = mo_round_up(nbytes, d->alignment);
    if (span < nbytes) return mo_fail(MO_E_EXHAUSTED, "request of %llu bytes exceeds the capacity", (ull)nbytes);
    int rc = MO_OK;
    if (!(d->plan.armed && mo_replay_alloc(d, nbytes, stream, address))) rc = heap_alloc(d, span, stream, address);
    if (rc != MO_OK) {
        d->st.failed_allocs++;
        return rc;
    }
    d->st.live_bytes += span;
    d->st.live_blocks++;
    if (d->st.live_bytes > d->st.peak_live_bytes) d->st.peak_live_bytes = d->st.live_bytes;
    if (d->recording) mo_replay_note_alloc(d, *address, nbytes);
    return MO_OK;
}

/* Free through a marker recorded and waited for at once: the way a free that cannot be deferred (no host
 * memory for its record) still never hands memory a stream may be using to another. */
static void wait_now(mo_dev *d, uint64_t stream, const uint64_t *extra, uint32_t n_extra) {
    for (uint32_t k = 0; k <= n_extra; k++) {
        uint64_t token = d->ops.record(d->ops.ctx, k ? extra[k - 1] : stream);
        if (!token || d->ops.wait(d->ops.ctx, token) != 0) d->st.marker_errors++;
        if (token) d->ops.release(d->ops.ctx, token);
    }
    d->st.sync_frees++;
}

/* Defer the free of a live heap or overflow block (it passed every check). */
static void defer_free(mo_dev *d, uint64_t address, uint64_t nbytes, int kind, uint64_t stream) {
    uint64_t extra[MO_DEV_MAX_USES];
    uint32_t n = mo_dev_take_uses(d, address, extra), kept = 0;
    for (uint32_t k = 0; k < n; k++)
        if (extra[k] != stream) extra[kept++] = extra[k];
    uint32_t si = MO_NIL;
    int rc = pend_reserve(d);
    if (rc == MO_OK) rc = mo_map_reserve(&d->pending_map, 1);
    if (rc == MO_OK && kept) rc = mo_dev_marker_reserve(d, kept + 1);
    if (rc == MO_OK && (si = stream_get(d, stream)) == MO_NIL) rc = MO_E_NOMEM;
    if (rc != MO_OK) {
        wait_now(d, stream, extra, kept);
        free_now(d, kind, address, nbytes);
        return;
    }
    uint32_t i = pend_take(d);
    mo_pending *e = &d->pend[i];
    e->address = address;
    e->nbytes = nbytes;
    e->kind = (uint8_t)kind;
    e->stream = si;
    if (kept) { /* the slow list, with markers of its own: recorded now, after the other streams' uses */
        if ((e->marker = mo_dev_marker_new(d, stream))) d->markers[e->marker].refs++;
        for (uint32_t k = 0; k < kept; k++) {
            uint32_t m = mo_dev_marker_new(d, extra[k]);
            if (!m) continue;
            d->markers[m].refs++;
            e->extra[e->n_extra++] = m;
        }
        if (!e->n_extra && e->marker) { /* no other stream's marker could be had: an ordinary open entry */
            mo_dev_marker_unref(d, e->marker);
            e->marker = 0;
        }
    }
    if (e->n_extra) {
        e->next = d->slow_head;
        if (d->slow_head != MO_NIL) d->pend[d->slow_head].prev = i;
        d->slow_head = i;
    } else {
        mo_stream *s = &d->streams[si];
        e->prev = s->tail;
        if (s->tail != MO_NIL) d->pend[s->tail].next = i;
        else s->head = i;
        s->tail = i;
        if (!e->marker) {
            s->open++;
            s->open_bytes += nbytes;
        }
    }
    mo_map_put(&d->pending_map, address, i);
    d->st.pending_bytes += nbytes;
    d->st.pending_blocks++;
    d->st.deferred_frees++;
    if (d->st.pending_bytes > d->st.peak_pending_bytes) d->st.peak_pending_bytes = d->st.pending_bytes;
    mo_stream *s = &d->streams[si];
    if (s->open >= MO_DEV_SEAL_BLOCKS || s->open_bytes >= d->capacity / 64) seal(d, si);
}

static int already_pending(const mo_dev *d, uint64_t address) {
    uint64_t i;
    if (!d->st.pending_blocks || !mo_map_get(&d->pending_map, address, &i)) return 0;
    return mo_fail(MO_E_DOUBLE_FREE, "block at 0x%llx (%llu bytes) was already freed: it waits for the work its stream queued "
                   "before that free", (ull)address, (ull)d->pend[i].nbytes);
}

int mo_dev_do_free(mo_dev *d, uint64_t address, uint64_t stream) {
    uint64_t nbytes = 0;
    int rc = d->plan.armed ? mo_replay_free(d, address, stream, &nbytes) : -1;
    if (rc == -1) {
        int kind;
        if (address >= d->base_address && address - d->base_address < d->capacity) {
            uint64_t span;
            if (!d->has_ops) { /* at once: the arena checks and frees in one call, its counters give the size */
                uint64_t before = d->arena->st.requested_bytes;
                if ((rc = mo_dev_heap_free_now(d, address - d->base_address)) != MO_OK) return rc;
                nbytes = before - d->arena->st.requested_bytes;
                d->heap_live_bytes -= nbytes;
                goto freed;
            }
            if (already_pending(d, address)) return MO_E_DOUBLE_FREE;
            rc = mo_arena_query(d->arena, (mo_handle){address - d->base_address, 0, 0, 0}, &nbytes, &span);
            if (rc != MO_OK) return rc;
            kind = MO_PEND_HEAP;
        } else if (mo_map_get(&d->overflow_map, address, &nbytes)) {
            if (already_pending(d, address)) return MO_E_DOUBLE_FREE;
            kind = MO_PEND_OVERFLOW;
        } else {
            return mo_fail(MO_E_INVALID_FREE, "address 0x%llx is neither in the region [0x%llx, 0x%llx) nor memory it "
                           "handed out from outside it", (ull)address, (ull)d->base_address,
                           (ull)(d->base_address + d->capacity));
        }
        if (kind == MO_PEND_HEAP) d->heap_live_bytes -= nbytes;
        defer_free(d, address, nbytes, kind, stream); /* has ops: overflow memory exists only with them */
    } else if (rc != MO_OK) {
        return rc;
    }
freed:
    if (d->recording) mo_replay_note_free(d, address);
    d->st.live_blocks--;
    d->st.live_bytes -= nbytes;
    return MO_OK;
}

int mo_dev_do_record_stream(mo_dev *d, uint64_t address, uint64_t stream) {
    int found = 0, rc = d->plan.armed ? mo_replay_record_stream(d, address, &found) : MO_OK;
    if (rc != MO_OK) return rc;
    if (!found) {
        uint64_t nbytes, span;
        if (address >= d->base_address && address - d->base_address < d->capacity) {
            if (already_pending(d, address)) return MO_E_DOUBLE_FREE;
            rc = mo_arena_query(d->arena, (mo_handle){address - d->base_address, 0, 0, 0}, &nbytes, &span);
            if (rc != MO_OK) return rc;
        } else if (!mo_map_get(&d->overflow_map, address, &nbytes) || already_pending(d, address)) {
            return mo_fail(MO_E_INVALID_FREE, "address 0x%llx is not a live block of this pool", (ull)address);
        }
    }
    return d->has_ops ? add_use(d, address, stream) : MO_OK;
}

int mo_dev_do_collect(mo_dev *d, int wait) {
    if (!d->st.pending_blocks) return MO_OK;
    seal_all(d);
    collect(d);
    while (wait && d->st.pending_blocks && wait_oldest(d)) collect(d);
    return MO_OK;
}

/* Wait for every pending free and release it (a pool being destroyed). */
void mo_dev_drain(mo_dev *d) {
    seal_all(d);
    while (d->st.pending_blocks) {
        collect(d);
        if (d->st.pending_blocks && !wait_oldest(d)) break; /* open entries whose marker failed: nothing to wait on */
    }
    for (uint32_t si = 0; si < d->stream_count; si++) /* markers failed: the streams are lost to errors anyway */
        while (d->streams[si].head != MO_NIL) pend_release(d, d->streams[si].head);
    while (d->slow_head != MO_NIL) pend_release(d, d->slow_head);
}
