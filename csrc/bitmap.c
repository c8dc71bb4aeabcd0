/*
 * bitmap.c - bit-packed atomic bitmaps with a summary level.
 *
 * Layout.  Bit i lives in words[i / 64] at bit i % 64.  summary[w / 64] bit
 * w % 64 says "words[w] may be non-zero".  Bits past nbits are always zero.
 *
 * The summary invariant (when no operation is in flight): words[w] != 0
 * implies summary bit w is set.  A set summary bit over a zero word is
 * allowed (a stale hint that costs one extra word load in a scan).
 *
 * Setting:  fetch_or(word, m); then, if the summary bit is not already set,
 *           fetch_or(summary, bit).
 * Clearing: new = fetch_and(word, ~m) & ~m; if new == 0: fetch_and(summary,
 *           ~bit), then load(word) again and, if it is non-zero, set the
 *           summary bit again.
 * Why a racing setter cannot be left with its word non-zero and its summary
 * bit clear: all five operations are seq_cst, so they sit in one total
 * order S.  Suppose a setter's word RMW W is followed by its summary check
 * R that read "set" (so it skipped setting), and a clearer's summary clear C
 * made that bit clear.  R read a value older than C, so R precedes C in S;
 * the clearer's re-load L follows C; hence W < R < C < L in S and L sees W's
 * bit (or a later value, and then a later clearer repeats this argument).
 * L finds the word non-zero and sets the summary bit again.
 *
 * Scans (next_set, next_run, collect) read summary words first and skip 64
 * words (4096 bits) per zero summary word: a 1 TiB volume at 64 KiB tracks
 * is 16 Mi bits = 256 Ki words = 4 Ki summary words (32 KiB).
 *
 * Popcount is chosen once at run time: AVX-512 VPOPCNTDQ, POPCNT, or a
 * portable bit trick (wheels are built without -march=native).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PM_X86 1
#include <immintrin.h>
#endif

#define WORD_BITS 64u

static inline uint64_t words_for(uint64_t nbits) { return (nbits + 63) / 64; }

/* Mask of the valid bits of the last word. */
static inline uint64_t tail_mask(const pm_bitmap *bm)
{
    unsigned r = (unsigned)(bm->nbits % 64);
    return r ? (((uint64_t)1 << r) - 1) : ~(uint64_t)0;
}

/* ---- popcount dispatch --------------------------------------------------- */

static uint64_t popcount_portable(const uint64_t *w, uint64_t n)
{
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t x = w[i];
        x = x - ((x >> 1) & 0x5555555555555555ULL);
        x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
        x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
        total += (x * 0x0101010101010101ULL) >> 56;
    }
    return total;
}

#ifdef PM_X86
__attribute__((target("popcnt")))
static uint64_t popcount_popcnt(const uint64_t *w, uint64_t n)
{
    uint64_t a = 0, b = 0, c = 0, d = 0, i = 0;
    for (; i + 4 <= n; i += 4) {   /* four chains hide the instruction's latency */
        a += (uint64_t)__builtin_popcountll(w[i]);
        b += (uint64_t)__builtin_popcountll(w[i + 1]);
        c += (uint64_t)__builtin_popcountll(w[i + 2]);
        d += (uint64_t)__builtin_popcountll(w[i + 3]);
    }
    for (; i < n; i++)
        a += (uint64_t)__builtin_popcountll(w[i]);
    return a + b + c + d;
}

__attribute__((target("avx512f,avx512vpopcntdq,popcnt")))
static uint64_t popcount_avx512(const uint64_t *w, uint64_t n)
{
    __m512i acc = _mm512_setzero_si512();
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_loadu_si512((const void *)(w + i))));
    uint64_t total = (uint64_t)_mm512_reduce_add_epi64(acc);
    for (; i < n; i++)
        total += (uint64_t)__builtin_popcountll(w[i]);
    return total;
}
#endif

typedef uint64_t (*popcount_fn)(const uint64_t *, uint64_t);
static _Atomic(popcount_fn) popcount_impl;   /* chosen on first use */
static const char *_Atomic popcount_name;

