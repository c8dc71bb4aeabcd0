/*
 * copier.c - the copier threads of a job: claiming runs of PENDING tracks,
 * the rate limit, sleeping when nothing is claimable.
 *
 * Layer 6 (with arbitrate.c): may call job.c (5), meta.c (4), tracklock.c
 * (3), bitmap.c (1) and the layer-0 helpers; never arbitrate.c.
 *
 * Each copier thread loops: take the next run of PENDING tracks on the
 * target (at most batch_bytes) from its own stripe, a contiguous range of
 * tracks it walks in order (stripe_take: the first copier takes the whole
 * volume, each next one, or one whose stripe is used up, the upper half of
 * the largest stripe left); once no stripe of two batches is left, from a
 * shared cursor over the whole table (which also finds tracks skipped
 * because host I/O held them).  Then try-lock each track's BUSY bit in
 * ascending order (stopping at the first busy or no-longer-PENDING track:
 * a copier never waits while holding a track), ask the kernel to read the
 * next batches of the stripe ahead, copy the run (inside the kernel between
 * two files, else through its own buffer), start the run's write-back,
 * clear PENDING track by track and release the locks.  Buffers are bounded
 * by copiers x batch_bytes.  Measurements and choices: docs/copier.md.
 *
 * A failed read or write is retried (cfg.retries attempts, with backoff).
 * If a multi-track batch still fails, its tracks are retried one by one so
 * the error names the failing track; that track stays PENDING, the job
 * pauses with the error, and pm_pair_resume retries it.
 *
 * Copying a span, clearing PENDING and ending the job are job.c's: the
 * same steps serve hydrating reads and host writes.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "layout.h"

/* How far a copier asks the kernel to read ahead of its stream, in batches. */
#ifndef PM_PREFETCH_BATCHES
#define PM_PREFETCH_BATCHES 2
#endif

/* Wait until the rate limit allows `bytes` more: the time a batch costs is
 * paid before it is copied, so a low rate never begins with a burst.  The
 * wait sleeps on the job's condition variable, so pause, stop and a new rate
 * (pm_pair_set_rate broadcasts) end it at once.  Returns 0 to go on, or 1
 * if the job was paused or stopped meanwhile (the payment is then cancelled). */
static int rate_wait(pm_pair *p, uint64_t bytes)
{
    uint64_t rate = pm_load_relaxed(&p->rate);
    if (rate == 0)
        return 0;
    pthread_mutex_lock(&p->rate_mu);
    double now = pm_now();
    double start = p->rate_next > now ? p->rate_next : now;
    double until = start + (double)bytes / (double)rate;
    p->rate_next = until;
    pthread_mutex_unlock(&p->rate_mu);
    if (until <= now)
        return 0;
    int stopped = 0;
    struct timespec deadline = pm_deadline(until);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (pm_load_relaxed(&p->stop) || !pm_load_relaxed(&p->run) || !p->job_active) {
            stopped = 1;
            break;
        }
        if (pm_load_relaxed(&p->rate) != rate)
            break;                /* a new rate: go on at once, paying the new one from now */
        if (pm_now() >= until)
            break;
        pthread_cond_timedwait(&p->cond, &p->mu, &deadline);
    }
    pthread_mutex_unlock(&p->mu);
    if (stopped || pm_load_relaxed(&p->rate) != rate) {
        pthread_mutex_lock(&p->rate_mu);
        p->rate_next = 0;         /* the batch was not paid in full: no debt */
        pthread_mutex_unlock(&p->rate_mu);
    }
    return stopped;
}

/* Nothing can be claimed now: every PENDING track left is held by another
 * copier or by host I/O.  Sleep on the job's condition variable until a
 * copier releases a batch, the job changes (pause, end, stop), or a short
 * timeout passes (host I/O releasing a track does not signal; the timeout
 * doubles while nothing changes, up to 20 ms).  `seen` is the batch count
 * read before the scan that found nothing: a batch released since then
 * means there may be work again, so the wait is skipped.  No lost wake-up:
 * the waiter increments idle_waiters, then reads `batches`; a releaser
 * increments `batches`, then reads idle_waiters (all seq_cst), so one of
 * the two sees the other, and the broadcast is made under mu. */
