/*
 * Replays an allocation trace against one allocator and reports its speed and memory, so that the
 * figures are the allocator's own and not those of a Python loop. Compiled and run by bench/alloc.py.
 *
 *   alloc_driver LIBRARY TRACE MODES REPEATS CAPACITY_BYTES
 *
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
} mo_mode;

static const mo_mode MO_MODES[] = {
    {"memopt", 0, 0, 0},
    {"memopt-hardened", 16, 0, 0},
    {"memopt-host", 16, MO_F_CANARIES | MO_F_ZERO_SMALL, 1},
    {"memopt-host-nozero", 16, MO_F_CANARIES, 1},
    {"memopt-host-poison", 16, MO_F_CANARIES | MO_F_POISON, 1},
};

#define MAX_MODES 8

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s LIBRARY TRACE MODES REPEATS CAPACITY_BYTES\n", argv[0]);
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
        const mo_mode *modes[MAX_MODES];
        void *region = NULL;
        for (int m = 0; m < n_modes; m++) {
            modes[m] = NULL;
            for (size_t j = 0; j < sizeof(MO_MODES) / sizeof(MO_MODES[0]); j++)
                if (strcmp(names[m], MO_MODES[j].name) == 0) modes[m] = &MO_MODES[j];
            if (!modes[m]) return fprintf(stderr, "unknown mode %s\n", names[m]), 2;
            if (modes[m]->host && !region) {
                region = malloc(capacity);
                memset(region, 0, capacity); /* fault the pages in before timing */
            }
        }
        for (int k = 0; k < repeats + 1; k++) {
            for (int m = 0; m < n_modes; m++) {
                uint64_t handle;
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
    for (int m = 0; m < n_modes; m++)
        printf("{\"mode\": \"%s%s\", \"ops\": %zu, \"ns_per_op\": %.3f, \"peak_reserved_bytes\": %llu, "
               "\"peak_metadata_bytes\": %llu, \"peak_span_bytes\": %llu}\n",
               names[m], threads > 0 ? "+threads" : "", n, best[m] / (double)n, (unsigned long long)peak_reserved[m],
               (unsigned long long)peak_metadata[m], (unsigned long long)peak_spans[m]);
    return 0;
}
