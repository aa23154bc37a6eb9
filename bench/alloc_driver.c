/*
 * Replays an allocation trace against one allocator and reports its speed and memory, so that the
 * figures are the allocator's own and not those of a Python loop. Compiled and run by bench/alloc.py.
 *
 *   alloc_driver LIBRARY TRACE MODES REPEATS CAPACITY_BYTES [PLAN [LAG_PLAN]]
 *
 * PLAN (replay modes) holds uint64 count, uint64 region_bytes, uint64 n_regions, n_regions (offset, bytes)
 * pairs, then count (nbytes, offset, offset_among) triples, offsets UINT64_MAX for the heap:
 * memopt.pools._replay's layouts of the trace's first step, in one region (offset) and among the blocks
 * alive when it is armed (offset_among, inside the regions; n_regions 0 when there is none). The replay
 * arms the second with mo_dev_plan_at and, where the pool's blocks are not where the layout saw them
 * (lagging frees move them), the first with mo_dev_plan; "layout" in the output says which. LAG_PLAN, the
 * same laid out from a pool whose frees lagged as the -lag modes' do, serves those modes (PLAN when absent).
 * TRACE is a file of records {uint32 id; uint32 is_free; uint64 nbytes}; every id is freed before
 * it is allocated again and the trace ends with nothing live. MODES is one mode or several moalloc
 * modes separated by commas, replayed in turn in this one process (interleaved, so a slow spell of
 * a shared machine hits them all):
 *   glibc               malloc / free (alone)
 *   memopt              moalloc, no hardening (offsets only)
 *   memopt-hardened     moalloc with a 16-block quarantine (the hardened default of a GPU arena)
 *   memopt-host         moalloc over a host region with quarantine, canaries and freed blocks of at
 *                       most 1 KiB zeroed (a host Arena's default)
 *   memopt-host-nozero  the same without the zeroing (a host Arena's default before it)
 *   memopt-host-poison  quarantine, canaries and poison (Arena(poison=True): every freed block poisoned)
 *   memopt-device       a device pool (mo_dev_*, what a CUDA arena runs on) with the 16-block quarantine, no
 *                       streams: addresses instead of handles, the heap only
 *   memopt-replay       the same, replaying PLAN from the trace's second step on (the first is the recorded one);
 *                       until then the heap places blocks lowest first, as a CUDA arena does before arming
 *   memopt-device-lag, memopt-replay-lag   with stream-ordered frees: a free's marker is done only once 64
 *                       more allocations happened (a GPU running behind the CPU), as fake markers
 * Records of kind 2 mark a training step's beginning: the device modes start a step there and count the
 * figures of the steps after the first apart ("steady": peaks reset at the second step).
 * A "+threads" suffix (on every mode of the list) first starts an idle thread, as in any process with a
 * thread pool (Python with torch): glibc then takes its multi-threaded paths and moalloc its per-arena
 * lock. Frees pass back the whole handle (offset, size, serial, check), as Arena.free does.
 * Prints one JSON object a mode: best ns per operation over REPEATS replays, and the peak bytes reserved
 * (glibc: heap + mmapped bytes, from mallinfo2 on a first replay in a fresh process; moalloc: the
 * highest end offset of any block or slab) and, for moalloc, the peak metadata bytes and the peak bytes
 * in live blocks (spans: requested bytes plus rounding and guard bytes).
 */
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <unistd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moalloc.h"

typedef struct {
    uint32_t id;
    uint32_t is_free;
    uint64_t nbytes;
} record;

static int (*p_create)(uint64_t, void *, uint32_t, uint32_t, uint64_t, uint64_t *);
static int (*p_destroy)(uint64_t);
static int (*p_alloc)(uint64_t, uint64_t, uint64_t, uint64_t *, uint64_t *, uint64_t *, uint64_t *);
static int (*p_free)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);
static int (*p_stats)(uint64_t, mo_stats_t *);
static const char *(*p_error)(void);
static int (*p_dev_create)(uint64_t, uint64_t, void *, uint64_t, uint32_t, uint32_t, uint64_t, const mo_dev_ops *, uint64_t *);
static int (*p_dev_destroy)(uint64_t);
static int (*p_dev_alloc)(uint64_t, uint64_t, uint64_t, uint64_t *);
static int (*p_dev_free)(uint64_t, uint64_t, uint64_t);
static int (*p_dev_plan)(uint64_t, uint64_t, const uint64_t *, const uint64_t *, uint64_t);
static int (*p_dev_plan_at)(uint64_t, uint64_t, const uint64_t *, const uint64_t *, uint64_t, const uint64_t *,
                            const uint64_t *);
