/*
 * CUDA backend: one region of device memory reserved with cuMemAlloc, handed out by a device pool (device.c)
 * through the malloc/free pair torch.cuda.memory.CUDAPluggableAllocator calls. The pool's markers are CUDA
 * events (recorded on the freeing stream, kept in a pool of spare events), its overflow memory comes from
 * cuMemAlloc. libcuda is opened with dlopen on first use, so the library loads (and everything else works)
 * where CUDA is absent; tests/csrc/cuda_glue.c runs all of this on a CPU against a fake libcuda.
 *
 * Only a GPU can show: that torch's stream handles are the driver's (CUstream), that events recorded here
 * order reuse against real kernels, and that torch never sees a NULL (tests/test_pools_cuda.py).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moalloc.h"

#define MO_MAX_DEVICES 64
/* torch's own allocator rounds to 512 bytes; keeping that alignment keeps vectorised kernels happy. */
#define MO_CUDA_ALIGNMENT 512u
#define MO_SPARE_EVENTS 4096u
#define CU_EVENT_DISABLE_TIMING 0x2
#define CUDA_ERROR_NOT_READY 600

typedef int cu_result;
typedef int cu_device;
typedef void *cu_context;
typedef void *cu_event;
typedef void *cu_stream;
typedef unsigned long long cu_deviceptr;

static struct {
    void *lib;
    cu_result (*init)(unsigned int);
    cu_result (*device_get)(cu_device *, int);
    cu_result (*primary_ctx_retain)(cu_context *, cu_device);
    cu_result (*primary_ctx_release)(cu_device);
    cu_result (*ctx_push)(cu_context);
    cu_result (*ctx_pop)(cu_context *);
    cu_result (*ctx_get_current)(cu_context *);
    cu_result (*mem_alloc)(cu_deviceptr *, size_t);
    cu_result (*mem_free)(cu_deviceptr);
    cu_result (*event_create)(cu_event *, unsigned int);
    cu_result (*event_record)(cu_event, cu_stream);
    cu_result (*event_query)(cu_event);
    cu_result (*event_synchronize)(cu_event);
    cu_result (*event_destroy)(cu_event);
    cu_result (*error_string)(cu_result, const char **);
} cu;

typedef struct {
    uint64_t pool; /* the device pool, 0 when the device has no backend */
    cu_deviceptr base;
    uint64_t capacity;
    cu_device dev;
    cu_context ctx;
    int device;
    int process_wide;
    cu_event spare[MO_SPARE_EVENTS]; /* recorded-and-done events, reused: creating one costs more than recording */
    uint32_t n_spare;
    uint64_t rejected_frees;
    char last_rejection[256];
} cuda_region;

static cuda_region regions[MO_MAX_DEVICES];
static pthread_mutex_t cuda_lock = PTHREAD_MUTEX_INITIALIZER;

int mo_fail(int code, const char *fmt, ...);

static int load_driver(void) {
    if (cu.lib) return MO_OK;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return mo_fail(MO_E_CUDA, "the CUDA driver (libcuda.so.1) is not installed on this machine");
#define RESOLVE(field, name)                                                                        \
    *(void **)(&cu.field) = dlsym(lib, name);                                                       \
    if (!cu.field) {                                                                                \
        dlclose(lib);                                                                               \
        memset(&cu, 0, sizeof(cu));                                                                 \
        return mo_fail(MO_E_CUDA, "the CUDA driver lacks %s; update the NVIDIA driver", name);      \
    }
    RESOLVE(init, "cuInit")
    RESOLVE(device_get, "cuDeviceGet")
    RESOLVE(primary_ctx_retain, "cuDevicePrimaryCtxRetain")
    RESOLVE(primary_ctx_release, "cuDevicePrimaryCtxRelease_v2")
    RESOLVE(ctx_push, "cuCtxPushCurrent_v2")
    RESOLVE(ctx_pop, "cuCtxPopCurrent_v2")
    RESOLVE(ctx_get_current, "cuCtxGetCurrent")
    RESOLVE(mem_alloc, "cuMemAlloc_v2")
    RESOLVE(mem_free, "cuMemFree_v2")
    RESOLVE(event_create, "cuEventCreate")
    RESOLVE(event_record, "cuEventRecord")
    RESOLVE(event_query, "cuEventQuery")
    RESOLVE(event_synchronize, "cuEventSynchronize")
    RESOLVE(event_destroy, "cuEventDestroy_v2")
    RESOLVE(error_string, "cuGetErrorString")
#undef RESOLVE
    cu.lib = lib;
    return MO_OK;
}

