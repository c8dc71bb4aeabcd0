/* test_bitmap.c - every bitmap operation against a naive shadow model (a
 * bool per bit, after QEMU's hbitmap tests), at sizes around word and
 * summary boundaries, with pm_bitmap_validate after every operation; the
 * serial format byte by byte; one check per error return; the popcount
 * implementations against each other; and threads racing on the same
 * words.  Prints raw speeds at the end (not checked: machines vary). */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pymirror.h"
#include "check.h"

/* Test hook in bitmap.c: count with a named popcount (-1: not on this CPU). */
int64_t pm__popcount_with(const char *name, const uint64_t *w, uint64_t n);
/* Test hook in bitmap.c: runs inside a clear that emptied word w, right
 * before the clearer clears w's summary bit. */
extern void (*pm__unmark_hook)(pm_bitmap *bm, uint64_t w);

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#else
#define SANITIZED 0
#endif

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* ---- the shadow model ---------------------------------------------------- */

static int64_t shadow_next(const bool *s, uint64_t n, uint64_t from, bool value)
{
    for (uint64_t i = from; i < n; i++)
        if (s[i] == value)
            return (int64_t)i;
    return -1;
}

static uint64_t shadow_count(const bool *s, uint64_t from, uint64_t to)
{
    uint64_t c = 0;
    for (uint64_t i = from; i < to; i++)
        c += s[i];
    return c;
}

/* Full comparison: every bit, the count, the word array, the invariants. */
static void compare(pm_bitmap *bm, const bool *shadow, uint64_t n)
{
    const uint64_t *words = pm_bitmap_words(bm);
    for (uint64_t i = 0; i < n; i++) {
        if (pm_bitmap_get(bm, i) != (int)shadow[i] ||
            (int)((words[i / 64] >> (i % 64)) & 1) != (int)shadow[i]) {
            CHECK_EQ(pm_bitmap_get(bm, i), shadow[i]);
            return;
        }
    }
    if (n % 64)
        CHECK_EQ(words[n / 64] >> (n % 64), 0);   /* nothing past the size */
    CHECK_EQ(pm_bitmap_count(bm), shadow_count(shadow, 0, n));
    CHECK_EQ(pm_bitmap_validate(bm), 0);
}