static popcount_fn choose_popcount(void)
{
    popcount_fn fn = atomic_load_explicit(&popcount_impl, memory_order_acquire);
    if (PM_LIKELY(fn != NULL))
        return fn;
    const char *name = "portable";
    fn = popcount_portable;
#ifdef PM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512f")) {
        fn = popcount_avx512;
        name = "avx512-vpopcntdq";
    } else if (__builtin_cpu_supports("popcnt")) {
        fn = popcount_popcnt;
        name = "popcnt";
    }
#endif
    /* Racing first callers compute the same answer; release publishes it. */
    atomic_store_explicit(&popcount_name, name, memory_order_relaxed);
    atomic_store_explicit(&popcount_impl, fn, memory_order_release);
    return fn;
}

const char *pm_popcount_impl(void)
{
    choose_popcount();
    return atomic_load_explicit(&popcount_name, memory_order_relaxed);
}

/* For tests: count with the portable code regardless of the CPU. */
uint64_t pm__popcount_portable(const uint64_t *w, uint64_t n);
uint64_t pm__popcount_portable(const uint64_t *w, uint64_t n) { return popcount_portable(w, n); }

/* The words as plain uint64_t for bulk reads.  Concurrent writers may change
 * words during a bulk count; the count is then a snapshot per word, which is
 * what a statistics read wants.  (Reading an _Atomic object through a plain
 * pointer is a data race in the C model; TSan builds use the atomic loop.) */
static uint64_t count_words(const pm_bitmap *bm, uint64_t first, uint64_t n)
{
#if defined(__SANITIZE_THREAD__)
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++)
        total += (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[first + i]));
    return total;
#else
    return choose_popcount()((const uint64_t *)(const void *)(bm->words + first), n);
#endif
}

/* ---- create / destroy ---------------------------------------------------- */

