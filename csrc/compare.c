/*
 * compare.c - comparing two stores track by track: the engine behind
 * verify, compare-establish/restore and adopt; the compare handle (progress,
 * cancel); per-track hashes a store may offer.
 *
 * Layer 2 (with table.c, store_volatile.c): may call bitmap.c/store.c (1)
 * and the layer-0 helpers (crc32c.c, errors.c, clock.c).  It knows nothing
 * of a pair: the layer above passes two stores and a callback that gets
 * each batch's verdict (compare.h).
 *
 * Threads.  One reader thread per side reads batch b into slot b % depth
 * of its own ring, once the comparing thread (the caller's) has consumed
 * batch b - depth; the comparing thread waits until both sides hold batch
 * b, compares it track by track, calls the callback, and frees the slot.
 * So both volumes are read at once, each sequentially (the kernel's
 * read-ahead works; the next batch is also asked for with WILLNEED), and
 * the memory is 2 x depth x batch bytes whatever the volume's size.  All
 * hand-overs go through one mutex, which also orders the buffers' bytes.
 *
 * Hashes.  A store far away (NBD, RBD) pays for every byte it sends.  If a
 * store offers a per-track hash (CRC-32C of the track, computed next to
 * the data: pm_store_set_track_hash), its reader asks for hashes instead of
 * data, and the other side's reader hashes what it reads, as DRBD's
 * csums-alg resync does.  CRC-32C is 32 bits: two different tracks have the
 * same hash with probability 2^-32 per track; docs/compare.md says so.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compare.h"
#include "crc32c.h"

/* ---- the handle ---------------------------------------------------------- */

struct pm_compare {
    pm_atomic_u64 total, done, differ, bytes, hashed;   /* relaxed counters */
    pm_atomic_int running, cancel;
    pthread_mutex_t mu;            /* t0, t1 */
    double t0, t1;
};