static void model_run(uint64_t n, int steps)
{
    pm_bitmap *bm, *other;
    CHECK_EQ(pm_bitmap_create(n, &bm), 0);
    CHECK_EQ(pm_bitmap_create(n, &other), 0);
    CHECK_EQ(pm_bitmap_size(bm), n);
    CHECK_EQ(pm_bitmap_nwords(bm), (n + 63) / 64);
    CHECK_EQ((uintptr_t)pm_bitmap_words(bm) % 64, 0);
    bool *s = calloc(n, 1), *o = calloc(n, 1);
    uint64_t *out = malloc(sizeof(uint64_t) * (n + 1));
    unsigned char *buf = malloc(pm_bitmap_serial_size(bm));
    for (int step = 0; step < steps; step++) {
        uint64_t i = rnd() % n, c = rnd() % (n - i + 1);
        if (rnd() % 4 == 0)
            c = rnd() % (c + 1) % 130;   /* short ranges more often */
        switch (rnd() % 16) {
        case 0: CHECK_EQ(pm_bitmap_test_and_set(bm, i), s[i]); s[i] = 1; break;
        case 1: CHECK_EQ(pm_bitmap_test_and_clear(bm, i), s[i]); s[i] = 0; break;
        case 2: CHECK_EQ(pm_bitmap_set(bm, i), s[i]); s[i] = 1; break;
        case 3: CHECK_EQ(pm_bitmap_clear(bm, i), s[i]); s[i] = 0; break;
        case 4: {
            int64_t changed = 0;
            for (uint64_t k = i; k < i + c; k++) changed += !s[k], s[k] = 1;
            CHECK_EQ(pm_bitmap_set_range(bm, i, c), changed);
            break;
        }
        case 5: {
            int64_t changed = 0;
            for (uint64_t k = i; k < i + c; k++) changed += s[k], s[k] = 0;
            CHECK_EQ(pm_bitmap_clear_range(bm, i, c), changed);
            break;
        }
        case 6:
            CHECK_EQ(pm_bitmap_next_set(bm, i), shadow_next(s, n, i, 1));
            CHECK_EQ(pm_bitmap_next_clear(bm, i), shadow_next(s, n, i, 0));
            break;
        case 7: {
            uint64_t max = rnd() % 3 == 0 ? UINT64_MAX : 1 + rnd() % 200, st = 0, len = 0;
            int64_t first = shadow_next(s, n, i, 1);
            int found = pm_bitmap_next_run(bm, i, max, &st, &len);
            CHECK_EQ(found, first >= 0);
            if (found == 1 && first >= 0) {
                uint64_t e = (uint64_t)first;
                while (e < n && s[e] && e - (uint64_t)first < max) e++;
                CHECK_EQ(st, first);
                CHECK_EQ(len, e - (uint64_t)first);
            }
            break;
        }
        case 8: {   /* collect, in chunks of `max` like the Python wrapper */
            uint64_t max = 1 + rnd() % 70, from = i, k = 0;
            int64_t got;
            while ((got = pm_bitmap_collect(bm, from, out, max)) > 0) {
                for (int64_t j = 0; j < got; j++) {
                    int64_t expect = shadow_next(s, n, from, 1);
                    CHECK_EQ(out[j], expect);
                    from = (uint64_t)expect + 1;
                    k++;
                }
                CHECK(got <= (int64_t)max);
            }
            CHECK_EQ(got, 0);
            CHECK_EQ(k, shadow_count(s, i, n));
            break;
        }
        case 9: {   /* round trip through the serial format */
            uint64_t len = pm_bitmap_serial_size(bm);
            CHECK_EQ(len, (n + 7) / 8);
            CHECK_EQ(pm_bitmap_save(bm, buf, len), 0);
            for (uint64_t b = 0; b < n; b++)
                if (((buf[b / 8] >> (b % 8)) & 1) != s[b]) { CHECK_EQ(b, -1); break; }
            CHECK_EQ(pm_bitmap_load(other, buf, len), 0);
            CHECK_EQ(pm_bitmap_equal(bm, other), 1);
            memcpy(o, s, n);
            break;
        }
        case 10: {   /* change other, then union / intersect / subtract / copy */
            for (int k = 0; k < 5; k++) { uint64_t b = rnd() % n; pm_bitmap_set(other, b); o[b] = 1; }
            if (rnd() % 2) { uint64_t b = rnd() % n; pm_bitmap_clear(other, b); o[b] = 0; }
            int op = (int)(rnd() % 4);
            if (op == 0) { CHECK_EQ(pm_bitmap_union(bm, other), 0); for (uint64_t k = 0; k < n; k++) s[k] |= o[k]; }
            if (op == 1) { CHECK_EQ(pm_bitmap_intersect(bm, other), 0); for (uint64_t k = 0; k < n; k++) s[k] &= o[k]; }
            if (op == 2) { CHECK_EQ(pm_bitmap_subtract(bm, other), 0); for (uint64_t k = 0; k < n; k++) s[k] &= !o[k]; }
            if (op == 3) { CHECK_EQ(pm_bitmap_copy(bm, other), 0); memcpy(s, o, n); }
            CHECK_EQ(pm_bitmap_equal(bm, other), memcmp(s, o, n) == 0);
            compare(other, o, n);
            break;
        }
        case 11: CHECK_EQ(pm_bitmap_count_range(bm, i, c), shadow_count(s, i, i + c)); break;
        case 12:   /* clamped at the size, never an error */
            CHECK_EQ(pm_bitmap_count_range(bm, i, UINT64_MAX), shadow_count(s, i, n));
            CHECK_EQ(pm_bitmap_count_range(bm, n + i, 5), 0);
            break;
        case 13:
            if (rnd() % 6 == 0) { CHECK_EQ(pm_bitmap_fill(bm), 0); memset(s, 1, n); }
            else if (rnd() % 6 == 0) { CHECK_EQ(pm_bitmap_zero(bm), 0); memset(s, 0, n); }
            break;
        case 14:   /* load from other into bm (replaces every bit) */
            CHECK_EQ(pm_bitmap_save(other, buf, pm_bitmap_serial_size(other)), 0);
            CHECK_EQ(pm_bitmap_load(bm, buf, pm_bitmap_serial_size(bm)), 0);
            memcpy(s, o, n);
            break;
        case 15:   /* dense random pattern in one word-aligned stretch */
            for (uint64_t k = i; k < i + c && k < i + 300; k++)
                if (rnd() & 1) { pm_bitmap_set(bm, k); s[k] = 1; }
            break;
        }
        compare(bm, s, n);
    }
    free(s), free(o), free(out), free(buf);
    pm_bitmap_destroy(bm);
    pm_bitmap_destroy(other);
}

