/*
 * pair_compare.c - comparing a pair's two sides: verify, the compare phase
 * of establish/restore --compare, and adopting two existing volumes.
 *
 * Layer 8 (with pair_open.c): may call pair.c (7), job.c (5), meta.c (4),
 * tracklock.c (3), compare.c (2), bitmap.c/store.c (1) and the layer-0
 * helpers.  The reading and comparing itself is compare.c's engine (two
 * reader threads, a bounded ring per side); this file decides what a
 * verdict means for the pair.
 *
 * The compare phase of a --compare job, and host writes.  The job begins
 * as a full one (pair.c: every track PENDING on the target, CHANGED cleared,
 * the host arbitrated at once), but instead of copiers one compare thread
 * runs.  For each track the engine found equal, it takes the track's lock
 * and clears PENDING only if the track is still PENDING and CHANGED on
 * neither side.  A host write marks CHANGED under the same lock before its
 * data (arbitrate.c, pm_meta_before_write), so:
 *  - a write before the compare read the track, or between that read and
 *    the lock: CHANGED is seen, the track stays PENDING and is copied (or
 *    the arbitration already settled it: a whole-track write);
 *  - a write after the lock is released: PENDING is clear, so the write
 *    takes the settled path (mirrored while syncing; the standard alone in a
 *    protected restore), exactly as after a copy.
 * No write is missed; a track the host wrote during the compare may be
 * copied although it ended equal.  When the compare ends the copiers start
 * (pm_pair__compare_done) and copy what is still PENDING.  A crash or an
 * error during the compare leaves a superset PENDING: after a reopen or a
 * resume the copiers copy every track not yet found equal.
 */
#include <stdlib.h>
#include <string.h>

#include "compare.h"
#include "layout.h"

static const char *const SIDE_NAMES[2] = { "the standard", "the mirror" };

static void fill_job(pm_pair *p, struct pm_compare_job *j, uint64_t first, uint64_t count, pm_compare *c)
{
    memset(j, 0, sizeof *j);
    j->store[0] = p->store[PM_STANDARD];
    j->store[1] = p->store[PM_MIRROR];
    j->name[0] = SIDE_NAMES[0];
    j->name[1] = SIDE_NAMES[1];
    j->size = p->size;
    j->track_size = p->track_size;
    j->first = first;
    j->count = count;
    j->ctl = c;
}

/* ---- compare into a bitmap (verify) -------------------------------------- */

struct to_bitmap {
    pm_bitmap *out;
    uint64_t *list;              /* pm_pair_verify: up to max numbers */
    uint64_t max, n, next;
};

static int to_bitmap_batch(void *ctx, uint64_t first, uint64_t n, const unsigned char *differ)
{
    struct to_bitmap *tb = ctx;
    for (uint64_t i = 0; i < n; i++) {
        if (!differ[i])
            continue;
        if (tb->out != NULL)
            pm_bitmap_set(tb->out, first + i);
        if (tb->list != NULL) {
            tb->list[tb->n++] = first + i;
            if (tb->n == tb->max) {
                tb->next = first + i + 1;
                return 1;        /* full: the caller continues from next */
            }
        }
    }
    tb->next = first + n;
    return 0;
}

int64_t pm_pair_compare(pm_pair *p, uint64_t first, uint64_t count, pm_bitmap *out, pm_compare *c)
{
    if (p == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "the pair and out must not be NULL");
    if (pm_bitmap_size(out) != p->tracks)
        return PM_FAIL(PM_E_GEOMETRY, "the result bitmap has %llu bits, the pair %llu tracks",
                       (unsigned long long)pm_bitmap_size(out), (unsigned long long)p->tracks);
    if (first > p->tracks)
        return PM_FAIL(PM_E_RANGE, "track %llu is beyond the pair's %llu tracks",
                       (unsigned long long)first, (unsigned long long)p->tracks);
    if (count == 0 || count > p->tracks - first)
        count = p->tracks - first;
    struct to_bitmap tb = { out, NULL, 0, 0, first };
    struct pm_compare_job j;
    fill_job(p, &j, first, count, c);
    j.batch = to_bitmap_batch;
    j.ctx = &tb;
    return pm__compare_run(&j);
}

int64_t pm_pair_verify(pm_pair *p, uint64_t from, uint64_t *out, uint64_t max, uint64_t *next)
{
    if (p == NULL || next == NULL || (out == NULL && max > 0))
        return PM_FAIL(-EINVAL, "the pair, out and next must not be NULL");
    if (from >= p->tracks || max == 0) {
        *next = from >= p->tracks ? p->tracks : from;
        return 0;
    }
    struct to_bitmap tb = { NULL, out, max, 0, from };
    struct pm_compare_job j;
    fill_job(p, &j, from, p->tracks - from, NULL);
    j.batch = to_bitmap_batch;
    j.ctx = &tb;
    int64_t rc = pm__compare_run(&j);
    if (rc < 0)
        return rc;
    *next = tb.next;
    return (int64_t)tb.n;
}

