/*
 * layout.h - struct pm_pair, and the functions the pair's layers offer one
 * another (layer 3 header: tracklock.c and everything above it include it;
 * meta.c does not, it knows only its own handle, meta.h).
 *
 * The floors of csrc/, top to bottom (docs/layers.md; each .c file's first
 * comment names its layer, and csrc/tools/layers.py checks that every call
 * goes downwards):
 *   8 pair_open.c             pairs from a metadata file: create, open, recover
 *   7 pair.c                  construction, the state machine, commands
 *   6 copier.c, arbitrate.c   the background copy | host I/O against it
 *   5 job.c                   copy a span, clear PENDING, end the job
 *   4 meta.c                  the metadata format and commit protocol
 *   3 tracklock.c, state.c    per-track locks | state names
 *   2 table.c, store_volatile.c
 *   1 bitmap.c, store.c
 *   0 errors.c, crc32c.c, clock.c
 *
 * Lock order (outer first): the I/O barrier (host writes and flushes pass
 * it first; pm_pair_hold_io closes it) -> cmd_lock (rwlock: commands write,
 * host I/O read) -> track locks (BUSY bits, ascending track order) ->
 * meta->lock -> mu (job state).  A thread holding the barrier may give
 * commands (they take cmd_lock) but must not write through the pair.
 * Copier threads never take cmd_lock and only try-lock tracks, so they
 * cannot deadlock with host I/O or commands.
 */
#ifndef PM_LAYOUT_H
#define PM_LAYOUT_H

#include <pthread.h>
#include <time.h>

#include "internal.h"
#include "meta.h"
#include "store.h"

#define PM_MAX_COPIERS 64
#define PM_LOCK_BUCKETS 64

struct pm_lock_bucket {
    pthread_mutex_t m;
    pthread_cond_t c;
    pm_atomic_int waiters;
} __attribute__((aligned(64)));

struct pm_pair {
    pm_store *store[2];          /* PM_STANDARD, PM_MIRROR (borrowed) */
    pm_table *table[2];
    pm_bitmap *busy;             /* track locks: the standard table's BUSY bitmap */
    uint64_t size, tracks;
    uint32_t track_size, shift, last_track_size;

    pthread_rwlock_t cmd_lock;
    /* The state: written under mu (and cmd_lock, or by the copier at the end
     * of a job) with release; host I/O reads it with acquire. */
    pm_atomic_int state;
    pm_atomic_int protect;       /* the current/last restore is protected */
    pm_atomic_int incremental;
    /* cfg.read_policy, mirrored for the read path: relaxed, it orders
     * nothing (a read racing a configure may use either policy) */
    pm_atomic_int read_policy;

    /* ---- the job (protected by mu unless atomic) ---- */
    pthread_mutex_t mu;
    pthread_cond_t cond;         /* job finished, paused, errored, resumed */
    struct pm_copy_config cfg;
    int target;                  /* side receiving copies while a job exists */
    int job_active;              /* a job exists (running or paused) */
    int finishing;               /* the job ended; its final commit is being made */
    int paused_req;              /* paused by request (or reopened mid-copy) */
    int error;                   /* the error that paused the job, or 0 */
    int64_t error_track;
    int nthreads;                /* copier threads started and not yet joined */
    pthread_t threads[PM_MAX_COPIERS];
    pm_atomic_int idle_waiters;  /* copiers waiting for claimable tracks */
    pm_atomic_u64 batches;       /* copier batches released (wakes idle copiers) */
    pm_atomic_int stop;          /* copiers must exit (destroy) */
    pm_atomic_int run;           /* 1 while copiers may copy (not paused, no error) */
    pm_atomic_u64 cursor;        /* where the next copier scan starts (outside stripes) */
    /* Stripes (copier.c): each copier copies one contiguous range of
     * tracks [cur, end) in order; one that runs out takes the upper half of
     * the largest range left.  Under stripe_mu; reset when the first copier
     * of a job starts. */
    pthread_mutex_t stripe_mu;
    int nstripes;                /* slots handed out */
    uint64_t stripe_free;        /* tracks [stripe_free, tracks) are in no stripe yet */
    struct pm_stripe { uint64_t cur, end; } stripes[PM_MAX_COPIERS];
    pm_atomic_u64 pending_left;  /* PENDING bits set on the target */
    /* Mirror tracks that are not part of a point-in-time image, outside
     * SYNCING (while syncing the live count of PENDING(mirror) is used):
     * set by a cancelled establish, cleared by a completed one, persisted
     * in the metadata header.  Written under mu. */
    pm_atomic_u64 mirror_invalid;
    double t_start, t_end;       /* monotonic seconds; t_end 0 while running */

    /* rate limit: a token bucket under rate_mu */
    pthread_mutex_t rate_mu;
    pm_atomic_u64 rate;
    double rate_next;            /* earliest time the next batch may start */