/* ---- serial format, byte by byte ----------------------------------------- */

static void serial_format(void)
{
    pm_bitmap *bm;
    CHECK_EQ(pm_bitmap_create(70, &bm), 0);
    const uint64_t bits[] = { 0, 9, 63, 64, 69 };
    for (size_t i = 0; i < 5; i++)
        pm_bitmap_set(bm, bits[i]);
    unsigned char buf[9], expect[9] = { 0x01, 0x02, 0, 0, 0, 0, 0, 0x80, 0x21 };
    CHECK_EQ(pm_bitmap_serial_size(bm), 9);
    CHECK_EQ(pm_bitmap_save(bm, buf, 9), 0);
    CHECK(memcmp(buf, expect, 9) == 0);
    /* loading a known byte image gives known bits, whatever the host order */
    unsigned char img[9] = { 0x80, 0, 0, 0, 0, 0, 0, 0x01, 0x3f };
    CHECK_EQ(pm_bitmap_load(bm, img, 9), 0);
    CHECK_EQ(pm_bitmap_count(bm), 8);
    CHECK_EQ(pm_bitmap_next_set(bm, 0), 7);
    CHECK_EQ(pm_bitmap_next_set(bm, 8), 56);
    CHECK_EQ(pm_bitmap_next_set(bm, 57), 64);
    CHECK_EQ(pm_bitmap_get(bm, 69), 1);
    CHECK_EQ(pm_bitmap_validate(bm), 0);
    /* a bigger buffer than needed is fine for save (bytes past it untouched) */
    unsigned char big[12];
    memset(big, 0xAA, sizeof big);
    CHECK_EQ(pm_bitmap_save(bm, big, sizeof big), 0);
    CHECK(memcmp(big, img, 9) == 0 && big[9] == 0xAA);
    pm_bitmap_destroy(bm);
}

/* ---- error paths: one check per error return ------------------------------ */

static bool last_error_has(const char *a, const char *b)
{
    const char *m = pm_last_error();
    return strstr(m, a) != NULL && (b == NULL || strstr(m, b) != NULL);
}

