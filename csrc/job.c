/*
 * job.c - the rules of a copy job, each in one place: copy one span from
 * the source side to the target (with retries); clear a track's PENDING bit,
 * count it, and end the job when it was the last; the state a finished job
 * ends in; what a job's error does; how many mirror tracks are invalid.
 * A span's holes and zero tracks are zeroed on the target, not copied.
 *
 * Layer 5: may call meta.c (4), tracklock.c (3), bitmap.c/store.c (1) and
 * the layer-0 helpers.  Called by the copier (copier.c), the host I/O
 * arbitration (arbitrate.c) and the commands (pair.c, pair_open.c).
 *
 * Who ends a job: whoever clears the last PENDING bit (a copier, a hydrating
 * read, a whole-track or merging host write), or the command that finds
 * nothing to copy.  The state moves on under mu; the final commit is made
 * outside it (lock order: metadata lock, then mu), with `finishing` set so
 * that waiters wait for it.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "layout.h"

static int detach(pm_pair *p, int rc, uint64_t track, int unsynced, int ended_job);

int pm_job_done_state(int target, int protect)
{
    if (target == PM_MIRROR)
        return PM_STATE_ESTABLISHED;
    return protect ? PM_STATE_RESTORED : PM_STATE_ESTABLISHED;
}

void pm_job_end_locked(pm_pair *p)
{
    p->job_active = 0;
    p->error = 0;           /* host writes may have covered a track that had failed */
    p->error_track = -1;
    p->t_end = pm_now();
    if (p->target == PM_MIRROR) {
        pm_store_relaxed(&p->mirror_invalid, 0);   /* the mirror is a whole image again */
        p->detach_error = 0;                       /* ... repaired, if it was detached */
        p->detach_track = -1;
        p->detach_time_ns = 0;
    }
    pm_store_release(&p->state, pm_job_done_state(p->target, pm_load_relaxed(&p->protect)));
}

/* Tracks CHANGED on either side: what an incremental establish would copy. */
static uint64_t count_changed_either(pm_pair *p)
{
    const uint64_t *a = pm_bitmap_words(p->table[PM_STANDARD]->flags[PM_CHANGED]);
    const uint64_t *b = pm_bitmap_words(p->table[PM_MIRROR]->flags[PM_CHANGED]);
    uint64_t n = 0, words = pm_bitmap_nwords(p->table[PM_STANDARD]->flags[PM_CHANGED]);
    for (uint64_t i = 0; i < words; i++)   /* relaxed reads: a count of a moving table */
        n += (uint64_t)__builtin_popcountll(__atomic_load_n(&a[i], __ATOMIC_RELAXED) |
                                            __atomic_load_n(&b[i], __ATOMIC_RELAXED));
    return n;
}

uint64_t pm_job_mirror_invalid(pm_pair *p)
{
    int state = pm_load_acquire(&p->state);
    if (state == PM_STATE_SYNCING)
        return pm_bitmap_count(p->table[PM_MIRROR]->flags[PM_PENDING]);
    if (state == PM_STATE_DETACHED)        /* every track the mirror may lack */
        return count_changed_either(p);
    return pm_load_relaxed(&p->mirror_invalid);
}

void pm_job_finish(pm_pair *p)
{
    pthread_mutex_lock(&p->mu);
    int ended = p->job_active && pm_load_seqcst(&p->pending_left) == 0;
    int target = p->target;
    if (ended) {
        pm_job_end_locked(p);
        p->finishing = 1;       /* waiters wait for the commit below */
    }
    pthread_mutex_unlock(&p->mu);
    if (!ended)
        return;
    /* An establish's copies must be durable on the mirror before the pair
     * is recorded established; a mirror that fails that sync detaches
     * (fsync reports a writeback error only once, so the commit below
     * would not see it again) and the pair is recorded detached. */
    int rc = target == PM_MIRROR ? pm_store_flush(p->store[PM_MIRROR]) : 0;
    if (rc)
        detach(p, rc, UINT64_MAX, 1, 1);
    /* Data before state: the copied tracks are made durable by this commit
     * (meta.c flushes both stores before writing the tables). */
    pm_meta_commit(p->meta);
    pthread_mutex_lock(&p->mu);
    p->finishing = 0;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
}

int pm_job_clear_pending(pm_pair *p, int side, uint64_t t, pm_atomic_u64 *counter)
{
    /* seq_cst RMW after the data write: a reader that sees PENDING clear
     * (acquire) sees the data */
    if (pm_bitmap_test_and_clear(p->table[side]->flags[PM_PENDING], t) != 1)
        return 0;
    pm_count_add(counter, 1);
    pm_meta_dirty(p->meta);
    if (side == PM_STANDARD)
        pm_meta_std_cleared(p->meta);   /* host flushes commit fully until this is durable */
    if (pm_fetch_sub(&p->pending_left, 1) == 1)
        pm_job_finish(p);
    return 1;
}

