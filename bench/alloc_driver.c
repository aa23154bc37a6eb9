/*
 * Replays an allocation trace against one allocator and reports its speed and memory, so that the
 * figures are the allocator's own and not those of a Python loop. Compiled and run by bench/alloc.py.
 *
 *   alloc_driver LIBRARY TRACE MODE REPEATS CAPACITY_BYTES
 *
 * TRACE is a file of records {uint32 id; uint32 is_free; uint64 nbytes}; every id is freed before
 * it is allocated again and the trace ends with nothing live. MODE is one of
 *   glibc            malloc / free
 *   memopt           moalloc, no hardening (offsets only)
 *   memopt-hardened  moalloc with a 16-block quarantine (the hardened default of a GPU arena)
 *   memopt-host      moalloc with quarantine and canaries over a host region (Arena's default)
 * A "+threads" suffix first starts an idle thread, as in any process with a thread pool (Python with
 * torch): glibc then takes its multi-threaded paths and moalloc its per-arena lock.
 * Prints one JSON object: best ns per operation over REPEATS replays, and the peak bytes reserved
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
static int (*p_alloc)(uint64_t, uint64_t, uint64_t, uint64_t *, uint64_t *, uint64_t *);
static int (*p_free)(uint64_t, uint64_t, uint64_t);
static int (*p_stats)(uint64_t, mo_stats_t *);
static const char *(*p_error)(void);

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

static double replay_memopt(const record *trace, size_t n, uint64_t handle, uint64_t *offsets, uint64_t *serials) {
    uint64_t span;
    double t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        const record *r = &trace[i];
        int rc = r->is_free ? p_free(handle, offsets[r->id], serials[r->id])
                            : p_alloc(handle, r->nbytes, 16, &offsets[r->id], &span, &serials[r->id]);
        if (rc != MO_OK) {
            fprintf(stderr, "moalloc op %zu failed (%d): %s\n", i, rc, p_error());
            exit(1);
        }
    }
    return now_ns() - t0;
}

static void *idle_thread(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s LIBRARY TRACE MODE REPEATS CAPACITY_BYTES\n", argv[0]);
        return 2;
    }
    char mode[64];
    snprintf(mode, sizeof(mode), "%s", argv[3]);
    char *suffix = strstr(mode, "+threads");
    if (suffix) {
        *suffix = '\0';
        pthread_t thread;
        pthread_create(&thread, NULL, idle_thread, NULL);
    }
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
    uint64_t *offsets = calloc(max_id + 1, sizeof(uint64_t));
    uint64_t *serials = calloc(max_id + 1, sizeof(uint64_t));

    double best = 1e300;
    uint64_t peak_reserved = 0, peak_metadata = 0, peak_spans = 0;
    if (strcmp(mode, "glibc") == 0) {
        replay_glibc(trace, n, ptrs, 1, &peak_reserved); /* first, on a fresh heap: the memory figure */
        for (int k = 0; k < repeats; k++) {
            double t = replay_glibc(trace, n, ptrs, 0, NULL);
            if (t < best) best = t;
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
        uint32_t quarantine = 0, flags = 0;
        void *region = NULL;
        if (strcmp(mode, "memopt-hardened") == 0) {
            quarantine = 16;
        } else if (strcmp(mode, "memopt-host") == 0) {
            quarantine = 16;
            flags = MO_F_CANARIES;
            region = malloc(capacity);
            memset(region, 0, capacity); /* fault the pages in before timing */
        } else if (strcmp(mode, "memopt") != 0) {
            return fprintf(stderr, "unknown mode %s\n", mode), 2;
        }
        for (int k = 0; k < repeats + 1; k++) {
            uint64_t handle;
            if (p_create(capacity, region, quarantine, flags, 1, &handle) != MO_OK)
                return fprintf(stderr, "create: %s\n", p_error()), 1;
            double t = replay_memopt(trace, n, handle, offsets, serials);
            if (k > 0 && t < best) best = t; /* replay 0 warms caches and metadata pages */
            mo_stats_t st;
            p_stats(handle, &st);
            peak_reserved = st.high_water_bytes;
            peak_metadata = st.peak_metadata_bytes;
            peak_spans = st.peak_bytes;
            p_destroy(handle);
        }
        free(region);
    }
    printf("{\"mode\": \"%s\", \"ops\": %zu, \"ns_per_op\": %.3f, \"peak_reserved_bytes\": %llu, "
           "\"peak_metadata_bytes\": %llu, \"peak_span_bytes\": %llu}\n",
           argv[3], n, best / (double)n, (unsigned long long)peak_reserved, (unsigned long long)peak_metadata,
           (unsigned long long)peak_spans);
    return 0;
}