static void errors(void)
{
    pm_bitmap *bm = (pm_bitmap *)1, *small, *big;
    /* create */
    CHECK_EQ(pm_bitmap_create(10, NULL), -EINVAL);
    CHECK(last_error_has("pm_bitmap_create", "out must not be NULL"));
    CHECK_EQ(pm_bitmap_create(0, &bm), -EINVAL);
    CHECK(bm == NULL);
    CHECK(last_error_has("at least one bit", NULL));
    CHECK_EQ(pm_bitmap_create(((uint64_t)1 << 48) + 1, &bm), -EINVAL);
    CHECK(last_error_has("281474976710657 bits is too many", NULL));
    CHECK_EQ(pm_bitmap_create(100, &bm), 0);
    CHECK_EQ(pm_bitmap_create(99, &small), 0);
    CHECK_EQ(pm_bitmap_create(101, &big), 0);
    pm_bitmap_set(bm, 7);

    /* single bits: each names the bit and the size */
    CHECK_EQ(pm_bitmap_get(bm, 100), PM_E_RANGE);
    CHECK(last_error_has("pm_bitmap_get: bit 100 is beyond the size 100", NULL));
    CHECK_EQ(pm_bitmap_set(bm, 1000), PM_E_RANGE);
    CHECK(last_error_has("bit 1000", "size 100"));
    CHECK_EQ(pm_bitmap_clear(bm, 100), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_test_and_set(bm, UINT64_MAX), PM_E_RANGE);
    CHECK(last_error_has("bit 18446744073709551615", NULL));
    CHECK_EQ(pm_bitmap_test_and_clear(bm, 100), PM_E_RANGE);

    /* ranges, including start + count overflowing 64 bits */
    CHECK_EQ(pm_bitmap_set_range(bm, 50, 51), PM_E_RANGE);
    CHECK(last_error_has("pm_bitmap_set_range: bits 50+51 are beyond the size 100", NULL));
    CHECK_EQ(pm_bitmap_set_range(bm, UINT64_MAX, 2), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_set_range(bm, 1, UINT64_MAX), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_clear_range(bm, 101, 0), PM_E_RANGE);
    CHECK(last_error_has("pm_bitmap_clear_range", NULL));
    CHECK_EQ(pm_bitmap_clear_range(bm, 0, 101), PM_E_RANGE);
    CHECK_EQ(pm_bitmap_set_range(bm, 100, 0), 0);   /* an empty range at the end is fine */

    /* scans */
    uint64_t st = 123, len = 456, out[4];
    CHECK_EQ(pm_bitmap_next_run(bm, 0, 0, &st, &len), -EINVAL);
    CHECK(last_error_has("max_len must be at least 1", NULL));
    CHECK_EQ(pm_bitmap_next_run(bm, 0, 5, NULL, &len), -EINVAL);
    CHECK_EQ(pm_bitmap_next_run(bm, 0, 5, &st, NULL), -EINVAL);
    CHECK(st == 123 && len == 456);
    CHECK_EQ(pm_bitmap_collect(bm, 0, NULL, 4), -EINVAL);
    CHECK(last_error_has("out must not be NULL", NULL));
    CHECK_EQ(pm_bitmap_collect(bm, 0, NULL, 0), 0);     /* nothing asked, nothing written */
    CHECK_EQ(pm_bitmap_collect(bm, 100, out, 4), 0);
    CHECK_EQ(pm_bitmap_collect(bm, UINT64_MAX, out, 4), 0);
    CHECK_EQ(pm_bitmap_next_set(bm, 100), -1);
    CHECK_EQ(pm_bitmap_next_set(bm, UINT64_MAX), -1);
    CHECK_EQ(pm_bitmap_next_clear(bm, 100), -1);
    CHECK_EQ(pm_bitmap_next_run(bm, UINT64_MAX, 1, &st, &len), 0);

    /* whole maps of different sizes, both directions */
    CHECK_EQ(pm_bitmap_union(bm, small), PM_E_GEOMETRY);
    CHECK(last_error_has("pm_bitmap_union: bitmaps differ in size (100 and 99 bits)", NULL));
    CHECK_EQ(pm_bitmap_intersect(bm, big), PM_E_GEOMETRY);
    CHECK(last_error_has("pm_bitmap_intersect", "101"));
    CHECK_EQ(pm_bitmap_subtract(bm, small), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_copy(bm, big), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_equal(bm, small), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_union(bm, NULL), -EINVAL);
    CHECK_EQ(pm_bitmap_copy(NULL, bm), -EINVAL);
    CHECK_EQ(pm_bitmap_copy(bm, bm), 0);                 /* self-copy: a no-op */

    /* serialisation: every failure leaves the bitmap as it was */
    unsigned char buf[14] = {0};
    CHECK_EQ(pm_bitmap_save(bm, buf, 12), PM_E_GEOMETRY);
    CHECK(last_error_has("12 bytes", "13"));
    CHECK_EQ(pm_bitmap_save(bm, NULL, 13), -EINVAL);
    CHECK_EQ(pm_bitmap_load(bm, buf, 12), PM_E_GEOMETRY);
    CHECK(last_error_has("pm_bitmap_load: 12 bytes given, a 100-bit map needs 13", NULL));
    CHECK_EQ(pm_bitmap_load(bm, buf, 14), PM_E_GEOMETRY);
    CHECK_EQ(pm_bitmap_load(bm, NULL, 13), -EINVAL);
    buf[12] = 0x10;   /* bit 100: past the size */
    CHECK_EQ(pm_bitmap_load(bm, buf, 13), PM_E_CORRUPT);
    CHECK(last_error_has("past the size 100", NULL));
    CHECK_EQ(pm_bitmap_count(bm), 1);                    /* failed loads changed nothing */
    CHECK_EQ(pm_bitmap_get(bm, 7), 1);
    CHECK_EQ(pm_bitmap_validate(bm), 0);

    /* validate catches writes that bypass the summary, and bits past the size */
    CHECK_EQ(pm_bitmap_validate(NULL), -EINVAL);
    uint64_t *raw = (uint64_t *)(uintptr_t)pm_bitmap_words(small);
    raw[1] = 1;       /* word 1 non-zero, summary bit clear */
    CHECK_EQ(pm_bitmap_validate(small), PM_E_CORRUPT);
    CHECK(last_error_has("word 1 is non-zero", NULL));
    raw[1] = 0;
    pm_bitmap_set(small, 70);
    raw[1] |= (uint64_t)1 << 40;   /* bit 104 of a 99-bit map */
    CHECK_EQ(pm_bitmap_validate(small), PM_E_CORRUPT);
    CHECK(last_error_has("past the size 99", NULL));
    raw[1] = 0;
    CHECK_EQ(pm_bitmap_validate(small), 0);   /* a stale summary bit is allowed */

    pm_bitmap_destroy(bm);
    pm_bitmap_destroy(small);
    pm_bitmap_destroy(big);
    pm_bitmap_destroy(NULL);
    CHECK(strcmp(pm_strerror(PM_E_RANGE), "offset, length or index out of range") == 0);
}

