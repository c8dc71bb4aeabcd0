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