/* ---- copying a span: data copied, holes and zeroes punched ----------------
 *
 * A span is copied extent by extent as the source describes itself
 * (pm_store_extents: SEEK_DATA/SEEK_HOLE on files; "all data" for block
 * devices, memory and stores without the call).  A hole or zero extent is
 * not read: the target's range is zeroed with PM_ZERO_PUNCH (a punched hole
 * on a file, a discard that guarantees zeroes or BLKZEROOUT on a block
 * device), so holes stay holes and cost no data I/O.  A data extent is
 * copied inside the kernel when allowed (its bytes never reach us, so
 * zeroes written as data are copied as data), else read into the buffer,
 * where each track's piece that reads as all zeroes is zeroed on the target
 * instead of written.  Counters: bytes_read (read from the source),
 * bytes_written (data written), bytes_zeroed (zeroed instead). */

/* Whether n bytes at b are all zero: the first 16, then the buffer against
 * itself shifted by 16 (memcmp runs at memory speed). */
static int all_zero(const unsigned char *b, uint64_t n)
{
    uint64_t head = n < 16 ? n : 16;
    for (uint64_t i = 0; i < head; i++)
        if (b[i] != 0)
            return 0;
    return n <= 16 || memcmp(b, b + 16, (size_t)(n - 16)) == 0;
}

/* Zero [off, off+len) of the target, unless the target says it already
 * reads as zeroes there (a hole: two lseeks instead of a journalled
 * fallocate; a sparse volume's restore is mostly this).  The caller holds
 * the tracks' locks, so no host write lands in the range meanwhile. */
static int zero_target(pm_pair *p, int target, uint64_t off, uint64_t len)
{
    struct pm_extent e;
    int rc = 0;
    if (pm_store_extents(p->store[target], off, len, &e, 1) == 1 && e.kind != PM_EXTENT_DATA &&
        e.offset == off && e.length >= len)
        rc = 0;
    else
        rc = pm_store_write_zeroes(p->store[target], len, off, PM_ZERO_PUNCH);
    if (rc == 0)
        pm_count_add(&p->bytes_zeroed, len);
    return rc;
}

/* [off, off+len) of data through b (which it fills with the bytes): runs
 * of track pieces that read as zeroes are zeroed, the others written. */
static int copy_buffered(pm_pair *p, int target, uint64_t off, uint64_t len, unsigned char *b)
{
    int rc = pm_store_read(p->store[1 - target], b, len, off);
    if (rc < 0)
        return rc;
    pm_count_add(&p->bytes_read, len);
    uint64_t pos = off, end = off + len;
    while (pos < end) {
        uint64_t run = pos;
        int zero = -1;
        while (run < end) {
            uint64_t next = ((run >> p->shift) + 1) << p->shift;
            uint64_t cend = next < end ? next : end;
            int z = all_zero(b + (run - off), cend - run);
            if (zero >= 0 && z != zero)
                break;
            zero = z;
            run = cend;
        }
        if (zero) {
            rc = zero_target(p, target, pos, run - pos);
        } else {
            rc = pm_store_write(p->store[target], b + (pos - off), run - pos, pos);
            if (rc == 0)
                pm_count_add(&p->bytes_written, run - pos);
        }
        if (rc < 0)
            return rc;
        pos = run;
    }
    return 0;
}

/* One attempt at [off, off+len).  fill: buf must hold the span's bytes
 * afterwards (a hydrating read serves from it), so no kernel copy. */
static int copy_span_once(pm_pair *p, int target, uint64_t off, uint64_t len, unsigned char *buf,
                          int kernel_ok, int fill)
{
    pm_store *src = p->store[1 - target];
    struct pm_extent ext[16];
    uint64_t pos = off, end = off + len;
    while (pos < end) {
        int64_t n = pm_store_extents(src, pos, end - pos, ext, 16);
        if (n <= 0) {                 /* the query failed: copy it as data (a read says why if it fails) */
            ext[0] = (struct pm_extent){ pos, end - pos, PM_EXTENT_DATA, 0 };
            n = 1;
        }
        for (int64_t i = 0; i < n && pos < end; i++) {
            if (ext[i].offset != pos || ext[i].length == 0)
                break;                /* not contiguous: ask again from pos */
            uint64_t elen = ext[i].length < end - pos ? ext[i].length : end - pos;
            int rc;
            if (ext[i].kind != PM_EXTENT_DATA) {
                rc = zero_target(p, target, pos, elen);
                if (fill)
                    memset(buf + (pos - off), 0, (size_t)elen);
            } else {
                rc = kernel_ok && !fill ? pm__store_copy_range(src, p->store[target], elen, pos) : PM__NO_KERNEL_COPY;
                if (rc == 0) {
                    pm_count_add(&p->bytes_read, elen);
                    pm_count_add(&p->bytes_written, elen);
                } else if (rc > 0) {
                    rc = copy_buffered(p, target, pos, elen, buf + (pos - off));
                }
            }
            if (rc < 0)
                return rc;
            pos += elen;
        }
    }
    return 0;
}

