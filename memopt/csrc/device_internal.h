/* Internal layout of a device pool (device.c: streams, deferred frees, heap; replay.c: record and replay;
 * device_api.c: handles, entry points, checks and statistics; map.c: the address tables). */
#ifndef MO_DEVICE_INTERNAL_H
#define MO_DEVICE_INTERNAL_H

#include <pthread.h>

#include "moalloc_internal.h"

/* An open-addressing map of 64-bit keys (never UINT64_MAX) to 64-bit values, with backward-shift deletion. */
typedef struct mo_map {
    uint64_t *keys; /* key + 1; 0 marks an empty slot */
    uint64_t *vals;
    uint32_t bits;
    uint64_t count;
} mo_map;

/* Room for `extra` more keys without a rebuild; MO_E_NOMEM (map unchanged) when host memory runs out. */
int mo_map_reserve(mo_map *m, uint64_t extra);
/* Insert or overwrite; needs the room mo_map_reserve made. */
void mo_map_put(mo_map *m, uint64_t key, uint64_t val);
int mo_map_get(const mo_map *m, uint64_t key, uint64_t *val);
int mo_map_remove(mo_map *m, uint64_t key);
void mo_map_free(mo_map *m);
uint64_t mo_map_bytes(const mo_map *m);

/* A marker recorded on a stream (an event on a GPU), shared by every pending block it covers. Index 0 is "none". */
typedef struct mo_marker {
    uint64_t token;  /* the ops' marker */
    uint64_t stream; /* the stream it was recorded on */
    uint32_t refs;   /* pending blocks and planned ranges waiting on it; a free record when 0 */
    uint8_t done;    /* seen done once: not queried again */
} mo_marker;

enum { MO_PEND_HEAP = 0, MO_PEND_OVERFLOW = 1 };

/* A heap or overflow block freed on a stream, waiting for the work queued before the free. Entries of one
 * stream form a FIFO (markers of one stream complete in order); the newest `open` ones have no marker yet
 * and are sealed by one marker together. A block that other streams used too (mo_dev_record_stream) sits
 * in the `slow` list with its own markers, recorded at its free. */
typedef struct mo_pending {
    uint64_t address;
    uint64_t nbytes;
    uint32_t marker;                  /* on the freeing stream; 0 while open */
    uint32_t extra[MO_DEV_MAX_USES];  /* markers on the other streams that used it */
    uint32_t stream;                  /* index in the stream table */
    uint32_t prev, next;              /* its list; next also chains free records */
    uint8_t n_extra;
    uint8_t kind;                     /* MO_PEND_HEAP or MO_PEND_OVERFLOW */
    uint8_t in_use;
} mo_pending;

typedef struct mo_stream {
    uint64_t stream;
    uint32_t head, tail; /* FIFO of its pending entries, oldest first */
    uint32_t open;       /* the newest `open` entries have no marker yet */
    uint64_t open_bytes;
} mo_stream;

/* Streams a block was used on besides its own (mo_dev_record_stream). */
typedef struct mo_uses {
    uint64_t stream[MO_DEV_MAX_USES];
    uint32_t n;
    uint32_t next_free;
} mo_uses;

/* One allocation of the recorded step: [start, end) in events, end MO_UNPLANNED while live. */
typedef struct mo_trace_rec {
    uint64_t nbytes, start, end;
} mo_trace_rec;

/* A range of the planned region that a planned block holds, or held: a freed range stays until an
 * allocation overlaps it, which takes it at once on the freeing stream, on another once the markers are done
 * (without ops at once: it stays only so that a second free of it is named a double free). */
typedef struct mo_range {
    uint64_t offset;  /* in the pool (regions hold them) */
    uint64_t span;    /* the bytes asked for, rounded up to the alignment */
    uint64_t nbytes;  /* the same (what the pool counts as live) */
    uint64_t stream;  /* freeing stream (freed ranges) */
    uint32_t marker;  /* on the freeing stream, recorded when another stream first needs the range */
    uint32_t extra[MO_DEV_MAX_USES];
    uint8_t n_extra;
    uint8_t freed;
    uint8_t piece;    /* what is left of a freed range that an allocation on its own stream overlapped in part */
} mo_range;

typedef struct mo_plan {
    int armed;
    uint64_t count;           /* positions */
    uint64_t *nbytes;         /* per position */
    uint64_t *offsets;        /* per position, in the pool; MO_UNPLANNED for the heap's */
    uint64_t n_regions;       /* heap blocks reserved for the plan, sorted by offset, disjoint */
    uint64_t *region_offsets; /* in the pool */
    uint64_t *region_bytes;
    uint64_t region_total;    /* bytes of all regions */
    uint64_t cursor;          /* the position the next allocation should be */
    mo_range *ranges;         /* sorted by offset, disjoint */
    uint64_t n_ranges, range_cap;
    uint64_t live_bytes;      /* requested bytes of the live planned blocks */
    mo_departure_t departures[MO_DEV_DEPARTURES]; /* the first departures from the plan, in order */
    uint64_t n_departures;
} mo_plan;

