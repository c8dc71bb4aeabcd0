/*
 * copier.c - the copier threads of a job: claiming runs of PENDING tracks,
 * the rate limit, sleeping when nothing is claimable.
 *
 * Layer 6 (with arbitrate.c): may call job.c (5), meta.c (4), tracklock.c
 * (3), bitmap.c/store.c/pace.c/heat.c (1) and the layer-0 helpers; never
 * arbitrate.c.
 *
 * Issue 13: the run a copier chooses is reserved for it (resv[]) before it
 * pays the rate, so copiers never pay twice for one run and the rate is
 * exact with any number of them; with order hot, tracks the host used
 * while PENDING (heat.c) come first; the pacing controller (pace.c) is
 * ticked from here and sets a rate (and smaller runs) below the user's
 * cap, and asks for short quiet windows to learn the host's idle latency;
 * write-behind waits for the window before last, so the copy's dirty
 * pages stay bounded (two batches per copier).
 *
 * Each copier thread loops: take the next run of PENDING tracks on the
 * target (at most batch_bytes) from its own stripe, a contiguous range of
 * tracks it walks in order (stripe_take: the first copier takes the whole
 * volume, each next one, or one whose stripe is used up, the upper half of
 * the largest stripe left); once no stripe of two batches is left, from a
 * shared cursor over the whole table (which also finds tracks skipped
 * because host I/O held them).  Then try-lock each track's BUSY bit in
 * ascending order (stopping at the first busy or no-longer-PENDING track:
 * a copier never waits while holding a track), ask the kernel to read
 * scattered PENDING runs ahead (a stream's own continuation is left to the
 * kernel's read-ahead: the source is marked sequential during the job),
 * copy the run (inside the kernel between two files, else through its own
 * buffer), start the run's write-back, clear PENDING track by track and
 * release the locks; then drop the source pages the run brought into the
 * page cache, and the target pages of the run before once they are on the
 * device (evict.c), so a copy of any size keeps the cache small.  Buffers
 * are bounded by copiers x batch_bytes (plus a 19 KiB residency window per
 * copier).  Measurements and choices: docs/copier.md.
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

#include "evict.h"
#include "layout.h"

/* Write-behind: a copier waits until the run it copied this many runs ago
 * is on the device, so the copy leaves at most this many batches dirty per
 * copier (docs/copier.md). */
#ifndef PM_WB_WINDOWS
#define PM_WB_WINDOWS 1
#endif

/* A hot track's run: the track and at most a few after it.  A host's
 * working set is scattered; a full batch from each hot track would copy
 * mostly cold tracks before the next hot one (measured: 5 % of the tracks
 * hot, batch-long hot runs copied 80 % of the volume first). */
#ifndef PM_HOT_RUN_BYTES
#define PM_HOT_RUN_BYTES (256u << 10)
#endif

/* How far ahead a copier looks for scattered PENDING runs to ask the
 * kernel for, in batches. */
#ifndef PM_PREFETCH_BATCHES
#define PM_PREFETCH_BATCHES 2
#endif

/* The rate the copy may go now: the user's cap and the pacing's rate,
 * whichever is lower (0 = no limit). */
static uint64_t effective_rate(pm_pair *p)
{
    uint64_t cap = pm_load_acquire(&p->rate);
    uint64_t pace = pm_load_relaxed(&p->pace_on) ? pm_load_relaxed(&p->pace_rate) : 0;
    if (cap == 0)
        return pace;
    return pace == 0 || cap < pace ? cap : pace;
}

/* Sleep on the job's condition variable until `until` (pm_now seconds),
 * the job stops or pauses (returns 1), or, with cap != UINT64_MAX, the
 * user's rate changes from `cap` (pm_pair_set_rate broadcasts; returns 2). */
