/* test_bitmap.c - every bitmap operation against a naive shadow model (a
 * bool per bit), at sizes around word and summary boundaries; error paths;
 * and threads racing on the same words. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pymirror.h"
#include "check.h"

uint64_t pm__popcount_portable(const uint64_t *w, uint64_t n);

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void compare(pm_bitmap *bm, const bool *shadow, uint64_t n)
{
    uint64_t count = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (pm_bitmap_get(bm, i) != (int)shadow[i]) {
            CHECK_EQ(pm_bitmap_get(bm, i), shadow[i]);
            return;
        }
        count += shadow[i];
    }
    CHECK_EQ(pm_bitmap_count(bm), count);
    CHECK_EQ(pm_bitmap_validate(bm), 0);
}

static int64_t shadow_next(const bool *s, uint64_t n, uint64_t from, bool value)
{
    for (uint64_t i = from; i < n; i++)
        if (s[i] == value)
            return (int64_t)i;
    return -1;
}

static void model_run(uint64_t n, int steps)
{
    pm_bitmap *bm, *other;
    CHECK_EQ(pm_bitmap_create(n, &bm), 0);
    CHECK_EQ(pm_bitmap_create(n, &other), 0);
    bool *s = calloc(n, 1), *o = calloc(n, 1);
    uint64_t *out = malloc(sizeof(uint64_t) * (n + 1));
    unsigned char *buf = malloc(pm_bitmap_serial_size(bm));
    for (int step = 0; step < steps; step++) {
        uint64_t i = rnd() % n, c = rnd() % (n - i + 1);
        switch (rnd() % 12) {
        case 0: CHECK_EQ(pm_bitmap_test_and_set(bm, i), s[i]); s[i] = 1; break;
        case 1: CHECK_EQ(pm_bitmap_test_and_clear(bm, i), s[i]); s[i] = 0; break;
        case 2: {
            int64_t changed = 0;
            for (uint64_t k = i; k < i + c; k++) changed += !s[k], s[k] = 1;
            CHECK_EQ(pm_bitmap_set_range(bm, i, c), changed);
            break;
        }
        case 3: {
            int64_t changed = 0;
            for (uint64_t k = i; k < i + c; k++) changed += s[k], s[k] = 0;
            CHECK_EQ(pm_bitmap_clear_range(bm, i, c), changed);
            break;
        }
        case 4: CHECK_EQ(pm_bitmap_next_set(bm, i), shadow_next(s, n, i, 1)); break;
        case 5: CHECK_EQ(pm_bitmap_next_clear(bm, i), shadow_next(s, n, i, 0)); break;
        case 6: {
            uint64_t max = 1 + rnd() % 200, st = 0, len = 0;
            int64_t first = shadow_next(s, n, i, 1);
            int found = pm_bitmap_next_run(bm, i, max, &st, &len);
            CHECK_EQ(found, first >= 0);
            if (found && first >= 0) {
                uint64_t e = (uint64_t)first;
                while (e < n && s[e] && e - (uint64_t)first < max) e++;
                CHECK_EQ(st, first);
                CHECK_EQ(len, e - (uint64_t)first);
            }
            break;
        }
        case 7: {
            int64_t got = pm_bitmap_collect(bm, i, out, n + 1), k = 0;
            for (uint64_t b = i; b < n; b++)
                if (s[b]) { if (k < got) CHECK_EQ(out[k], b); k++; }
            CHECK_EQ(got, k);
            break;
        }
        case 8: {   /* round trip through the serial format */
            CHECK_EQ(pm_bitmap_save(bm, buf, pm_bitmap_serial_size(bm)), 0);
            CHECK_EQ(pm_bitmap_zero(other), 0);
            CHECK_EQ(pm_bitmap_load(other, buf, pm_bitmap_serial_size(bm)), 0);
            CHECK_EQ(pm_bitmap_equal(bm, other), 1);
            for (uint64_t k = 0; k < n; k++) o[k] = s[k];
            break;
        }
        case 9: {   /* set some bits of other, then union / intersect / subtract */
            for (int k = 0; k < 5; k++) { uint64_t b = rnd() % n; pm_bitmap_set(other, b); o[b] = 1; }
            int op = (int)(rnd() % 3);
            if (op == 0) { pm_bitmap_union(bm, other); for (uint64_t k = 0; k < n; k++) s[k] |= o[k]; }
            if (op == 1) { pm_bitmap_intersect(bm, other); for (uint64_t k = 0; k < n; k++) s[k] &= o[k]; }
            if (op == 2) { pm_bitmap_subtract(bm, other); for (uint64_t k = 0; k < n; k++) s[k] &= !o[k]; }
            CHECK_EQ(pm_bitmap_validate(other), 0);
            break;
        }
        case 10: CHECK_EQ(pm_bitmap_count_range(bm, i, c), ({ uint64_t x = 0; for (uint64_t k = i; k < i + c; k++) x += s[k]; x; })); break;
        case 11: if (rnd() % 8 == 0) { pm_bitmap_fill(bm); memset(s, 1, n); } else if (rnd() % 8 == 0) { pm_bitmap_zero(bm); memset(s, 0, n); } break;
        }
        compare(bm, s, n);
    }
    pm_bitmap_copy(other, bm);
    CHECK_EQ(pm_bitmap_equal(other, bm), 1);
    free(s), free(o), free(out), free(buf);
    pm_bitmap_destroy(bm);
    pm_bitmap_destroy(other);
}

