/*
 * A fake CUDA driver (libcuda.so.1) over host memory, so memopt/csrc/cuda.c runs on a machine without a GPU.
 * Streams are queues of work that never runs by itself: an event recorded on a stream is done once the test
 * calls fake_cuda_run(stream) (the stream catches up) or someone synchronizes the event. cuMemAlloc fails past
 * fake_cuda_set_limit() bytes. Built as libcuda.so.1 by tests/test_pools_cuda_glue.py and found through
 * LD_LIBRARY_PATH, as the real driver would be.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define API __attribute__((visibility("default")))
#define MAX_STREAMS 64
#define NOT_READY 600
#define OUT_OF_MEMORY 2

typedef struct {
    void *stream;
    uint64_t queued, done;
} fake_stream;

typedef struct {
    int stream; /* index, -1 until recorded */
    uint64_t at;
    int magic;
} fake_event;

static fake_stream streams[MAX_STREAMS];
static int n_streams;
static uint64_t limit_bytes = UINT64_MAX, used_bytes, allocs, frees, syncs, events_live, records;
static _Thread_local void *ctx_stack[16];
static _Thread_local int ctx_depth;
static int primary_ctx = 0x5eed;

static int stream_index(void *stream) {
    for (int i = 0; i < n_streams; i++)
        if (streams[i].stream == stream) return i;
    streams[n_streams].stream = stream;
    return n_streams++;
}

API int cuInit(unsigned int flags) { return (int)flags; }
API int cuDeviceGet(int *dev, int ordinal) {
    *dev = ordinal;
    return ordinal < 2 ? 0 : 101; /* CUDA_ERROR_INVALID_DEVICE */
}
API int cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    *ctx = (char *)&primary_ctx + dev;
    return 0;
}
API int cuDevicePrimaryCtxRelease_v2(int dev) { return dev < 0; }
API int cuCtxPushCurrent_v2(void *ctx) {
    ctx_stack[ctx_depth++] = ctx;
    return 0;
}
API int cuCtxPopCurrent_v2(void **ctx) {
    if (!ctx_depth) return 201;
    *ctx = ctx_stack[--ctx_depth];
    return 0;
}
API int cuCtxGetCurrent(void **ctx) {
    *ctx = ctx_depth ? ctx_stack[ctx_depth - 1] : NULL;
    return 0;
}

/* Sizes live in a header before each block, so cuMemFree knows what it gives back. */
API int cuMemAlloc_v2(unsigned long long *ptr, size_t nbytes) {
    if (used_bytes + nbytes > limit_bytes) return OUT_OF_MEMORY;
    void *p = NULL;
    if (posix_memalign(&p, 4096, nbytes + 4096)) return OUT_OF_MEMORY;
    *(size_t *)p = nbytes;
    used_bytes += nbytes;
    allocs++;
    *ptr = (unsigned long long)(uintptr_t)p + 4096;
    return 0;
}
API int cuMemFree_v2(unsigned long long ptr) {
    void *p = (void *)(uintptr_t)(ptr - 4096);
    used_bytes -= *(size_t *)p;
    frees++;
    free(p);
    return 0;
}

API int cuEventCreate(void **event, unsigned int flags) {
    fake_event *e = calloc(1, sizeof(fake_event));
    e->stream = -1;
    e->magic = 0xE7 + (int)(flags & 0);
    events_live++;
    *event = e;
    return 0;
}
API int cuEventRecord(void *event, void *stream) {
    fake_event *e = event;
    int i = stream_index(stream);
    e->stream = i;
    e->at = ++streams[i].queued; /* the marker sits after everything queued so far */
    records++;
    return 0;
}
API int cuEventQuery(void *event) {
    fake_event *e = event;
    return e->stream < 0 || streams[e->stream].done >= e->at ? 0 : NOT_READY;
}
API int cuEventSynchronize(void *event) {
    fake_event *e = event;
    if (e->stream >= 0 && streams[e->stream].done < e->at) streams[e->stream].done = e->at;
    syncs++;
    return 0;
}
API int cuEventDestroy_v2(void *event) {
    events_live--;
    free(event);
    return 0;
}
API int cuGetErrorString(int code, const char **text) {
    *text = code == OUT_OF_MEMORY ? "out of memory" : "fake error";
    return 0;
}

/* -- for the tests ----------------------------------------------------------------------------------- */
API void fake_cuda_run(void *stream) {
    int i = stream_index(stream);
    streams[i].done = streams[i].queued;
}
API void fake_cuda_launch(void *stream) { streams[stream_index(stream)].queued++; }
API void fake_cuda_set_limit(uint64_t bytes) { limit_bytes = bytes; }
API uint64_t fake_cuda_counter(const char *name) {
    if (!strcmp(name, "used_bytes")) return used_bytes;
    if (!strcmp(name, "allocs")) return allocs;
    if (!strcmp(name, "frees")) return frees;
    if (!strcmp(name, "syncs")) return syncs;
    if (!strcmp(name, "events_live")) return events_live;
    if (!strcmp(name, "records")) return records;
    return UINT64_MAX;
}