/* ---- the compare phase of a --compare job -------------------------------- */

struct compare_phase {
    pm_pair *p;
    pm_compare *ctl;
    uint64_t first_failed;
};

/* One batch's verdict: clear PENDING on the equal tracks nobody wrote. */
static int phase_batch(void *ctx, uint64_t first, uint64_t n, const unsigned char *differ)
{
    struct compare_phase *cp = ctx;
    pm_pair *p = cp->p;
    pthread_mutex_lock(&p->mu);
    while (!pm_load_relaxed(&p->stop) && p->job_active && (p->paused_req || p->error))
        pthread_cond_wait(&p->cond, &p->mu);     /* paused: the readers wait with us */
    int go = !pm_load_relaxed(&p->stop) && p->job_active;
    int target = p->target;
    pthread_mutex_unlock(&p->mu);
    if (!go)
        return 1;
    /* the job's PENDING set is durable before any bit of it is cleared */
    int rc = pm_meta_changed_durable(p->meta);
    if (rc < 0) {
        pm_job_error(p, rc, first);
        return 1;
    }
    /* counted before the decisions: the last one may end the job, and a
     * waiter then reads these */
    pm_count_add(&p->tracks_compared, n);
    struct pm_compare_progress pr = { sizeof pr, 0, 0, 0, 0, 0, 0, 0 };
    if (pm_compare_progress(cp->ctl, &pr) == 0)
        pm_store_relaxed(&p->compare_bytes, pr.bytes_read);
    pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
    pm_bitmap *chg_std = p->table[PM_STANDARD]->flags[PM_CHANGED];
    pm_bitmap *chg_mir = p->table[PM_MIRROR]->flags[PM_CHANGED];
    uint64_t cleared = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t = first + i;
        if (differ[i])
            continue;
        pm_track_lock(p, t);
        if (pm_bitmap_get(pending, t) == 1 && pm_bitmap_get(chg_std, t) != 1 && pm_bitmap_get(chg_mir, t) != 1)
            cleared += (uint64_t)pm_job_clear_pending(p, target, t, &p->tracks_equal);
        pm_track_unlock(p, t);
    }
    if (cleared)
        pm_meta_copied(p->meta, cleared);   /* a commit about every second, as copiers do */
    return 0;
}

static void *phase_main(void *arg)
{
    pm_pair *p = arg;
    struct compare_phase cp = { p, NULL, 0 };
    int64_t rc = pm_compare_create(&cp.ctl);
    if (rc == 0) {
        struct pm_compare_job j;
        fill_job(p, &j, 0, p->tracks, cp.ctl);
        j.batch = phase_batch;
        j.ctx = &cp;
        rc = pm__compare_run(&j);
        if (rc >= 0) {
            struct pm_compare_progress pr = { sizeof pr, 0, 0, 0, 0, 0, 0, 0 };
            if (pm_compare_progress(cp.ctl, &pr) == 0)
                pm_store_relaxed(&p->compare_bytes, pr.bytes_read);
        }
    }
    if (rc < 0) {
        /* a read failed: the job pauses with the error; resume copies
         * every track still PENDING (those not yet found equal) */
        uint64_t at = pm_load_relaxed(&p->tracks_compared);
        pm_job_error(p, (int)rc, at < p->tracks ? at : p->tracks - 1);
    }
    pm_compare_destroy(cp.ctl);
    pm_pair__compare_done(p);
    return NULL;
}

int pm_pair_establish_compare(pm_pair *p, const struct pm_copy_config *cfg)
{
    if (p == NULL)
        return PM_FAIL(-EINVAL, "the pair must not be NULL");
    return pm_pair__establish(p, 0, cfg, phase_main);
}

int pm_pair_restore_compare(pm_pair *p, int protect, const struct pm_copy_config *cfg)
{
    if (p == NULL)
        return PM_FAIL(-EINVAL, "the pair must not be NULL");
    return pm_pair__restore(p, 0, protect, cfg, phase_main);
}

/* ---- adopt ----------------------------------------------------------------- */

int64_t pm_pair_adopt(pm_pair *p, pm_compare *c)
{
    if (p == NULL)
        return PM_FAIL(-EINVAL, "the pair must not be NULL");
    int s = pm_pair_state(p);
    if (s != PM_STATE_NEW)
        return PM_FAIL(PM_E_STATE, "the pair is %s; adopt is for a new pair over two existing volumes",
                       pm_state_name(s));
    pm_bitmap *differ = NULL;
    int64_t rc = pm_bitmap_create(p->tracks, &differ);
    if (rc == 0)
        rc = pm_pair_compare(p, 0, 0, differ, c);
    if (rc >= 0) {
        int done = pm_pair__adopted(p, differ);
        if (done < 0)
            rc = done;
    }
    pm_bitmap_destroy(differ);
    return rc;
}