static int job_sleep(pm_pair *p, double until, uint64_t cap)
{
    int why = 0;
    struct timespec deadline = pm_deadline(until);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (pm_load_relaxed(&p->stop) || !pm_load_relaxed(&p->run) || !p->job_active) {
            why = 1;
            break;
        }
        if (cap != UINT64_MAX && pm_load_relaxed(&p->rate) != cap) {
            why = 2;
            break;
        }
        if (pm_now() >= until)
            break;
        pthread_cond_timedwait(&p->cond, &p->mu, &deadline);
    }
    pthread_mutex_unlock(&p->mu);
    return why;
}

/* Wait until the rate allows `bytes` more: the time a run costs is paid
 * before it is claimed, so a low rate never begins with a burst and no
 * track is held while the limit sleeps.  The run is this copier's alone
 * (reserved by next_run), so copiers never pay twice for one run: the
 * rate is exact with any number of copiers.  *paid is the rate paid at
 * (0: none).  Returns 0 to go on, or 1 if the job was paused or stopped
 * meanwhile (the payment is then cancelled). */
static int rate_wait(pm_pair *p, uint64_t bytes, uint64_t *paid)
{
    *paid = 0;
    uint64_t rate = effective_rate(p);
    if (rate == 0)
        return 0;
    uint64_t cap = pm_load_relaxed(&p->rate);
    pthread_mutex_lock(&p->rate_mu);
    double now = pm_now();
    double start = p->rate_next > now ? p->rate_next : now;
    double until = start + (double)bytes / (double)rate;
    p->rate_next = until;
    pthread_mutex_unlock(&p->rate_mu);
    *paid = rate;
    if (until <= now)
        return 0;
    int why = job_sleep(p, until, cap);
    if (why) {
        pthread_mutex_lock(&p->rate_mu);
        p->rate_next = 0;         /* the run was not paid in full: no debt */
        pthread_mutex_unlock(&p->rate_mu);
        *paid = 0;                /* a new cap: go on at once, paying the new one from now */
    }
    return why == 1;
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

/* Give back the rate credit of bytes paid for (at `rate`) but not copied. */
static void rate_refund(pm_pair *p, uint64_t rate, uint64_t bytes)
{
    if (rate == 0 || bytes == 0)
        return;
    pthread_mutex_lock(&p->rate_mu);
    p->rate_next -= (double)bytes / (double)rate;
    pthread_mutex_unlock(&p->rate_mu);
}

/* Copy the run [s, s+k) whose tracks this thread holds. */
static void copy_run(pm_pair *p, int target, uint64_t s, uint64_t k, unsigned char *buf, uint32_t retries)
{
    uint64_t off = pm_track_off(p, s);
    uint64_t end = s + k >= p->tracks ? p->size : pm_track_off(p, s + k);
    int rc = pm_job_copy_span(p, target, off, end - off, buf, retries, 1);
    if (rc == 0) {
        for (uint64_t t = s; t < s + k; t++)
            pm_job_clear_pending(p, target, t, &p->tracks_copied);
        return;
    }
    /* Find the failing track: copy one by one. */
    for (uint64_t t = s; t < s + k; t++) {
        rc = k == 1 ? rc : pm_job_copy_span(p, target, pm_track_off(p, t), pm_track_len(p, t), buf, retries, 1);
        if (rc < 0) {
            pm_job_error(p, rc, t);
            return;
        }
        pm_job_clear_pending(p, target, t, &p->tracks_copied);
    }
}

/* ---- choosing a run: hot tracks, stripes, the shared cursor ----------------
 *
 * All under stripe_mu.  Each copier records the run it chose in resv[slot]
 * until its batch is done; no copier chooses a run that overlaps another's
 * (it skips past it, or stops its run before it), so a run is paid for by
 * one copier only. */

/* Another copier's run overlapping [s, s + *n): returns the end of one
 * that covers s (the caller looks past it), else 0, with *n trimmed so
 * the run stops before any that begins inside it. */
static uint64_t resv_conflict(pm_pair *p, int slot, uint64_t s, uint64_t *n)
{
    for (int j = 0; j < p->nstripes; j++) {
        const struct pm_resv *r = &p->resv[j];
        if (j == slot || r->e <= r->s)
            continue;
        if (r->s <= s && s < r->e)
            return r->e;
        if (s < r->s && r->s < s + *n)
            *n = r->s - s;
    }
    return 0;
}

/* Give this copier a stripe: the tracks no copier has taken yet, else the
 * upper half of the largest stripe left (cut at a multiple of `align`
 * tracks), if that is at least two batches.  Returns 1 with [*cur, *end),
 * or 0: the copier then scans the whole table from the shared cursor.
 * stripe_mu held; the slot was given when the copier started. */
static int stripe_take_locked(pm_pair *p, int slot, uint64_t align, uint64_t *cur, uint64_t *end)
{
    struct pm_stripe *me = &p->stripes[slot];
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
            if (j != slot && left > most)
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
    *cur = me->cur;
    *end = me->end;
    return me->end > me->cur;
}

/* A copier's view of where it copies. */
struct walker {
    int slot;               /* its index in stripes[] and resv[] */
    int striped;            /* 1 while it has a stripe */
    uint64_t cur, end;      /* its stripe, as it last saw it */
    int from;               /* where the last run came from: FROM_* */
};
enum { FROM_HOT, FROM_STRIPE, FROM_SHARED };

static void walker_start(pm_pair *p, struct walker *w)
{
    pthread_mutex_lock(&p->stripe_mu);
    w->slot = p->nstripes < PM_MAX_COPIERS ? p->nstripes++ : PM_MAX_COPIERS - 1;
    p->resv[w->slot].s = p->resv[w->slot].e = 0;
    p->stripes[w->slot].cur = p->stripes[w->slot].end = 0;
    pthread_mutex_unlock(&p->stripe_mu);
    w->striped = 1;
    w->cur = w->end = 0;
}

/* The run is done (copied, or given up): others may take its tracks. */
static void resv_release(pm_pair *p, const struct walker *w)
{
    pthread_mutex_lock(&p->stripe_mu);
    p->resv[w->slot].s = p->resv[w->slot].e = 0;
    pthread_mutex_unlock(&p->stripe_mu);
}

/* A hot track (heat.c) still PENDING and not in another copier's run:
 * the run from it.  The heat queue is bounded, and a mark is a hint. */
static int hot_run(pm_pair *p, pm_bitmap *pending, uint64_t max_tracks, int slot, uint64_t *s, uint64_t *n)
{
    uint64_t t, hot_max = (PM_HOT_RUN_BYTES >> p->shift) ? (PM_HOT_RUN_BYTES >> p->shift) : 1;
    if (hot_max > max_tracks)
        hot_max = max_tracks;
    for (int tries = 0; tries < 64 && pm_heat_pop(&p->heat, &t); tries++) {
        if (t >= p->tracks || pm_bitmap_get(pending, t) != 1)
            continue;                       /* copied meanwhile */
        if (!pm_bitmap_next_run(pending, t, hot_max, s, n) || *s != t)
            continue;
        if (resv_conflict(p, slot, *s, n) == 0)
            return 1;
    }
    return 0;
}

/* The next run to claim, reserved for this copier: a hot track's (order
 * hot), else from its stripe while it lasts (taking a new one when it runs
 * out), else from anywhere (the shared cursor: tracks skipped because host
 * I/O held them, and the last few batches).  Returns 1 with [*s, *s+*n),
 * or 0 if no PENDING track is free to choose. */
static int next_run(pm_pair *p, pm_bitmap *pending, uint64_t max_tracks, int hot, struct walker *w,
                    uint64_t *s, uint64_t *n)
{
    int got = 0;
    pthread_mutex_lock(&p->stripe_mu);
    if (hot && hot_run(p, pending, max_tracks, w->slot, s, n)) {
        w->from = FROM_HOT;
        got = 1;
    }
    while (!got && w->striped) {
        struct pm_stripe *me = &p->stripes[w->slot];
        if (w->cur < me->end && pm_bitmap_next_run(pending, w->cur, max_tracks, s, n) && *s < me->end) {
            if (*n > me->end - *s)
                *n = me->end - *s;    /* another copier cut the stripe */
            uint64_t past = resv_conflict(p, w->slot, *s, n);
            if (past) {
                w->cur = past;
                continue;
            }
            me->cur = *s + *n;        /* a cut never falls inside the run */
            w->cur = *s + *n;
            w->from = FROM_STRIPE;
            got = 1;
            break;
        }
        w->striped = stripe_take_locked(p, w->slot, max_tracks, &w->cur, &w->end);
    }
    if (!got) {
        uint64_t c = pm_load_relaxed(&p->cursor);
        int wrapped = c == 0;
        for (;;) {
            if (c >= p->tracks || !pm_bitmap_next_run(pending, c, max_tracks, s, n)) {
                if (wrapped)
                    break;
                wrapped = 1, c = 0;
                continue;
            }
            uint64_t past = resv_conflict(p, w->slot, *s, n);
            if (past) {
                c = past;
                continue;
            }
            pm_store_relaxed(&p->cursor, *s + *n < p->tracks ? *s + *n : 0);
            w->from = FROM_SHARED;
            got = 1;
            break;
        }
    }
    if (got) {
        p->resv[w->slot].s = *s;
        p->resv[w->slot].e = *s + *n;
    }
    pthread_mutex_unlock(&p->stripe_mu);
    return got;
}

/* Start reading the source ahead of a copier's stream: the next PENDING
 * tracks after the run it just claimed, `ahead` bytes of them, so the
 * device has the next reads queued while this batch is written.  During
 * a full copy those tracks simply continue the stream, and the kernel's
 * read-ahead reads them (nothing is asked: the hint made the copy slower,
 * docs/copier.md); during an incremental one they are scattered, and asking
 * for each PENDING run after a gap (not for the bytes that follow the run,
 * which nobody will copy) puts many scattered reads in flight at once
 * instead of one per copier (branch sparse, issue 13 item 7).  *done is how
 * far this copier has looked. */
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
        /* The tracks right after the run being copied continue its stream:
         * the kernel reads them ahead on its own (the source is marked
         * sequential), and a hint there made the copy slower (measured:
         * docs/copier.md, "Large copies"); only scattered runs are asked. */
        if (s != t)
            pm__store_prefetch(p->store[1 - target], n << p->shift, pm_track_off(p, s));
        have += n;
        dt = s + n;
    }
    *done = dt << p->shift;
}