static int copy_span(pm_pair *p, int target, uint64_t off, uint64_t len, unsigned char *buf,
                     uint32_t retries, int kernel_ok, int fill)
{
    int rc = 0;
    for (uint32_t attempt = 0; attempt < retries; attempt++) {
        if (attempt)
            pm_sleep(0.001 * (double)(1u << (attempt < 8 ? attempt : 8)));
        /* The caller holds the tracks' locks (docs/copier.md). */
        rc = copy_span_once(p, target, off, len, buf, kernel_ok, fill);
        if (rc == 0)
            return 0;
    }
    return rc;
}

int pm_job_copy_span(pm_pair *p, int target, uint64_t off, uint64_t len, unsigned char *buf,
                     uint32_t retries, int kernel_ok)
{
    return copy_span(p, target, off, len, buf, retries, kernel_ok, 0);
}

int pm_job_copy_track_locked(pm_pair *p, uint64_t t, unsigned char *buf)
{
    pthread_mutex_lock(&p->mu);
    int target = p->target;
    uint32_t retries = p->cfg.retries;
    pthread_mutex_unlock(&p->mu);
    /* like a copier: the job's PENDING set is durable before a bit of it is cleared */
    int rc = pm_meta_changed_durable(p->meta);
    if (rc == 0)
        rc = copy_span(p, target, pm_track_off(p, t), pm_track_len(p, t), buf, retries, 0, 1);   /* the caller reads buf */
    if (rc == 0)
        pm_job_clear_pending(p, target, t, &p->tracks_copied);
    return rc;
}

static void *prefetch_first_main(void *arg)
{
    pm_pair *p = arg;
    int target = p->prefetch_target;        /* set before the thread was created */
    pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
    uint64_t want = PM_JOB_PREFETCH_FIRST >> p->shift ? PM_JOB_PREFETCH_FIRST >> p->shift : 1;
    uint64_t t = 0, s, n;
    while (want > 0 && t < p->tracks && !pm_load_relaxed(&p->stop) &&
           pm_bitmap_next_run(pending, t, want, &s, &n)) {
        pm__store_prefetch(p->store[1 - target], n << p->shift, pm_track_off(p, s));
        want -= n;
        t = s + n;
    }
    return NULL;
}

void pm_job_prefetch_join(pm_pair *p)
{
    pthread_mutex_lock(&p->mu);
    int running = p->prefetch_running;
    pthread_t th = p->prefetch_thread;
    p->prefetch_running = 0;
    pthread_mutex_unlock(&p->mu);
    if (running)
        pthread_join(th, NULL);
}

void pm_job_prefetch_first(pm_pair *p, int target)
{
    if (pm_load_relaxed(&p->rate) != 0)
        return;                     /* a rate limit would not read them soon */
    pm_job_prefetch_join(p);        /* an earlier job's, if it is still asking */
    pthread_mutex_lock(&p->mu);
    if (!p->prefetch_running) {     /* (another command may have started one meanwhile) */
        p->prefetch_target = target;
        p->prefetch_running = pthread_create(&p->prefetch_thread, NULL, prefetch_first_main, p) == 0;
    }
    pthread_mutex_unlock(&p->mu);
}

void pm_job_error(pm_pair *p, int rc, uint64_t track)
{
    pthread_mutex_lock(&p->mu);
    int first = p->error == 0;
    if (first) {
        p->error = rc;
        p->error_track = (int64_t)track;
    }
    pm_store_seqcst(&p->run, 0);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    if (first) {
        /* the metadata header records the error, so a reopened pair still
         * says why it stopped: a commit that syncs no data volume (the
         * failing one may fail its sync too, as a loop device over a full
         * filesystem does).  Callers may hold track locks: tracks ->
         * metadata -> mu. */
        pm_meta_dirty(p->meta);
        pm_meta_commit_records(p->meta);
    }
}

