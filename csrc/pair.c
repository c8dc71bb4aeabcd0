/*
 * pair.c - a pair's construction, its state machine and its commands.
 *
 * Layer 7: may call copier.c (6: start and join its threads), job.c (5),
 * meta.c (4), tracklock.c/state.c (3), table.c (2), bitmap.c/store.c (1)
 * and the layer-0 helpers.
 *
 *   NEW --establish--> SYNCING --(copy done)--> ESTABLISHED --split--> SPLIT
 *   SPLIT/RESTORED --establish--> SYNCING
 *   SPLIT/RESTORED --restore--> RESTORING --(copy done)--> RESTORED (protect)
 *                                                     \--> ESTABLISHED
 *
 * Commands take cmd_lock for writing, so no host I/O is in flight while the
 * state and the PENDING/CHANGED tables change: a host write is wholly before
 * a command (and seen by it, e.g. in CHANGED) or wholly after it (and
 * arbitrated by the new state).  The end of a copy is decided by the copier
 * (copier.c) without cmd_lock; see arbitrate.c for why that is safe.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "layout.h"

/* ---- structs that grow ---------------------------------------------------
 *
 * The sizes of the first sized versions (0.2).  They never change: a struct
 * of this size, or size 0, is what a program built against 0.2 passes. */
#define CONFIG_SIZE_0_2 32u
#define PROGRESS_SIZE_0_2 160u
_Static_assert(sizeof(struct pm_copy_config) >= CONFIG_SIZE_0_2, "pm_copy_config only grows");
_Static_assert(sizeof(struct pm_progress) >= PROGRESS_SIZE_0_2, "pm_progress only grows");

static void config_defaults(struct pm_copy_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->size = sizeof *cfg;
    cfg->copiers = 0;          /* auto: resolve_config */
    cfg->batch_bytes = 0;
    cfg->rate_bytes = 0;
    cfg->retries = 3;
    cfg->read_policy = PM_READ_REDIRECT;
    cfg->pace = PM_PACE_AUTO;
    cfg->order = PM_ORDER_HOT;
    cfg->latency_factor_milli = 2000;
    cfg->latency_target_ns = 0;
}

int pm_copy_config_init(struct pm_copy_config *cfg, size_t size)
{
    if (cfg == NULL || size < sizeof(uint32_t) || size > UINT32_MAX)
        return PM_FAIL(-EINVAL, "the config's size %zu is not a valid struct size", size);
    struct pm_copy_config d;
    config_defaults(&d);
    size_t n = size < sizeof d ? size : sizeof d;
    memcpy(cfg, &d, n);
    if (size > n)
        memset((char *)cfg + n, 0, size - n);   /* fields of a newer header: zero = default */
    cfg->size = (uint32_t)size;
    return 0;
}

void pm_copy_config_default(struct pm_copy_config *cfg)
{
    pm_copy_config_init(cfg, CONFIG_SIZE_0_2);
}

/* A caller's config (any version) as this library's struct. */
static int import_config(const struct pm_copy_config *in, struct pm_copy_config *out, const char *func)
{
    size_t size = in->size ? in->size : CONFIG_SIZE_0_2;
    config_defaults(out);
    if (size < sizeof(uint32_t))
        return pm_fail(func, -EINVAL, "the config's size field is %zu: set it to sizeof the struct", size);
    for (size_t i = sizeof *out; i < size; i++)
        if (((const unsigned char *)in)[i] != 0)
            return pm_fail(func, -E2BIG, "the config sets fields this library (version %d.%d) does not know",
                           PM_VERSION_MAJOR, PM_VERSION_MINOR);
    memcpy(out, in, size < sizeof *out ? size : sizeof *out);
    out->size = sizeof *out;
    return 0;
}

/* The copy settings chosen from the stores when the caller leaves them 0
 * (measurements in docs/copier.md): 4 MiB batches; 2 copiers, each with
 * its own stripe (between two files the kernel copies, reads run ahead and
 * writes are started behind), or 4 when a side is a caller's store (NBD,
 * RBD, ...), where each I/O waits for a round trip. */
static void resolve_config(const pm_pair *p, struct pm_copy_config *c)
{
    int remote = p->store[0]->ops == &p->store[0]->own_ops || p->store[1]->ops == &p->store[1]->own_ops;
    if (c->copiers == 0)
        c->copiers = remote ? 4 : 2;
    if (c->batch_bytes == 0) {
        uint32_t b = 4u << 20;
        c->batch_bytes = b < p->track_size ? p->track_size : b / p->track_size * p->track_size;
    }
}

