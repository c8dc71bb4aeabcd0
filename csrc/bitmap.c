/*
 * bitmap.c - bit-packed atomic bitmaps with a summary level.
 *
 * Layer 1 (with store.c): may call errors.c (0).
 *
 * LAYOUT.  Bit i lives in words[i / 64] at bit i % 64.  summary[w / 64] bit
 * w % 64 says "words[w] may be non-zero".  Both arrays are 64-byte aligned
 * (one cache line holds 8 words = 512 bits).  Bits past nbits, and summary
 * bits past nwords, are always zero.
 *
 * THE SUMMARY INVARIANT.  When no operation is in flight, words[w] != 0
 * implies summary bit w is set.  The converse need not hold: a set summary
 * bit over a zero word is a stale hint that costs a scan one extra load.
 *
 *   setter:  W: fetch_or(word, m)                 (seq_cst)
 *            R: load(summary)                     (seq_cst)
 *            M: if bit w was clear in R, fetch_or(summary, bit w)
 *   clearer: fetch_and(word, ~m); only if that left the word zero:
 *            C: fetch_and(summary, ~bit w)        (seq_cst)
 *            L: load(word)                        (seq_cst)
 *            M': if L saw a non-zero word, fetch_or(summary, bit w)
 *
 * Why this is enough.  All these operations are seq_cst, so they sit in one
 * total order S that agrees with each thread's program order, and a seq_cst
 * load returns the last modification before it in S (or a later one).
 * Suppose that at quiescence words[w] = x != 0 while summary bit w is clear.
 * Then the last modification of summary bit w is a clear C, by some clearer
 * K with re-load L (C < L in S); nothing set the bit after C.  Take any bit
 * of x; it was set by some setter's W and not cleared since, so every value
 * of the word from W on has it.
 *   - If W < L in S: L returns W's value or a later one: non-zero.  So K
 *     ran M' after C, which set the bit after C.  Contradiction.
 *   - If L < W in S: then C < L < W < R (R follows W in that setter's
 *     program order).  R returns C's value or a later one; C is the last
 *     change of bit w, so R sees it clear and the setter runs M after C.
 *     Contradiction.
 * Acquire/release cannot give this: both halves need a store followed by a
 * load of another location to stay in that order (store->load ordering).
 *
 * Whole-map fill and zero use relaxed word stores followed by one seq_cst
 * fence and then the same summary protocol; C11's fence rules (a seq_cst
 * fence orders the relaxed stores before it against seq_cst operations
 * after it in S) make the argument above go through unchanged.
 *
 * MEMORY ORDERS, one line each (the shim is in internal.h):
 *   - word and summary read-modify-writes: seq_cst (the protocol above);
 *     on x86-64 a locked RMW is a full barrier anyway, so seq_cst costs
 *     nothing over relaxed (LIMITS.md section 3).
 *   - get, scans, save: acquire loads, so a thread that sees a flag change
 *     also sees what its writer published before making it (the copier
 *     writes a track, then clears PENDING).
 *   - "is there anything to do" pre-checks before an RMW (range ops, fill,
 *     zero, copy, load): relaxed; the RMW that follows does the ordering,
 *     and a skipped RMW would not have changed the word.
 *   - count: relaxed (a statistic; each word is read at some instant).
 *
 * COMPLEXITY (n bits, W = n/64 words, k set bits).  Single-bit operations:
 * O(1), one or two atomic RMWs.  Ranges: O(words touched).  next_set,
 * next_run, collect and count: O(W/64 + words holding set bits), because a
 * zero summary word skips 64 words (4096 bits) at once; a 1 TiB volume at
 * 64 KiB tracks is 16 Mi bits = 256 Ki words = 4 Ki summary words (32 KiB).
 * next_clear: O(words scanned) (the summary cannot say "full").  Union,
 * subtract: O(summary + marked words of src); intersect: of dst.  Copy,
 * equal, save, load: O(W).
 *
 * POPCOUNT is chosen once at run time: AVX-512 VPOPCNTDQ, the POPCNT
 * instruction, or a portable bit trick.  Wheels are built without
 * -march=native; the fast versions are compiled with target attributes and
 * only called after __builtin_cpu_supports says the CPU has them.  The
 * environment variable PYMIRROR_POPCOUNT=portable|popcnt can force a slower
 * implementation (for benchmarks and tests); it is read once.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PM_X86 1
#include <immintrin.h>
#endif

#define ALL_ONES (~(uint64_t)0)

static inline uint64_t words_for(uint64_t nbits) { return (nbits + 63) / 64; }
static inline uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* Mask of the valid bits of the last word. */
static inline uint64_t tail_mask(const pm_bitmap *bm)
{
    unsigned r = (unsigned)(bm->nbits % 64);
    return r ? (((uint64_t)1 << r) - 1) : ALL_ONES;
}

/* Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64. */
static inline uint64_t span_mask(unsigned lo, unsigned hi)
{
    uint64_t upper = hi == 64 ? ALL_ONES : (((uint64_t)1 << hi) - 1);
    return upper & ~(((uint64_t)1 << lo) - 1);
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

__attribute__((target("avx512f,avx512vpopcntdq")))
static uint64_t popcount_avx512(const uint64_t *w, uint64_t n)
{
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    uint64_t i = 0;
    for (; i + 16 <= n; i += 16) {   /* two accumulators: two loads in flight */
        acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_loadu_si512((const void *)(w + i))));
        acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_loadu_si512((const void *)(w + i + 8))));
    }
    if (i + 8 <= n) {
        acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(_mm512_loadu_si512((const void *)(w + i))));
        i += 8;
    }
    if (i < n) {   /* 1..7 words left: a masked load reads only those */
        __mmask8 k = (__mmask8)((1u << (n - i)) - 1);
        acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(_mm512_maskz_loadu_epi64(k, (const void *)(w + i))));
    }
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1));
}
#endif

typedef uint64_t (*popcount_fn)(const uint64_t *, uint64_t);

struct popcount_choice {
    const char *name;
    popcount_fn fn;
    int (*supported)(void);
};

static int always(void) { return 1; }
#ifdef PM_X86
static int has_popcnt(void) { __builtin_cpu_init(); return __builtin_cpu_supports("popcnt"); }
static int has_avx512_popcnt(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
}
#endif

/* Best first. */
static const struct popcount_choice popcount_choices[] = {
#ifdef PM_X86
    { "avx512-vpopcntdq", popcount_avx512, has_avx512_popcnt },
    { "popcnt", popcount_popcnt, has_popcnt },
#endif
    { "portable", popcount_portable, always },
};
#define NCHOICES (sizeof popcount_choices / sizeof popcount_choices[0])

/* Index into popcount_choices, or -1 before the first use.  Racing first
 * callers compute the same answer, so a relaxed store is enough: the table
 * it indexes is constant. */
static pm_atomic_int popcount_chosen = -1;

static int choose_popcount(void)
{
    int c = pm_load_relaxed(&popcount_chosen);
    if (PM_LIKELY(c >= 0))
        return c;
    const char *force = getenv("PYMIRROR_POPCOUNT");
    int best = -1, forced = -1;
    for (int i = 0; i < (int)NCHOICES; i++) {
        if (!popcount_choices[i].supported())
            continue;
        if (best < 0)
            best = i;
        if (force != NULL && strcmp(force, popcount_choices[i].name) == 0)
            forced = i;
    }
    c = forced >= 0 ? forced : best;   /* an unknown or unsupported name: the best */
    pm_store_relaxed(&popcount_chosen, c);
    return c;
}

static inline uint64_t popcount_words(const uint64_t *w, uint64_t n)
{
    return popcount_choices[choose_popcount()].fn(w, n);
}

const char *pm_popcount_impl(void)
{
    return popcount_choices[choose_popcount()].name;
}

/* Test hook (not in the public header): count n words with the named
 * implementation; -1 if this build or CPU does not have it. */
int64_t pm__popcount_with(const char *name, const uint64_t *w, uint64_t n);
int64_t pm__popcount_with(const char *name, const uint64_t *w, uint64_t n)
{
    for (size_t i = 0; i < NCHOICES; i++)
        if (strcmp(name, popcount_choices[i].name) == 0)
            return popcount_choices[i].supported() ? (int64_t)popcount_choices[i].fn(w, n) : -1;
    return -1;
}

/* Count words [first, first+n).  Concurrent writers may change words during
 * the count; each word is then read at some instant, which is what a
 * statistic wants.  The vector versions read the _Atomic words through a
 * plain pointer (every load is a whole aligned word, which x86-64 makes
 * atomic, but the C model calls it a race), so ThreadSanitizer builds use
 * relaxed atomic loads instead. */