typedef struct mo_dev {
    mo_arena *arena;
    uint64_t base_address, capacity, alignment;
    int has_ops;
    mo_dev_ops ops;

    mo_marker *markers;
    uint32_t marker_cap, marker_used; /* records [1, marker_used) handed out at some time */
    uint32_t *marker_free;            /* stack of free records (refs 0), marker_cap slots */
    uint32_t marker_free_count;

    mo_pending *pend;
    uint32_t pend_cap, pend_used, pend_spare; /* free records chained through next */
    uint32_t slow_head;                       /* entries with extra markers */
    mo_stream *streams;
    uint32_t stream_count, stream_cap;
    mo_map pending_map;  /* address -> pending index */
    mo_map overflow_map; /* address -> requested bytes, of live and pending blocks outside the region */
    mo_map uses_map;     /* address -> index in uses */
    mo_uses *uses;
    uint32_t uses_cap, uses_used, uses_spare;

    /* Recording. */
    int recording, trace_failed;
    mo_trace_rec *trace;
    uint64_t trace_len, trace_cap, clock;
    mo_map rec_map; /* address -> trace index, of the recorded blocks still live */

    mo_plan plan;

    uint64_t heap_live_bytes;     /* requested bytes of live heap blocks (not pending) */
    int lowest_first;             /* heap blocks at the lowest address that fits (mo_dev_set_lowest_first) */
    uint64_t peak_extent;         /* highest region end in use since the last reset */
    mo_dev_stats_t st;
} mo_dev;

#define MO_DEV_REUSE_WINDOW 16u    /* newest pending entries of a stream searched for a block of the same size */
#define MO_DEV_SEAL_BLOCKS 32u     /* open entries of a stream sealed by one marker */
#define MO_DEV_LOOKAHEAD 8u        /* plan positions searched ahead for the size asked for */

/* device.c: the calls behind the entry points of device_api.c, which holds the pool's mutex around them */
int mo_dev_do_alloc(mo_dev *d, uint64_t nbytes, uint64_t stream, uint64_t *address);
int mo_dev_do_free(mo_dev *d, uint64_t address, uint64_t stream);
int mo_dev_do_record_stream(mo_dev *d, uint64_t address, uint64_t stream);
int mo_dev_do_collect(mo_dev *d, int wait);
void mo_dev_drain(mo_dev *d);

/* device_api.c: the pool behind a handle, unlocked, for the tests of the checks (tests/csrc/core_faults.c) */
mo_dev *mo_dev_unlocked(uint64_t handle);

/* device.c, for replay.c */
uint32_t mo_dev_marker_new(mo_dev *d, uint64_t stream); /* recorded on stream; 0 when none */
int mo_dev_marker_done(mo_dev *d, uint32_t m);
void mo_dev_marker_wait(mo_dev *d, uint32_t m);
void mo_dev_marker_unref(mo_dev *d, uint32_t m);
int mo_dev_marker_reserve(mo_dev *d, uint32_t n);
/* The extra streams mo_dev_record_stream noted for the block at address (removed from the table). */
uint32_t mo_dev_take_uses(mo_dev *d, uint64_t address, uint64_t *streams);
void mo_dev_note_extent(mo_dev *d, uint64_t end);
int mo_dev_heap_free_now(mo_dev *d, uint64_t offset);

/* replay.c */
void mo_replay_note_alloc(mo_dev *d, uint64_t address, uint64_t nbytes);
void mo_replay_note_free(mo_dev *d, uint64_t address);
/* 1 when the allocation was served from the plan (*address set), 0 when the heap must serve it. */
int mo_replay_alloc(mo_dev *d, uint64_t nbytes, uint64_t stream, uint64_t *address);
/* MO_OK when address was a live planned block (freed; *nbytes its size), -1 when it is not in the planned
 * region, else an error. */
int mo_replay_free(mo_dev *d, uint64_t address, uint64_t stream, uint64_t *nbytes);
int mo_replay_record_stream(mo_dev *d, uint64_t address, int *found);
int mo_replay_plan(mo_dev *d, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets, uint64_t region_bytes);
int mo_replay_plan_at(mo_dev *d, uint64_t count, const uint64_t *nbytes, const uint64_t *offsets, uint64_t n_regions,
                      const uint64_t *region_offsets, const uint64_t *region_bytes);
int mo_replay_unplan(mo_dev *d);
int mo_replay_check(const mo_dev *d);
void mo_replay_free_all(mo_dev *d);
uint64_t mo_replay_bytes(const mo_dev *d);

#endif /* MO_DEVICE_INTERNAL_H */