/* ---- pacing ------------------------------------------------------------ */

void pm_job_pace_reset_locked(pm_pair *p)
{
    int on = p->cfg.pace == PM_PACE_AUTO;
    uint32_t milli = p->cfg.latency_factor_milli ? p->cfg.latency_factor_milli : 2000;
    pthread_mutex_lock(&p->pace_mu);       /* order: mu, then pace_mu */
    pm_pace_restart(&p->pacer, milli / 1000.0, p->cfg.latency_target_ns);
    p->pace_tick_t = 0;
    pthread_mutex_unlock(&p->pace_mu);
    pm_store_relaxed(&p->pace_rate, 0);
    pm_store_relaxed(&p->quiet_until_ns, 0);
    pm_store_relaxed(&p->pace_on, on);
    pm_store_relaxed(&p->order, p->cfg.order);
    pm_heat_reset(&p->heat);
}

/* Run the controller (pace.c) at most every 50 ms, from whichever copier
 * comes by first; publish its rate and any quiet window it asks for. */
#define PACE_TICK_S 0.05
static void pace_tick(pm_pair *p)
{
    if (!pm_load_relaxed(&p->pace_on) || pthread_mutex_trylock(&p->pace_mu) != 0)
        return;
    double now = pm_now();
    if (now - p->pace_tick_t >= PACE_TICK_S) {
        double quiet_before = p->pacer.quiet_until;
        p->pace_tick_t = now;
        pm_pace_tick(&p->pacer, &p->lat, &p->pace_snap, &p->pace_in, now, pm_load_relaxed(&p->bytes_written));
        pm_store_relaxed(&p->pace_rate, (uint64_t)p->pacer.rate);
        if (p->pacer.quiet_until > now && p->pacer.quiet_until != quiet_before) {
            pm_store_relaxed(&p->quiet_until_ns, (uint64_t)(p->pacer.quiet_until * 1e9));
            pm_count_add(&p->pace_quiet, 1);
        }
    }
    pthread_mutex_unlock(&p->pace_mu);
}