static int cuda_fail(cu_result r, const char *what) {
    const char *text = "unknown error";
    if (cu.error_string) cu.error_string(r, &text);
    return mo_fail(MO_E_CUDA, "%s failed: CUDA error %d (%s)", what, r, text ? text : "?");
}

/* Run the driver call with device's primary context current (the one the CUDA runtime, and so torch, uses). */
static int with_primary_context(int device, cu_device *dev, cu_context *ctx) {
    cu_result r = cu.init(0);
    if (r) return cuda_fail(r, "cuInit");
    if ((r = cu.device_get(dev, device))) return cuda_fail(r, "cuDeviceGet");
    if ((r = cu.primary_ctx_retain(ctx, *dev))) return cuda_fail(r, "cuDevicePrimaryCtxRetain");
    if ((r = cu.ctx_push(*ctx))) {
        cu.primary_ctx_release(*dev);
        return cuda_fail(r, "cuCtxPushCurrent");
    }
    return MO_OK;
}

/* torch's threads have the device's primary context current; a thread that has none (a fresh one freeing a
 * tensor) gets it pushed for the call. Returns whether it pushed. */
static int enter(const cuda_region *g) {
    cu_context current = NULL;
    if (cu.ctx_get_current(&current) == 0 && current == g->ctx) return 0;
    return cu.ctx_push(g->ctx) == 0;
}

static void leave(int pushed) {
    cu_context popped;
    if (pushed) cu.ctx_pop(&popped);
}

/* -- the pool's ops: markers are events ----------------------------------------------------------------- */

static uint64_t event_record(void *ctx, uint64_t stream) {
    cuda_region *g = ctx;
    int pushed = enter(g);
    cu_event ev = NULL;
    if (g->n_spare) ev = g->spare[--g->n_spare];
    else if (cu.event_create(&ev, CU_EVENT_DISABLE_TIMING) != 0) ev = NULL;
    if (ev && cu.event_record(ev, (cu_stream)(uintptr_t)stream) != 0) {
        cu.event_destroy(ev);
        ev = NULL;
    }
    leave(pushed);
    return (uint64_t)(uintptr_t)ev;
}

static int event_query(void *ctx, uint64_t marker) {
    int pushed = enter(ctx);
    cu_result r = cu.event_query((cu_event)(uintptr_t)marker);
    leave(pushed);
    return r == 0 ? 1 : r == CUDA_ERROR_NOT_READY ? 0 : -1;
}

static int event_wait(void *ctx, uint64_t marker) {
    int pushed = enter(ctx);
    cu_result r = cu.event_synchronize((cu_event)(uintptr_t)marker);
    leave(pushed);
    return r;
}

/* An event goes back to the spares once released: recording it again later is legal whether or not its
 * last recording completed (the pool releases a marker only when no block waits on it). */
static void event_release(void *ctx, uint64_t marker) {
    cuda_region *g = ctx;
    if (g->n_spare < MO_SPARE_EVENTS) {
        g->spare[g->n_spare++] = (cu_event)(uintptr_t)marker;
        return;
    }
    int pushed = enter(g);
    cu.event_destroy((cu_event)(uintptr_t)marker);
    leave(pushed);
}

/* Memory outside the region, only where torch cannot take a NULL (process-wide): in a MemPool, NULL makes
 * torch free its cached blocks, retry and raise OutOfMemoryError, which is what the caller should see. */
static uint64_t overflow_alloc(void *ctx, uint64_t nbytes) {
    cuda_region *g = ctx;
    if (!g->process_wide) return 0;
    int pushed = enter(g);
    cu_deviceptr p = 0;
    if (cu.mem_alloc(&p, (size_t)nbytes) != 0) p = 0;
    leave(pushed);
    return (uint64_t)p;
}

static void overflow_free(void *ctx, uint64_t address) {
    int pushed = enter(ctx);
    cu.mem_free((cu_deviceptr)address);
    leave(pushed);
}