int pm_compare_create(pm_compare **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    pm_compare *c = calloc(1, sizeof *c);
    if (c == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    pthread_mutex_init(&c->mu, NULL);
    *out = c;
    return 0;
}

void pm_compare_destroy(pm_compare *c)
{
    if (c == NULL)
        return;
    pthread_mutex_destroy(&c->mu);
    free(c);
}

int pm_compare_cancel(pm_compare *c)
{
    if (c == NULL)
        return PM_FAIL(-EINVAL, "the compare handle must not be NULL");
    pm_store_seqcst(&c->cancel, 1);   /* seq_cst: seen by the next batch's check */
    return 0;
}

int pm_compare_progress(const pm_compare *cc, struct pm_compare_progress *out)
{
    if (cc == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "the compare handle and out must not be NULL");
    pm_compare *c = (pm_compare *)cc;
    size_t size = out->size ? out->size : sizeof *out;
    if (size < sizeof(uint32_t) || size > 65536)
        return PM_FAIL(-EINVAL, "out->size is %zu: set it to sizeof(struct pm_compare_progress)", size);
    struct pm_compare_progress o;
    memset(&o, 0, sizeof o);
    o.running = pm_load_relaxed(&c->running);
    o.tracks_total = pm_load_relaxed(&c->total);
    o.tracks_done = pm_load_relaxed(&c->done);
    o.tracks_differ = pm_load_relaxed(&c->differ);
    o.bytes_read = pm_load_relaxed(&c->bytes);
    o.tracks_hashed = pm_load_relaxed(&c->hashed);
    pthread_mutex_lock(&c->mu);
    o.elapsed = c->t0 == 0 ? 0 : (c->t1 ? c->t1 : pm_now()) - c->t0;
    pthread_mutex_unlock(&c->mu);
    size_t n = size < sizeof o ? size : sizeof o;
    o.size = (uint32_t)n;
    memcpy(out, &o, n);
    if (size > n)
        memset((char *)out + n, 0, size - n);
    return 0;
}

/* ---- per-track hashes ---------------------------------------------------- */

int pm_store_set_track_hash(pm_store *s,
                            int (*hash)(void *ctx, uint64_t offset, uint64_t len, uint32_t track_size,
                                        uint32_t *out),
                            void *ctx)
{
    if (s == NULL)
        return PM_FAIL(-EINVAL, "the store must not be NULL");
    s->track_hash = hash;
    s->track_hash_ctx = hash ? ctx : NULL;
    return 0;
}

static void hash_tracks(const unsigned char *buf, uint64_t len, uint32_t ts, uint32_t *out)
{
    for (uint64_t o = 0, i = 0; o < len; o += ts, i++)
        out[i] = pm_crc32c(0, buf + o, (size_t)(len - o < ts ? len - o : ts));
}

static int check_hash_args(pm_store *s, uint64_t offset, uint64_t len, uint32_t ts, const char *func)
{
    if (s == NULL)
        return pm_fail(func, -EINVAL, "the store must not be NULL");
    if (ts == 0 || (ts & (ts - 1)) != 0)
        return pm_fail(func, -EINVAL, "the track size %u is not a power of two", ts);
    if (offset % ts != 0)
        return pm_fail(func, PM_E_ALIGN, "offset %llu is not a multiple of the track size %u",
                       (unsigned long long)offset, ts);
    if (offset > s->size || len > s->size - offset)
        return pm_fail(func, PM_E_RANGE, "offset %llu + length %llu is beyond the volume size %llu",
                       (unsigned long long)offset, (unsigned long long)len, (unsigned long long)s->size);
    return 0;
}

int pm_store_crc32c_tracks(void *store, uint64_t offset, uint64_t len, uint32_t ts, uint32_t *out)
{
    pm_store *s = store;
    int rc = check_hash_args(s, offset, len, ts, __func__);
    if (rc)
        return rc;
    uint64_t chunk = (1u << 20) > ts ? (1u << 20) : ts;
    unsigned char *buf = malloc(len < chunk ? (size_t)len + 1 : (size_t)chunk);
    if (buf == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    for (uint64_t o = 0; o < len && rc == 0; o += chunk) {
        uint64_t n = len - o < chunk ? len - o : chunk;
        rc = pm_store_read(s, buf, n, offset + o);
        if (rc == 0)
            hash_tracks(buf, n, ts, out + o / ts);
    }
    free(buf);
    return rc;
}

int pm_store_track_hashes(pm_store *s, uint64_t offset, uint64_t len, uint32_t ts, uint32_t *out)
{
    int rc = check_hash_args(s, offset, len, ts, __func__);
    if (rc)
        return rc;
    if (s->track_hash != NULL)
        return s->track_hash(s->track_hash_ctx, offset, len, ts, out);
    return pm_store_crc32c_tracks(s, offset, len, ts, out);
}

/* ---- the engine ---------------------------------------------------------- */

struct engine;

struct side {
    struct engine *e;
    int idx;
    int remote_hash;               /* the store hashes for us: no data crosses */
    unsigned char *buf;            /* depth x batch bytes (data path) */
    uint32_t *hash;                /* depth x tracks per batch (hash path) */
    pthread_t th;
    int started;
};

struct engine {
    const struct pm_compare_job *j;
    uint32_t shift, batch, depth;
    uint64_t tpb, nbatches;        /* tracks per batch, batches */
    int use_hash;
    pthread_mutex_t mu;            /* everything below, and the slots' hand-over */
    pthread_cond_t cond;
    uint64_t produced[2], consumed;
    int stop, err, err_side;
    uint64_t err_track;
    char err_msg[256];
    struct side side[2];
};

/* Batch b: its first track, track count, byte offset and length. */
static void batch_span(const struct engine *e, uint64_t b, uint64_t *t0, uint64_t *n, uint64_t *off,
                       uint64_t *len)
{
    const struct pm_compare_job *j = e->j;
    *t0 = j->first + b * e->tpb;
    uint64_t end = j->first + j->count;
    *n = end - *t0 < e->tpb ? end - *t0 : e->tpb;
    *off = *t0 << e->shift;
    uint64_t stop = (*t0 + *n) << e->shift;
    *len = (stop < j->size ? stop : j->size) - *off;
}

static void *reader_main(void *arg)
{
    struct side *sd = arg;
    struct engine *e = sd->e;
    const struct pm_compare_job *j = e->j;
    pm_store *s = j->store[sd->idx];
    for (uint64_t b = 0; b < e->nbatches; b++) {
        pthread_mutex_lock(&e->mu);
        while (!e->stop && b - e->consumed >= e->depth)
            pthread_cond_wait(&e->cond, &e->mu);
        int stop = e->stop;
        pthread_mutex_unlock(&e->mu);
        if (stop)
            break;
        uint64_t t0, n, off, len;
        batch_span(e, b, &t0, &n, &off, &len);
        uint64_t slot = b % e->depth;
        int rc;
        if (sd->remote_hash) {
            rc = s->track_hash(s->track_hash_ctx, off, len, j->track_size, sd->hash + slot * e->tpb);
            if (rc == 0 && j->ctl)
                pm_count_add(&j->ctl->hashed, n);
        } else {
            if (b + 1 < e->nbatches)
                pm__store_prefetch(s, len, off + len);   /* the next batch: a hint */
            unsigned char *buf = sd->buf + slot * e->batch;
            rc = pm_store_read(s, buf, len, off);
            if (rc == 0 && e->use_hash)
                hash_tracks(buf, len, j->track_size, sd->hash + slot * e->tpb);
            if (rc == 0 && j->ctl)
                pm_count_add(&j->ctl->bytes, len);
        }
        pthread_mutex_lock(&e->mu);
        if (rc < 0 && e->err == 0) {
            e->err = rc;
            e->err_side = sd->idx;
            e->err_track = t0;
            snprintf(e->err_msg, sizeof e->err_msg, "%s", pm_last_error());
        }
        if (rc == 0)
            e->produced[sd->idx] = b + 1;
        pthread_cond_broadcast(&e->cond);
        pthread_mutex_unlock(&e->mu);
        if (rc < 0)
            break;
    }
    return NULL;
}

static int cancelled(const struct pm_compare_job *j)
{
    return j->ctl != NULL && pm_load_seqcst(&j->ctl->cancel);
}

/* Compare batch b (both sides ready) into differ[]; returns the count. */
static uint64_t compare_batch(struct engine *e, uint64_t b, unsigned char *differ)
{
    uint64_t t0, n, off, len, d = 0;
    batch_span(e, b, &t0, &n, &off, &len);
    uint64_t slot = b % e->depth;
    uint32_t ts = e->j->track_size;
    for (uint64_t i = 0; i < n; i++) {
        int diff;
        if (e->use_hash) {
            diff = e->side[0].hash[slot * e->tpb + i] != e->side[1].hash[slot * e->tpb + i];
        } else {
            uint64_t o = i * ts;
            size_t l = (size_t)(len - o < ts ? len - o : ts);
            diff = memcmp(e->side[0].buf + slot * e->batch + o, e->side[1].buf + slot * e->batch + o, l) != 0;
        }
        differ[i] = (unsigned char)diff;
        d += (uint64_t)diff;
    }
    return d;
}

static int engine_setup(struct engine *e, const struct pm_compare_job *j)
{
    memset(e, 0, sizeof *e);
    e->j = j;
    e->shift = (uint32_t)__builtin_ctz(j->track_size);
    uint32_t want = j->batch_bytes ? j->batch_bytes : PM_COMPARE_BATCH;
    e->batch = want < j->track_size ? j->track_size : want / j->track_size * j->track_size;
    e->depth = j->depth ? j->depth : PM_COMPARE_DEPTH;
    e->tpb = e->batch >> e->shift;
    e->nbatches = (j->count + e->tpb - 1) / e->tpb;
    e->use_hash = j->store[0]->track_hash != NULL || j->store[1]->track_hash != NULL;
    for (int i = 0; i < 2; i++) {
        struct side *sd = &e->side[i];
        sd->e = e;
        sd->idx = i;
        sd->remote_hash = j->store[i]->track_hash != NULL;
        /* page-aligned: an O_DIRECT store reads into it directly */
        void *buf = NULL;
        if (!sd->remote_hash && posix_memalign(&buf, 4096, (size_t)e->batch * e->depth) != 0)
            return PM_FAIL(-ENOMEM, "out of memory for the compare's buffers");
        sd->buf = buf;
        if (e->use_hash && (sd->hash = malloc(sizeof(uint32_t) * e->tpb * e->depth)) == NULL)
            return PM_FAIL(-ENOMEM, "out of memory for the compare's buffers");
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->cond, &ca);
    pthread_condattr_destroy(&ca);
    return 0;
}

static void engine_stop(struct engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->stop = 1;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < 2; i++)
        if (e->side[i].started)
            pthread_join(e->side[i].th, NULL);
}

static void engine_free(struct engine *e, int inited)
{
    for (int i = 0; i < 2; i++) {
        free(e->side[i].buf);
        free(e->side[i].hash);
    }
    if (inited) {
        pthread_cond_destroy(&e->cond);
        pthread_mutex_destroy(&e->mu);
    }
}

/* Wait until both sides hold batch b, an error, or a cancel; 0 when ready. */
static int wait_ready(struct engine *e, uint64_t b)
{
    int rc = 0;
    pthread_mutex_lock(&e->mu);
    while (e->err == 0 && (e->produced[0] <= b || e->produced[1] <= b)) {
        if (cancelled(e->j))
            break;
        /* a timed wait: a cancel from another thread does not signal us */
        struct timespec d = pm_deadline(pm_now() + 0.05);
        pthread_cond_timedwait(&e->cond, &e->mu, &d);
    }
    if (e->err) {
        const char *what = e->j->name[e->err_side] ? e->j->name[e->err_side] : "a side";
        rc = PM_FAIL(e->err, "reading %s at track %llu: %s", what, (unsigned long long)e->err_track,
                     e->err_msg[0] ? e->err_msg : pm_strerror(e->err));
    }
    pthread_mutex_unlock(&e->mu);
    if (rc == 0 && cancelled(e->j))
        rc = PM_FAIL(-ECANCELED, "the compare was cancelled");
    return rc;
}

int64_t pm__compare_run(const struct pm_compare_job *j)
{
    pm_compare *c = j->ctl;
    if (c != NULL) {
        if (atomic_exchange(&c->running, 1))
            return PM_FAIL(PM_E_BUSY, "this compare handle is in use by another compare");
        pm_store_relaxed(&c->total, j->count);
        pm_store_relaxed(&c->done, 0);
        pm_store_relaxed(&c->differ, 0);
        pm_store_relaxed(&c->bytes, 0);
        pm_store_relaxed(&c->hashed, 0);
        pthread_mutex_lock(&c->mu);
        c->t0 = pm_now();
        c->t1 = 0;
        pthread_mutex_unlock(&c->mu);
    }
    struct engine e;
    int64_t total = 0;
    int rc = engine_setup(&e, j);
    int inited = rc == 0;
    unsigned char *differ = rc == 0 && j->count ? malloc((size_t)e.tpb) : NULL;
    if (rc == 0 && j->count && differ == NULL)
        rc = PM_FAIL(-ENOMEM, "out of memory");
    for (int i = 0; i < 2 && rc == 0 && j->count; i++) {
        int err = pthread_create(&e.side[i].th, NULL, reader_main, &e.side[i]);
        if (err)
            rc = PM_FAIL(-err, "cannot start a reader thread");
        else
            e.side[i].started = 1;
    }
    for (uint64_t b = 0; rc == 0 && b < e.nbatches; b++) {
        if ((rc = wait_ready(&e, b)) != 0)
            break;
        uint64_t t0, n, off, len;
        batch_span(&e, b, &t0, &n, &off, &len);
        uint64_t d = compare_batch(&e, b, differ);
        total += (int64_t)d;
        if (c != NULL) {
            pm_count_add(&c->done, n);
            pm_count_add(&c->differ, d);
        }
        int stop = j->batch != NULL && j->batch(j->ctx, t0, n, differ);
        pthread_mutex_lock(&e.mu);
        e.consumed = b + 1;
        pthread_cond_broadcast(&e.cond);
        pthread_mutex_unlock(&e.mu);
        if (stop)
            break;
    }
    if (inited)
        engine_stop(&e);
    engine_free(&e, inited);
    free(differ);
    if (c != NULL) {
        pthread_mutex_lock(&c->mu);
        c->t1 = pm_now();
        pthread_mutex_unlock(&c->mu);
        pm_store_seqcst(&c->cancel, 0);    /* a cancel given before the start counted; now spent */
        pm_store_seqcst(&c->running, 0);
    }
    return rc < 0 ? rc : total;
}
