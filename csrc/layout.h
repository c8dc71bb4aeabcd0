/*
 * layout.h - struct pm_pair, and the functions the pair's layers offer one
 * another (layer 3 header: tracklock.c and everything above it include it;
 * meta.c does not, it knows only its own handle, meta.h).
 *
 * The floors of csrc/, top to bottom (docs/layers.md; each .c file's first
 * comment names its layer, and csrc/tools/layers.py checks that every call
 * goes downwards):
 *   9 nbd_loop.c              the NBD transmission phase (calls pm_pair_*)
 *   8 pair_open.c             pairs from a metadata file: create, open, recover
 *   7 pair.c                  construction, the state machine, commands
 *   6 copier.c, arbitrate.c   the background copy | host I/O against it
 *   5 job.c                   copy a span, clear PENDING, end the job
 *   4 meta.c                  the metadata format and commit protocol
 *   3 tracklock.c, state.c    per-track locks | state names
 *   2 table.c, store_volatile.c, store_nbd.c, store_rbd.c, evict.c
 *   1 bitmap.c, store.c, store_uri.c, pace.c, heat.c, nbd_tls.c
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

#include "heat.h"
#include "internal.h"
#include "meta.h"
#include "pace.h"
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
    pm_atomic_int seq_users;     /* copiers reading the source as a stream (copier.c) */
    /* Stripes (copier.c): each copier copies one contiguous range of
     * tracks [cur, end) in order; one that runs out takes the upper half of
     * the largest range left.  Under stripe_mu; reset when the first copier
     * of a job starts. */
    pthread_mutex_t stripe_mu;
    int nstripes;                /* slots handed out */
    uint64_t stripe_free;        /* tracks [stripe_free, tracks) are in no stripe yet */
    struct pm_stripe { uint64_t cur, end; } stripes[PM_MAX_COPIERS];
    /* The run each copier has chosen and not yet finished, [s, e) (e == s:
     * none), under stripe_mu: a copier never picks (and pays the rate for)
     * a run another copier holds or is about to claim. */
    struct pm_resv { uint64_t s, e; } resv[PM_MAX_COPIERS];
    pm_atomic_u64 pending_left;  /* PENDING bits set on the target */
    /* Mirror tracks that are not part of a point-in-time image, outside
     * SYNCING (while syncing the live count of PENDING(mirror) is used):
     * set by a cancelled establish, cleared by a completed one, persisted
     * in the metadata header.  Written under mu. */
    pm_atomic_u64 mirror_invalid;
    double t_start, t_end;       /* monotonic seconds; t_end 0 while running */
    /* The detach record (job.c; under mu): the mirror's error that
     * detached the pair, the first track of the failed write, when (epoch
     * seconds).  detach_error 0: none.  Cleared when an establish completes. */
    int detach_error;
    int64_t detach_track;
    uint64_t detach_time_ns;
    int detached_job;            /* the job that was running ended by a detach (pm_pair_wait says so) */

    /* rate limit: a token bucket under rate_mu */
    pthread_mutex_t rate_mu;
    pm_atomic_u64 rate;
    double rate_next;            /* earliest time the next batch may start */

    /* Pacing (pace.c): host latency recorded by arbitrate.c; the controller
     * ticked by the copiers under pace_mu; its decisions published in
     * relaxed atomics the copiers read per batch. */
    struct pm_lat lat;
    pthread_mutex_t pace_mu;
    struct pm_pacer pacer;
    struct pm_pace_snap pace_snap;
    struct pm_pace_in pace_in;       /* scratch for a tick */
    double pace_tick_t;              /* when the controller last ran (under pace_mu) */
    pm_atomic_int pace_on;           /* cfg.pace == PM_PACE_AUTO for the current job */
    pm_atomic_u64 pace_rate;         /* bytes/s the pacing allows, 0 = full speed */
    pm_atomic_u64 quiet_until_ns;    /* copiers claim nothing before this (a quiet window) */
    pm_atomic_u64 pace_quiet;        /* quiet windows taken */
    /* Hot tracks first (heat.c): marked by arbitrate.c, taken by copier.c. */
    struct pm_heat heat;
    pm_atomic_int order;             /* cfg.order, for arbitrate.c (relaxed: a hint) */
    pm_atomic_u64 tracks_hot;

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

    /* ---- branch compare: a job that begins by comparing (pair_compare.c) ----
     * comparing and the thread's handle are under mu; the counters relaxed. */
    int comparing;               /* the compare phase runs: copiers start when it ends */
    int compare_thread_live;     /* compare_thread was started and not yet joined */
    pthread_t compare_thread;
    pm_atomic_int compare;       /* the current/last job began by comparing */
    pm_atomic_u64 tracks_compared, tracks_equal, compare_bytes;
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
void pm_job_pace_reset_locked(pm_pair *p);     /* a job's pacing and heat start afresh (mu held) */
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
/* A host write or flush failed on the mirror (rc) while the pair mirrors
 * (SYNCING or ESTABLISHED; called with cmd_lock held for reading, maybe
 * track locks): detach the mirror (job.c's rule, docs/states.md) and commit.
 * Returns 1 if the pair is detached now (by this call or an earlier one),
 * 0 if it was not mirroring (the caller then reports rc). */
int pm_job_detach(pm_pair *p, int rc, uint64_t track);
/* A host write failed during a restore (on the standard, or on the mirror
 * of an unprotected one): pause the job with the error; for the mirror,
 * stop mirroring host writes (the restore ends RESTORED) and return what
 * the host's write returns (0 once that is committed); else rc. */
int pm_job_restore_write_failed(pm_pair *p, int side, int rc, uint64_t track);

/* ---- branch compare: the pair's side of a compare job (pair.c, called by
 * pair_compare.c on layer 8).  pm_pair__establish/__restore are the
 * commands with an optional compare phase: with `compare_main` the job
 * begins with every track PENDING and that thread (given the pair) runs
 * instead of the copiers; it calls pm_pair__compare_done when it ends,
 * which starts the copiers unless the job is paused, failed or over. */
int pm_pair__establish(pm_pair *p, int incremental, const struct pm_copy_config *cfg,
                       void *(*compare_main)(void *));
int pm_pair__restore(pm_pair *p, int incremental, int protect, const struct pm_copy_config *cfg,
                     void *(*compare_main)(void *));
void pm_pair__compare_done(pm_pair *p);
/* Adopt: a NEW pair whose sides differ in `differ` goes to SPLIT with those
 * tracks CHANGED on both sides, committed.  PM_E_STATE if no longer NEW. */
int pm_pair__adopted(pm_pair *p, const pm_bitmap *differ);
/* arbitrate.c: pm_pair_read if all of it is in the page cache of a local
 * file, outside a restore: PM__READ_DONE; PM__READ_COLD if none of it is
 * (nothing read); -EAGAIN otherwise; no error said (the NBD loop's reader,
 * nbd_loop.c). */
#define PM__READ_DONE 0
#define PM__READ_COLD 1
int pm_pair__read_cached(pm_pair *p, int side, void *buf, uint64_t len, uint64_t offset);

#endif
