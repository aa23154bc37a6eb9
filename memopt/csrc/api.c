/*
 * Public entry points: arenas are addressed by handles (slot index + generation) so a call on a
 * destroyed arena is detected instead of touching freed memory, and each slot's mutex serialises the
 * calls on its arena.
 */
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moalloc_internal.h"

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
#include <sys/single_threaded.h>
/* While the process has one thread nothing can race, so calls skip the atomic lock (glibc's malloc
 * does the same). Only the calling thread could start a second one, and it is busy with this call. */
#define MO_SINGLE_THREADED() (__libc_single_threaded != 0)
#else
#define MO_SINGLE_THREADED() 0
#endif

#define MO_MAX_ARENAS 4096u

/* A test-and-test-and-set lock: one atomic exchange to take, a plain release store to give back, so
 * an uncontended call costs about half of a pthread mutex. Waiters yield the CPU after a short spin. */
typedef struct mo_slot {
    atomic_int lock;
    uint32_t generation; /* bumped on destroy, so old handles stop matching */
    mo_arena *arena;
} mo_slot;

static mo_slot slots[MO_MAX_ARENAS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t next_slot;
static _Thread_local char error_message[512];

__attribute__((constructor)) static void init_slots(void) {
    for (uint32_t i = 0; i < MO_MAX_ARENAS; i++) {
        atomic_init(&slots[i].lock, 0);
        slots[i].generation = 1;
    }
}

static inline void slot_lock(mo_slot *s) {
    while (atomic_exchange_explicit(&s->lock, 1, memory_order_acquire)) {
        for (int spin = 0; atomic_load_explicit(&s->lock, memory_order_relaxed); spin++) {
            if (spin >= 64) {
                sched_yield();
                spin = 0;
            }
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
}

static inline void slot_unlock(mo_slot *s) { atomic_store_explicit(&s->lock, 0, memory_order_release); }

int mo_fail(int code, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(error_message, sizeof(error_message), fmt, args);
    va_end(args);
    return code;
}

MO_API uint32_t mo_abi_version(void) { return MO_ABI_VERSION; }
MO_API size_t mo_stats_size(void) { return sizeof(mo_stats_t); }
MO_API const char *mo_last_error(void) { return error_message; }

/* Locks and returns the slot of a live arena, or NULL (with the error set). *locked says whether
 * the lock was taken (it is not while the process is single-threaded). Inlined into every entry
 * point: as a call, its spin loop's register saves cost as much as the check itself. */
static inline __attribute__((always_inline)) mo_slot *acquire(uint64_t handle, mo_arena **arena, int *locked) {
    uint32_t index = (uint32_t)handle, generation = (uint32_t)(handle >> 32);
    if (index == 0 || index > MO_MAX_ARENAS) {
        mo_fail(MO_E_BAD_HANDLE, "handle %llu was never returned by mo_arena_create", (unsigned long long)handle);
        return NULL;
    }
    mo_slot *s = &slots[index - 1];
    *locked = !MO_SINGLE_THREADED();
    if (*locked) slot_lock(s);
    if (s->arena == NULL || s->generation != generation) {
        if (*locked) slot_unlock(s);
        mo_fail(MO_E_BAD_HANDLE, "the arena was destroyed (closed); its blocks can no longer be used or freed");
        return NULL;
    }
    *arena = s->arena;
    return s;
}

static inline void release(mo_slot *s, int locked) {
    if (locked) slot_unlock(s);
}

MO_API int mo_arena_create(uint64_t capacity_bytes, void *base, uint32_t quarantine_blocks, uint32_t flags,
                           uint64_t seed, uint64_t *handle_out) {
    uint64_t capacity = capacity_bytes & ~(uint64_t)(MO_GRANULE_BYTES - 1);
    if (capacity == 0 || capacity_bytes > MO_MAX_CAPACITY_BYTES)
        return mo_fail(MO_E_INVALID_ARG, "capacity %llu bytes is outside [%u, 2**60]", (unsigned long long)capacity_bytes,
                       MO_GRANULE_BYTES);
    if (flags & ~(uint32_t)(MO_F_CANARIES | MO_F_POISON | MO_F_ZERO_SMALL))
        return mo_fail(MO_E_INVALID_ARG, "unknown flags 0x%x", flags);
    if ((flags & (MO_F_CANARIES | MO_F_POISON | MO_F_ZERO_SMALL)) && base == NULL)
        return mo_fail(MO_E_INVALID_ARG, "canaries, poison and zeroing need host-addressable memory (a base address)");
    if (seed == 0) seed = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)&seed << 16) ^ (uint64_t)(uintptr_t)base;
    mo_arena *a = mo_core_new(capacity, base, quarantine_blocks, flags, seed);
    if (!a) return mo_fail(MO_E_NOMEM, "no host memory for the arena's metadata");
    /* Poison invariant: every byte outside a used block holds the poison byte. */
    if ((flags & MO_F_POISON) && base) memset(base, a->poison_byte, capacity);
    pthread_mutex_lock(&table_lock);
    for (uint32_t k = 0; k < MO_MAX_ARENAS; k++) {
        uint32_t i = (next_slot + k) % MO_MAX_ARENAS;
        mo_slot *s = &slots[i];
        slot_lock(s);
        if (s->arena == NULL) {
            s->arena = a;
            *handle_out = ((uint64_t)s->generation << 32) | (i + 1);
            slot_unlock(s);
            /* Rotate so a just-destroyed slot is reused last. */
            next_slot = (i + 1) % MO_MAX_ARENAS;
            pthread_mutex_unlock(&table_lock);
            return MO_OK;
        }
        slot_unlock(s);
    }
    pthread_mutex_unlock(&table_lock);
    mo_core_delete(a);
    return mo_fail(MO_E_NOMEM, "all %u arena slots are in use; close arenas you no longer need", MO_MAX_ARENAS);
}

MO_API int mo_arena_destroy(uint64_t handle) {
    mo_arena *a = mo_api_detach(handle);
    if (!a) return MO_E_BAD_HANDLE;
    mo_core_delete(a);
    return MO_OK;
}

mo_arena *mo_api_detach(uint64_t handle) {
    mo_arena *a;
    int locked;
    mo_slot *s = acquire(handle, &a, &locked);
    if (!s) return NULL;
    s->arena = NULL;
    if (++s->generation == 0) s->generation = 1;
    release(s, locked);
    return a;
}

MO_API int mo_alloc(uint64_t handle, uint64_t nbytes, uint64_t alignment, uint64_t *offset_out, uint64_t *span_out,
                    uint64_t *serial_out, uint64_t *check_out) {
    mo_arena *a;
    int locked;
    mo_slot *s = acquire(handle, &a, &locked);
    if (!s) return MO_E_BAD_HANDLE;
    int rc = mo_arena_alloc(a, nbytes, alignment, offset_out, span_out, serial_out, check_out);
    release(s, locked);
    return rc;
}

MO_API int mo_free(uint64_t handle, uint64_t offset, uint64_t nbytes, uint64_t serial, uint64_t check) {
    mo_arena *a;
    int locked;
    mo_slot *s = acquire(handle, &a, &locked);
    if (!s) return MO_E_BAD_HANDLE;
    int rc = mo_arena_free(a, (mo_handle){offset, nbytes, serial, check});
    release(s, locked);
    return rc;
}

MO_API int mo_query(uint64_t handle, uint64_t offset, uint64_t nbytes, uint64_t serial, uint64_t check,
                    uint64_t *nbytes_out, uint64_t *span_out) {
    mo_arena *a;
    int locked;
    mo_slot *s = acquire(handle, &a, &locked);
    if (!s) return MO_E_BAD_HANDLE;
    int rc = mo_arena_query(a, (mo_handle){offset, nbytes, serial, check}, nbytes_out, span_out);
    release(s, locked);
    return rc;
}

MO_API int mo_check(uint64_t handle) {
    mo_arena *a;
    int locked;
    mo_slot *s = acquire(handle, &a, &locked);
    if (!s) return MO_E_BAD_HANDLE;
    int rc = mo_arena_check(a);
    release(s, locked);
    return rc;
}

MO_API int mo_stats(uint64_t handle, mo_stats_t *out) {
    mo_arena *a;
    int locked;
    mo_slot *s = acquire(handle, &a, &locked);
    if (!s) return MO_E_BAD_HANDLE;
    mo_arena_stats(a, out);
    release(s, locked);
    return MO_OK;
}