static void wait_for_work(pm_pair *p, uint64_t seen, double *backoff)
{
    pthread_mutex_lock(&p->mu);
    pm_fetch_add(&p->idle_waiters, 1);
    if (pm_load_seqcst(&p->batches) == seen && p->job_active && !pm_load_relaxed(&p->stop) &&
        !p->paused_req && !p->error) {
        struct timespec deadline = pm_deadline(pm_now() + *backoff);
        pthread_cond_timedwait(&p->cond, &p->mu, &deadline);
    }
    pm_fetch_sub(&p->idle_waiters, 1);
    pthread_mutex_unlock(&p->mu);
    *backoff = *backoff * 2 > 0.02 ? 0.02 : *backoff * 2;
}

/* A copier released a batch of tracks: wake copiers waiting for work. */
static void batch_released(pm_pair *p)
{
    pm_fetch_add(&p->batches, 1);
    if (pm_load_seqcst(&p->idle_waiters) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Give back the rate credit of bytes paid for but not copied. */
static void rate_refund(pm_pair *p, uint64_t bytes)
{
    uint64_t rate = pm_load_relaxed(&p->rate);
    if (rate == 0 || bytes == 0)
        return;
    pthread_mutex_lock(&p->rate_mu);
    p->rate_next -= (double)bytes / (double)rate;
    pthread_mutex_unlock(&p->rate_mu);
}

/* Copy the run [s, s+k) whose tracks this thread holds. */
static void copy_run(pm_pair *p, int target, uint64_t s, uint64_t k, unsigned char *buf, uint32_t retries,
                     int kernel_ok)
{
    uint64_t off = pm_track_off(p, s);
    uint64_t end = s + k >= p->tracks ? p->size : pm_track_off(p, s + k);
    int rc = pm_job_copy_span(p, target, off, end - off, buf, retries, kernel_ok);
    if (rc == 0) {
        for (uint64_t t = s; t < s + k; t++)
            pm_job_clear_pending(p, target, t, &p->tracks_copied);
        return;
    }
    /* Find the failing track: copy one by one. */
    for (uint64_t t = s; t < s + k; t++) {
        rc = k == 1 ? rc : pm_job_copy_span(p, target, pm_track_off(p, t), pm_track_len(p, t), buf, retries, kernel_ok);
        if (rc < 0) {
            pm_job_error(p, rc, t);
            return;
        }
        pm_job_clear_pending(p, target, t, &p->tracks_copied);
    }
}

/* ---- stripes ---------------------------------------------------------- */

/* Give this copier a stripe: the tracks no copier has taken yet, else the
 * upper half of the largest stripe left (cut at a multiple of `align`
 * tracks), if that is at least two batches.  Returns 1 with [*cur, *end),
 * or 0: the copier then scans the whole table from the shared cursor. */
static int stripe_take(pm_pair *p, int *slot, uint64_t align, uint64_t *cur, uint64_t *end)
{
    pthread_mutex_lock(&p->stripe_mu);
    if (*slot < 0 && p->nstripes < PM_MAX_COPIERS)
        *slot = p->nstripes++;
    int got = 0;
    if (*slot >= 0) {
        struct pm_stripe *me = &p->stripes[*slot];
        me->cur = me->end = 0;             /* nobody cuts an exhausted stripe */
        if (p->stripe_free < p->tracks) {
            me->cur = p->stripe_free;
            me->end = p->tracks;
            p->stripe_free = p->tracks;
        } else {
            int best = -1;
            uint64_t most = 0;
            for (int j = 0; j < p->nstripes; j++) {
                uint64_t left = p->stripes[j].end - p->stripes[j].cur;
                if (j != *slot && left > most)
                    best = j, most = left;
            }
            if (best >= 0 && most >= 2 * align) {
                struct pm_stripe *v = &p->stripes[best];
                uint64_t mid = v->cur + most / 2;
                if (mid / align * align > v->cur)
                    mid = mid / align * align;
                me->cur = mid;
                me->end = v->end;
                v->end = mid;
            }
        }
        got = me->end > me->cur;
        *cur = me->cur;
        *end = me->end;
    }
    pthread_mutex_unlock(&p->stripe_mu);
    return got;
}

/* Reserve [s, s+*n) of this copier's stripe before claiming its tracks:
 * trims *n to the stripe's end (another copier may have cut it) and moves
 * the stripe's cursor past the run, so a cut never falls inside it.
 * Returns 0 if s is past the end: the stripe is used up. */
static int stripe_reserve(pm_pair *p, int slot, uint64_t s, uint64_t *n)
{
    pthread_mutex_lock(&p->stripe_mu);
    struct pm_stripe *me = &p->stripes[slot];
    int ok = s < me->end;
    if (ok) {
        if (*n > me->end - s)
            *n = me->end - s;
        me->cur = s + *n;
    }
    pthread_mutex_unlock(&p->stripe_mu);
    return ok;
}

/* The next run to claim: from this copier's stripe while it lasts (taking
 * a new one when it runs out), else from anywhere (the shared cursor):
 * tracks skipped because host I/O held them, and the last few batches.
 * Returns 1 with [*s, *s+*n), or 0 if no track is PENDING. */
static int next_run(pm_pair *p, pm_bitmap *pending, uint64_t max_tracks, int *slot, int *striped,
                    uint64_t *cur, uint64_t *end, uint64_t *s, uint64_t *n)
{
    while (*striped) {
        if (*cur < *end && pm_bitmap_next_run(pending, *cur, max_tracks, s, n) &&
            stripe_reserve(p, *slot, *s, n)) {
            *cur = *s + *n;
            return 1;
        }
        *striped = stripe_take(p, slot, max_tracks, cur, end);
    }
    uint64_t c = pm_load_relaxed(&p->cursor);
    return pm_bitmap_next_run(pending, c, max_tracks, s, n) ||
           (c != 0 && pm_bitmap_next_run(pending, 0, max_tracks, s, n));
}

/* Start reading the source ahead of a copier's stream: the next PENDING
 * tracks after the run it just claimed, `ahead` bytes of them, so the
 * device has the next reads queued while this batch is written (the
 * kernel's own readahead is per descriptor, and the copiers share one).
 * During a full copy those tracks are simply the next `ahead` bytes; during
 * an incremental one they are scattered, and asking for each PENDING run
 * (not for the bytes that follow the run, which nobody will copy) puts many
 * scattered reads in flight at once instead of one per copier (branch
 * sparse, issue 13 item 7).  *done is how far this copier has asked. */
static void prefetch(pm_pair *p, int target, uint64_t from, uint64_t ahead, uint64_t *done)
{
    if (ahead == 0 || from >= p->size)
        return;
    pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
    uint64_t t = from >> p->shift, want = ahead >> p->shift ? ahead >> p->shift : 1;
    uint64_t dt = *done >> p->shift, have = 0;
    if (*done < from || dt > p->tracks)
        dt = t;                             /* a new stream */
    else if (dt > t && (have = pm_bitmap_count_range(pending, t, dt - t)) > want)
        dt = t, have = 0;                   /* asked ahead of another stream (a stripe further on) */
    if (dt > t && have >= want / 2)
        return;                             /* asked recently: ask in large pieces */
    while (have < want && dt < p->tracks) {
        uint64_t s, n;
        if (!pm_bitmap_next_run(pending, dt, want - have, &s, &n)) {
            dt = p->tracks;
            break;
        }
        pm__store_prefetch(p->store[1 - target], n << p->shift, pm_track_off(p, s));
        have += n;
        dt = s + n;
    }
    *done = dt << p->shift;
}

static void *copier_main(void *arg)
{
    pm_pair *p = arg;
    pthread_mutex_lock(&p->mu);
    uint32_t batch_bytes = p->cfg.batch_bytes;
    pthread_mutex_unlock(&p->mu);
    unsigned char *buf = aligned_alloc(4096, (batch_bytes + 4095) / 4096 * 4096);
    if (buf == NULL) {
        pm_job_error(p, -ENOMEM, pm_load_relaxed(&p->cursor));
        return NULL;
    }
    /* The job's start must be durable before any data moves (a restore
     * returns before committing; see pair.c). */
    int rc = pm_meta_changed_durable(p->meta);
    if (rc < 0)
        pm_job_error(p, rc, 0);
    /* The kernel copy and write-behind won while the job fit in the page
     * cache's dirty budget (2 GiB of 24); at 8 GiB, writeback throttled
     * them and buffered I/O left to the kernel's writeback was faster
     * (docs/copier.md).  A job larger than 1/8 of memory takes that path. */
    uint64_t job_bytes = pm_load_relaxed(&p->tracks_total) << p->shift;
    long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
    int small_job = pages > 0 && page_size > 0 && job_bytes <= (uint64_t)pages * (uint64_t)page_size / 8;
    unsigned misses = 0;
    double backoff = 0.0005;
    int slot = -1, striped = 1;
    uint64_t scur = 0, send = 0, prefetched = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (!pm_load_relaxed(&p->stop) && p->job_active && (p->paused_req || p->error))
            pthread_cond_wait(&p->cond, &p->mu);
        int active = p->job_active && !pm_load_relaxed(&p->stop);
        int target = p->target;
        uint64_t max_tracks = p->cfg.batch_bytes >> p->shift;
        if (max_tracks > batch_bytes >> p->shift)
            max_tracks = batch_bytes >> p->shift;   /* never more than this thread's buffer */
        uint32_t retries = p->cfg.retries;
        uint64_t ahead = pm_load_relaxed(&p->rate) ? 0 : (uint64_t)p->cfg.batch_bytes * PM_PREFETCH_BATCHES;
        pthread_mutex_unlock(&p->mu);
        if (!active)
            break;

        pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
        uint64_t seen = pm_load_seqcst(&p->batches);
        uint64_t s, n;
        int from_stripe = striped;
        if (!next_run(p, pending, max_tracks, &slot, &striped, &scur, &send, &s, &n)) {
            if (pm_load_seqcst(&p->pending_left) == 0) {
                pm_job_finish(p);
                break;
            }
            wait_for_work(p, seen, &backoff);   /* the last tracks are held by others */
            continue;
        }
        from_stripe = from_stripe && striped;
        /* Pay for the run before claiming it, so no track is held while
         * the rate limit sleeps; what is not claimed is refunded. */
        if (rate_wait(p, n << p->shift))
            continue;
        uint64_t k = 0;
        while (k < n && pm_track_trylock(p, s + k)) {
            if (pm_bitmap_get(pending, s + k) != 1) {
                pm_track_unlock(p, s + k);
                break;
            }
            k++;
        }
        rate_refund(p, (n - k) << p->shift);
        if (k == 0) {
            /* held by host I/O or another copier: look further on, and
             * sleep once a pass finds nothing to claim */
            if (from_stripe)
                scur = s + 1;
            else
                pm_store_relaxed(&p->cursor, s + 1 < p->tracks ? s + 1 : 0);
            if (++misses >= 16) {
                misses = 0;
                wait_for_work(p, seen, &backoff);
            }
            continue;
        }
        misses = 0;
        backoff = 0.0005;
        if (from_stripe)
            scur = s + k;   /* tracks of the run not claimed: the shared scan finds them */
        else
            pm_store_relaxed(&p->cursor, s + k < p->tracks ? s + k : 0);
        prefetch(p, target, pm_track_off(p, s + k), ahead, &prefetched);
        copy_run(p, target, s, k, buf, retries, small_job);
        if (small_job)
            pm__store_write_behind(p->store[target], (k << p->shift), pm_track_off(p, s));
        for (uint64_t t = s; t < s + k; t++)
            pm_track_unlock(p, t);
        batch_released(p);
        pm_meta_copied(p->meta, k);
    }
    free(buf);
    return NULL;
}

int pm_job_start_threads_locked(pm_pair *p)
{
    pm_store_seqcst(&p->run, 1);
    if (p->nthreads == 0) {       /* no copier holds a stripe: start afresh */
        pthread_mutex_lock(&p->stripe_mu);
        p->nstripes = 0;
        p->stripe_free = 0;
        pthread_mutex_unlock(&p->stripe_mu);
    }
    uint32_t want = p->cfg.copiers;
    while ((uint32_t)p->nthreads < want) {
        int e = pthread_create(&p->threads[p->nthreads], NULL, copier_main, p);
        if (e != 0) {
            if (p->nthreads > 0)
                break;   /* run with fewer copiers */
            p->error = -e;
            p->error_track = -1;
            return PM_FAIL(-e, "cannot start a copier thread");
        }
        p->nthreads++;
    }
    return 0;
}

void pm_job_join_threads(pm_pair *p)
{
    pthread_t threads[PM_MAX_COPIERS];
    pthread_mutex_lock(&p->mu);
    int n = p->nthreads;
    memcpy(threads, p->threads, sizeof(pthread_t) * (size_t)n);
    p->nthreads = 0;
    if (n)
        pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
}