    /* counters: relaxed atomics, read without locks */
    pm_atomic_u64 tracks_total, tracks_copied, tracks_skipped, tracks_merged;
    pm_atomic_u64 reads_redirected, reads_hydrated, bytes_read, bytes_written;
    pm_atomic_u64 bytes_zeroed;  /* branch sparse: zeroed on the target instead of copied */
    /* branch sparse: the thread asking for a new job's first reads (job.c),
     * joined by the next one and at destroy; under mu */
    pthread_t prefetch_thread;
    int prefetch_running, prefetch_target;

    /* The I/O barrier (arbitrate.c): host writes/flushes in flight, and
     * holds.  A writer adds itself to io_inflight, then checks io_holds; a
     * holder adds to io_holds, then waits for io_inflight to drain (seq_cst
     * both ways, so one of the two sees the other).  io_mu/io_cond carry
     * the sleeps and wake-ups. */
    pthread_mutex_t io_mu;
    pthread_cond_t io_cond;
    pm_atomic_int io_holds;
    pm_atomic_i64 io_inflight;

    struct pm_lock_bucket buckets[PM_LOCK_BUCKETS];
    struct pm_meta *meta;        /* the metadata handle (without a store for a pair with no file) */
};

/* track locks (tracklock.c) */
void pm_tracklock_init(pm_pair *p);       /* after the tables exist */
void pm_tracklock_destroy(pm_pair *p);
void pm_track_lock(pm_pair *p, uint64_t t);
int pm_track_trylock(pm_pair *p, uint64_t t);
void pm_track_unlock(pm_pair *p, uint64_t t);

/* span of a track */
static inline uint64_t pm_track_off(const pm_pair *p, uint64_t t) { return t << p->shift; }
static inline uint32_t pm_track_len(const pm_pair *p, uint64_t t)
{
    return t == p->tracks - 1 ? p->last_track_size : p->track_size;
}

/* the copier threads (copier.c) */
int pm_job_start_threads_locked(pm_pair *p);   /* mu held */
void pm_job_join_threads(pm_pair *p);          /* mu not held */

/* the rules of a job (job.c) */
int pm_job_done_state(int target, int protect);   /* the state a finished job ends in */
void pm_job_end_locked(pm_pair *p);               /* end it now (mu held, or no threads yet) */
void pm_job_finish(pm_pair *p);                   /* end it if no track is PENDING */
/* Clear track t's PENDING bit on `side` after its data was written; if it
 * was set, count it in *counter and end the job when it was the last.
 * Returns 1 if it was set. */
int pm_job_clear_pending(pm_pair *p, int side, uint64_t t, pm_atomic_u64 *counter);
/* Copy [off, off+len) from the source side to `target`, with retries.
 * Holes of the source (its extents) and tracks that read as all zeroes are
 * zeroed on the target with PM_ZERO_PUNCH instead of written (job.c).
 * buf (at least len bytes) is scratch: its contents afterwards are
 * unspecified.  kernel_ok: two file stores may copy inside the kernel
 * (copy_file_range). */
int pm_job_copy_span(pm_pair *p, int target, uint64_t off, uint64_t len, unsigned char *buf,
                     uint32_t retries, int kernel_ok);
/* Copy one PENDING track now (its track lock held), for a hydrating read. */
int pm_job_copy_track_locked(pm_pair *p, uint64_t t, unsigned char *buf);
/* Ask the source to start reading the job's first PENDING tracks (up to
 * PM_JOB_PREFETCH_FIRST bytes of them, scattered or not), so their reads are
 * under way while the copiers commit the job's start (branch sparse: an
 * incremental job's scattered reads then cost almost nothing).  A hint,
 * given on a short-lived thread of its own (asking the kernel to read 8 MiB
 * takes milliseconds, which the command must not wait for); nothing when a
 * rate limit is set.  Call with no lock held.  pm_job_prefetch_join waits
 * for that thread (the next job's call and pm_pair_destroy make it). */
#define PM_JOB_PREFETCH_FIRST ((uint64_t)8 << 20)
void pm_job_prefetch_first(pm_pair *p, int target);
void pm_job_prefetch_join(pm_pair *p);
/* Pause the job on an error (the first one is kept) and commit it. */
void pm_job_error(pm_pair *p, int rc, uint64_t track);
/* Mirror tracks not part of a point-in-time image (see pm_pair_mirror_invalid). */
uint64_t pm_job_mirror_invalid(pm_pair *p);
/* A reopened pair that was syncing or restoring: its job, paused (with the
 * recorded error), from the PENDING tables; ended at once if none is left.
 * Before any thread runs. */
void pm_job_reopen(pm_pair *p, int state, int error, int64_t error_track);

#endif
