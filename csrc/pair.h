/*
 * pair.h - internal layout of a pair, shared by pair.c (state machine and
 * commands), copier.c (the background copy), arbitrate.c (host I/O and
 * track locks) and meta.c (persistence).
 *
 * Lock order (outer first): the I/O barrier (host writes and flushes pass
 * it first; pm_pair_hold_io closes it) -> cmd_lock (rwlock: commands write,
 * host I/O read) -> track locks (BUSY bits, ascending track order) ->
 * meta->lock -> mu (job state).  A thread holding the barrier may give
 * commands (they take cmd_lock) but must not write through the pair.  Copier threads never take cmd_lock and only try-lock
 * tracks, so they cannot deadlock with host I/O or commands.
 */
#ifndef PM_PAIR_H
#define PM_PAIR_H

#include <pthread.h>
#include <time.h>

#include "internal.h"
#include "store.h"

#define PM_MAX_COPIERS 64
#define PM_LOCK_BUCKETS 64

struct pm_lock_bucket {
    pthread_mutex_t m;
    pthread_cond_t c;
    pm_atomic_int waiters;
} __attribute__((aligned(64)));

struct pm_meta;

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
    pm_atomic_u64 cursor;        /* where the next copier scan starts */
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
    struct pm_meta *meta;        /* NULL for a pair without a metadata file */
};

/* The number of mirror tracks that are not part of a point-in-time image
 * (pair.c): PENDING(mirror) while syncing, else the persisted count. */
uint64_t pm_mirror_invalid_now(pm_pair *p);

double pm_now(void);                 /* CLOCK_MONOTONIC seconds */
/* An absolute time for pthread_cond_timedwait on p->cond (monotonic). */
struct timespec pm_deadline(double monotonic_seconds);

/* track locks (arbitrate.c) */
void pm_track_lock(pm_pair *p, uint64_t t);
int pm_track_trylock(pm_pair *p, uint64_t t);
void pm_track_unlock(pm_pair *p, uint64_t t);

/* span of a track */
static inline uint64_t pm_track_off(const pm_pair *p, uint64_t t) { return t << p->shift; }
static inline uint32_t pm_track_len(const pm_pair *p, uint64_t t)
{
    return t == p->tracks - 1 ? p->last_track_size : p->track_size;
}

/* job (copier.c) */
int pm_job_start_threads_locked(pm_pair *p);   /* mu held */
void pm_job_join_threads(pm_pair *p);          /* mu not held */
void pm_job_track_cleared(pm_pair *p);         /* a PENDING bit went 1 -> 0 */
/* Copy one PENDING track now (the track lock held), for a hydrating read:
 * buf receives the track's bytes. */
int pm_copy_track_locked(pm_pair *p, uint64_t t, unsigned char *buf);

/* persistence (meta.c); all are no-ops returning 0 when p->meta is NULL */
int pm_meta_commit_all(pm_pair *p);            /* tables + header, durable */
/* Note that the state changed and must reach the disk before data moves. */
void pm_meta_note(pm_pair *p);
/* Note a change that the next commit should carry, which nothing waits for
 * (a PENDING bit cleared). */
void pm_meta_dirty(pm_pair *p);
/* Write-intent for tracks t0..t1 of a side: sets their intent regions and
 * notes any region that was new.  Returns 1 if one was. */
int pm_meta_intent(pm_pair *p, int side, uint64_t t0, uint64_t t1);
/* CHANGED tables were cleared (split, job start): clear the intent regions
 * (the caller holds the metadata lock). */
void pm_meta_intent_reset_locked(pm_pair *p);
/* Commands hold the metadata lock while they change the tables and the
 * state, so a commit never snapshots half of a command. */
void pm_meta_lock(pm_pair *p);
void pm_meta_unlock(pm_pair *p);
/* The PENDING set was rebuilt (a job began): the next commit must be full. */
void pm_meta_need_full(pm_pair *p);
/* Block until everything noted so far is durable (group commit). */
int pm_meta_changed_durable(pm_pair *p);
/* Copier finished a batch: schedule a background commit. */
void pm_meta_copied(pm_pair *p, uint64_t ntracks);
void pm_meta_close(pm_pair *p);
void pm_meta_counters(pm_pair *p, uint64_t *commits, uint64_t *syncs);

#endif
