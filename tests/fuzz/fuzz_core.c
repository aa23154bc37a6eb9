/*
 * libFuzzer harness for memopt's C allocator, with coverage of the C code itself.
 *
 * Each input is a program: a configuration byte, then operations (allocate, free a live block, free
 * a stale handle, an interior or invented offset, or a handle with one word altered, overflow a block's
 * guard bytes, write to a freed block). A shadow table of live blocks checks that no two overlap and
 * that every block's bytes are its own; a stale handle must be a double free and an altered one an
 * invalid free, neither changing a counter; mo_check must pass after every operation that corrupted
 * nothing, and must fail after one that did.
 *
 * A configuration byte with its top bit set runs a device pool instead (device.c, replay.c): allocations and
 * frees on three fake streams whose work runs only when the program says, record_stream, recording a step,
 * arming a plan for it, replaying steps, bad frees. Besides overlap, it checks that no block reaches a stream
 * while another stream may still use it: each free notes the work each stream had queued by then, and a
 * block handed to stream T over a range freed on S != T needs S to have run that far.
 *
 * Build and run (clang):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Imemopt/csrc tests/fuzz/fuzz_core.c \
 *       memopt/csrc/{core,arena,api,map,device,device_api,replay,cuda}.c -ldl -lpthread -o fuzz_core && ./fuzz_core -max_total_time=600
 * Without libFuzzer (any C compiler), replay inputs or run seeded random ones:
 *   cc -g -O1 -fsanitize=address,undefined -DMO_FUZZ_STANDALONE -Imemopt/csrc tests/fuzz/fuzz_core.c \
 *       memopt/csrc/{core,arena,api,map,device,device_api,replay,cuda}.c -ldl -lpthread -o fuzz_core && ./fuzz_core 20000
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moalloc.h"

#define CAPACITY 65536u
#define MAX_LIVE 512

int fuzz_device(const uint8_t *data, size_t size);

typedef struct {
    uint64_t offset, nbytes, span, serial, check;
    uint8_t fill;
} live_block;

typedef struct {
    const uint8_t *data;
    size_t size, pos;
} reader;

static int next_byte(reader *r, uint8_t *out) {
    if (r->pos >= r->size) return 0;
    *out = r->data[r->pos++];
    return 1;
}

#define FAIL(...)                                                                                      \
    do {                                                                                               \
        fprintf(stderr, "fuzz_core: " __VA_ARGS__);                                                    \
        fprintf(stderr, " (last error: %s)\n", mo_last_error());                                       \
        abort();                                                                                       \
    } while (0)

static void verify_block(const uint8_t *memory, const live_block *b) {
    for (uint64_t i = 0; i < b->nbytes; i++)
        if (memory[b->offset + i] != b->fill) FAIL("block at %llu was overwritten: blocks overlap", (unsigned long long)b->offset);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static uint8_t memory[CAPACITY];
    static live_block live[MAX_LIVE];
    static live_block stale[64];
    reader r = {data, size, 0};
    uint8_t config = 0, op, a, b;
    if (!next_byte(&r, &config)) return 0;
    if (config & 0x80) return fuzz_device(data + 1, size - 1);
    uint32_t flags = (config & 1 ? MO_F_CANARIES : 0) | (config & 2 ? MO_F_POISON : 0) | (config & 32 ? MO_F_ZERO_SMALL : 0);
    uint32_t quarantine = (config >> 2) & 7;
    uint64_t handle;
    if (mo_arena_create(CAPACITY, memory, quarantine, flags, 42, &handle) != MO_OK) FAIL("create failed");
    size_t n_live = 0, n_stale = 0;
    int corrupted = 0;
    while (!corrupted && next_byte(&r, &op) && next_byte(&r, &a) && next_byte(&r, &b)) {
        switch (op % 8) {
        case 0:
        case 1: { /* allocate */
            uint64_t nbytes = op % 8 == 0 ? (uint64_t)(a | b << 8) : (uint64_t)(a % 64);
            uint64_t alignment = (uint64_t)1 << (b % 14);
            uint64_t offset, span, serial, check;
            int rc = mo_alloc(handle, nbytes, alignment, &offset, &span, &serial, &check);
            if (rc == MO_OK) {
                if (nbytes == 0 || n_live == MAX_LIVE) FAIL("alloc of %llu succeeded", (unsigned long long)nbytes);
                if (offset % (alignment < 16 ? 16 : alignment) || offset + span > CAPACITY || span < nbytes)
                    FAIL("bad block [%llu, +%llu)", (unsigned long long)offset, (unsigned long long)span);
                for (size_t i = 0; i < n_live; i++)
                    if (offset < live[i].offset + live[i].span && live[i].offset < offset + span)
                        FAIL("block [%llu, +%llu) overlaps a live one", (unsigned long long)offset, (unsigned long long)span);
                live_block *lb = &live[n_live++];
                *lb = (live_block){offset, nbytes, span, serial, check, (uint8_t)(a ^ b ^ 0x5A)};
                memset(memory + offset, lb->fill, nbytes);
            } else if (nbytes != 0 && rc != MO_E_EXHAUSTED) {
                FAIL("alloc of %llu failed with %d", (unsigned long long)nbytes, rc);
            }
            if (n_live == MAX_LIVE) { /* keep room: free the oldest */
                verify_block(memory, &live[0]);
                if (mo_free(handle, live[0].offset, live[0].nbytes, live[0].serial, live[0].check) != MO_OK)
                    FAIL("free of a live block failed");
                live[0] = live[--n_live];
            }
            break;
        }
        case 2:
        case 3: /* free a live block */
            if (n_live) {
                size_t i = a % n_live;
                verify_block(memory, &live[i]);
                if (mo_free(handle, live[i].offset, live[i].nbytes, live[i].serial, live[i].check) != MO_OK)
                    FAIL("free of a live block failed");
                stale[n_stale++ % 64] = live[i];
                live[i] = live[--n_live];
            }
            break;
        case 4:
        case 6: { /* a bad free: stale handle, interior or invented offset (4); a handle with one word altered (6) */
            live_block h = {(uint64_t)(a | b << 8), 0, 0, 0, 0, 0};
            int expect = -1; /* -1: a double or an invalid free, whichever the offset calls for */
            if (op % 8 == 6 && (n_live || n_stale)) {
                size_t pick = (size_t)b % (n_live + (n_stale < 64 ? n_stale : 64));
                h = pick < n_live ? live[pick] : stale[pick - n_live];
                switch (a % 4) {
                case 0: h.offset += 16u * (1u + b % 8u); break;
                case 1: h.nbytes += 1u + b % 3u; break;
                case 2: h.serial ^= (uint64_t)(1u + b % 4u) << (a & 4 ? 32 : 0); break;
                default: h.check ^= 2u; break;
                }
                expect = MO_E_INVALID_FREE;
            } else if (a % 3 == 0 && n_stale) {
                h = stale[b % (n_stale < 64 ? n_stale : 64)];
                expect = MO_E_DOUBLE_FREE;
            } else if (a % 3 == 1 && n_live) {
                live_block *lb = &live[b % n_live];
                h.offset = lb->offset + 1 + a % (lb->span - 1);
                expect = MO_E_INVALID_FREE;
            } else {
                for (size_t i = 0; i < n_live; i++) expect = live[i].offset == h.offset ? MO_OK : expect;
            }
            mo_stats_t before, after;
            mo_stats(handle, &before);
            int rc = mo_free(handle, h.offset, h.nbytes, h.serial, h.check);
            if (expect == MO_OK) {
                if (rc != MO_OK) FAIL("free of live offset %llu failed", (unsigned long long)h.offset);
                for (size_t i = 0; i < n_live; i++)
                    if (live[i].offset == h.offset) { live[i] = live[--n_live]; break; }
                break;
            }
            if (expect >= 0 ? rc != expect : rc != MO_E_DOUBLE_FREE && rc != MO_E_INVALID_FREE)
                FAIL("bad free of %llu (%llu bytes, serial %#llx, check %#llx) returned %d, expected %d", (unsigned long long)h.offset,
                     (unsigned long long)h.nbytes, (unsigned long long)h.serial, (unsigned long long)h.check, rc, expect);
            mo_stats(handle, &after);
            if (memcmp(&before, &after, sizeof(before))) FAIL("a rejected free changed the counters");
            break;
        }
        case 7: /* free a small block, then write into it while it waits in quarantine (zeroing must see it) */
            if ((flags & MO_F_ZERO_SMALL) && quarantine && n_live) {
                size_t i = a % n_live;
                if (live[i].span > MO_SMALL_MAX_SPAN_BYTES) break;
                if (mo_free(handle, live[i].offset, live[i].nbytes, live[i].serial, live[i].check) != MO_OK)
                    FAIL("free of a live block failed");
                for (uint64_t k = 0; k < live[i].span; k++)
                    if (memory[live[i].offset + k] != ((flags & MO_F_POISON) ? memory[live[i].offset] : 0))
                        FAIL("freed small block at %llu was not filled", (unsigned long long)live[i].offset);
                memory[live[i].offset + b % live[i].span] ^= 0xFF;
                live[i] = live[--n_live];
                corrupted = 1;
            }
            break;
        case 5: /* corrupt: one byte past a block (canaries) or into freed memory (poison) */
            if ((flags & MO_F_CANARIES) && n_live && (a & 1)) {
                live_block *lb = &live[b % n_live];
                memory[lb->offset + lb->nbytes] ^= 0xFF;
                corrupted = 1;
            } else if ((flags & MO_F_POISON) && n_stale && !(a & 1)) {
                uint64_t offset = stale[(n_stale - 1) % 64].offset;
                int reused = 0;
                for (size_t i = 0; i < n_live; i++)
                    reused |= offset >= live[i].offset && offset < live[i].offset + live[i].span;
                if (reused) break;
                memory[offset] ^= 0xFF;
                corrupted = 1;
            }
            break;
        }
        int rc = mo_check(handle);
        if (corrupted && rc != MO_E_CORRUPTION) FAIL("corruption went unnoticed by mo_check (rc %d)", rc);
        if (!corrupted && rc != MO_OK) FAIL("mo_check failed");
    }
    if (mo_arena_destroy(handle) != MO_OK) FAIL("destroy failed");
    uint64_t offset, span, serial;
    if (mo_alloc(handle, 16, 16, &offset, &span, &serial, NULL) != MO_E_BAD_HANDLE) FAIL("a destroyed arena allocated");
    if (mo_free(handle, 0, 0, 0, 0) != MO_E_BAD_HANDLE) FAIL("a destroyed arena freed");
    return 0;
}