static int check_config(const pm_pair *p, struct pm_copy_config *c, const char *func)
{
    resolve_config(p, c);
    if (c->copiers < 1 || c->copiers > PM_MAX_COPIERS)
        return pm_fail(func, -EINVAL, "copiers must be 1 to %d, got %u", PM_MAX_COPIERS, c->copiers);
    if (c->batch_bytes < p->track_size || c->batch_bytes % p->track_size || c->batch_bytes > (256u << 20))
        return pm_fail(func, -EINVAL, "batch size %u is not a multiple of the track size %u up to 256 MiB",
                       c->batch_bytes, p->track_size);
    if (c->retries < 1 || c->retries > 100)
        return pm_fail(func, -EINVAL, "retries must be 1 to 100, got %u", c->retries);
    if (c->read_policy != PM_READ_REDIRECT && c->read_policy != PM_READ_HYDRATE)
        return pm_fail(func, -EINVAL, "unknown read policy %d", c->read_policy);
    if (c->pace != PM_PACE_AUTO && c->pace != PM_PACE_OFF)
        return pm_fail(func, -EINVAL, "pace must be PM_PACE_AUTO (0) or PM_PACE_OFF (1), got %d", c->pace);
    if (c->order != PM_ORDER_HOT && c->order != PM_ORDER_ASCENDING)
        return pm_fail(func, -EINVAL, "order must be PM_ORDER_HOT (0) or PM_ORDER_ASCENDING (1), got %d",
                       c->order);
    if (c->latency_factor_milli == 0)
        c->latency_factor_milli = 2000;
    if (c->latency_factor_milli < 1000 || c->latency_factor_milli > 1000000)
        return pm_fail(func, -EINVAL, "the host latency target factor must be 1x to 1000x, got %u/1000",
                       c->latency_factor_milli);
    if (c->latency_target_ns > 60000000000ull)
        return pm_fail(func, -EINVAL, "the host latency target must be at most 60 s, got %llu ns",
                       (unsigned long long)c->latency_target_ns);
    if (c->reserved0 != 0)
        return pm_fail(func, -EINVAL, "reserved0 must be 0");
    return 0;
}

/* ---- construction -------------------------------------------------------- */

/* What the metadata records at a snapshot (meta.c calls it with its lock
 * held; the order is metadata lock, then mu). */
static void meta_status(void *ctx, struct pm_meta_status *st)
{
    pm_pair *p = ctx;
    st->state = pm_pair_state(p);
    st->incremental = pm_load_relaxed(&p->incremental);
    st->protect = pm_load_relaxed(&p->protect);
    st->mirror_invalid = pm_job_mirror_invalid(p);
    pthread_mutex_lock(&p->mu);
    if (p->job_active && p->error) {
        st->error = p->error;
        st->error_track = p->error_track;
    }
    st->detach_error = p->detach_error;
    st->detach_track = p->detach_track;
    st->detach_time_ns = p->detach_time_ns;
    pthread_mutex_unlock(&p->mu);
}