static void drop_spares(cuda_region *g) {
    while (g->n_spare) cu.event_destroy(g->spare[--g->n_spare]);
}

/* -- entry points -------------------------------------------------------------------------------------- */

MO_API int mo_cuda_init(int device, uint64_t capacity_bytes, uint32_t quarantine_blocks, uint64_t seed,
                        uint64_t *handle_out, uint64_t *base_out) {
    if (device < 0 || device >= MO_MAX_DEVICES) return mo_fail(MO_E_INVALID_ARG, "device %d is out of range", device);
    uint64_t capacity = capacity_bytes & ~(uint64_t)(MO_CUDA_ALIGNMENT - 1);
    if (capacity == 0) return mo_fail(MO_E_INVALID_ARG, "capacity %llu bytes is below %u", (unsigned long long)capacity_bytes,
                                      MO_CUDA_ALIGNMENT);
    pthread_mutex_lock(&cuda_lock);
    cuda_region *g = &regions[device];
    int rc = load_driver();
    if (rc == MO_OK && g->pool)
        rc = mo_fail(MO_E_INVALID_ARG, "device %d already has a memopt CUDA arena; close it first", device);
    cu_device dev;
    cu_context ctx, popped;
    if (rc == MO_OK) rc = with_primary_context(device, &dev, &ctx);
    if (rc != MO_OK) {
        pthread_mutex_unlock(&cuda_lock);
        return rc;
    }
    cu_deviceptr base = 0;
    cu_result r = cu.mem_alloc(&base, (size_t)capacity);
    cu.ctx_pop(&popped);
    if (r || base % MO_CUDA_ALIGNMENT) {
        rc = r ? cuda_fail(r, "cuMemAlloc of the arena region")
               : mo_fail(MO_E_CUDA, "cuMemAlloc gave 0x%llx, not %u-byte aligned", base, MO_CUDA_ALIGNMENT);
        if (!r) {
            cu.ctx_push(ctx);
            cu.mem_free(base);
            cu.ctx_pop(&popped);
        }
        cu.primary_ctx_release(dev);
        pthread_mutex_unlock(&cuda_lock);
        return rc;
    }
    memset(g, 0, sizeof(*g));
    g->base = base;
    g->capacity = capacity;
    g->dev = dev;
    g->ctx = ctx;
    g->device = device;
    mo_dev_ops ops = {g, event_record, event_query, event_wait, event_release, overflow_alloc, overflow_free};
    uint64_t pool = 0;
    rc = mo_dev_create(capacity, (uint64_t)base, NULL, MO_CUDA_ALIGNMENT, quarantine_blocks, 0, seed, &ops, &pool);
    if (rc != MO_OK) {
        cu.ctx_push(ctx);
        cu.mem_free(base);
        cu.ctx_pop(&popped);
        cu.primary_ctx_release(dev);
        memset(g, 0, sizeof(*g));
        pthread_mutex_unlock(&cuda_lock);
        return rc;
    }
    g->pool = pool;
    *handle_out = pool;
    *base_out = (uint64_t)base;
    pthread_mutex_unlock(&cuda_lock);
    return MO_OK;
}

MO_API int mo_cuda_shutdown(int device) {
    if (device < 0 || device >= MO_MAX_DEVICES) return mo_fail(MO_E_INVALID_ARG, "device %d is out of range", device);
    pthread_mutex_lock(&cuda_lock);
    cuda_region *g = &regions[device];
    if (!g->pool) {
        pthread_mutex_unlock(&cuda_lock);
        return mo_fail(MO_E_BAD_HANDLE, "device %d has no memopt CUDA arena", device);
    }
    if (g->process_wide) {
        pthread_mutex_unlock(&cuda_lock);
        return mo_fail(MO_E_INVALID_ARG, "device %d's arena serves every CUDA tensor of this process (install()); it "
                       "cannot be closed while torch may still allocate", device);
    }
    int rc = mo_dev_destroy(g->pool); /* waits for the pending frees' events */
    if (rc != MO_OK) {
        pthread_mutex_unlock(&cuda_lock);
        return rc == MO_E_INVALID_ARG ? mo_fail(MO_E_INVALID_ARG, "device %d's arena: %s; release the tensors (and the "
                                                "MemPool) first", device, mo_last_error()) : rc;
    }
    cu_device dev;
    cu_context ctx, popped;
    rc = with_primary_context(device, &dev, &ctx);
    if (rc == MO_OK) {
        drop_spares(g);
        cu_result r = cu.mem_free(g->base);
        cu.ctx_pop(&popped);
        cu.primary_ctx_release(dev); /* the retain just above */
        cu.primary_ctx_release(dev); /* the retain of mo_cuda_init */
        if (r) rc = cuda_fail(r, "cuMemFree of the arena region");
    }
    memset(g, 0, sizeof(*g));
    pthread_mutex_unlock(&cuda_lock);
    return rc;
}