static int (*p_dev_step)(uint64_t);
static int (*p_dev_set_lowest_first)(uint64_t, int);
static int (*p_dev_collect)(uint64_t, int);
static int (*p_dev_stats)(uint64_t, mo_dev_stats_t *);
static int (*p_dev_arena_stats)(uint64_t, mo_stats_t *);
static int (*p_dev_reset_peaks)(uint64_t);

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static uint64_t glibc_reserved(void) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    struct mallinfo2 m = mallinfo2();
    return (uint64_t)m.arena + (uint64_t)m.hblkhd;
#else
    return 0;
#endif
}

static double replay_glibc(const record *trace, size_t n, void **ptrs, int measure, uint64_t *peak) {
    uint64_t base = measure ? glibc_reserved() : 0;
    double t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        const record *r = &trace[i];
        if (r->is_free == 2) continue;
        if (r->is_free) {
            free(ptrs[r->id]);
        } else {
            ptrs[r->id] = malloc(r->nbytes);
            if (!ptrs[r->id]) {
                fprintf(stderr, "malloc(%llu) failed\n", (unsigned long long)r->nbytes);
                exit(1);
            }
            if (measure) {
                uint64_t reserved = glibc_reserved() - base;
                if (reserved > *peak) *peak = reserved;
            }
        }
    }
    return now_ns() - t0;
}

typedef struct {
    uint64_t offset, nbytes, serial, check;
} handle_words;

static double replay_memopt(const record *trace, size_t n, uint64_t handle, handle_words *blocks) {
    uint64_t span;
    double t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        const record *r = &trace[i];
        handle_words *b = &blocks[r->id];
        int rc;
        if (r->is_free == 2) continue;
        if (r->is_free) {
            rc = p_free(handle, b->offset, b->nbytes, b->serial, b->check);
        } else {
            b->nbytes = r->nbytes;
            rc = p_alloc(handle, r->nbytes, 16, &b->offset, &span, &b->serial, &b->check);
        }
        if (rc != MO_OK) {
            fprintf(stderr, "moalloc op %zu failed (%d): %s\n", i, rc, p_error());
            exit(1);
        }
    }
    return now_ns() - t0;
}

/* -- device pools ----------------------------------------------------------------------------------- */

#define DEV_ALIGNMENT 512u
#define DEV_BASE (1ull << 40) /* addresses nobody touches, as a GPU region's */
#define LAG_ALLOCS 64u

/* Fake markers of a GPU running LAG_ALLOCS allocations behind: a marker is its allocation count + 1. */
static uint64_t lag_clock, lag_waited;
static uint64_t lag_record(void *ctx, uint64_t stream) { (void)ctx; (void)stream; return lag_clock + 1; }
static int lag_query(void *ctx, uint64_t marker) { (void)ctx; return marker <= lag_waited || lag_clock + 1 >= marker + LAG_ALLOCS; }
static int lag_wait(void *ctx, uint64_t marker) {
    (void)ctx;
    if (marker > lag_waited) lag_waited = marker;
    return 0;
}
static void lag_release(void *ctx, uint64_t marker) { (void)ctx; (void)marker; }
static const mo_dev_ops LAG_OPS = {NULL, lag_record, lag_query, lag_wait, lag_release, NULL, NULL};

typedef struct {
    uint64_t count, region_bytes, n_regions;
    uint64_t *nbytes, *offsets, *among, *region_offsets, *region_sizes;
} plan_file;

typedef struct {
    uint64_t peak_live, peak_reserved, steady_live, steady_reserved, planned, fallbacks, allocs_after_first,
        peak_metadata, peak_spans;
    int among; /* armed with the layout among the live blocks */
} dev_figures;