/* ---- popcount implementations agree --------------------------------------- */

static void popcounts(void)
{
    static const char *impls[] = { "portable", "popcnt", "avx512-vpopcntdq" };
    const char *chosen = pm_popcount_impl();
    bool known = false;
    for (int k = 0; k < 3; k++)
        known |= strcmp(chosen, impls[k]) == 0;
    CHECK(known);
    CHECK(pm__popcount_with(chosen, NULL, 0) == 0);
    CHECK(pm__popcount_with("no-such-impl", NULL, 0) == -1);
    CHECK(pm__popcount_with("portable", NULL, 0) == 0);   /* always present */

    enum { N = 300 };
    uint64_t w[N + 8];
    for (int i = 0; i < N + 8; i++)
        w[i] = rnd() & rnd();   /* about a quarter of the bits */
    w[3] = ~(uint64_t)0, w[4] = 0, w[5] = (uint64_t)1 << 63;
    for (uint64_t off = 0; off < 8; off++) {       /* unaligned starts */
        for (uint64_t n = 0; n <= N; n += n < 40 ? 1 : 37) {   /* every tail length */
            int64_t naive = 0;
            for (uint64_t i = 0; i < n; i++)
                for (int b = 0; b < 64; b++)
                    naive += (int64_t)((w[off + i] >> b) & 1);
            for (int k = 0; k < 3; k++) {
                int64_t got = pm__popcount_with(impls[k], w + off, n);
                if (got != -1 && got != naive) {
                    fprintf(stderr, "popcount %s, %llu words at +%llu\n", impls[k],
                            (unsigned long long)n, (unsigned long long)off);
                    CHECK_EQ(got, naive);
                }
            }
        }
    }
    /* and the dispatched count of a whole bitmap, sparse and dense groups */
    pm_bitmap *bm;
    CHECK_EQ(pm_bitmap_create(300000, &bm), 0);
    int64_t expect = 0;
    for (uint64_t b = 0; b < 300000; b++) {
        bool on = b < 70000 ? (b % 3 == 0) : (b % 4099 == 0);
        if (on) { pm_bitmap_set(bm, b); expect++; }
    }
    CHECK_EQ(pm_bitmap_count(bm), expect);
    CHECK_EQ(pm__popcount_with("portable", pm_bitmap_words(bm), pm_bitmap_nwords(bm)), expect);
    CHECK_EQ(pm_bitmap_count_range(bm, 1, 299998), expect - 1);   /* bit 0 is set, 299999 not */
    /* mostly marked: count takes the bulk path; then a few marked words */
    CHECK_EQ(pm_bitmap_set_range(bm, 0, 300000), 300000 - expect);
    CHECK_EQ(pm_bitmap_clear(bm, 123456), 1);
    CHECK_EQ(pm_bitmap_count(bm), 299999);
    CHECK_EQ(pm_bitmap_count_range(bm, 5, 299990), 299989);
    CHECK_EQ(pm_bitmap_clear_range(bm, 64, 300000 - 128), 300000 - 128 - 1);
    CHECK_EQ(pm_bitmap_count(bm), 128);
    CHECK_EQ(pm_bitmap_count_range(bm, 1, 299999), 127);
    printf("popcount implementation: %s\n", chosen);
    pm_bitmap_destroy(bm);
}

/* ---- the summary protocol's race window, played deterministically ------ */

static uint64_t hook_bit;
static int hook_calls;

/* A "setter" that runs between a clearer's emptying of a word and its
 * clearing of the summary bit: it sees the summary bit still set and does
 * not mark it.  Only the clearer's re-check of the word keeps the bit
 * visible to scans. */
static void racing_setter(pm_bitmap *bm, uint64_t w)
{
    if (w == hook_bit / 64) {
        hook_calls++;
        CHECK_EQ(pm_bitmap_set(bm, hook_bit), 0);
    }
}