int pm_bitmap_create(uint64_t nbits, pm_bitmap **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    *out = NULL;
    if (nbits == 0)
        return PM_FAIL(-EINVAL, "a bitmap needs at least one bit");
    if (nbits > ((uint64_t)1 << 48))
        return PM_FAIL(-EINVAL, "%llu bits is too many (at most 2^48)", (unsigned long long)nbits);
    pm_bitmap *bm = calloc(1, sizeof *bm);
    if (bm == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    bm->nbits = nbits;
    bm->nwords = words_for(nbits);
    bm->nsummary = words_for(bm->nwords);
    size_t wbytes = (size_t)((bm->nwords * 8 + 63) / 64 * 64);
    size_t sbytes = (size_t)((bm->nsummary * 8 + 63) / 64 * 64);
    bm->words = aligned_alloc(64, wbytes);
    bm->summary = aligned_alloc(64, sbytes);
    if (bm->words == NULL || bm->summary == NULL) {
        pm_bitmap_destroy(bm);
        return PM_FAIL(-ENOMEM, "out of memory for %llu bits", (unsigned long long)nbits);
    }
    memset((void *)bm->words, 0, wbytes);
    memset((void *)bm->summary, 0, sbytes);
    *out = bm;
    return 0;
}

void pm_bitmap_destroy(pm_bitmap *bm)
{
    if (bm == NULL)
        return;
    free((void *)bm->words);
    free((void *)bm->summary);
    free(bm);
}

uint64_t pm_bitmap_size(const pm_bitmap *bm) { return bm->nbits; }
uint64_t pm_bitmap_nwords(const pm_bitmap *bm) { return bm->nwords; }
const uint64_t *pm_bitmap_words(const pm_bitmap *bm) { return (const uint64_t *)(const void *)bm->words; }

/* ---- summary maintenance ------------------------------------------------- */

static inline void summary_mark(pm_bitmap *bm, uint64_t w)
{
    pm_atomic_u64 *s = &bm->summary[w / 64];
    uint64_t m = (uint64_t)1 << (w % 64);
    /* seq_cst load: part of the protocol in the file comment. */
    if (!(pm_load_seqcst(s) & m))
        pm_fetch_or(s, m);
}

static inline void summary_unmark(pm_bitmap *bm, uint64_t w)
{
    pm_atomic_u64 *s = &bm->summary[w / 64];
    uint64_t m = (uint64_t)1 << (w % 64);
    pm_fetch_and(s, ~m);
    if (pm_load_seqcst(&bm->words[w]) != 0)
        pm_fetch_or(s, m);
}

/* Clear summary word s, re-marking any of its words that a concurrent
 * setter made non-zero meanwhile (the same protocol as summary_unmark). */
static void summary_clear_word_group(pm_bitmap *bm, uint64_t s)
{
    pm_store_seqcst(&bm->summary[s], 0);
    uint64_t end = (s + 1) * 64 < bm->nwords ? (s + 1) * 64 : bm->nwords;
    for (uint64_t w = s * 64; w < end; w++)
        if (pm_load_seqcst(&bm->words[w]) != 0)
            pm_fetch_or(&bm->summary[s], (uint64_t)1 << (w % 64));
}

/* OR mask into word w; returns the old word. */
static inline uint64_t word_or(pm_bitmap *bm, uint64_t w, uint64_t mask)
{
    uint64_t old = pm_fetch_or(&bm->words[w], mask);
    summary_mark(bm, w);
    return old;
}

/* AND ~mask into word w; returns the old word. */
static inline uint64_t word_andnot(pm_bitmap *bm, uint64_t w, uint64_t mask)
{
    uint64_t old = pm_fetch_and(&bm->words[w], ~mask);
    if ((old & ~mask) == 0 && old != 0)
        summary_unmark(bm, w);
    return old;
}

/* ---- single bits --------------------------------------------------------- */

#define CHECK_BIT(bm, bit)                                                          \
    do {                                                                            \
        if (PM_UNLIKELY((bit) >= (bm)->nbits))                                      \
            return PM_FAIL(PM_E_RANGE, "bit %llu is beyond the size %llu",          \
                           (unsigned long long)(bit), (unsigned long long)(bm)->nbits); \
    } while (0)

int pm_bitmap_get(const pm_bitmap *bm, uint64_t bit)
{
    CHECK_BIT(bm, bit);
    /* acquire: a reader that sees a flag also sees what its setter published */
    return (int)((pm_load_acquire(&bm->words[bit / 64]) >> (bit % 64)) & 1);
}

int pm_bitmap_test_and_set(pm_bitmap *bm, uint64_t bit)
{
    CHECK_BIT(bm, bit);
    uint64_t m = (uint64_t)1 << (bit % 64);
    return (word_or(bm, bit / 64, m) & m) != 0;
}

int pm_bitmap_test_and_clear(pm_bitmap *bm, uint64_t bit)
{
    CHECK_BIT(bm, bit);
    uint64_t m = (uint64_t)1 << (bit % 64);
    return (word_andnot(bm, bit / 64, m) & m) != 0;
}

int pm_bitmap_set(pm_bitmap *bm, uint64_t bit) { return pm_bitmap_test_and_set(bm, bit); }
int pm_bitmap_clear(pm_bitmap *bm, uint64_t bit) { return pm_bitmap_test_and_clear(bm, bit); }

/* ---- ranges -------------------------------------------------------------- */

static int check_range(const pm_bitmap *bm, uint64_t start, uint64_t count, const char *func)
{
    if (start > bm->nbits || count > bm->nbits - start)
        return pm_fail(func, PM_E_RANGE, "bits %llu+%llu are beyond the size %llu",
                       (unsigned long long)start, (unsigned long long)count,
                       (unsigned long long)bm->nbits);
    return 0;
}

/* Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64. */
static inline uint64_t span_mask(unsigned lo, unsigned hi)
{
    uint64_t upper = hi == 64 ? ~(uint64_t)0 : (((uint64_t)1 << hi) - 1);
    return upper & ~(((uint64_t)1 << lo) - 1);
}

static int64_t range_op(pm_bitmap *bm, uint64_t start, uint64_t count, int set)
{
    int64_t changed = 0;
    uint64_t end = start + count;
    while (start < end) {
        uint64_t w = start / 64;
        unsigned lo = (unsigned)(start % 64);
        unsigned hi = (end - w * 64) >= 64 ? 64 : (unsigned)(end - w * 64);
        uint64_t m = span_mask(lo, hi);
        uint64_t old = set ? word_or(bm, w, m) : word_andnot(bm, w, m);
        changed += __builtin_popcountll(set ? (~old & m) : (old & m));
        start = w * 64 + hi;
    }
    return changed;
}

int64_t pm_bitmap_set_range(pm_bitmap *bm, uint64_t start, uint64_t count)
{
    int rc = check_range(bm, start, count, __func__);
    return rc ? rc : range_op(bm, start, count, 1);
}

int64_t pm_bitmap_clear_range(pm_bitmap *bm, uint64_t start, uint64_t count)
{
    int rc = check_range(bm, start, count, __func__);
    return rc ? rc : range_op(bm, start, count, 0);
}

/* Whole-map fill and zero store each word that needs it (atomic per word,
 * as promised) with relaxed stores and no read-modify-write: a 16 Mi-bit
 * fill takes ~0.1 ms instead of ~1.2 ms of seq_cst stores.  The summary
 * protocol still holds: its ordering comes from the setters' and clearers'
 * seq_cst RMWs and from the seq_cst summary updates below, which follow a
 * full fence. */
int pm_bitmap_fill(pm_bitmap *bm)
{
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t full = w + 1 == bm->nwords ? tail_mask(bm) : ~(uint64_t)0;
        if (pm_load_relaxed(&bm->words[w]) != full)
            pm_store_relaxed(&bm->words[w], full);
    }
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t rem = bm->nwords % 64;
    for (uint64_t s = 0; s < bm->nsummary; s++) {
        uint64_t all = (s + 1 == bm->nsummary && rem) ? ((uint64_t)1 << rem) - 1 : ~(uint64_t)0;
        if (pm_load_relaxed(&bm->summary[s]) != all)
            pm_fetch_or(&bm->summary[s], all);
    }
    return 0;
}