int pm_pair_create(pm_store *standard, pm_store *mirror, uint32_t track_size, pm_pair **out)
{
    if (out == NULL || standard == NULL || mirror == NULL)
        return PM_FAIL(-EINVAL, "standard, mirror and out must not be NULL");
    *out = NULL;
    if (standard == mirror)
        return PM_FAIL(PM_E_GEOMETRY, "the standard and the mirror are the same store");
    if (standard->size != mirror->size)
        return PM_FAIL(PM_E_GEOMETRY, "the standard is %llu bytes but the mirror is %llu: "
                       "a pair needs two volumes of the same size",
                       (unsigned long long)standard->size, (unsigned long long)mirror->size);
    char id_std[256], id_mir[256];   /* one volume under two names (any store type) */
    pm_store_identity(standard, id_std, sizeof id_std);
    pm_store_identity(mirror, id_mir, sizeof id_mir);
    if (strcmp(id_std, id_mir) == 0)
        return PM_FAIL(PM_E_GEOMETRY, "the standard and the mirror are the same volume (%s)", standard->path);
    pm_pair *p = calloc(1, sizeof *p);
    if (p == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    for (int side = 0; side < 2; side++) {
        int rc = pm_table_create(standard->size, track_size, &p->table[side]);
        if (rc < 0) {
            pm_table_destroy(p->table[0]);
            free(p);
            return rc;
        }
    }
    p->store[PM_STANDARD] = standard;
    p->store[PM_MIRROR] = mirror;
    p->size = standard->size;
    p->tracks = p->table[0]->tracks;
    p->track_size = track_size;
    p->shift = p->table[0]->track_shift;
    p->last_track_size = p->table[0]->last_track_size;
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
#ifdef __GLIBC__
    /* commands must not starve behind a constant stream of host I/O */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    pthread_rwlock_init(&p->cmd_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* timed waits ignore clock jumps */
    pthread_cond_init(&p->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&p->rate_mu, NULL);
    pthread_mutex_init(&p->stripe_mu, NULL);
    pthread_mutex_init(&p->io_mu, NULL);
    pthread_cond_init(&p->io_cond, NULL);
    pthread_mutex_init(&p->pace_mu, NULL);
    pm_pace_init(&p->pacer, 2.0, 0);
    pm_heat_init(&p->heat);
    pm_tracklock_init(p);
    pm_copy_config_default(&p->cfg);
    resolve_config(p, &p->cfg);        /* what a reopened job resumes with */
    p->error_track = -1;
    p->detach_track = -1;
    p->target = PM_MIRROR;
    atomic_init(&p->state, PM_STATE_NEW);
    struct pm_meta_binding b = {
        .data = { standard, mirror },
        .pending = { p->table[PM_STANDARD]->flags[PM_PENDING], p->table[PM_MIRROR]->flags[PM_PENDING] },
        .changed = { p->table[PM_STANDARD]->flags[PM_CHANGED], p->table[PM_MIRROR]->flags[PM_CHANGED] },
        .volume_size = p->size, .tracks = p->tracks, .track_size = track_size,
        .status = meta_status, .ctx = p,
    };
    int rc = pm_meta_new(&b, &p->meta);
    if (rc) {
        pm_pair_destroy(p);
        return rc;
    }
    *out = p;
    return 0;
}

/* Join the compare thread of a --compare job, if one was started (it
 * exits once the job is stopped, cancelled or over). */
static void join_compare(pm_pair *p)
{
    pthread_mutex_lock(&p->mu);
    int live = p->compare_thread_live;
    pthread_t th = p->compare_thread;
    p->compare_thread_live = 0;
    pthread_mutex_unlock(&p->mu);
    if (live)
        pthread_join(th, NULL);
}

void pm_pair_destroy(pm_pair *p)
{
    if (p == NULL)
        return;
    pm_store_seqcst(&p->stop, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    pm_job_join_threads(p);
    join_compare(p);
    pm_job_prefetch_join(p);
    pm_meta_close(p->meta);
    pm_tracklock_destroy(p);
    pthread_mutex_destroy(&p->rate_mu);
    pthread_mutex_destroy(&p->stripe_mu);
    pthread_mutex_destroy(&p->pace_mu);
    pm_heat_destroy(&p->heat);
    pthread_cond_destroy(&p->io_cond);
    pthread_mutex_destroy(&p->io_mu);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->mu);
    pthread_rwlock_destroy(&p->cmd_lock);
    pm_table_destroy(p->table[0]);
    pm_table_destroy(p->table[1]);
    free(p);
}

pm_table *pm_pair_table(pm_pair *p, int side) { return (side == PM_STANDARD || side == PM_MIRROR) ? p->table[side] : NULL; }
uint64_t pm_pair_size(const pm_pair *p) { return p->size; }
uint32_t pm_pair_track_size(const pm_pair *p) { return p->track_size; }

/* ---- commands ------------------------------------------------------------ */

static int wrong_state(const char *func, int state, const char *what)
{
    return pm_fail(func, PM_E_STATE, "the pair is %s; %s", pm_state_name(state), what);
}

/* PM_E_DETACHED, naming the record: a command the detached state refuses. */
static int detached_refusal(pm_pair *p, const char *func, const char *what)
{
    pthread_mutex_lock(&p->mu);
    int err = p->detach_error;
    long long track = (long long)p->detach_track;
    pthread_mutex_unlock(&p->mu);
    return pm_fail(func, PM_E_DETACHED, "the mirror was detached after an error on it (%s, track %lld): "
                   "it is no point-in-time image, so %s; establish (--incremental copies only what it "
                   "missed) repairs it", pm_strerror(err), track, what);
}

/* Begin a job copying towards `target` (cmd_lock held for writing). */
static int begin_job(pm_pair *p, int target, int incremental, int protect, int new_state,
                     const struct pm_copy_config *cfg, void *(*compare_main)(void *))
{
    pm_job_join_threads(p);   /* threads of a finished job */
    join_compare(p);
    pm_meta_lock(p->meta);          /* no commit sees half of this */
    pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
    pm_bitmap *chg_std = p->table[PM_STANDARD]->flags[PM_CHANGED];
    pm_bitmap *chg_mir = p->table[PM_MIRROR]->flags[PM_CHANGED];
    pm_bitmap_zero(p->table[PM_STANDARD]->flags[PM_PENDING]);
    pm_bitmap_zero(p->table[PM_MIRROR]->flags[PM_PENDING]);
    if (incremental) {
        pm_bitmap_union(pending, chg_std);
        pm_bitmap_union(pending, chg_mir);
    } else {
        pm_bitmap_fill(pending);
    }
    /* From now on CHANGED records writes made since this operation began. */
    pm_bitmap_zero(chg_std);
    pm_bitmap_zero(chg_mir);
    pm_meta_intent_reset_locked(p->meta);
    uint64_t n = pm_bitmap_count(pending);

    pthread_mutex_lock(&p->mu);
    p->cfg = *cfg;
    p->target = target;
    p->error = 0;
    p->error_track = -1;
    p->detached_job = 0;
    p->paused_req = 0;
    p->t_start = pm_now();
    p->t_end = 0;
    pm_store_relaxed(&p->cursor, 0);
    pm_store_relaxed(&p->rate, cfg->rate_bytes);
    pm_store_relaxed(&p->read_policy, cfg->read_policy);
    p->rate_next = 0;
    pm_store_relaxed(&p->tracks_total, n);
    pm_store_relaxed(&p->tracks_copied, 0);
    pm_store_relaxed(&p->tracks_skipped, 0);
    pm_store_relaxed(&p->tracks_merged, 0);
    pm_store_relaxed(&p->reads_redirected, 0);
    pm_store_relaxed(&p->reads_hydrated, 0);
    pm_store_relaxed(&p->tracks_hot, 0);
    pm_store_relaxed(&p->pace_quiet, 0);
    pm_job_pace_reset_locked(p);
    pm_store_relaxed(&p->bytes_read, 0);
    pm_store_relaxed(&p->bytes_written, 0);
    pm_store_relaxed(&p->compare, compare_main != NULL);
    pm_store_relaxed(&p->tracks_compared, 0);
    pm_store_relaxed(&p->tracks_equal, 0);
    pm_store_relaxed(&p->compare_bytes, 0);
    pm_store_relaxed(&p->bytes_zeroed, 0);
    pm_store_seqcst(&p->pending_left, n);
    pm_store_relaxed(&p->incremental, incremental);
    pm_store_relaxed(&p->protect, protect);
    p->job_active = 1;
    pm_meta_need_full(p->meta);
    /* release: host I/O that sees the new state also sees the tables above */
    pm_store_release(&p->state, new_state);
    int rc = 0;
    if (n == 0) {
        pm_job_end_locked(p);     /* nothing to copy: the job is done at once */
    } else if (compare_main != NULL) {
        /* the compare phase first (pair_compare.c); it starts the copiers */
        pm_store_seqcst(&p->run, 1);
        int e = pthread_create(&p->compare_thread, NULL, compare_main, p);
        if (e != 0) {             /* copy every track instead: correct, only slower */
            rc = pm_job_start_threads_locked(p);
        } else {
            p->comparing = 1;
            p->compare_thread_live = 1;
        }
    } else {
        rc = pm_job_start_threads_locked(p);
    }
    pthread_mutex_unlock(&p->mu);
    pm_meta_unlock(p->meta);        /* the copiers commit the new job before they copy */
    return rc;
}

/* A command's copy settings: the caller's (of any struct size the ABI
 * accepts) or the defaults, checked against the pair. */
static int take_config(pm_pair *p, const struct pm_copy_config *cfg, struct pm_copy_config *mine,
                       const char *func)
{
    int rc = 0;
    if (cfg == NULL)
        config_defaults(mine);
    else
        rc = import_config(cfg, mine, func);
    return rc ? rc : check_config(p, mine, func);
}

int pm_pair_establish(pm_pair *p, int incremental, const struct pm_copy_config *cfg)
{
    return pm_pair__establish(p, incremental, cfg, NULL);
}

int pm_pair__establish(pm_pair *p, int incremental, const struct pm_copy_config *cfg,
                       void *(*compare_main)(void *))
{
    struct pm_copy_config mine;
    int rc = take_config(p, cfg, &mine, __func__);
    if (rc)
        return rc;
    cfg = &mine;
    pthread_rwlock_wrlock(&p->cmd_lock);
    int s = pm_pair_state(p);
    if (s == PM_STATE_NEW && incremental)
        rc = wrong_state(__func__, s, "an incremental establish is allowed only when split or "
                                      "restored (a pair established once); use a full establish");
    else if (s != PM_STATE_NEW && s != PM_STATE_SPLIT && s != PM_STATE_RESTORED && s != PM_STATE_DETACHED)
        rc = wrong_state(__func__, s, "establish is allowed when new, split, restored or detached");
    else if (incremental && (rc = pm_meta_refuse_outside(p->meta, __func__)) != 0)
        ;   /* a volume changed behind pymirror's back: CHANGED is incomplete */
    else
        rc = begin_job(p, PM_MIRROR, incremental, 0, PM_STATE_SYNCING, cfg, compare_main);
    if (rc == 0 && !incremental)
        pm_meta_trust_all(p->meta);   /* a full copy makes an outside change moot */
    if (rc == 0)
        rc = pm_meta_commit(p->meta);
    pthread_rwlock_unlock(&p->cmd_lock);
    if (rc == 0)
        pm_job_prefetch_first(p, PM_MIRROR);   /* its first reads, during the commit */
    return rc;
}

uint64_t pm_pair_mirror_invalid(const pm_pair *p) { return pm_job_mirror_invalid((pm_pair *)p); }

int pm_pair_restore(pm_pair *p, int incremental, int protect, const struct pm_copy_config *cfg)
{
    return pm_pair__restore(p, incremental, protect, cfg, NULL);
}

int pm_pair__restore(pm_pair *p, int incremental, int protect, const struct pm_copy_config *cfg,
                     void *(*compare_main)(void *))
{
    struct pm_copy_config mine;
    int rc = take_config(p, cfg, &mine, __func__);
    if (rc)
        return rc;
    cfg = &mine;
    pthread_rwlock_wrlock(&p->cmd_lock);
    int s = pm_pair_state(p);
    uint64_t invalid = pm_job_mirror_invalid(p);
    if (s == PM_STATE_DETACHED)
        rc = detached_refusal(p, __func__, "restore from it is refused");
    else if (s != PM_STATE_SPLIT && s != PM_STATE_RESTORED)
        rc = wrong_state(__func__, s, "restore is allowed when split or restored");
    else if (invalid > 0)
        rc = PM_FAIL(PM_E_STATE, "the mirror is inconsistent: %llu of its tracks are not part of a "
                     "point-in-time image (an establish was cancelled or failed); establish again "
                     "before restoring from it", (unsigned long long)invalid);
    else if (incremental && (rc = pm_meta_refuse_outside(p->meta, __func__)) != 0)
        ;   /* a volume changed behind pymirror's back: CHANGED is incomplete */
    else
        rc = begin_job(p, PM_STANDARD, incremental, protect, PM_STATE_RESTORING, cfg, compare_main);
    if (rc == 0 && !incremental)
        pm_meta_trust_all(p->meta);   /* a full copy makes an outside change moot */
    /* Nothing to copy: no copier will make the commit, so make it here
     * (one header and table write, like any command). */
    if (rc == 0 && pm_pair_state(p) != PM_STATE_RESTORING)
        rc = pm_meta_commit(p->meta);
    pthread_rwlock_unlock(&p->cmd_lock);
    if (rc == 0)
        pm_job_prefetch_first(p, PM_STANDARD);   /* its first reads, during the copiers' first commit */
    /* The restore's commit is made by the first copier before it copies
     * (copier.c), so the command returns in a time that does not grow with
     * the volume; host writes wait for it through write-intent. */
    return rc;
}

/* Move to `state` without a copy (cmd_lock held for writing), with the
 * tables and the state changed under the metadata lock so no commit sees
 * half of it; with `fresh_changed`, CHANGED and the intent regions start
 * afresh (the sides are identical).  Then commit. */
static int set_state_and_commit(pm_pair *p, int state, int fresh_changed)
{
    pm_meta_lock(p->meta);
    if (fresh_changed) {
        pm_bitmap_zero(p->table[PM_STANDARD]->flags[PM_CHANGED]);
        pm_bitmap_zero(p->table[PM_MIRROR]->flags[PM_CHANGED]);
        pm_meta_intent_reset_locked(p->meta);
    }
    pthread_mutex_lock(&p->mu);
    pm_store_release(&p->state, state);
    pthread_mutex_unlock(&p->mu);
    pm_meta_note(p->meta);
    pm_meta_unlock(p->meta);
    return pm_meta_commit(p->meta);
}

int pm_pair_split(pm_pair *p)
{
    pthread_rwlock_wrlock(&p->cmd_lock);
    int s = pm_pair_state(p);
    int rc;
    if (s == PM_STATE_DETACHED)
        rc = detached_refusal(p, __func__, "a split of it would be no image of the standard either");
    else if (s != PM_STATE_ESTABLISHED && s != PM_STATE_RESTORED)
        rc = wrong_state(__func__, s, "split is allowed only when established (or restored)");
    else
        /* From ESTABLISHED the sides are identical: CHANGED starts afresh.
         * From RESTORED the sides differ wherever the host wrote since the
         * restore began: CHANGED must keep those tracks, or a later
         * incremental restore or establish would silently skip them. */
        rc = set_state_and_commit(p, PM_STATE_SPLIT, s == PM_STATE_ESTABLISHED);
    pthread_rwlock_unlock(&p->cmd_lock);
    return rc;
}

int pm_pair_cancel(pm_pair *p)
{
    pthread_rwlock_wrlock(&p->cmd_lock);   /* no host I/O: nothing clears PENDING meanwhile */
    int s = pm_pair_state(p), rc = 0;
    if (s == PM_STATE_RESTORING) {
        rc = PM_FAIL(PM_E_STATE, "a restore cannot be cancelled: the standard depends on the mirror "
                     "until the restore is done; use pause to stop the copy for now");
    } else if (s != PM_STATE_SYNCING) {
        rc = wrong_state(__func__, s, "cancel ends an establish (syncing), and there is none");
    } else {
        pthread_mutex_lock(&p->mu);
        /* The copier ends a job under mu; once job_active is 0 here, it
         * cannot end this one (pm_job_finish re-checks job_active). */
        int ours = p->job_active && pm_pair_state(p) == PM_STATE_SYNCING;
        if (ours) {
            p->job_active = 0;
            p->paused_req = 0;
            p->error = 0;
            p->error_track = -1;
            p->t_end = pm_now();
            pm_store_seqcst(&p->run, 0);
            pthread_cond_broadcast(&p->cond);
        }
        s = pm_pair_state(p);
        pthread_mutex_unlock(&p->mu);
        if (!ours) {
            rc = wrong_state(__func__, s, "the establish ended before it could be cancelled");
        } else {
            pm_job_join_threads(p);         /* copiers finish their batch and exit */
            join_compare(p);                /* so does a compare phase */
            pm_meta_lock(p->meta);
            pm_bitmap *pending = p->table[PM_MIRROR]->flags[PM_PENDING];
            uint64_t n = pm_bitmap_count(pending);
            pm_bitmap_union(p->table[PM_MIRROR]->flags[PM_CHANGED], pending);
            pm_bitmap_zero(pending);
            pm_bitmap_zero(p->table[PM_STANDARD]->flags[PM_PENDING]);
            pm_store_seqcst(&p->pending_left, 0);
            pthread_mutex_lock(&p->mu);
            pm_store_relaxed(&p->mirror_invalid, n);
            pm_store_release(&p->state, PM_STATE_SPLIT);
            pthread_cond_broadcast(&p->cond);
            pthread_mutex_unlock(&p->mu);
            pm_meta_need_full(p->meta);
            pm_meta_unlock(p->meta);
            rc = pm_meta_commit(p->meta);
        }
    }
    pthread_rwlock_unlock(&p->cmd_lock);
    return rc;
}

int pm_pair_assume_established(pm_pair *p)
{
    pthread_rwlock_wrlock(&p->cmd_lock);
    int s = pm_pair_state(p);
    int rc;
    if (s != PM_STATE_NEW)
        rc = wrong_state(__func__, s, "establishing without a copy is allowed only for a new pair");
    else
        rc = set_state_and_commit(p, PM_STATE_ESTABLISHED, 1);
    pthread_rwlock_unlock(&p->cmd_lock);
    return rc;
}

/* ---- job control --------------------------------------------------------- */

int pm_pair_wait(pm_pair *p, int64_t timeout_ms)
{
    struct timespec deadline = { 0, 0 };
    if (timeout_ms >= 0)
        deadline = pm_deadline(pm_now() + (double)timeout_ms / 1000.0);
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    while (p->job_active || p->finishing || p->detached_job) {
        if (p->detached_job && !p->job_active && !p->finishing) {   /* the establish ended by a detach */
            rc = PM_FAIL(PM_E_DETACHED, "the mirror was detached at track %lld: %s; the host's writes go "
                         "on to the standard; establish (--incremental) repairs it",
                         (long long)p->detach_track, pm_strerror(p->detach_error));
            break;
        }
        if (p->job_active && p->error) {
            rc = PM_FAIL(PM_E_JOB, "the copy stopped at track %lld: %s", (long long)p->error_track,
                         pm_strerror(p->error));
            break;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(&p->cond, &p->mu);
        } else if (pthread_cond_timedwait(&p->cond, &p->mu, &deadline) != 0) {
            rc = (p->job_active || p->finishing) ? PM_E_TIMEDOUT : 0;
            break;
        }
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int pm_pair_pause(pm_pair *p)
{
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (!p->job_active)
        rc = PM_FAIL(PM_E_STATE, "there is no copy job to pause (the pair is %s)",
                     pm_state_name(pm_pair_state(p)));
    else {
        p->paused_req = 1;
        pm_store_seqcst(&p->run, 0);
        pthread_cond_broadcast(&p->cond);
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int pm_pair_resume(pm_pair *p)
{
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (!p->job_active)
        rc = PM_FAIL(PM_E_STATE, "there is no copy job to resume (the pair is %s)",
                     pm_state_name(pm_pair_state(p)));
    else {
        p->paused_req = 0;
        if (p->error)
            pm_meta_dirty(p->meta);           /* the persisted error goes with the next commit */
        p->error = 0;
        p->error_track = -1;
        pm_store_seqcst(&p->run, 1);
        if (p->nthreads == 0 && !p->comparing)   /* a compare phase starts them when it ends */
            rc = pm_job_start_threads_locked(p);
        pthread_cond_broadcast(&p->cond);
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int pm_pair_set_rate(pm_pair *p, uint64_t rate_bytes)
{
    pthread_mutex_lock(&p->mu);
    pm_store_release(&p->rate, rate_bytes);   /* a copier that sees it sees a pause made before */
    p->cfg.rate_bytes = rate_bytes;
    pthread_cond_broadcast(&p->cond);   /* copiers waiting out the old rate */
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int pm_pair_configure(pm_pair *p, const struct pm_copy_config *in)
{
    if (in == NULL)
        return PM_FAIL(-EINVAL, "cfg must not be NULL");
    struct pm_copy_config mine, *cfg = &mine;
    int rc = import_config(in, &mine, __func__);
    if (rc == 0)
        rc = check_config(p, cfg, __func__);
    if (rc)
        return rc;
    pthread_mutex_lock(&p->mu);
    int repace = cfg->pace != p->cfg.pace || cfg->latency_factor_milli != p->cfg.latency_factor_milli ||
                 cfg->latency_target_ns != p->cfg.latency_target_ns || cfg->order != p->cfg.order;
    p->cfg = *cfg;
    pm_store_relaxed(&p->rate, cfg->rate_bytes);
    pm_store_relaxed(&p->read_policy, cfg->read_policy);
    if (repace)
        pm_job_pace_reset_locked(p);
    pthread_cond_broadcast(&p->cond);   /* a copier sleeping on the old rate */
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int pm_pair_progress(const pm_pair *cp, struct pm_progress *out)
{
    if (cp == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "the pair and out must not be NULL");
    size_t size = out->size ? out->size : PROGRESS_SIZE_0_2;
    if (size < sizeof(uint32_t) || size > 65536)
        return PM_FAIL(-EINVAL, "out->size is %zu: set it to sizeof(struct pm_progress)", size);
    pm_pair *p = (pm_pair *)cp;
    struct pm_progress full, *o = &full;
    memset(o, 0, sizeof *o);
    pthread_mutex_lock(&p->mu);
    o->running = p->job_active;
    o->paused = p->job_active && (p->paused_req || p->error);
    o->error = p->error;
    o->error_track = p->error ? p->error_track : -1;
    o->elapsed = p->t_start == 0 ? 0 : (p->t_end ? p->t_end : pm_now()) - p->t_start;
    int target = p->target;
    pthread_mutex_unlock(&p->mu);
    o->state = pm_pair_state(p);
    o->incremental = pm_load_relaxed(&p->incremental);
    o->protect = pm_load_relaxed(&p->protect);
    o->tracks_total = pm_load_relaxed(&p->tracks_total);
    o->tracks_pending = pm_bitmap_count(p->table[target]->flags[PM_PENDING]);
    o->tracks_copied = pm_load_relaxed(&p->tracks_copied);
    o->tracks_skipped = pm_load_relaxed(&p->tracks_skipped);
    o->tracks_merged = pm_load_relaxed(&p->tracks_merged);
    o->reads_redirected = pm_load_relaxed(&p->reads_redirected);
    o->reads_hydrated = pm_load_relaxed(&p->reads_hydrated);
    o->bytes_read = pm_load_relaxed(&p->bytes_read);
    o->bytes_written = pm_load_relaxed(&p->bytes_written);
    o->bytes_zeroed = pm_load_relaxed(&p->bytes_zeroed);
    o->changed_standard = pm_bitmap_count(p->table[PM_STANDARD]->flags[PM_CHANGED]);
    o->changed_mirror = pm_bitmap_count(p->table[PM_MIRROR]->flags[PM_CHANGED]);
    pm_meta_counters(p->meta, &o->commits, &o->syncs);
    o->mirror_invalid = pm_job_mirror_invalid(p);
    o->compare = pm_load_relaxed(&p->compare);
    pthread_mutex_lock(&p->mu);
    o->comparing = p->comparing && p->job_active && !p->error;
    pthread_mutex_unlock(&p->mu);
    o->tracks_compared = pm_load_relaxed(&p->tracks_compared);
    o->tracks_equal = pm_load_relaxed(&p->tracks_equal);
    o->compare_bytes = pm_load_relaxed(&p->compare_bytes);
    pthread_mutex_lock(&p->pace_mu);
    const struct pm_pacer *c = &p->pacer;
    o->host_read_p50_ns = c->p50_ns[PM_LAT_READ];
    o->host_read_p99_ns = c->p99_ns[PM_LAT_READ];
    o->host_write_p50_ns = c->p50_ns[PM_LAT_WRITE];
    o->host_write_p99_ns = c->p99_ns[PM_LAT_WRITE];
    o->host_flush_p50_ns = c->p50_ns[PM_LAT_FLUSH];
    o->host_flush_p99_ns = c->p99_ns[PM_LAT_FLUSH];
    o->idle_read_p99_ns = c->base99_ns[PM_LAT_READ];
    o->idle_write_p99_ns = c->base99_ns[PM_LAT_WRITE];
    o->idle_flush_p99_ns = c->base99_ns[PM_LAT_FLUSH];
    o->host_merge_p50_ns = c->p50_ns[PM_LAT_MERGE];
    o->host_merge_p99_ns = c->p99_ns[PM_LAT_MERGE];
    o->idle_merge_p99_ns = c->base99_ns[PM_LAT_MERGE];
    pthread_mutex_unlock(&p->pace_mu);
    o->pace_rate = o->running ? pm_load_relaxed(&p->pace_rate) : 0;
    o->tracks_hot = pm_load_relaxed(&p->tracks_hot);
    o->pace_quiet = pm_load_relaxed(&p->pace_quiet);
    /* as much as the caller's struct holds; a newer caller's extra fields read 0 */
    size_t n = size < sizeof full ? size : sizeof full;
    full.size = (uint32_t)n;
    memcpy(out, &full, n);
    if (size > n)
        memset((char *)out + n, 0, size - n);
    return 0;
}

/* ---- compare jobs and adopt (the pair's side; the rest is pair_compare.c) ---- */

void pm_pair__compare_done(pm_pair *p)
{
    pthread_mutex_lock(&p->mu);
    p->comparing = 0;
    if (p->job_active && !pm_load_relaxed(&p->stop) && !p->paused_req && !p->error && p->nthreads == 0)
        pm_job_start_threads_locked(p);   /* a failure to start is recorded as the job's error */
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
}

int pm_pair__adopted(pm_pair *p, const pm_bitmap *differ)
{
    pthread_rwlock_wrlock(&p->cmd_lock);
    int s = pm_pair_state(p), rc;
    if (s != PM_STATE_NEW) {
        rc = wrong_state("pm_pair_adopt", s, "adopt is for a new pair, and this one changed meanwhile");
    } else {
        /* what the host wrote meanwhile is CHANGED(standard) already */
        pm_meta_lock(p->meta);
        pm_bitmap_union(p->table[PM_STANDARD]->flags[PM_CHANGED], differ);
        pm_bitmap_union(p->table[PM_MIRROR]->flags[PM_CHANGED], differ);
        pm_meta_dirty(p->meta);
        pm_meta_unlock(p->meta);
        rc = set_state_and_commit(p, PM_STATE_SPLIT, 0);
    }
    pthread_rwlock_unlock(&p->cmd_lock);
    return rc;
}

int pm_pair_detach_info(const pm_pair *cp, struct pm_detach_info *out)
{
    if (cp == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "the pair and out must not be NULL");
    pm_pair *p = (pm_pair *)cp;
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&p->mu);
    out->error = p->detach_error;
    out->track = p->detach_error ? p->detach_track : -1;
    out->time = p->detach_error ? (double)p->detach_time_ns / 1e9 : 0;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int pm_pair_commit(pm_pair *p)
{
    return pm_meta_commit(p->meta);
}