MO_API int mo_cuda_set_process_wide(int device, int process_wide) {
    if (device < 0 || device >= MO_MAX_DEVICES || !regions[device].pool)
        return mo_fail(MO_E_BAD_HANDLE, "device %d has no memopt CUDA arena", device);
    regions[device].process_wide = process_wide != 0;
    return MO_OK;
}

MO_API uint64_t mo_cuda_pool(int device) {
    return device < 0 || device >= MO_MAX_DEVICES ? 0 : regions[device].pool;
}

static __attribute__((cold, noreturn)) void out_of_memory(int device, size_t nbytes) {
    fprintf(stderr,
            "memopt: the process-wide CUDA allocator of device %d cannot serve %zu bytes: %s. torch cannot be told (a "
            "pluggable allocator has no way to raise, and a NULL would become an illegal memory access), so the "
            "process stops here. Give cuda_allocator() a larger capacity_bytes, or use backend.pool() instead of "
            "install(), where this is an OutOfMemoryError.\n",
            device, nbytes, mo_last_error());
    abort();
}

MO_API void *mo_cuda_malloc(size_t nbytes, int device, void *stream) {
    if (nbytes == 0 || device < 0 || device >= MO_MAX_DEVICES || !regions[device].pool) return NULL;
    uint64_t address;
    if (mo_dev_alloc(regions[device].pool, nbytes, (uint64_t)(uintptr_t)stream, &address) == MO_OK)
        return (void *)(uintptr_t)address;
    if (regions[device].process_wide) out_of_memory(device, nbytes);
    return NULL; /* torch frees its cached blocks and retries, then raises OutOfMemoryError */
}

static void reject(cuda_region *g, int device) {
    /* A free cannot raise into torch; record it for check() to report. */
    pthread_mutex_lock(&cuda_lock);
    g->rejected_frees++;
    snprintf(g->last_rejection, sizeof(g->last_rejection), "device %d: %s", device, mo_last_error());
    pthread_mutex_unlock(&cuda_lock);
}

/* torch passes the stream the block was allocated on: its work is what the free must wait for. */
MO_API void mo_cuda_free(void *ptr, size_t nbytes, int device, void *stream) {
    (void)nbytes;
    if (ptr == NULL || device < 0 || device >= MO_MAX_DEVICES) return;
    cuda_region *g = &regions[device];
    int rc = g->pool ? mo_dev_free(g->pool, (uint64_t)(uintptr_t)ptr, (uint64_t)(uintptr_t)stream)
                     : mo_fail(MO_E_INVALID_FREE, "pointer 0x%llx is not in device %d's memopt arena",
                               (unsigned long long)(uintptr_t)ptr, device);
    if (rc != MO_OK) reject(g, device);
}

MO_API int mo_cuda_record_stream(void *ptr, int device, void *stream) {
    if (device < 0 || device >= MO_MAX_DEVICES || !regions[device].pool)
        return mo_fail(MO_E_BAD_HANDLE, "device %d has no memopt CUDA arena", device);
    return mo_dev_record_stream(regions[device].pool, (uint64_t)(uintptr_t)ptr, (uint64_t)(uintptr_t)stream);
}

MO_API uint64_t mo_cuda_rejected_frees(int device, char *message, size_t message_bytes) {
    if (device < 0 || device >= MO_MAX_DEVICES) return 0;
    pthread_mutex_lock(&cuda_lock);
    uint64_t n = regions[device].rejected_frees;
    if (message && message_bytes) snprintf(message, message_bytes, "%s", regions[device].last_rejection);
    pthread_mutex_unlock(&cuda_lock);
    return n;
}