static uint64_t count_words(const pm_bitmap *bm, uint64_t first, uint64_t n)
{
#if defined(__SANITIZE_THREAD__)
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++)
        total += (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[first + i]));
    return total;
#else
    return popcount_words((const uint64_t *)(const void *)(bm->words + first), n);
#endif
}

/* ---- create / destroy ---------------------------------------------------- */

#define PM_BITMAP_MAX_BITS ((uint64_t)1 << 48)   /* 32 TiB of words: far past any table */

int pm_bitmap_create(uint64_t nbits, pm_bitmap **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    *out = NULL;
    if (nbits == 0)
        return PM_FAIL(-EINVAL, "a bitmap needs at least one bit (nbits is 0)");
    if (nbits > PM_BITMAP_MAX_BITS)
        return PM_FAIL(-EINVAL, "%llu bits is too many (at most 2^48)", (unsigned long long)nbits);
    pm_bitmap *bm = calloc(1, sizeof *bm);
    if (bm == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    bm->nbits = nbits;
    bm->nwords = words_for(nbits);
    bm->nsummary = words_for(bm->nwords);
    /* aligned_alloc wants a multiple of the alignment. */
    size_t wbytes = (size_t)((bm->nwords * 8 + 63) / 64 * 64);
    size_t sbytes = (size_t)((bm->nsummary * 8 + 63) / 64 * 64);
    bm->words = aligned_alloc(64, wbytes);
    bm->summary = aligned_alloc(64, sbytes);
    if (bm->words == NULL || bm->summary == NULL) {
        pm_bitmap_destroy(bm);
        return PM_FAIL(-ENOMEM, "out of memory for %llu bits", (unsigned long long)nbits);
    }
    /* No other thread can see the bitmap yet: plain zeroing is fine. */
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

/* ---- summary maintenance (the protocol in the file comment) -------------- */

/* R and M of a setter, after its W. */
static inline void summary_mark(pm_bitmap *bm, uint64_t w)
{
    pm_atomic_u64 *s = &bm->summary[w / 64];
    uint64_t m = (uint64_t)1 << (w % 64);
    if (!(pm_load_seqcst(s) & m))   /* R: seq_cst, see the proof */
        pm_fetch_or(s, m);          /* M */
}

/* Test hook (not in the public header; NULL except in csrc/tests): called
 * by a clearer that has just emptied word w, right before it clears the
 * summary bit.  That is the window in which a racing setter reads the
 * summary bit still set and skips marking it; a test's hook sets a bit
 * there to play that setter deterministically.  Costs one load and branch
 * on the rare path where a word turns zero. */
void (*pm__unmark_hook)(pm_bitmap *bm, uint64_t w);

/* C, L and M' of a clearer whose RMW left word w zero. */
static inline void summary_unmark(pm_bitmap *bm, uint64_t w)
{
    pm_atomic_u64 *s = &bm->summary[w / 64];
    uint64_t m = (uint64_t)1 << (w % 64);
    if (PM_UNLIKELY(pm__unmark_hook != NULL))
        pm__unmark_hook(bm, w);
    pm_fetch_and(s, ~m);                         /* C */
    if (pm_load_seqcst(&bm->words[w]) != 0)      /* L */
        pm_fetch_or(s, m);                       /* M' */
}

/* Clear summary word s as one C, then re-check each of its words (L, M'). */
static void summary_clear_group(pm_bitmap *bm, uint64_t s)
{
    uint64_t end = min_u64((s + 1) * 64, bm->nwords);
    if (PM_UNLIKELY(pm__unmark_hook != NULL))
        for (uint64_t w = s * 64; w < end; w++)
            pm__unmark_hook(bm, w);
    pm_store_seqcst(&bm->summary[s], 0);
    for (uint64_t w = s * 64; w < end; w++)
        if (pm_load_seqcst(&bm->words[w]) != 0)
            pm_fetch_or(&bm->summary[s], (uint64_t)1 << (w % 64));
}

/* OR mask into word w (W, then R/M); returns the old word. */
static inline uint64_t word_or(pm_bitmap *bm, uint64_t w, uint64_t mask)
{
    uint64_t old = pm_fetch_or(&bm->words[w], mask);
    summary_mark(bm, w);
    return old;
}

/* AND ~mask into word w; returns the old word.  Only the clearer that
 * turned the word from non-zero to zero runs the summary protocol. */
static inline uint64_t word_andnot(pm_bitmap *bm, uint64_t w, uint64_t mask)
{
    uint64_t old = pm_fetch_and(&bm->words[w], ~mask);
    if (old != 0 && (old & ~mask) == 0)
        summary_unmark(bm, w);
    return old;
}

/* Make word w equal x, atomically (one exchange), for copy and load.  An
 * exchange is a setter's W when x != 0 and a clearer's RMW when x == 0, so
 * it joins the summary protocol in that role. */
static inline void word_assign(pm_bitmap *bm, uint64_t w, uint64_t x)
{
    if (pm_load_relaxed(&bm->words[w]) == x)   /* pre-check: nothing to do */
        return;
    /* seq_cst, like every word RMW (file comment). */
    uint64_t old = atomic_exchange_explicit(&bm->words[w], x, memory_order_seq_cst);
    if (x != 0)
        summary_mark(bm, w);
    else if (old != 0)
        summary_unmark(bm, w);
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

/* set/clear are test_and_set/test_and_clear: the RMW returns the old value
 * for free, and both must be atomic anyway. */
int pm_bitmap_set(pm_bitmap *bm, uint64_t bit) { return pm_bitmap_test_and_set(bm, bit); }
int pm_bitmap_clear(pm_bitmap *bm, uint64_t bit) { return pm_bitmap_test_and_clear(bm, bit); }

/* ---- ranges -------------------------------------------------------------- */

/* start + count <= nbits, written so that it cannot overflow. */
static int check_range(const pm_bitmap *bm, uint64_t start, uint64_t count, const char *func)
{
    if (start > bm->nbits || count > bm->nbits - start)
        return pm_fail(func, PM_E_RANGE, "bits %llu+%llu are beyond the size %llu",
                       (unsigned long long)start, (unsigned long long)count,
                       (unsigned long long)bm->nbits);
    return 0;
}

/* Word at a time: the first and last words take a partial mask.  A word
 * whose masked bits already have the wanted value is skipped after a
 * relaxed pre-check (its RMW would change nothing).  Returns how many bits
 * changed: the popcount of the bits each RMW actually flipped. */
static int64_t range_op(pm_bitmap *bm, uint64_t start, uint64_t count, int set)
{
    int64_t changed = 0;
    uint64_t end = start + count;   /* checked: <= nbits */
    while (start < end) {
        uint64_t w = start / 64;
        unsigned lo = (unsigned)(start % 64);
        unsigned hi = (unsigned)min_u64(end - w * 64, 64);
        uint64_t m = span_mask(lo, hi);
        uint64_t cur = pm_load_relaxed(&bm->words[w]);
        if (set ? (~cur & m) : (cur & m)) {
            uint64_t old = set ? word_or(bm, w, m) : word_andnot(bm, w, m);
            changed += __builtin_popcountll(set ? (~old & m) : (old & m));
        }
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
 * fill takes ~0.1 ms instead of ~1.2 ms of locked RMWs.  The seq_cst fence
 * after the stores puts them in the summary protocol (file comment). */
int pm_bitmap_fill(pm_bitmap *bm)
{
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t full = w + 1 == bm->nwords ? tail_mask(bm) : ALL_ONES;
        if (pm_load_relaxed(&bm->words[w]) != full)
            pm_store_relaxed(&bm->words[w], full);
    }
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t rem = bm->nwords % 64;
    for (uint64_t s = 0; s < bm->nsummary; s++) {
        uint64_t all = (s + 1 == bm->nsummary && rem) ? ((uint64_t)1 << rem) - 1 : ALL_ONES;
        if (pm_load_relaxed(&bm->summary[s]) != all)   /* R (after the fence) */
            pm_fetch_or(&bm->summary[s], all);        /* M */
    }
    return 0;
}

int pm_bitmap_zero(pm_bitmap *bm)
{
    for (uint64_t s = 0; s < bm->nsummary; s++) {
        if (pm_load_relaxed(&bm->summary[s]) == 0)
            continue;   /* none of its 64 words was non-zero at quiescence */
        uint64_t end = min_u64((s + 1) * 64, bm->nwords);
        for (uint64_t w = s * 64; w < end; w++)
            if (pm_load_relaxed(&bm->words[w]) != 0)
                pm_store_relaxed(&bm->words[w], 0);
        atomic_thread_fence(memory_order_seq_cst);
        summary_clear_group(bm, s);
    }
    return 0;
}

/* ---- counting ------------------------------------------------------------ */

/* Set bits in words [a, b), guided by the summary: an empty group of 64
 * words is skipped, a group with a few marked words counts just those, and
 * runs of busier groups go to the dispatched bulk popcount in one call.
 * The body is compiled twice (below): with the POPCNT instruction where the
 * CPU has it, since its per-word popcounts are otherwise library calls. */
static inline __attribute__((always_inline))
uint64_t count_guided_body(const pm_bitmap *bm, uint64_t a, uint64_t b)
{
    uint64_t total = 0, bulk_from = 0, bulk_n = 0;
    while (a < b) {
        uint64_t s = a / 64, first = a, end = min_u64((s + 1) * 64, b);
        uint64_t marks = pm_load_relaxed(&bm->summary[s]) & span_mask((unsigned)(first % 64),
                                                                      (unsigned)(end - s * 64));
        a = end;
        if (__builtin_popcountll(marks) > 8) {   /* busy: join the bulk run */
            if (bulk_n == 0)
                bulk_from = first;
            bulk_n += end - first;
            continue;
        }
        if (bulk_n) {
            total += count_words(bm, bulk_from, bulk_n);
            bulk_n = 0;
        }
        for (; marks; marks &= marks - 1)
            total += (uint64_t)__builtin_popcountll(
                pm_load_relaxed(&bm->words[s * 64 + (uint64_t)__builtin_ctzll(marks)]));
    }
    if (bulk_n)
        total += count_words(bm, bulk_from, bulk_n);
    return total;
}

static uint64_t count_guided_portable(const pm_bitmap *bm, uint64_t a, uint64_t b)
{
    return count_guided_body(bm, a, b);
}

#ifdef PM_X86
__attribute__((target("popcnt")))
static uint64_t count_guided_popcnt(const pm_bitmap *bm, uint64_t a, uint64_t b)
{
    return count_guided_body(bm, a, b);
}
#endif

/* How many words of summary words [s0, s1) are marked (same caveats as
 * count_words). */
static uint64_t count_marks(const pm_bitmap *bm, uint64_t s0, uint64_t s1)
{
#if defined(__SANITIZE_THREAD__)
    uint64_t total = 0;
    for (uint64_t i = s0; i < s1; i++)
        total += (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->summary[i]));
    return total;
#else
    return popcount_words((const uint64_t *)(const void *)(bm->summary + s0), s1 - s0);
#endif
}

static uint64_t count_guided(const pm_bitmap *bm, uint64_t a, uint64_t b)
{
    /* A long range with many marked words: the bulk popcount alone is
     * faster than walking the summary (one look at the summary decides). */
    if (b - a >= 64 * 64 && count_marks(bm, a / 64, (b + 63) / 64) > (b - a) / 4)
        return count_words(bm, a, b - a);
#ifdef PM_X86
    if (popcount_choices[choose_popcount()].fn != popcount_portable)
        return count_guided_popcnt(bm, a, b);   /* every other choice implies POPCNT */
#endif
    return count_guided_portable(bm, a, b);
}

uint64_t pm_bitmap_count(const pm_bitmap *bm)
{
    return count_guided(bm, 0, bm->nwords);
}

/* Clamped to the size (the result cannot carry an error). */
uint64_t pm_bitmap_count_range(const pm_bitmap *bm, uint64_t start, uint64_t count)
{
    if (start >= bm->nbits || count == 0)
        return 0;
    count = min_u64(count, bm->nbits - start);
    uint64_t end = start + count;
    uint64_t w0 = start / 64, w1 = (end - 1) / 64;
    if (w0 == w1) {
        uint64_t m = span_mask((unsigned)(start % 64), (unsigned)(end - w0 * 64));
        return (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[w0]) & m);
    }
    uint64_t total = (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[w0]) &
                                                    span_mask((unsigned)(start % 64), 64));
    total += count_guided(bm, w0 + 1, w1);
    total += (uint64_t)__builtin_popcountll(pm_load_relaxed(&bm->words[w1]) &
                                            span_mask(0, (unsigned)(end - w1 * 64)));
    return total;
}

/* ---- scanning ------------------------------------------------------------ */

/* The first word index >= w whose summary bit is set, or nwords. */
static inline uint64_t next_marked_word(const pm_bitmap *bm, uint64_t w)
{
    while (w < bm->nwords) {
        uint64_t si = w / 64;
        uint64_t s = pm_load_acquire(&bm->summary[si]) & (ALL_ONES << (w % 64));
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
    /* The first word is read whatever its summary bit says (cheaper than
     * checking) and masked below `from`; later ones only where marked. */
    uint64_t x = pm_load_acquire(&bm->words[w]) & (ALL_ONES << (from % 64));
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
    uint64_t x = ~pm_load_acquire(&bm->words[w]) & (ALL_ONES << (from % 64));
    for (;;) {
        if (w == bm->nwords - 1)
            x &= tail_mask(bm);   /* the zero bits past the size are not "clear bits" */
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
    if (start == NULL || len == NULL)
        return PM_FAIL(-EINVAL, "start and len must not be NULL");
    if (max_len == 0)
        return PM_FAIL(-EINVAL, "max_len must be at least 1");
    int64_t s = pm_bitmap_next_set(bm, from);
    if (s < 0)
        return 0;
    uint64_t first = (uint64_t)s;
    uint64_t limit = first + min_u64(max_len, bm->nbits - first);   /* no overflow */
    /* Extend while bits stay set, a word at a time, across word boundaries. */
    uint64_t pos = first;
    while (pos < limit) {
        uint64_t w = pos / 64;
        uint64_t gaps = ~pm_load_acquire(&bm->words[w]) & (ALL_ONES << (pos % 64));
        if (gaps) {
            limit = min_u64(limit, w * 64 + (uint64_t)__builtin_ctzll(gaps));
            break;
        }
        pos = (w + 1) * 64;
    }
    *start = first;
    *len = limit - first;
    return 1;
}

int64_t pm_bitmap_collect(const pm_bitmap *bm, uint64_t from, uint64_t *out, uint64_t max)
{
    if (from >= bm->nbits || max == 0)
        return 0;
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL when max is %llu", (unsigned long long)max);
    if (max > INT64_MAX)
        max = INT64_MAX;
    uint64_t n = 0, w = from / 64;
    uint64_t x = pm_load_acquire(&bm->words[w]) & (ALL_ONES << (from % 64));
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
    if (a == NULL || b == NULL)
        return pm_fail(func, -EINVAL, "a bitmap argument is NULL");
    if (a->nbits != b->nbits)
        return pm_fail(func, PM_E_GEOMETRY, "bitmaps differ in size (%llu and %llu bits)",
                       (unsigned long long)a->nbits, (unsigned long long)b->nbits);
    return 0;
}

/* dst |= src: only src's marked words can contribute. */
int pm_bitmap_union(pm_bitmap *dst, const pm_bitmap *src)
{
    int rc = same_size(dst, src, __func__);
    if (rc)
        return rc;
    for (uint64_t w = next_marked_word(src, 0); w < src->nwords; w = next_marked_word(src, w + 1)) {
        uint64_t x = pm_load_acquire(&src->words[w]);
        if (x & ~pm_load_relaxed(&dst->words[w]))
            word_or(dst, w, x);
    }
    return 0;
}

/* dst &= src: only dst's marked words can lose bits. */
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

/* dst &= ~src: only src's marked words can remove bits. */
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
    if (dst == src)
        return 0;
    for (uint64_t w = 0; w < dst->nwords; w++)
        word_assign(dst, w, pm_load_acquire(&src->words[w]));
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

/* Byte j of the format holds bits 8j..8j+7, least significant bit first:
 * word w is bytes 8w..8w+7 in little-endian order, whatever the host's
 * order.  These helpers spell that out byte by byte; gcc and clang merge
 * them into one 8-byte load or store (plus a bswap on big-endian hosts). */
static inline void put_le64(unsigned char *p, uint64_t x)
{
    for (unsigned b = 0; b < 8; b++)
        p[b] = (unsigned char)(x >> (8 * b));
}

static inline uint64_t get_le64(const unsigned char *p)
{
    uint64_t x = 0;
    for (unsigned b = 0; b < 8; b++)
        x |= (uint64_t)p[b] << (8 * b);
    return x;
}

uint64_t pm_bitmap_serial_size(const pm_bitmap *bm) { return (bm->nbits + 7) / 8; }

int pm_bitmap_save(const pm_bitmap *bm, void *buf, uint64_t len)
{
    uint64_t need = pm_bitmap_serial_size(bm);
    if (buf == NULL)
        return PM_FAIL(-EINVAL, "buf must not be NULL");
    if (len < need)
        return PM_FAIL(PM_E_GEOMETRY, "a buffer of %llu bytes is smaller than the %llu a %llu-bit map needs",
                       (unsigned long long)len, (unsigned long long)need, (unsigned long long)bm->nbits);
    unsigned char *p = buf;
    uint64_t full = need / 8;   /* words that fill all 8 of their bytes */
    for (uint64_t w = 0; w < full; w++)
        put_le64(p + w * 8, pm_load_acquire(&bm->words[w]));
    if (full < bm->nwords) {   /* the last word's 1..7 bytes */
        uint64_t x = pm_load_acquire(&bm->words[full]);
        for (uint64_t j = full * 8; j < need; j++, x >>= 8)
            p[j] = (unsigned char)x;
    }
    return 0;
}

int pm_bitmap_load(pm_bitmap *bm, const void *buf, uint64_t len)
{
    uint64_t need = pm_bitmap_serial_size(bm);
    if (len != need)
        return PM_FAIL(PM_E_GEOMETRY, "%llu bytes given, a %llu-bit map needs %llu",
                       (unsigned long long)len, (unsigned long long)bm->nbits, (unsigned long long)need);
    if (buf == NULL)
        return PM_FAIL(-EINVAL, "buf must not be NULL");
    const unsigned char *p = buf;
    /* Validate everything before changing anything. */
    unsigned r = (unsigned)(bm->nbits % 8);
    if (r && (p[need - 1] >> r))
        return PM_FAIL(PM_E_CORRUPT, "bits are set past the size %llu (last byte 0x%02x)",
                       (unsigned long long)bm->nbits, p[need - 1]);
    uint64_t full = need / 8;
    for (uint64_t w = 0; w < full; w++)
        word_assign(bm, w, get_le64(p + w * 8));
    if (full < bm->nwords) {
        uint64_t x = 0;
        for (uint64_t j = need; j-- > full * 8;)
            x = (x << 8) | p[j];
        word_assign(bm, full, x);
    }
    return 0;
}

/* ---- checking ------------------------------------------------------------ */

int pm_bitmap_validate(const pm_bitmap *bm)
{
    if (bm == NULL)
        return PM_FAIL(-EINVAL, "bm must not be NULL");
    if (bm->nwords != words_for(bm->nbits) || bm->nsummary != words_for(bm->nwords))
        return PM_FAIL(PM_E_CORRUPT, "word counts %llu/%llu do not match the size %llu",
                       (unsigned long long)bm->nwords, (unsigned long long)bm->nsummary,
                       (unsigned long long)bm->nbits);
    if ((uintptr_t)bm->words % 64 != 0 || (uintptr_t)bm->summary % 64 != 0)
        return PM_FAIL(PM_E_CORRUPT, "the word arrays are not 64-byte aligned");
    for (uint64_t w = 0; w < bm->nwords; w++) {
        uint64_t x = pm_load_relaxed(&bm->words[w]);
        int marked = (int)((pm_load_relaxed(&bm->summary[w / 64]) >> (w % 64)) & 1);
        if (x && !marked)
            return PM_FAIL(PM_E_CORRUPT, "word %llu is non-zero (0x%016llx) but its summary bit is clear",
                           (unsigned long long)w, (unsigned long long)x);
    }
    if (pm_load_relaxed(&bm->words[bm->nwords - 1]) & ~tail_mask(bm))
        return PM_FAIL(PM_E_CORRUPT, "bits are set past the size %llu", (unsigned long long)bm->nbits);
    uint64_t sw = bm->nwords % 64;
    if (sw && (pm_load_relaxed(&bm->summary[bm->nsummary - 1]) >> sw))
        return PM_FAIL(PM_E_CORRUPT, "summary bits are set past the last word %llu",
                       (unsigned long long)(bm->nwords - 1));
    return 0;
}