static void summary_window(void)
{
    pm_bitmap *bm, *src;
    CHECK_EQ(pm_bitmap_create(300, &bm), 0);
    CHECK_EQ(pm_bitmap_create(300, &src), 0);
    unsigned char zeros[38] = {0};
    for (int k = 0; k < 8; k++) {
        pm__unmark_hook = NULL;
        pm_bitmap_zero(bm);
        pm_bitmap_zero(src);
        pm_bitmap_set(bm, 64);     /* word 1's only bit */
        pm_bitmap_set(bm, 250);    /* something in another word */
        if (k == 4) pm_bitmap_set(src, 64);
        if (k == 5) pm_bitmap_set(src, 250);
        hook_bit = 65;
        hook_calls = 0;
        pm__unmark_hook = racing_setter;
        switch (k) {
        case 0: CHECK_EQ(pm_bitmap_clear(bm, 64), 1); break;
        case 1: CHECK_EQ(pm_bitmap_test_and_clear(bm, 64), 1); break;
        case 2: CHECK_EQ(pm_bitmap_clear_range(bm, 60, 10), 1); break;
        case 3: pm_bitmap_set(src, 250); CHECK_EQ(pm_bitmap_intersect(bm, src), 0); break;
        case 4: CHECK_EQ(pm_bitmap_subtract(bm, src), 0); break;
        case 5: CHECK_EQ(pm_bitmap_copy(bm, src), 0); break;
        case 6: zeros[31] = 0x04; CHECK_EQ(pm_bitmap_load(bm, zeros, 38), 0); zeros[31] = 0; break;
        case 7: CHECK_EQ(pm_bitmap_zero(bm), 0); break;
        }
        pm__unmark_hook = NULL;
        CHECK_EQ(hook_calls, 1);
        CHECK_EQ(pm_bitmap_validate(bm), 0);
        CHECK_EQ(pm_bitmap_next_set(bm, 0), 65);   /* word 1 found through the summary */
        CHECK_EQ(pm_bitmap_get(bm, 64), 0);
        CHECK_EQ(pm_bitmap_count(bm), k == 7 ? 1 : 2);
    }
    pm_bitmap_destroy(bm);
    pm_bitmap_destroy(src);
}

/* ---- threads --------------------------------------------------------------- */

#define NT 4
static pm_bitmap *race_bm;
static uint64_t wins[NT];
static pthread_barrier_t barrier;
static _Atomic int readers_stop;

/* Every thread test-and-sets every bit, in different overlapping orders. */
static void *tas_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t n = pm_bitmap_size(race_bm);
    pthread_barrier_wait(&barrier);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t b = (k * 7 + (uint64_t)id * 13) % n;
        if (pm_bitmap_test_and_set(race_bm, b) == 0)
            wins[id]++;
    }
    return NULL;
}

/* Thread `id` owns bit id of each word and flips it on and off, so words
 * turn zero and non-zero all the time under four racing threads: the
 * summary protocol's worst case.  At the end it leaves a known pattern. */
#define FLIP_WORDS 8
static void *flip_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t x = 0x12345 + (uint64_t)id * 0x9E3779B9u;
    pthread_barrier_wait(&barrier);
    for (int k = 0; k < (SANITIZED ? 20000 : 200000); k++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t b = (x % FLIP_WORDS) * 64 + (uint64_t)id;
        switch ((x >> 20) % 4) {
        case 0: pm_bitmap_set(race_bm, b); break;
        case 1: pm_bitmap_clear(race_bm, b); break;
        case 2: pm_bitmap_test_and_set(race_bm, b); break;
        case 3: pm_bitmap_clear_range(race_bm, b, 1); break;
        }
    }
    for (uint64_t w = 0; w < FLIP_WORDS; w++) {
        uint64_t b = w * 64 + (uint64_t)id;
        if ((w + (uint64_t)id) % 3 == 0) pm_bitmap_set(race_bm, b); else pm_bitmap_clear(race_bm, b);
    }
    return NULL;
}

/* The summary protocol's exact race, many times over: in each round the
 * clearer empties words (bit 0 of each) while the setter sets bit 1 of the
 * same words, in the same order, starting together.  A clearer that
 * cleared a summary bit without re-checking its word would leave a set bit
 * hidden from scans; validate at the end of every round finds it. */
#define DUEL_WORDS 256
#define DUEL_ROUNDS (SANITIZED ? 100 : 1000)
static uint64_t duel_bad_rounds;
static _Atomic uint64_t duel_arrived[2];

/* A two-thread rendezvous per word, so both reach word w within a few
 * cache-line transfers of each other. */
static void duel_meet(int me, uint64_t ticket)
{
    atomic_store(&duel_arrived[me], ticket);
    for (int spins = 0; atomic_load(&duel_arrived[!me]) < ticket; spins++)
        if (spins > 1000)
            sched_yield();   /* the other thread is not running: let it */
}