/* -- device pools ------------------------------------------------------------------------------------ */

#define DEV_STREAMS 4u /* streams 1..3 */
static uint64_t queued[DEV_STREAMS], done[DEV_STREAMS];
static uint64_t fk_record(void *ctx, uint64_t stream) {
    (void)ctx;
    return stream << 32 | ++queued[stream];
}
static int fk_query(void *ctx, uint64_t m) {
    (void)ctx;
    return done[m >> 32] >= (uint32_t)m;
}
static int fk_wait(void *ctx, uint64_t m) {
    (void)ctx;
    if (done[m >> 32] < (uint32_t)m) done[m >> 32] = (uint32_t)m;
    return 0;
}
static void fk_release(void *ctx, uint64_t m) { (void)ctx, (void)m; }

typedef struct {
    uint64_t address, nbytes;
    uint32_t stream, users; /* users: a bit per stream that record_stream named */
    uint8_t fill;
} dev_block;

typedef struct {
    uint64_t address, end;
    uint64_t queued_at[DEV_STREAMS]; /* work each user stream had queued at the free; 0: not a user */
} dev_freed;

#define DEV_LIVE 256
#define DEV_FREED 128

int fuzz_device(const uint8_t *data, size_t size) {
    static uint8_t memory[CAPACITY] __attribute__((aligned(512)));
    static dev_block live[DEV_LIVE];
    static dev_freed freed[DEV_FREED];
    memset(queued, 0, sizeof(queued));
    memset(done, 0, sizeof(done));
    reader r = {data, size, 0};
    uint8_t op, a, b;
    mo_dev_ops ops = {NULL, fk_record, fk_query, fk_wait, fk_release, NULL, NULL};
    uint64_t h, base = (uint64_t)(uintptr_t)memory;
    if (mo_dev_create(CAPACITY, base, memory, 512, size % 3, 0, 7, &ops, &h) != MO_OK) FAIL("dev create failed");
    size_t n_live = 0, n_freed = 0;
    int recording = 0, armed = 0;
    while (next_byte(&r, &op) && next_byte(&r, &a) && next_byte(&r, &b)) {
        uint32_t stream = 1u + (uint32_t)b % 3u;
        switch (op % 10) {
        case 0:
        case 1:
        case 2: { /* allocate on a stream */
            /* A few common sizes half the time, so that replayed steps meet the plan's positions. */
            uint64_t nbytes = (a & 0x80) ? 500u * (1u + (uint32_t)a % 4u) : 1u + (uint64_t)(a | (b & 0x3F) << 8) % 9000u;
            uint64_t address;
            int rc = mo_dev_alloc(h, nbytes, stream, &address);
            if (rc == MO_E_EXHAUSTED || n_live == DEV_LIVE) {
                if (rc == MO_OK) FAIL("alloc past the shadow's room");
                break;
            }
            if (rc != MO_OK) FAIL("dev alloc of %llu failed with %d", (unsigned long long)nbytes, rc);
            if (address % 512 || address < base || address + nbytes > base + CAPACITY) FAIL("bad dev block");
            for (size_t i = 0; i < n_live; i++)
                if (address < live[i].address + live[i].nbytes && live[i].address < address + nbytes)
                    FAIL("dev block [0x%llx, +%llu) overlaps a live one", (unsigned long long)address, (unsigned long long)nbytes);
            for (size_t i = 0; i < n_freed && i < DEV_FREED; i++) {
                const dev_freed *f = &freed[i];
                if (!(address < f->end && f->address < address + nbytes)) continue;
                for (uint32_t s = 1; s < DEV_STREAMS; s++)
                    if (s != stream && f->queued_at[s] && done[s] < f->queued_at[s])
                        FAIL("block 0x%llx went to stream %u while stream %u may still use it", (unsigned long long)address,
                             stream, s);
            }
            dev_block *lb = &live[n_live++];
            *lb = (dev_block){address, nbytes, stream, 0, (uint8_t)(a ^ b ^ 0xA5)};
            memset((void *)(uintptr_t)address, lb->fill, nbytes);
            break;
        }
        case 3:
        case 4: /* free a live block on its stream, after its last use there */
            if (n_live) {
                size_t i = a % n_live;
                verify_block(memory, &(live_block){live[i].address - base, live[i].nbytes, 0, 0, 0, live[i].fill});
                queued[live[i].stream]++;
                dev_freed f = {live[i].address, live[i].address + live[i].nbytes, {0}};
                f.queued_at[live[i].stream] = queued[live[i].stream];
                for (uint32_t s = 1; s < DEV_STREAMS; s++)
                    if (live[i].users >> s & 1) f.queued_at[s] = queued[s];
                if (mo_dev_free(h, live[i].address, live[i].stream) != MO_OK) FAIL("dev free of a live block failed");
                freed[n_freed++ % DEV_FREED] = f;
                live[i] = live[--n_live];
            }
            break;
        case 5: /* another stream uses a live block */
            if (n_live) {
                dev_block *lb = &live[a % n_live];
                if (stream != lb->stream && !(lb->users >> stream & 1)) {
                    if (mo_dev_record_stream(h, lb->address, stream) != MO_OK) FAIL("record_stream failed");
                    lb->users |= 1u << stream;
                    queued[stream]++; /* its use */
                }
            }
            break;
        case 6: /* a stream runs its queued work */
            done[stream] = queued[stream];
            if (a & 1) mo_dev_collect(h, 0);
            break;
        case 7: /* bad frees: a freed block again, or inside a live one */
            if (n_freed && (a & 1)) {
                const dev_freed *f = &freed[(n_freed - 1) % DEV_FREED];
                int reused = 0;
                for (size_t i = 0; i < n_live; i++) reused |= live[i].address == f->address;
                int rc = reused ? MO_OK : mo_dev_free(h, f->address, stream);
                if (!reused && rc != MO_E_DOUBLE_FREE && rc != MO_E_INVALID_FREE) FAIL("a second free returned %d", rc);
            } else if (n_live) {
                dev_block *lb = &live[a % n_live];
                if (lb->nbytes > 16 && mo_dev_free(h, lb->address + 16, stream) != MO_E_INVALID_FREE)
                    FAIL("an interior free was not refused");
            }
            break;
        case 8: /* record a step, or arm a plan for the recorded one (first fit in time and address) */
            if (armed) {
                if (mo_dev_unplan(h) == MO_OK) armed = 0;
            } else if (!recording) {
                if (mo_dev_record_begin(h) != MO_OK) FAIL("record_begin failed");
                recording = 1;
            } else {
                uint64_t count = 0;
                recording = 0;
                if (mo_dev_record_end(h, &count) != MO_OK) FAIL("record_end failed");
                if (!count || count > 512) break;
                static uint64_t nb[512], st[512], en[512], off[512];
                if (mo_dev_trace(h, count, nb, st, en) != MO_OK) FAIL("trace failed");
                uint64_t region = 0;
                for (uint64_t i = 0; i < count; i++) { /* the lowest offset clear of every earlier one alive with it */
                    uint64_t span = (nb[i] + 511u) & ~511ull, at = 0;
                    off[i] = MO_UNPLANNED;
                    if ((b & 1) && en[i] == UINT64_MAX) continue;
                    for (int moved = 1; moved;) {
                        moved = 0;
                        for (uint64_t j = 0; j < i; j++) {
                            uint64_t sj = (nb[j] + 511u) & ~511ull;
                            if (off[j] == MO_UNPLANNED || !(st[j] < en[i] && st[i] < en[j])) continue;
                            if (at < off[j] + sj && off[j] < at + span) {
                                at = off[j] + sj;
                                moved = 1;
                            }
                        }
                    }
                    off[i] = at;
                    if (at + span > region) region = at + span;
                }
                uint64_t runs_at[64], runs_size[64], runs = 0, base = UINT64_MAX;
                if (region && region <= CAPACITY / 2 && (b & 2) &&
                    mo_dev_free_runs(h, 64, runs_at, runs_size, &runs) == MO_OK && runs <= 64) {
                    /* Among the live blocks: the layout at the lowest free run that holds it, or (b & 4) at 0,
                     * which must be refused, the pool unchanged, whenever a live block is there. */
                    for (uint64_t k = 0; k < runs && base == UINT64_MAX; k++) {
                        uint64_t lo = (runs_at[k] + 511u) & ~511ull;
                        if (lo + region <= runs_at[k] + runs_size[k]) base = lo;
                    }
                    if (b & 4) base = 0;
                }
                if (base != UINT64_MAX) {
                    for (uint64_t i = 0; i < count; i++)
                        if (off[i] != MO_UNPLANNED) off[i] += base;
                    int rc = mo_dev_plan_at(h, count, nb, off, 1, &base, &region);
                    if (rc != MO_OK && rc != MO_E_EXHAUSTED) FAIL("plan_at failed with %d", rc);
                    if (rc != MO_OK && (b & 4) == 0) FAIL("plan_at refused a free run the pool listed");
                    armed = rc == MO_OK;
                } else if (region && region <= CAPACITY / 2) {
                    int rc = mo_dev_plan(h, count, nb, off, region);
                    if (rc != MO_OK && rc != MO_E_EXHAUSTED) FAIL("plan failed with %d", rc);
                    armed = rc == MO_OK;
                }
            }
            break;
        case 9: /* a step begins */
            if (mo_dev_step(h) != MO_OK) FAIL("step failed");
            break;
        }
        if (mo_dev_check(h) != MO_OK) FAIL("mo_dev_check failed");
    }
    for (size_t i = 0; i < n_live; i++)
        if (mo_dev_free(h, live[i].address, live[i].stream) != MO_OK) FAIL("final free failed");
    if (recording) {
        uint64_t count;
        mo_dev_record_end(h, &count);
    }
    if (mo_dev_destroy(h) != MO_OK) FAIL("dev destroy failed");
    uint64_t address;
    if (mo_dev_alloc(h, 16, 1, &address) != MO_E_BAD_HANDLE) FAIL("a destroyed pool allocated");
    return 0;
}

#ifdef MO_FUZZ_STANDALONE
int main(int argc, char **argv) {
    long runs = argc > 1 ? atol(argv[1]) : 10000;
    uint64_t state = 0x9E3779B97F4A7C15ull;
    uint8_t buf[2048];
    for (long run = 0; run < runs; run++) {
        size_t n = 1;
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        n += (state >> 33) % sizeof(buf);
        for (size_t i = 0; i < n; i++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            buf[i] = (uint8_t)(state >> 56);
        }
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("%ld random programs passed\n", runs);
    return 0;
}
#endif
