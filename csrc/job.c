/*
 * job.c - the rules of a copy job, each in one place: copy one span from
 * the source side to the target (with retries); clear a track's PENDING bit,
 * count it, and end the job when it was the last; the state a finished job
 * ends in; what a job's error does; how many mirror tracks are invalid.
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

#include "layout.h"

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
    if (p->target == PM_MIRROR)
        pm_store_relaxed(&p->mirror_invalid, 0);   /* the mirror is a whole image again */
    pm_store_release(&p->state, pm_job_done_state(p->target, pm_load_relaxed(&p->protect)));
}

uint64_t pm_job_mirror_invalid(pm_pair *p)
{
    if (pm_load_acquire(&p->state) == PM_STATE_SYNCING)
        return pm_bitmap_count(p->table[PM_MIRROR]->flags[PM_PENDING]);
    return pm_load_relaxed(&p->mirror_invalid);
}

void pm_job_finish(pm_pair *p)
{
    pthread_mutex_lock(&p->mu);
    int ended = p->job_active && pm_load_seqcst(&p->pending_left) == 0;
    if (ended) {
        pm_job_end_locked(p);
        p->finishing = 1;       /* waiters wait for the commit below */
    }
    pthread_mutex_unlock(&p->mu);
    if (!ended)
        return;
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
    if (pm_fetch_sub(&p->pending_left, 1) == 1)
        pm_job_finish(p);
    return 1;
}

int pm_job_copy_span(pm_pair *p, int target, uint64_t off, uint64_t len, unsigned char *buf,
                     uint32_t retries, int kernel_ok)
{
    int rc = 0;
    for (uint32_t attempt = 0; attempt < retries; attempt++) {
        if (attempt)
            pm_sleep(0.001 * (double)(1u << (attempt < 8 ? attempt : 8)));
        /* Two file stores: the kernel copies, no byte crosses user space.
         * The caller holds the tracks' locks either way (docs/copier.md). */
        rc = kernel_ok ? pm__store_copy_range(p->store[1 - target], p->store[target], len, off)
                       : PM__NO_KERNEL_COPY;
        if (rc == 0) {
            pm_count_add(&p->bytes_read, len);
            pm_count_add(&p->bytes_written, len);
            return 0;
        }
        if (rc < 0)
            continue;
        rc = pm_store_read(p->store[1 - target], buf, len, off);
        if (rc < 0)
            continue;
        pm_count_add(&p->bytes_read, len);
        rc = pm_store_write(p->store[target], buf, len, off);
        if (rc == 0) {
            pm_count_add(&p->bytes_written, len);
            return 0;
        }
    }
    return rc;
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
        rc = pm_job_copy_span(p, target, pm_track_off(p, t), pm_track_len(p, t), buf, retries, 0);   /* the caller reads buf */
    if (rc == 0)
        pm_job_clear_pending(p, target, t, &p->tracks_copied);
    return rc;
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
         * says why it stopped; best effort: a failing volume may fail the
         * commit too.  Callers may hold track locks: tracks -> metadata -> mu. */
        pm_meta_dirty(p->meta);
        pm_meta_commit(p->meta);
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
