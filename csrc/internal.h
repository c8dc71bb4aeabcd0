/*
 * internal.h - shared by the csrc C files only; never installed, never seen by cffi.
 *
 * Holds the atomics shim (one comment per memory order), the error helpers
 * and the struct layouts that more than one .c file needs.
 */
#ifndef PM_INTERNAL_H
#define PM_INTERNAL_H

#include <stdatomic.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <errno.h>
#include <time.h>

#include "pymirror.h"

/* ---- atomics shim --------------------------------------------------------
 *
 * Memory orders used in the core, and why:
 *  - relaxed: statistics counters and hints that nothing else depends on
 *    (progress counters, the "maybe non-zero" pre-check before an RMW).
 *  - acquire (loads) / release (stores): publishing data through a flag,
 *    e.g. a copier writes the target track, then clears PENDING with release;
 *    a reader that sees PENDING clear (acquire) also sees the track's bytes.
 *  - seq_cst: the bitmap read-modify-writes and the summary-level protocol,
 *    where two threads each store to one location and then load the other
 *    (store-load ordering, which acquire/release does not give).  On x86-64
 *    every locked RMW is already a full barrier, so this costs nothing extra
 *    (measured in LIMITS.md section 3: relaxed and seq_cst fetch_or run at
 *    the same rate).
 */
typedef _Atomic uint64_t pm_atomic_u64;
typedef _Atomic int64_t pm_atomic_i64;
typedef _Atomic int pm_atomic_int;

#define pm_load_relaxed(p) atomic_load_explicit((p), memory_order_relaxed)
#define pm_load_acquire(p) atomic_load_explicit((p), memory_order_acquire)
#define pm_load_seqcst(p) atomic_load_explicit((p), memory_order_seq_cst)
#define pm_store_relaxed(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define pm_store_release(p, v) atomic_store_explicit((p), (v), memory_order_release)
#define pm_store_seqcst(p, v) atomic_store_explicit((p), (v), memory_order_seq_cst)
#define pm_fetch_or(p, v) atomic_fetch_or_explicit((p), (v), memory_order_seq_cst)
#define pm_fetch_and(p, v) atomic_fetch_and_explicit((p), (v), memory_order_seq_cst)
/* counters: relaxed, they order nothing */
#define pm_count_add(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
#define pm_fetch_add(p, v) atomic_fetch_add_explicit((p), (v), memory_order_seq_cst)
#define pm_fetch_sub(p, v) atomic_fetch_sub_explicit((p), (v), memory_order_seq_cst)

/* ---- errors --------------------------------------------------------------
 *
 * pm_fail(func, code, fmt, ...) records "func: message" as this thread's
 * last error and returns code, so a failure path reads
 *     return PM_FAIL(PM_E_RANGE, "bit %llu is beyond the size %llu", ...);
 */
int pm_fail(const char *func, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define PM_FAIL(code, ...) pm_fail(__func__, (code), __VA_ARGS__)
/* Clears this thread's message (called at the start of nothing: messages
 * are only meaningful after a failure). */
void pm_clear_error(void);

/* ---- clocks (clock.c) ---------------------------------------------------- */
double pm_now(void);                          /* CLOCK_MONOTONIC seconds */
struct timespec pm_deadline(double seconds);  /* for timed waits on monotonic condvars */
void pm_sleep(double seconds);                /* restarts after signals */

#define PM_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define PM_LIKELY(x) __builtin_expect(!!(x), 1)

/* ---- bitmap layout (bitmap.c; read by table.c and the pair) -------------- */
struct pm_bitmap {
    uint64_t nbits;
    uint64_t nwords;          /* ceil(nbits / 64) */
    uint64_t nsummary;        /* ceil(nwords / 64) */
    pm_atomic_u64 *words;     /* nwords, 64-byte aligned */
    pm_atomic_u64 *summary;   /* bit w set => words[w] may be non-zero;
                                 words[w] != 0 (when quiescent) => bit w set */
};

/* The table of one volume: geometry plus PM_NFLAGS bitmaps. */
struct pm_table {
    uint64_t volume_size;
    uint64_t tracks;
    uint32_t track_size;
    uint32_t track_shift;
    uint32_t last_track_size;
    pm_bitmap *flags[PM_NFLAGS];
};

#endif /* PM_INTERNAL_H */