static void *duel_worker(void *arg)
{
    int setter = (int)(intptr_t)arg;
    uint64_t ticket = 0;
    for (int round = 0; round < DUEL_ROUNDS; round++) {
        pthread_barrier_wait(&barrier);   /* main has reset the map */
        for (uint64_t w = 0; w < DUEL_WORDS; w++) {
            duel_meet(setter, ++ticket);
            if (setter) pm_bitmap_set(race_bm, w * 64 + 1);
            else pm_bitmap_clear(race_bm, w * 64);
        }
        pthread_barrier_wait(&barrier);   /* main checks */
        pthread_barrier_wait(&barrier);
    }
    return NULL;
}

static void duel(void)
{
    pthread_t t[2];
    CHECK_EQ(pm_bitmap_create(DUEL_WORDS * 64, &race_bm), 0);
    pthread_barrier_init(&barrier, NULL, 3);
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, duel_worker, (void *)(intptr_t)i);
    for (int round = 0; round < DUEL_ROUNDS; round++) {
        pm_bitmap_fill(race_bm);   /* fill, clear: every summary bit set */
        pm_bitmap_clear_range(race_bm, 0, DUEL_WORDS * 64);
        for (uint64_t w = 0; w < DUEL_WORDS; w++) pm_bitmap_set(race_bm, w * 64);
        pthread_barrier_wait(&barrier);
        pthread_barrier_wait(&barrier);
        if (pm_bitmap_validate(race_bm) != 0 || pm_bitmap_count(race_bm) != DUEL_WORDS)
            duel_bad_rounds++;
        pthread_barrier_wait(&barrier);
    }
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    if (getenv("PM_DUEL_VERBOSE")) printf("duel: %llu bad rounds\n", (unsigned long long)duel_bad_rounds);
    CHECK_EQ(duel_bad_rounds, 0);
    pthread_barrier_destroy(&barrier);
    pm_bitmap_destroy(race_bm);
}

/* Scans at the same time must never crash or report a bit out of range. */
static void *reader(void *arg)
{
    uint64_t out[64], bad = 0;
    (void)arg;
    while (!atomic_load(&readers_stop)) {
        int64_t got = pm_bitmap_collect(race_bm, 0, out, 64);
        for (int64_t j = 0; j < got; j++)
            bad += out[j] >= pm_bitmap_size(race_bm);
        int64_t b = pm_bitmap_next_set(race_bm, 0);
        bad += b >= (int64_t)pm_bitmap_size(race_bm);
        bad += pm_bitmap_count(race_bm) > pm_bitmap_size(race_bm);
    }
    return (void *)(uintptr_t)bad;
}

/* Range ops and whole-map ops racing: only the invariants can be checked. */
static pm_bitmap *race_src;
static void *range_worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t n = pm_bitmap_size(race_bm), x = 77 + (uint64_t)id;
    pthread_barrier_wait(&barrier);
    for (int k = 0; k < (SANITIZED ? 3000 : 30000); k++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t s = x % n, c = (x >> 32) % 300;
        if (c > n - s) c = n - s;
        switch ((x >> 8) % 16) {
        case 0: pm_bitmap_union(race_bm, race_src); break;
        case 1: pm_bitmap_subtract(race_bm, race_src); break;
        case 2: pm_bitmap_intersect(race_bm, race_src); break;
        case 3: if (k % 64 == 0) pm_bitmap_zero(race_bm); break;
        case 4: if (k % 256 == 0) pm_bitmap_fill(race_bm); break;
        case 5: if (k % 64 == 0) pm_bitmap_copy(race_bm, race_src); break;
        default: if (x & 1) pm_bitmap_set_range(race_bm, s, c); else pm_bitmap_clear_range(race_bm, s, c);
        }
    }
    return NULL;
}