static double replay_device(const record *trace, size_t n, uint64_t handle, uint64_t *addresses, const plan_file *plan,
                            dev_figures *fig) {
    int steps = 0;
    uint64_t after_first = 0;
    mo_dev_stats_t st;
    if (plan) p_dev_set_lowest_first(handle, 1); /* as a CUDA arena does before its replay is armed */
    double t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        const record *r = &trace[i];
        int rc = MO_OK;
        if (r->is_free == 2) {
            if (++steps == 2) {
                p_dev_stats(handle, &st);
                fig->peak_live = st.peak_live_bytes; /* of the first step, updated at the end */
                fig->peak_reserved = st.peak_reserved_bytes;
                if (plan) {
                    p_dev_collect(handle, 1);
                    rc = plan->n_regions ? p_dev_plan_at(handle, plan->count, plan->nbytes, plan->among,
                                                         plan->n_regions, plan->region_offsets, plan->region_sizes)
                                         : -1;
                    fig->among = rc == MO_OK;
                    if (rc != MO_OK)
                        rc = p_dev_plan(handle, plan->count, plan->nbytes, plan->offsets, plan->region_bytes);
                    p_dev_set_lowest_first(handle, 0);
                }
                p_dev_reset_peaks(handle);
            }
            if (rc == MO_OK && steps >= 2 && plan) rc = p_dev_step(handle);
        } else if (r->is_free) {
            rc = p_dev_free(handle, addresses[r->id], 0);
        } else {
            lag_clock++;
            after_first += steps >= 2;
            rc = p_dev_alloc(handle, r->nbytes, 0, &addresses[r->id]);
        }
        if (rc != MO_OK) {
            fprintf(stderr, "device pool op %zu failed (%d): %s\n", i, rc, p_error());
            exit(1);
        }
    }
    double elapsed = now_ns() - t0;
    p_dev_stats(handle, &st);
    fig->steady_live = st.peak_live_bytes;
    fig->steady_reserved = st.peak_reserved_bytes;
    if (st.peak_live_bytes > fig->peak_live) fig->peak_live = st.peak_live_bytes;
    if (st.peak_reserved_bytes > fig->peak_reserved) fig->peak_reserved = st.peak_reserved_bytes;
    fig->planned = st.planned_allocs;
    fig->fallbacks = st.fallback_allocs;
    fig->allocs_after_first = after_first;
    mo_stats_t as;
    p_dev_arena_stats(handle, &as);
    fig->peak_metadata = as.peak_metadata_bytes;
    fig->peak_spans = as.peak_bytes;
    return elapsed;
}

static int read_plan(const char *path, plan_file *plan) {
    FILE *f = fopen(path, "rb");
    if (!f || fread(&plan->count, 8, 1, f) != 1 || fread(&plan->region_bytes, 8, 1, f) != 1 ||
        fread(&plan->n_regions, 8, 1, f) != 1)
        return -1;
    plan->region_offsets = malloc((plan->n_regions + 1) * 8);
    plan->region_sizes = malloc((plan->n_regions + 1) * 8);
    for (uint64_t r = 0; r < plan->n_regions; r++)
        if (fread(&plan->region_offsets[r], 8, 1, f) != 1 || fread(&plan->region_sizes[r], 8, 1, f) != 1) return -1;
    plan->nbytes = malloc(plan->count * 8);
    plan->offsets = malloc(plan->count * 8);
    plan->among = malloc(plan->count * 8);
    for (uint64_t i = 0; i < plan->count; i++)
        if (fread(&plan->nbytes[i], 8, 1, f) != 1 || fread(&plan->offsets[i], 8, 1, f) != 1 ||
            fread(&plan->among[i], 8, 1, f) != 1)
            return -1;
    fclose(f);
    return 0;
}