int pm_bitmap_zero(pm_bitmap *bm)
{
    for (uint64_t s = 0; s < bm->nsummary; s++) {
        if (pm_load_relaxed(&bm->summary[s]) == 0)
            continue;   /* none of its 64 words can be non-zero */
        uint64_t end = (s + 1) * 64 < bm->nwords ? (s + 1) * 64 : bm->nwords;
        for (uint64_t w = s * 64; w < end; w++)
            if (pm_load_relaxed(&bm->words[w]) != 0)
                pm_store_relaxed(&bm->words[w], 0);
        atomic_thread_fence(memory_order_seq_cst);
        summary_clear_word_group(bm, s);
    }
    return 0;
}

/* ---- counting ------------------------------------------------------------ */

uint64_t pm_bitmap_count(const pm_bitmap *bm)
{
    return count_words(bm, 0, bm->nwords);
}

uint64_t pm_bitmap_count_range(const pm_bitmap *bm, uint64_t start, uint64_t count)
{
    if (start >= bm->nbits || count == 0)
        return 0;
    if (count > bm->nbits - start)
        count = bm->nbits - start;
    uint64_t end = start + count, total = 0;
    uint64_t w0 = start / 64, w1 = (end - 1) / 64;
    if (w0 == w1) {
        uint64_t m = span_mask((unsigned)(start % 64), (unsigned)(end - w0 * 64));
        return (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[w0]) & m);
    }
    total += (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[w0]) & span_mask((unsigned)(start % 64), 64));
    if (w1 > w0 + 1)
        total += count_words(bm, w0 + 1, w1 - w0 - 1);
    total += (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[w1]) & span_mask(0, (unsigned)(end - w1 * 64)));
    return total;
}

/* ---- scanning ------------------------------------------------------------ */

/* The first word index >= w whose summary bit is set, or nwords. */
static inline uint64_t next_marked_word(const pm_bitmap *bm, uint64_t w)
{
    while (w < bm->nwords) {
        uint64_t si = w / 64;
        uint64_t s = pm_load_acquire(&bm->summary[si]) & (~(uint64_t)0 << (w % 64));
        if (s)
            return si * 64 + (uint64_t)__builtin_ctzll(s);
        w = (si + 1) * 64;
    }
    return bm->nwords;
}

int64_t pm_bitmap_next_set(const pm_bitmap *bm, uint64_t from)
{
    if (from >= bm->nbits)
        return -1;
    uint64_t w = from / 64;
    /* The first word is masked below `from`; later ones are taken whole. */
    uint64_t x = pm_load_acquire(&bm->words[w]) & (~(uint64_t)0 << (from % 64));
    if (x)
        return (int64_t)(w * 64 + (uint64_t)__builtin_ctzll(x));
    for (w = next_marked_word(bm, w + 1); w < bm->nwords; w = next_marked_word(bm, w + 1)) {
        x = pm_load_acquire(&bm->words[w]);
        if (x)
            return (int64_t)(w * 64 + (uint64_t)__builtin_ctzll(x));
    }
    return -1;
}