static void threads(void)
{
    pthread_t t[NT], r;
    uint64_t n = 100003;

    /* 1. test-and-set: each bit is won exactly once */
    CHECK_EQ(pm_bitmap_create(n, &race_bm), 0);
    pthread_barrier_init(&barrier, NULL, NT);
    for (int i = 0; i < NT; i++) pthread_create(&t[i], NULL, tas_worker, (void *)(intptr_t)i);
    uint64_t total = 0;
    for (int i = 0; i < NT; i++) { pthread_join(t[i], NULL); total += wins[i]; }
    CHECK_EQ(total, n);
    CHECK_EQ(pm_bitmap_count(race_bm), n);
    CHECK_EQ(pm_bitmap_validate(race_bm), 0);
    pm_bitmap_destroy(race_bm);

    /* 2. flipping bits that share words, with readers scanning meanwhile */
    CHECK_EQ(pm_bitmap_create(FLIP_WORDS * 64, &race_bm), 0);
    atomic_store(&readers_stop, 0);
    pthread_create(&r, NULL, reader, NULL);
    for (int i = 0; i < NT; i++) pthread_create(&t[i], NULL, flip_worker, (void *)(intptr_t)i);
    for (int i = 0; i < NT; i++) pthread_join(t[i], NULL);
    atomic_store(&readers_stop, 1);
    void *bad;
    pthread_join(r, &bad);
    CHECK_EQ((uintptr_t)bad, 0);
    CHECK_EQ(pm_bitmap_validate(race_bm), 0);
    uint64_t expect = 0;
    for (uint64_t w = 0; w < FLIP_WORDS; w++)
        for (uint64_t id = 0; id < NT; id++) {
            int on = (w + id) % 3 == 0;
            expect += (uint64_t)on;
            CHECK_EQ(pm_bitmap_get(race_bm, w * 64 + id), on);
        }
    CHECK_EQ(pm_bitmap_count(race_bm), expect);
    uint64_t seen = 0;
    for (int64_t b = pm_bitmap_next_set(race_bm, 0); b >= 0; b = pm_bitmap_next_set(race_bm, (uint64_t)b + 1))
        seen++;
    CHECK_EQ(seen, expect);   /* the summary hides no set bit */
    pm_bitmap_destroy(race_bm);

    /* 3. ranges and whole-map operations racing on the same words */
    CHECK_EQ(pm_bitmap_create(20000, &race_bm), 0);
    CHECK_EQ(pm_bitmap_create(20000, &race_src), 0);
    for (uint64_t b = 0; b < 20000; b += 3) pm_bitmap_set(race_src, b);
    for (int i = 0; i < NT; i++) pthread_create(&t[i], NULL, range_worker, (void *)(intptr_t)i);
    for (int i = 0; i < NT; i++) pthread_join(t[i], NULL);
    CHECK_EQ(pm_bitmap_validate(race_bm), 0);
    seen = 0;
    for (int64_t b = pm_bitmap_next_set(race_bm, 0); b >= 0; b = pm_bitmap_next_set(race_bm, (uint64_t)b + 1))
        seen++;
    CHECK_EQ(seen, pm_bitmap_count(race_bm));
    CHECK_EQ(pm__popcount_with("portable", pm_bitmap_words(race_bm), pm_bitmap_nwords(race_bm)), seen);
    pm_bitmap_destroy(race_bm);
    pm_bitmap_destroy(race_src);
    pthread_barrier_destroy(&barrier);
}

/* ---- raw speed (printed, not checked) ------------------------------------- */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void speed(void)
{
    if (SANITIZED)
        return;
    pm_bitmap *bm;
    uint64_t n = 16u << 20, ops = 5000000, won = 0;
    CHECK_EQ(pm_bitmap_create(n, &bm), 0);
    double t0 = now();
    for (uint64_t k = 0; k < ops; k++)
        won += pm_bitmap_test_and_set(bm, rnd() % n) == 0;
    double t1 = now();
    CHECK_EQ(pm_bitmap_count(bm), won);
    printf("speed: test_and_set, random bits of 16 Mi, 1 thread: %.1f Mops/s (%.1f ns/op)\n",
           (double)ops / (t1 - t0) / 1e6, (t1 - t0) * 1e9 / (double)ops);
    pm_bitmap_fill(bm);
    const char *impls[] = { "portable", "popcnt", "avx512-vpopcntdq" };
    for (int k = 0; k < 3; k++) {
        int reps = 200;
        int64_t sum = 0;
        t0 = now();
        for (int r = 0; r < reps; r++)
            sum += pm__popcount_with(impls[k], pm_bitmap_words(bm), pm_bitmap_nwords(bm));
        t1 = now();
        if (sum >= 0)
            printf("speed: popcount %s, 2 MiB: %.1f GB/s\n", impls[k], (double)reps * (double)(n / 8) / (t1 - t0) / 1e9);
    }
    pm_bitmap_destroy(bm);
}

int main(void)
{
    static const uint64_t sizes[] = { 1, 2, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097, 100003, 262145 };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        model_run(sizes[i], sizes[i] > 5000 ? 250 : 2500);
    serial_format();
    errors();
    popcounts();
    summary_window();
    threads();
    duel();
    speed();
    return CHECK_DONE("test_bitmap");
}
