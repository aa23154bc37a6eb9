/* An open-addressing map of 64-bit keys to 64-bit values (device_internal.h), for the device pools' tables:
 * pending frees, overflow blocks, stream uses and the recorded blocks, all keyed by address. */
#include <stdlib.h>
#include <string.h>

#include "device_internal.h"

static inline uint64_t map_home(uint32_t bits, uint64_t key1) { return (key1 * 0x9E3779B97F4A7C15ull) >> (64 - bits); }

static int map_rebuild(mo_map *m, uint32_t bits) {
    uint64_t *keys = calloc((size_t)1 << bits, sizeof(uint64_t));
    uint64_t *vals = malloc(((size_t)1 << bits) * sizeof(uint64_t));
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return mo_fail(MO_E_NOMEM, "no host memory for a table of %llu slots", 1ull << bits);
    }
    uint64_t mask = ((uint64_t)1 << bits) - 1, old = m->keys ? (uint64_t)1 << m->bits : 0;
    for (uint64_t i = 0; i < old; i++) {
        if (!m->keys[i]) continue;
        uint64_t j = map_home(bits, m->keys[i]);
        while (keys[j]) j = (j + 1) & mask;
        keys[j] = m->keys[i];
        vals[j] = m->vals[i];
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->bits = bits;
    return MO_OK;
}

int mo_map_reserve(mo_map *m, uint64_t extra) {
    uint32_t bits = m->keys ? m->bits : 4;
    while ((m->count + extra) * 4 > ((uint64_t)3 << bits)) bits++;
    return (m->keys && bits == m->bits) ? MO_OK : map_rebuild(m, bits);
}

static inline uint64_t map_slot(const mo_map *m, uint64_t key1) {
    uint64_t mask = ((uint64_t)1 << m->bits) - 1, j = map_home(m->bits, key1);
    while (m->keys[j] && m->keys[j] != key1) j = (j + 1) & mask;
    return j;
}

void mo_map_put(mo_map *m, uint64_t key, uint64_t val) {
    uint64_t j = map_slot(m, key + 1);
    if (!m->keys[j]) {
        m->keys[j] = key + 1;
        m->count++;
    }
    m->vals[j] = val;
}

int mo_map_get(const mo_map *m, uint64_t key, uint64_t *val) {
    if (!m->keys) return 0;
    uint64_t j = map_slot(m, key + 1);
    if (!m->keys[j]) return 0;
    if (val) *val = m->vals[j];
    return 1;
}

int mo_map_remove(mo_map *m, uint64_t key) {
    if (!m->keys) return 0;
    uint64_t mask = ((uint64_t)1 << m->bits) - 1, i = map_slot(m, key + 1);
    if (!m->keys[i]) return 0;
    for (uint64_t j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        uint64_t home = map_home(m->bits, m->keys[j]);
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->count--;
    return 1;
}

void mo_map_free(mo_map *m) {
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof(*m));
}

uint64_t mo_map_bytes(const mo_map *m) { return m->keys ? ((uint64_t)1 << m->bits) * 16u : 0; }