void pm_job_reopen(pm_pair *p, int state, int error, int64_t error_track)
{
    int target = state == PM_STATE_SYNCING ? PM_MIRROR : PM_STANDARD;
    uint64_t n = pm_bitmap_count(p->table[target]->flags[PM_PENDING]);
    p->target = target;
    p->job_active = 1;
    p->paused_req = 1;          /* resumes on request */
    p->t_start = pm_now();
    if (error != 0) {           /* it had stopped on an error: say so again */
        p->error = error;
        p->error_track = error_track;
    }
    pm_store_relaxed(&p->tracks_total, n);
    pm_store_seqcst(&p->pending_left, n);
    pm_store_release(&p->state, state);
    if (n == 0) {               /* committed just before it ended */
        p->paused_req = 0;
        pm_job_end_locked(p);
        pm_meta_dirty(p->meta);
    }
}

/* ---- a failing mirror (docs/states.md, "detached") ----------------------
 *
 * Why the CHANGED tables are enough to repair a detached mirror: since the
 * establish began (begin_job cleared CHANGED) every host write marked
 * CHANGED(standard), durably before its data (write-intent), so every
 * track a host write may have left different on the mirror is there.  What
 * the establish still had to copy is PENDING(mirror): it moves to
 * CHANGED(mirror).  Copies the copier finished are durable on the mirror
 * once the mirror is flushed; if that flush fails too, no copy since the
 * last good flush can be trusted and every track becomes CHANGED(mirror).
 * Then a full commit records the state, the tables and the record
 * together; it does not flush the mirror (meta.c), so the failing mirror
 * cannot fail it. */
int pm_job_detach(pm_pair *p, int rc, uint64_t track)
{
    return detach(p, rc, track, 0, 0);
}

/* unsynced: the mirror failed a sync, so nothing written to it since its
 * last good sync can be trusted (fsync reports a writeback error once).
 * ended_job: the establish that just ended (pm_job_finish) is the one the
 * detach ends, for pm_pair_wait. */
static int detach(pm_pair *p, int rc, uint64_t track, int unsynced, int ended_job)
{
    pm_meta_lock(p->meta);          /* no commit sees half of it */
    pthread_mutex_lock(&p->mu);
    int state = pm_pair_state(p);
    if (state != PM_STATE_SYNCING && state != PM_STATE_ESTABLISHED) {
        pthread_mutex_unlock(&p->mu);
        pm_meta_unlock(p->meta);
        return state == PM_STATE_DETACHED;
    }
    if (state == PM_STATE_SYNCING && p->job_active) {
        /* the establish ends here; copiers exit after their batch (their
         * PENDING clears then find nothing to clear) */
        p->job_active = 0;
        p->paused_req = 0;
        p->error = 0;
        p->error_track = -1;
        p->t_end = pm_now();
        p->detached_job = 1;
        pm_store_seqcst(&p->run, 0);
    }
    if (ended_job)
        p->detached_job = 1;
    p->detach_error = rc;
    p->detach_track = (int64_t)track;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    p->detach_time_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    /* release: host I/O that sees DETACHED writes the standard alone */
    pm_store_release(&p->state, PM_STATE_DETACHED);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    pm_bitmap *pending = p->table[PM_MIRROR]->flags[PM_PENDING];
    pm_bitmap *chg_mir = p->table[PM_MIRROR]->flags[PM_CHANGED];
    if (state == PM_STATE_SYNCING) {
        pm_bitmap_union(chg_mir, pending);
        pm_bitmap_zero(pending);
        pm_store_seqcst(&p->pending_left, 0);
        if (!unsynced && pm_store_flush(p->store[PM_MIRROR]) != 0)
            unsynced = 1;
    }
    if (unsynced)
        pm_bitmap_fill(chg_mir);
    pm_meta_dirty(p->meta);
    pm_meta_unlock(p->meta);
    pm_meta_commit(p->meta);        /* best effort: a close commits again */
    return 1;
}

int pm_job_restore_write_failed(pm_pair *p, int side, int rc, uint64_t track)
{
    pthread_mutex_lock(&p->mu);
    if (side == PM_MIRROR && p->target == PM_STANDARD)
        pm_store_relaxed(&p->protect, 1);   /* host writes go to the standard alone from now on */
    pthread_mutex_unlock(&p->mu);
    pm_job_error(p, rc, track);             /* pauses and commits (the first error) */
    if (side != PM_MIRROR)
        return rc;
    /* The write is on the standard: it succeeds once the protect flag is
     * durable (else an unclean reopen of an unprotected restore would copy
     * the mirror's older track over it). */
    pm_meta_dirty(p->meta);
    return pm_meta_commit(p->meta);
}