static void *idle_thread(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

/* A moalloc configuration: quarantine blocks and flags; host ones run over a host region. */
typedef struct {
    const char *name;
    uint32_t quarantine, flags;
    int host;
    int device; /* 1: a device pool; 2: one with lagging stream markers */
    int replay;
} mo_mode;

static const mo_mode MO_MODES[] = {
    {"memopt", 0, 0, 0, 0, 0},
    {"memopt-hardened", 16, 0, 0, 0, 0},
    {"memopt-host", 16, MO_F_CANARIES | MO_F_ZERO_SMALL, 1, 0, 0},
    {"memopt-host-nozero", 16, MO_F_CANARIES, 1, 0, 0},
    {"memopt-host-poison", 16, MO_F_CANARIES | MO_F_POISON, 1, 0, 0},
    {"memopt-device", 16, 0, 0, 1, 0},
    {"memopt-replay", 16, 0, 0, 1, 1},
    {"memopt-device-lag", 16, 0, 0, 2, 0},
    {"memopt-replay-lag", 16, 0, 0, 2, 1},
};

#define MAX_MODES 8

int main(int argc, char **argv) {
    if (argc < 6 || argc > 8) {
        fprintf(stderr, "usage: %s LIBRARY TRACE MODES REPEATS CAPACITY_BYTES [PLAN [LAG_PLAN]]\n", argv[0]);
        return 2;
    }
    /* Split MODES at commas; every one carries the +threads suffix or none does. */
    char list[512], *names[MAX_MODES];
    snprintf(list, sizeof(list), "%s", argv[3]);
    int n_modes = 0, threads = -1;
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        if (n_modes == MAX_MODES) return fprintf(stderr, "at most %d modes\n", MAX_MODES), 2;
        char *suffix = strstr(tok, "+threads");
        if (threads >= 0 && threads != (suffix != NULL)) return fprintf(stderr, "+threads on some modes only\n"), 2;
        threads = suffix != NULL;
        if (suffix) *suffix = '\0';
        names[n_modes++] = tok;
    }
    if (threads > 0) {
        pthread_t thread;
        pthread_create(&thread, NULL, idle_thread, NULL);
    }
    const char *mode = names[0];
    int repeats = atoi(argv[4]);
    uint64_t capacity = strtoull(argv[5], NULL, 10);
    FILE *f = fopen(argv[2], "rb");
    if (!f) return perror("trace"), 1;
    fseek(f, 0, SEEK_END);
    size_t n = (size_t)ftell(f) / sizeof(record);
    fseek(f, 0, SEEK_SET);
    record *trace = malloc(n * sizeof(record));
    if (fread(trace, sizeof(record), n, f) != n) return fprintf(stderr, "short trace\n"), 1;
    fclose(f);
    uint32_t max_id = 0;
    for (size_t i = 0; i < n; i++)
        if (trace[i].id > max_id) max_id = trace[i].id;
    void **ptrs = calloc(max_id + 1, sizeof(void *));
    handle_words *blocks = calloc(max_id + 1, sizeof(handle_words));

    double best[MAX_MODES];
    uint64_t peak_reserved[MAX_MODES] = {0}, peak_metadata[MAX_MODES] = {0}, peak_spans[MAX_MODES] = {0};
    dev_figures figures[MAX_MODES] = {{0}};
    plan_file plan = {0}, lag_plan = {0};
    if (argc >= 7 && read_plan(argv[6], &plan) != 0) return fprintf(stderr, "cannot read the plan %s\n", argv[6]), 1;
    if (argc >= 8 && read_plan(argv[7], &lag_plan) != 0) return fprintf(stderr, "cannot read the plan %s\n", argv[7]), 1;
    if (argc < 8) lag_plan = plan;
    uint64_t *addresses = calloc(max_id + 1, sizeof(uint64_t));
    for (int m = 0; m < MAX_MODES; m++) best[m] = 1e300;
    if (strcmp(mode, "glibc") == 0) {
        if (n_modes != 1) return fprintf(stderr, "glibc runs alone\n"), 2;
        replay_glibc(trace, n, ptrs, 1, &peak_reserved[0]); /* first, on a fresh heap: the memory figure */
        for (int k = 0; k < repeats; k++) {
            double t = replay_glibc(trace, n, ptrs, 0, NULL);
            if (t < best[0]) best[0] = t;
        }
    } else {
        void *lib = dlopen(argv[1], RTLD_NOW);
        if (!lib) return fprintf(stderr, "%s\n", dlerror()), 1;
        *(void **)&p_create = dlsym(lib, "mo_arena_create");
        *(void **)&p_destroy = dlsym(lib, "mo_arena_destroy");
        *(void **)&p_alloc = dlsym(lib, "mo_alloc");
        *(void **)&p_free = dlsym(lib, "mo_free");
        *(void **)&p_stats = dlsym(lib, "mo_stats");
        *(void **)&p_error = dlsym(lib, "mo_last_error");
        *(void **)&p_dev_create = dlsym(lib, "mo_dev_create");
        *(void **)&p_dev_destroy = dlsym(lib, "mo_dev_destroy");
        *(void **)&p_dev_alloc = dlsym(lib, "mo_dev_alloc");
        *(void **)&p_dev_free = dlsym(lib, "mo_dev_free");
        *(void **)&p_dev_plan = dlsym(lib, "mo_dev_plan");
        *(void **)&p_dev_plan_at = dlsym(lib, "mo_dev_plan_at");
        *(void **)&p_dev_step = dlsym(lib, "mo_dev_step");
        *(void **)&p_dev_set_lowest_first = dlsym(lib, "mo_dev_set_lowest_first");
        *(void **)&p_dev_collect = dlsym(lib, "mo_dev_collect");
        *(void **)&p_dev_stats = dlsym(lib, "mo_dev_stats");
        *(void **)&p_dev_arena_stats = dlsym(lib, "mo_dev_arena_stats");
        *(void **)&p_dev_reset_peaks = dlsym(lib, "mo_dev_reset_peaks");
        const mo_mode *modes[MAX_MODES];
        void *region = NULL;
        for (int m = 0; m < n_modes; m++) {
            modes[m] = NULL;
            for (size_t j = 0; j < sizeof(MO_MODES) / sizeof(MO_MODES[0]); j++)
                if (strcmp(names[m], MO_MODES[j].name) == 0) modes[m] = &MO_MODES[j];
            if (!modes[m]) return fprintf(stderr, "unknown mode %s\n", names[m]), 2;
            if (modes[m]->replay && !plan.count) return fprintf(stderr, "mode %s needs a PLAN\n", names[m]), 2;
            if (modes[m]->host && !region) {
                region = malloc(capacity);
                memset(region, 0, capacity); /* fault the pages in before timing */
            }
        }
        for (int k = 0; k < repeats + 1; k++) {
            for (int m = 0; m < n_modes; m++) {
                uint64_t handle;
                if (modes[m]->device) {
                    uint64_t cap = capacity / DEV_ALIGNMENT * DEV_ALIGNMENT;
                    lag_clock = lag_waited = 0;
                    if (p_dev_create(cap, DEV_BASE, NULL, DEV_ALIGNMENT, modes[m]->quarantine, 0, 1,
                                     modes[m]->device == 2 ? &LAG_OPS : NULL, &handle) != MO_OK)
                        return fprintf(stderr, "create: %s\n", p_error()), 1;
                    dev_figures fig = {0};
                    double t = replay_device(trace, n, handle, addresses, !modes[m]->replay ? NULL : modes[m]->device == 2 ? &lag_plan : &plan,
                                             &fig);
                    if (k > 0 && t < best[m]) best[m] = t;
                    figures[m] = fig;
                    peak_reserved[m] = fig.peak_reserved;
                    peak_metadata[m] = fig.peak_metadata;
                    peak_spans[m] = fig.peak_spans;
                    p_dev_collect(handle, 1);
                    if (p_dev_destroy(handle) != MO_OK) return fprintf(stderr, "destroy: %s\n", p_error()), 1;
                    continue;
                }
                if (p_create(capacity, modes[m]->host ? region : NULL, modes[m]->quarantine, modes[m]->flags, 1,
                             &handle) != MO_OK)
                    return fprintf(stderr, "create: %s\n", p_error()), 1;
                double t = replay_memopt(trace, n, handle, blocks);
                if (k > 0 && t < best[m]) best[m] = t; /* replay 0 warms caches and metadata pages */
                mo_stats_t st;
                p_stats(handle, &st);
                peak_reserved[m] = st.high_water_bytes;
                peak_metadata[m] = st.peak_metadata_bytes;
                peak_spans[m] = st.peak_bytes;
                p_destroy(handle);
            }
        }
        free(region);
    }
    for (int m = 0; m < n_modes; m++) {
        const dev_figures *f = &figures[m];
        printf("{\"mode\": \"%s%s\", \"ops\": %zu, \"ns_per_op\": %.3f, \"peak_reserved_bytes\": %llu, "
               "\"peak_metadata_bytes\": %llu, \"peak_span_bytes\": %llu, \"peak_live_bytes\": %llu, "
               "\"steady_reserved_bytes\": %llu, \"steady_live_bytes\": %llu, \"planned_allocs\": %llu, "
               "\"fallback_allocs\": %llu, \"allocs_after_first_step\": %llu, \"layout\": \"%s\"}\n",
               names[m], threads > 0 ? "+threads" : "", n, best[m] / (double)n, (unsigned long long)peak_reserved[m],
               (unsigned long long)peak_metadata[m], (unsigned long long)peak_spans[m], (unsigned long long)f->peak_live,
               (unsigned long long)f->steady_reserved, (unsigned long long)f->steady_live, (unsigned long long)f->planned,
               (unsigned long long)f->fallbacks, (unsigned long long)f->allocs_after_first,
               strstr(names[m], "replay") ? (f->among ? "among" : "region") : "");
    }
    return 0;
}
