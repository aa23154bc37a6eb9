/*
 * memopt/csrc/cuda.c against the fake driver (fake_libcuda.c), on a CPU: what torch's pluggable allocator
 * calls (mo_cuda_malloc / mo_cuda_free with streams) behaves as the GPU needs.
 *   1. A block freed on a stream goes to another stream only after the event recorded at its free is done;
 *      the freeing stream itself may take it back at once.
 *   2. mo_cuda_record_stream makes the free wait for the other stream too.
 *   3. A full region waits for pending frees (cuEventSynchronize) before anything else.
 *   4. Inside a MemPool a full region returns NULL (torch raises OutOfMemoryError); process-wide it
 *      overflows to cuMemAlloc, and when the driver refuses too the process aborts with a message rather
 *      than return NULL.
 *   5. Shutdown waits for the pending frees and gives every byte and event back.
 * Built and run by tests/test_pools_cuda_glue.py with LD_LIBRARY_PATH at the fake driver; prints one line per
 * failure, "ok" at the end.
 */
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "moalloc.h"

#include "expect.h"

static void (*fake_run)(void *);
static void (*fake_set_limit)(uint64_t);
static uint64_t (*fake_counter)(const char *);

#define S1 ((void *)0x1111)
#define S2 ((void *)0x2222)
#define MIB (1ull << 20)

static mo_dev_stats_t stats(void) {
    mo_dev_stats_t st;
    mo_dev_stats(mo_cuda_pool(0), &st);
    return st;
}

static uint64_t init(uint64_t capacity) {
    uint64_t handle, base;
    int rc = mo_cuda_init(0, capacity, 0, 7, &handle, &base);
    EXPECT(rc == MO_OK, "init: %s", mo_last_error());
    return base;
}

static void streams_order_reuse(void) {
    uint64_t base = init(8 * MIB);
    void *a = mo_cuda_malloc(MIB, 0, S1);
    EXPECT(a && (uint64_t)(uintptr_t)a >= base, "malloc on S1 failed");
    mo_cuda_free(a, MIB, 0, S1);
    void *b = mo_cuda_malloc(MIB, 0, S1);
    EXPECT(b == a, "S1 did not get its own freed block back at once (%p, %p)", a, b);
    mo_cuda_free(b, MIB, 0, S1);
    /* S1's queued work may still read a: S2 must get other memory, however tight. */
    void *c[7];
    for (int i = 0; i < 7; i++) {
        c[i] = mo_cuda_malloc(MIB, 0, S2);
        EXPECT(c[i] != a, "S2 got S1's freed block %p before S1's work ran", a);
    }
    mo_dev_stats_t st = stats();
    EXPECT(st.pending_blocks == 1 && st.markers_recorded >= 1, "pending %llu, markers %llu",
           (unsigned long long)st.pending_blocks, (unsigned long long)st.markers_recorded);
    fake_run(S1);
    void *d = mo_cuda_malloc(MIB, 0, S2);
    EXPECT(d == a, "S2 did not get the block once S1 ran (%p, %p)", a, d);
    mo_cuda_free(d, MIB, 0, S2);
    for (int i = 0; i < 7; i++) mo_cuda_free(c[i], MIB, 0, S2);
    fake_run(S2);
    EXPECT(mo_cuda_shutdown(0) == MO_OK, "shutdown: %s", mo_last_error());
}

static void record_stream_waits_for_both(void) {
    init(4 * MIB);
    void *a = mo_cuda_malloc(MIB, 0, S1);
    EXPECT(mo_cuda_record_stream(a, 0, S2) == MO_OK, "record_stream: %s", mo_last_error());
    mo_cuda_free(a, MIB, 0, S1);
    fake_run(S1);
    mo_dev_collect(mo_cuda_pool(0), 0);
    EXPECT(stats().pending_blocks == 1, "the block was released before S2's work ran");
    void *b = mo_cuda_malloc(MIB, 0, S1);
    EXPECT(b != a, "S1 took back a block S2 may still be using");
    fake_run(S2);
    mo_dev_collect(mo_cuda_pool(0), 0);
    EXPECT(stats().pending_blocks == 0, "the block is still pending after both streams ran");
    mo_cuda_free(b, MIB, 0, S1);
    fake_run(S1);
    EXPECT(mo_cuda_shutdown(0) == MO_OK, "shutdown: %s", mo_last_error());
}

static void full_region_waits_then_fails(void) {
    init(4 * MIB);
    void *a[4];
    for (int i = 0; i < 4; i++) a[i] = mo_cuda_malloc(MIB, 0, S1);
    for (int i = 0; i < 4; i++) mo_cuda_free(a[i], MIB, 0, S1);
    uint64_t syncs = fake_counter("syncs");
    void *big = mo_cuda_malloc(3 * MIB, 0, S2); /* fits only once S1's frees are done: waits for them */
    EXPECT(big != NULL && fake_counter("syncs") > syncs, "a full region did not wait for the pending frees");
    void *none = mo_cuda_malloc(2 * MIB, 0, S2);
    EXPECT(none == NULL && stats().failed_allocs == 1, "a MemPool's full region did not return NULL");
    mo_cuda_free(big, 3 * MIB, 0, S2);
    fake_run(S2);
    EXPECT(mo_cuda_shutdown(0) == MO_OK, "shutdown: %s", mo_last_error());
}