int64_t pm_bitmap_next_clear(const pm_bitmap *bm, uint64_t from)
{
    if (from >= bm->nbits)
        return -1;
    uint64_t w = from / 64;
    uint64_t x = ~pm_load_acquire(&bm->words[w]) & (~(uint64_t)0 << (from % 64));
    for (;;) {
        if (w == bm->nwords - 1)
            x &= tail_mask(bm);
        if (x)
            return (int64_t)(w * 64 + (uint64_t)__builtin_ctzll(x));
        if (++w >= bm->nwords)
            return -1;
        x = ~pm_load_acquire(&bm->words[w]);
    }
}

int pm_bitmap_next_run(const pm_bitmap *bm, uint64_t from, uint64_t max_len,
                       uint64_t *start, uint64_t *len)
{
    if (max_len == 0)
        return PM_FAIL(-EINVAL, "max_len must be at least 1");
    int64_t s = pm_bitmap_next_set(bm, from);
    if (s < 0)
        return 0;
    uint64_t limit = (uint64_t)s + max_len;
    if (limit > bm->nbits || limit < (uint64_t)s)
        limit = bm->nbits;
    /* Extend while bits stay set: whole words at a time. */
    uint64_t pos = (uint64_t)s;
    while (pos < limit) {
        uint64_t w = pos / 64;
        uint64_t x = ~pm_load_acquire(&bm->words[w]) & (~(uint64_t)0 << (pos % 64));
        if (x) {
            uint64_t end = w * 64 + (uint64_t)__builtin_ctzll(x);
            if (end < limit)
                limit = end;
            break;
        }
        pos = (w + 1) * 64;
    }
    *start = (uint64_t)s;
    *len = limit - (uint64_t)s;
    return 1;
}

int64_t pm_bitmap_collect(const pm_bitmap *bm, uint64_t from, uint64_t *out, uint64_t max)
{
    if (from >= bm->nbits || max == 0)
        return 0;
    uint64_t n = 0, w = from / 64;
    uint64_t x = pm_load_acquire(&bm->words[w]) & (~(uint64_t)0 << (from % 64));
    for (;;) {
        while (x) {
            out[n++] = w * 64 + (uint64_t)__builtin_ctzll(x);
            if (n == max)
                return (int64_t)n;
            x &= x - 1;
        }
        w = next_marked_word(bm, w + 1);
        if (w >= bm->nwords)
            return (int64_t)n;
        x = pm_load_acquire(&bm->words[w]);
    }
}

/* ---- whole-map operations ------------------------------------------------ */

static int same_size(const pm_bitmap *a, const pm_bitmap *b, const char *func)
{
    if (a->nbits != b->nbits)
        return pm_fail(func, PM_E_GEOMETRY, "bitmaps differ in size (%llu and %llu bits)",
                       (unsigned long long)a->nbits, (unsigned long long)b->nbits);
    return 0;
}

int pm_bitmap_union(pm_bitmap *dst, const pm_bitmap *src)
{
    int rc = same_size(dst, src, __func__);
    if (rc)
        return rc;
    for (uint64_t w = next_marked_word(src, 0); w < src->nwords; w = next_marked_word(src, w + 1)) {
        uint64_t x = pm_load_acquire(&src->words[w]);
        if (x)
            word_or(dst, w, x);
    }
    return 0;
}

int pm_bitmap_intersect(pm_bitmap *dst, const pm_bitmap *src)
{
    int rc = same_size(dst, src, __func__);
    if (rc)
        return rc;
    for (uint64_t w = next_marked_word(dst, 0); w < dst->nwords; w = next_marked_word(dst, w + 1)) {
        uint64_t keep = pm_load_acquire(&src->words[w]);
        if (~keep & pm_load_relaxed(&dst->words[w]))
            word_andnot(dst, w, ~keep);
    }
    return 0;
}

