/*
 * CUDA backend: one region of device memory reserved with cuMemAlloc, handed out by a moalloc arena
 * through the malloc/free pair torch.cuda.memory.CUDAPluggableAllocator calls. libcuda is opened with
 * dlopen on first use, so the library loads (and everything else works) where CUDA is absent.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "moalloc.h"

#define MO_MAX_DEVICES 64
/* torch's own allocator rounds to 512 bytes; keeping that alignment keeps vectorised kernels happy. */
#define MO_CUDA_ALIGNMENT 512u

typedef int cu_result;
typedef int cu_device;
typedef void *cu_context;
typedef unsigned long long cu_deviceptr;

static struct {
    void *lib;
    cu_result (*init)(unsigned int);
    cu_result (*device_get)(cu_device *, int);
    cu_result (*primary_ctx_retain)(cu_context *, cu_device);
    cu_result (*primary_ctx_release)(cu_device);
    cu_result (*ctx_push)(cu_context);
    cu_result (*ctx_pop)(cu_context *);
    cu_result (*mem_alloc)(cu_deviceptr *, size_t);
    cu_result (*mem_free)(cu_deviceptr);
    cu_result (*error_string)(cu_result, const char **);
} cu;

typedef struct {
    uint64_t handle;
    cu_deviceptr base;
    uint64_t capacity;
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
    RESOLVE(mem_alloc, "cuMemAlloc_v2")
    RESOLVE(mem_free, "cuMemFree_v2")
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

MO_API int mo_cuda_init(int device, uint64_t capacity_bytes, uint32_t quarantine_blocks, uint64_t seed,
                        uint64_t *handle_out, uint64_t *base_out) {
    if (device < 0 || device >= MO_MAX_DEVICES) return mo_fail(MO_E_INVALID_ARG, "device %d is out of range", device);
    pthread_mutex_lock(&cuda_lock);
    int rc = load_driver();
    if (rc == MO_OK && regions[device].handle)
        rc = mo_fail(MO_E_INVALID_ARG, "device %d already has a memopt CUDA arena; close it first", device);
    cu_device dev;
    cu_context ctx;
    if (rc == MO_OK) rc = with_primary_context(device, &dev, &ctx);
    if (rc != MO_OK) {
        pthread_mutex_unlock(&cuda_lock);
        return rc;
    }
    cu_deviceptr base = 0;
    cu_result r = cu.mem_alloc(&base, (size_t)capacity_bytes);
    cu_context popped;
    cu.ctx_pop(&popped);
    if (r) {
        cu.primary_ctx_release(dev);
        rc = cuda_fail(r, "cuMemAlloc of the arena region");
        pthread_mutex_unlock(&cuda_lock);
        return rc;
    }
    uint64_t handle = 0;
    rc = mo_arena_create(capacity_bytes, NULL, quarantine_blocks, 0, seed, &handle);
    if (rc != MO_OK) {
        cu.ctx_push(ctx);
        cu.mem_free(base);
        cu.ctx_pop(&popped);
        cu.primary_ctx_release(dev);
        pthread_mutex_unlock(&cuda_lock);
        return rc;
    }
    regions[device].handle = handle;
    regions[device].base = base;
    regions[device].capacity = capacity_bytes;
    regions[device].rejected_frees = 0;
    regions[device].last_rejection[0] = '\0';
    *handle_out = handle;
    *base_out = (uint64_t)base;
    pthread_mutex_unlock(&cuda_lock);
    return MO_OK;
}

MO_API int mo_cuda_shutdown(int device) {
    if (device < 0 || device >= MO_MAX_DEVICES) return mo_fail(MO_E_INVALID_ARG, "device %d is out of range", device);
    pthread_mutex_lock(&cuda_lock);
    cuda_region *g = &regions[device];
    if (!g->handle) {
        pthread_mutex_unlock(&cuda_lock);
        return mo_fail(MO_E_BAD_HANDLE, "device %d has no memopt CUDA arena", device);
    }
    mo_stats_t st;
    int rc = mo_stats(g->handle, &st);
    if (rc == MO_OK && st.live_blocks) {
        pthread_mutex_unlock(&cuda_lock);
        return mo_fail(MO_E_INVALID_ARG,
                       "device %d's arena still has %llu live blocks; release the tensors (and the MemPool) first",
                       device, (unsigned long long)st.live_blocks);
    }
    mo_arena_destroy(g->handle);
    cu_device dev;
    cu_context ctx, popped;
    rc = with_primary_context(device, &dev, &ctx);
    if (rc == MO_OK) {
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

MO_API void *mo_cuda_malloc(size_t nbytes, int device, void *stream) {
    (void)stream; /* one region serves every stream; torch orders reuse on the freeing stream */
    if (nbytes == 0 || device < 0 || device >= MO_MAX_DEVICES || !regions[device].handle) return NULL;
    uint64_t offset, span, serial;
    /* NULL makes torch free its cached blocks and retry, then raise OutOfMemoryError. */
    if (mo_alloc(regions[device].handle, nbytes, MO_CUDA_ALIGNMENT, &offset, &span, &serial, NULL) != MO_OK) return NULL;
    return (void *)(uintptr_t)(regions[device].base + offset);
}

MO_API void mo_cuda_free(void *ptr, size_t nbytes, int device, void *stream) {
    (void)stream;
    (void)nbytes;
    if (ptr == NULL || device < 0 || device >= MO_MAX_DEVICES) return;
    cuda_region *g = &regions[device];
    uint64_t address = (uint64_t)(uintptr_t)ptr;
    int rc;
    if (!g->handle || address < g->base || address >= g->base + g->capacity)
        rc = mo_fail(MO_E_INVALID_FREE, "pointer 0x%llx is not in device %d's memopt arena", (unsigned long long)address,
                     device);
    else
        rc = mo_free(g->handle, address - g->base, 0, 0, 0);
    if (rc != MO_OK) {
        /* A free cannot raise into torch; record it for check() to report. */
        pthread_mutex_lock(&cuda_lock);
        g->rejected_frees++;
        snprintf(g->last_rejection, sizeof(g->last_rejection), "%s", mo_last_error());
        pthread_mutex_unlock(&cuda_lock);
    }
}

MO_API uint64_t mo_cuda_rejected_frees(int device, char *message, size_t message_bytes) {
    if (device < 0 || device >= MO_MAX_DEVICES) return 0;
    pthread_mutex_lock(&cuda_lock);
    uint64_t n = regions[device].rejected_frees;
    if (message && message_bytes) snprintf(message, message_bytes, "%s", regions[device].last_rejection);
    pthread_mutex_unlock(&cuda_lock);
    return n;
}