static void process_wide_overflows_then_aborts(void) {
    init(2 * MIB);
    EXPECT(mo_cuda_set_process_wide(0, 1) == MO_OK, "set_process_wide: %s", mo_last_error());
    void *a = mo_cuda_malloc(2 * MIB, 0, S1);
    void *b = mo_cuda_malloc(MIB, 0, S1); /* the region is full: from the driver */
    mo_dev_stats_t st = stats();
    EXPECT(b && st.overflow_allocs == 1 && st.overflow_bytes == MIB, "no overflow (%p, %llu)", b,
           (unsigned long long)st.overflow_allocs);
    uint64_t frees = fake_counter("frees");
    mo_cuda_free(b, MIB, 0, S1);
    EXPECT(fake_counter("frees") == frees, "overflow memory went back to the driver before its stream ran");
    fake_run(S1);
    mo_dev_collect(mo_cuda_pool(0), 0);
    EXPECT(fake_counter("frees") == frees + 1, "overflow memory was not given back once its stream ran");
    fflush(stdout);
    int pipefd[2];
    if (pipe(pipefd) != 0) return;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 2);
        fake_set_limit(0);
        void *p = mo_cuda_malloc(MIB, 0, S1); /* nothing anywhere: must not return NULL */
        printf("FAIL: malloc returned %p instead of stopping the process\n", p);
        _exit(0);
    }
    close(pipefd[1]);
    char text[1024] = {0};
    ssize_t got = read(pipefd[0], text, sizeof(text) - 1);
    (void)got;
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "the process did not abort (status %d)", status);
    EXPECT(strstr(text, "cannot serve") && strstr(text, "capacity_bytes"), "abort message: %s", text);
    EXPECT(mo_cuda_shutdown(0) != MO_OK, "a process-wide arena was closed");
    mo_cuda_free(a, 2 * MIB, 0, S1);
    fake_run(S1);
    mo_cuda_set_process_wide(0, 0);
    EXPECT(mo_cuda_shutdown(0) == MO_OK, "shutdown: %s", mo_last_error());
}

static void rejected_frees_are_recorded(void) {
    init(MIB);
    void *a = mo_cuda_malloc(4096, 0, S1);
    mo_cuda_free(a, 4096, 0, S1);
    mo_cuda_free(a, 4096, 0, S1);                 /* a double free, while the first waits */
    mo_cuda_free((void *)(uintptr_t)12345, 16, 0, S1); /* not ours */
    char message[256];
    EXPECT(mo_cuda_rejected_frees(0, message, sizeof(message)) == 2, "rejections: %s", message);
    EXPECT(strstr(message, "neither in the region"), "message: %s", message);
    fake_run(S1);
    EXPECT(mo_cuda_shutdown(0) == MO_OK, "shutdown: %s", mo_last_error());
}

static void shutdown_waits_and_returns_everything(void) {
    init(4 * MIB);
    void *a = mo_cuda_malloc(MIB, 0, S1);
    EXPECT(mo_cuda_shutdown(0) != MO_OK && strstr(mo_last_error(), "live"), "closed with a live block");
    mo_cuda_free(a, MIB, 0, S1); /* S1 never runs by itself: shutdown must wait for it */
    uint64_t syncs = fake_counter("syncs");
    EXPECT(mo_cuda_shutdown(0) == MO_OK, "shutdown: %s", mo_last_error());
    EXPECT(fake_counter("syncs") > syncs, "shutdown did not wait for the pending free");
    EXPECT(fake_counter("used_bytes") == 0, "%llu driver bytes left", (unsigned long long)fake_counter("used_bytes"));
    EXPECT(fake_counter("events_live") == 0, "%llu events left", (unsigned long long)fake_counter("events_live"));
}

int main(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
        printf("FAIL: the fake driver is not on LD_LIBRARY_PATH: %s\n", dlerror());
        return 1;
    }
    *(void **)&fake_run = dlsym(lib, "fake_cuda_run");
    *(void **)&fake_set_limit = dlsym(lib, "fake_cuda_set_limit");
    *(void **)&fake_counter = dlsym(lib, "fake_cuda_counter");
    streams_order_reuse();
    record_stream_waits_for_both();
    full_region_waits_then_fails();
    process_wide_overflows_then_aborts();
    rejected_frees_are_recorded();
    shutdown_waits_and_returns_everything();
    if (failures) printf("%d failure(s)\n", failures);
    else printf("ok\n");
    return failures != 0;
}