/* The largest run under pacing: about 25 ms of copy at the paced rate, so
 * a paced copy holds tracks and the device in small pieces. */
static uint64_t paced_tracks(pm_pair *p, uint64_t max_tracks)
{
    uint64_t pr = pm_load_relaxed(&p->pace_on) ? pm_load_relaxed(&p->pace_rate) : 0;
    if (pr == 0)
        return max_tracks;
    uint64_t t = (pr / 40) >> p->shift;
    return t < 1 ? 1 : (t < max_tracks ? t : max_tracks);
}

static void *copier_main(void *arg)
{
    pm_pair *p = arg;
    pthread_mutex_lock(&p->mu);
    uint32_t batch_bytes = p->cfg.batch_bytes;
    int target0 = p->target;     /* a copier serves one job: its source is fixed */
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
    /* Large copies (docs/copier.md): the source is read as a sequential
     * stream (the kernel's read-ahead, doubled), and a copier drops from
     * the page cache what it brought in once it is copied and on the device. */
    pm_store *src = p->store[1 - target0];
    if (pm_fetch_add(&p->seq_users, 1) == 0)
        pm__store_sequential(src, 1);
    struct pm_evict ev;
    int evicting = pm_evict_init(&ev, src, batch_bytes) == 0 && ev.active;
    unsigned misses = 0;
    double backoff = 0.0005;
    struct walker w;
    walker_start(p, &w);
    uint64_t prefetched = 0;
    /* write-behind in windows: the run copied PM_WB_WINDOWS runs ago must be
     * on the device before this copier goes on (docs/copier.md, bounded
     * dirty data) */
    int wb_target = -1;
    uint64_t wb_off[PM_WB_WINDOWS] = { 0 }, wb_len[PM_WB_WINDOWS] = { 0 }, wb_n = 0;
    int wb_keep[PM_WB_WINDOWS] = { 0 };
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
        int hot = p->cfg.order == PM_ORDER_HOT && target == PM_STANDARD;
        pthread_mutex_unlock(&p->mu);
        if (!active)
            break;

        pace_tick(p);
        uint64_t quiet = pm_load_relaxed(&p->quiet_until_ns);
        if (quiet && pm_lat_now_ns() < quiet) {
            job_sleep(p, (double)quiet / 1e9, UINT64_MAX);   /* a quiet window: the baseline */
            continue;
        }
        max_tracks = paced_tracks(p, max_tracks);
        uint64_t ahead = effective_rate(p) ? 0 : (uint64_t)batch_bytes * PM_PREFETCH_BATCHES;
        pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
        uint64_t seen = pm_load_seqcst(&p->batches);
        uint64_t s, n;
        if (!next_run(p, pending, max_tracks, hot, &w, &s, &n)) {
            if (pm_load_seqcst(&p->pending_left) == 0) {
                pm_job_finish(p);
                break;
            }
            wait_for_work(p, seen, &backoff);   /* the last tracks are held by others */
            continue;
        }
        /* Pay for the run before claiming it, so no track is held while
         * the rate limit sleeps; what is not claimed is refunded. */
        uint64_t paid;
        if (rate_wait(p, n << p->shift, &paid)) {
            resv_release(p, &w);
            continue;
        }
        /* which source pages are cached before this run is read (evict.c):
         * asked before the claim, so no track is held meanwhile */
        int evict = evicting && target == target0 && w.from != FROM_HOT;
        if (evict)
            pm_evict_before(&ev, pm_track_off(p, s), n << p->shift);
        uint64_t k = 0;
        while (k < n && pm_track_trylock(p, s + k)) {
            if (pm_bitmap_get(pending, s + k) != 1) {
                pm_track_unlock(p, s + k);
                break;
            }
            k++;
        }
        rate_refund(p, paid, (n - k) << p->shift);
        if (k > 0 && !pm_load_seqcst(&p->run)) {
            /* paused (or stopped) since the top of the loop: a pause that
             * has returned moves nothing more, so the claim is given back */
            for (uint64_t t = s; t < s + k; t++)
                pm_track_unlock(p, t);
            rate_refund(p, paid, k << p->shift);
            resv_release(p, &w);
            continue;
        }
        if (k == 0) {
            /* held by host I/O or another copier: look further on, and
             * sleep once a pass finds nothing to claim */
            resv_release(p, &w);
            if (w.from == FROM_STRIPE)
                w.cur = s + 1;
            else if (w.from == FROM_SHARED)
                pm_store_relaxed(&p->cursor, s + 1 < p->tracks ? s + 1 : 0);
            if (++misses >= 16) {
                misses = 0;
                wait_for_work(p, seen, &backoff);
            }
            continue;
        }
        misses = 0;
        backoff = 0.0005;
        if (w.from == FROM_STRIPE)
            w.cur = s + k;   /* tracks of the run not claimed: the shared scan finds them */
        else if (w.from == FROM_SHARED)
            pm_store_relaxed(&p->cursor, s + k < p->tracks ? s + k : 0);
        else
            pm_count_add(&p->tracks_hot, k);
        uint64_t off = pm_track_off(p, s), len = (s + k >= p->tracks ? p->size : pm_track_off(p, s + k)) - off;
        /* a hot run's pages are the host's working set: they stay cached */
        int keep = w.from == FROM_HOT;
        if (w.from != FROM_HOT)
            prefetch(p, target, pm_track_off(p, s + k), ahead, &prefetched);
        pm_lat_copy_begin(&p->lat);
        copy_run(p, target, s, k, buf, retries);
        pm__store_write_behind(p->store[target], len, off);
        pm_lat_copy_end(&p->lat);
        for (uint64_t t = s; t < s + k; t++)
            pm_track_unlock(p, t);
        if (evict)
            pm_evict_after(&ev, off, len);   /* a cache hint: no track held */
        resv_release(p, &w);
        batch_released(p);
        pm_meta_copied(p->meta, k);
        if (wb_target != target)
            wb_n = 0, wb_target = target;
        unsigned slot = (unsigned)(wb_n % PM_WB_WINDOWS);
        if (wb_n >= PM_WB_WINDOWS) {
            pm__store_write_wait(p->store[target], wb_len[slot], wb_off[slot]);
            if (!wb_keep[slot])
                pm__store_evict(p->store[target], wb_len[slot], wb_off[slot]);
        }
        wb_off[slot] = off, wb_len[slot] = len, wb_keep[slot] = keep, wb_n++;
    }
    /* the last windows: on the device (the job's final commit synced them,
     * unless it stopped early) and out of the page cache */
    for (uint64_t i = wb_n > PM_WB_WINDOWS ? wb_n - PM_WB_WINDOWS : 0; wb_target >= 0 && i < wb_n; i++) {
        unsigned slot = (unsigned)(i % PM_WB_WINDOWS);
        if (!wb_keep[slot]) {
            pm__store_write_wait(p->store[wb_target], wb_len[slot], wb_off[slot]);
            pm__store_evict(p->store[wb_target], wb_len[slot], wb_off[slot]);
        }
    }
    pm_evict_destroy(&ev);
    if (pm_fetch_sub(&p->seq_users, 1) == 1)
        pm__store_sequential(src, 0);    /* the job's last copier: back to normal read-ahead */
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
        memset(p->resv, 0, sizeof p->resv);
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