static void errors(void)
{
    pm_bitmap *bm, *small;
    CHECK_EQ(pm_bitmap_create(0, &bm), -EINVAL);
    CHECK(bm == NULL);
    CHECK_EQ(pm_bitmap_create(100, &bm), 0);
    CHECK_EQ(pm_bitmap_create(99, &small), 0);
    CHECK_EQ(pm_bitmap_get(bm, 100), PM_E_RANGE);
    CHECK(strstr(pm_last_error(), "bit 100 is beyond the size 100") != NULL);
    CHECK_EQ(pm_bitmap_set(bm, 1000), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_test_and_clear(bm, UINT64_MAX), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_set_range(bm, 50, 51), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_set_range(bm, UINT64_MAX, 2), PM_E_RANGE);   /* no overflow */
    CHECK_EQ(pm_bitmap_clear_range(bm, 101, 0), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_set_range(bm, 100, 0), 0);
    CHECK_EQ(pm_bitmap_union(bm, small), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_intersect(bm, small), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_equal(bm, small), PM_E_GEOMETRY);
    uint64_t st, len;
    CHECK_EQ(pm_bitmap_next_run(bm, 0, 0, &st, &len), -EINVAL);
    unsigned char buf[13] = {0};
    CHECK_EQ(pm_bitmap_load(bm, buf, 12), PM_E_GEOMETRY);
    buf[12] = 0x10;   /* bit 100: past the size */
    CHECK_EQ(pm_bitmap_load(bm, buf, 13), PM_E_CORRUPT);
    CHECK_EQ(pm_bitmap_count(bm), 0);       /* failed loads change nothing */
    CHECK_EQ(pm_bitmap_save(bm, buf, 12), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_next_set(bm, 100), -1);
    pm_bitmap_destroy(bm);
    pm_bitmap_destroy(small);
    pm_bitmap_destroy(NULL);
    CHECK(strcmp(pm_strerror(PM_E_RANGE), "offset, length or index out of range") == 0);
    CHECK(strcmp(pm_strerror(-EIO), "Input/output error") == 0);
}

static void popcounts(void)
{
    uint64_t w[37];
    for (int i = 0; i < 37; i++) w[i] = rnd();
    pm_bitmap *bm;
    CHECK_EQ(pm_bitmap_create(37 * 64, &bm), 0);
    uint64_t expect = pm__popcount_portable(w, 37);
    for (uint64_t b = 0; b < 37 * 64; b++)
        if ((w[b / 64] >> (b % 64)) & 1) pm_bitmap_set(bm, b);
    CHECK_EQ(pm_bitmap_count(bm), expect);
    printf("popcount implementation: %s\n", pm_popcount_impl());
    pm_bitmap_destroy(bm);
}

/* ---- threads ---- */
#define NT 4
static pm_bitmap *race_bm;
static uint64_t wins[NT];
static pthread_barrier_t barrier;

static void *tas_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t n = pm_bitmap_size(race_bm);
    pthread_barrier_wait(&barrier);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t b = (k * 7 + (uint64_t)id * 13) % n;   /* overlapping orders */
        if (pm_bitmap_test_and_set(race_bm, b) == 0)
            wins[id]++;
    }
    return NULL;
}

static void *churn_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t n = pm_bitmap_size(race_bm);
    pthread_barrier_wait(&barrier);
    for (int k = 0; k < 200000; k++) {
        uint64_t b = (uint64_t)(k * 31 + id) % n;
        if (k & 1) pm_bitmap_set(race_bm, b); else pm_bitmap_clear(race_bm, b);
    }
    /* leave a known pattern: each thread sets its own bits */
    for (uint64_t b = (uint64_t)id; b < n; b += NT * 3) pm_bitmap_set(race_bm, b);
    return NULL;
}

static void threads(void)
{
    pthread_t t[NT];
    CHECK_EQ(pm_bitmap_create(100003, &race_bm), 0);
    pthread_barrier_init(&barrier, NULL, NT);
    for (int i = 0; i < NT; i++) pthread_create(&t[i], NULL, tas_worker, (void *)(intptr_t)i);
    uint64_t total = 0;
    for (int i = 0; i < NT; i++) { pthread_join(t[i], NULL); total += wins[i]; }
    CHECK_EQ(total, 100003);                  /* each bit won exactly once */
    CHECK_EQ(pm_bitmap_count(race_bm), 100003);
    CHECK_EQ(pm_bitmap_validate(race_bm), 0);
    pm_bitmap_zero(race_bm);
    for (int i = 0; i < NT; i++) pthread_create(&t[i], NULL, churn_worker, (void *)(intptr_t)i);
    for (int i = 0; i < NT; i++) pthread_join(t[i], NULL);
    CHECK_EQ(pm_bitmap_validate(race_bm), 0);  /* summary consistent after the race */
    uint64_t seen = 0;
    for (int64_t b = pm_bitmap_next_set(race_bm, 0); b >= 0; b = pm_bitmap_next_set(race_bm, (uint64_t)b + 1))
        seen++;
    CHECK_EQ(seen, pm_bitmap_count(race_bm));  /* the summary hides no set bit */
    pthread_barrier_destroy(&barrier);
    pm_bitmap_destroy(race_bm);
}

int main(void)
{
    static const uint64_t sizes[] = { 1, 2, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097, 100003 };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        model_run(sizes[i], sizes[i] > 5000 ? 300 : 2000);
    errors();
    popcounts();
    threads();
    return CHECK_DONE("test_bitmap");
}