int pm_bitmap_subtract(pm_bitmap *dst, const pm_bitmap *src)
{
    int rc = same_size(dst, src, __func__);
    if (rc)
        return rc;
    for (uint64_t w = next_marked_word(src, 0); w < src->nwords; w = next_marked_word(src, w + 1)) {
        uint64_t x = pm_load_acquire(&src->words[w]);
        if (x & pm_load_relaxed(&dst->words[w]))
            word_andnot(dst, w, x);
    }
    return 0;
}

int pm_bitmap_copy(pm_bitmap *dst, const pm_bitmap *src)
{
    int rc = same_size(dst, src, __func__);
    if (rc)
        return rc;
    for (uint64_t w = 0; w < dst->nwords; w++) {
        uint64_t x = pm_load_acquire(&src->words[w]);
        uint64_t old = pm_load_relaxed(&dst->words[w]);
        if (old & ~x)
            word_andnot(dst, w, old & ~x);
        if (x & ~old)
            word_or(dst, w, x);
    }
    return 0;
}

int pm_bitmap_equal(const pm_bitmap *a, const pm_bitmap *b)
{
    int rc = same_size(a, b, __func__);
    if (rc)
        return rc;
    for (uint64_t w = 0; w < a->nwords; w++)
        if (pm_load_acquire(&a->words[w]) != pm_load_acquire(&b->words[w]))
            return 0;
    return 1;
}

/* ---- serialisation ------------------------------------------------------- */

uint64_t pm_bitmap_serial_size(const pm_bitmap *bm) { return (bm->nbits + 7) / 8; }

int pm_bitmap_save(const pm_bitmap *bm, void *buf, uint64_t len)
{
    uint64_t need = pm_bitmap_serial_size(bm);
    if (len < need)
        return PM_FAIL(PM_E_GEOMETRY, "buffer of %llu bytes is smaller than the %llu needed",
                       (unsigned long long)len, (unsigned long long)need);
    unsigned char *p = buf;
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t x = pm_load_acquire(&bm->words[w]);
        for (unsigned b = 0; b < 8 && w * 8 + b < need; b++)
            p[w * 8 + b] = (unsigned char)(x >> (8 * b));
    }
    return 0;
}

int pm_bitmap_load(pm_bitmap *bm, const void *buf, uint64_t len)
{
    uint64_t need = pm_bitmap_serial_size(bm);
    if (len != need)
        return PM_FAIL(PM_E_GEOMETRY, "%llu bytes given, a %llu-bit map needs %llu",
                       (unsigned long long)len, (unsigned long long)bm->nbits, (unsigned long long)need);
    const unsigned char *p = buf;
    unsigned r = (unsigned)(bm->nbits % 8);
    if (r && (p[need - 1] >> r))
        return PM_FAIL(PM_E_CORRUPT, "bits are set past the size %llu", (unsigned long long)bm->nbits);
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t x = 0;
        for (unsigned b = 0; b < 8 && w * 8 + b < need; b++)
            x |= (uint64_t)p[w * 8 + b] << (8 * b);
        uint64_t old = pm_load_relaxed(&bm->words[w]);
        if (old & ~x)
            word_andnot(bm, w, old & ~x);
        if (x & ~old)
            word_or(bm, w, x);
    }
    return 0;
}

/* ---- checking ------------------------------------------------------------ */

int pm_bitmap_validate(const pm_bitmap *bm)
{
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t x = pm_load_relaxed(&bm->words[w]);
        int marked = (int)((pm_load_relaxed(&bm->summary[w / 64]) >> (w % 64)) & 1);
        if (x && !marked)
            return PM_FAIL(PM_E_CORRUPT, "word %llu is non-zero but its summary bit is clear",
                           (unsigned long long)w);
    }
    if (pm_load_relaxed(&bm->words[bm->nwords - 1]) & ~tail_mask(bm))
        return PM_FAIL(PM_E_CORRUPT, "bits are set past the size %llu", (unsigned long long)bm->nbits);
    uint64_t sw = bm->nwords % 64;
    if (sw && (pm_load_relaxed(&bm->summary[bm->nsummary - 1]) >> sw))
        return PM_FAIL(PM_E_CORRUPT, "summary bits are set past the last word");
    return 0;
}
