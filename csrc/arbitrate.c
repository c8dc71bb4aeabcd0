/*
 * arbitrate.c - host I/O against the background copy, track by track, and
 * the I/O barrier of consistency groups.
 *
 * Layer 6 (with copier.c): may call job.c (5), meta.c (4), tracklock.c/
 * state.c (3), bitmap.c/store.c/pace.c/heat.c (1) and the layer-0 helpers;
 * never copier.c.
 *
 * Pacing and hot order (issue 13): every host read, write and flush of the
 * standard is timed, entry to return, into pace.c's histograms (the
 * latency the host sees, track-lock waits included); a redirected read
 * marks its first track hot, a merge the track after it (heat.c).
 *
 * A host I/O locks every track it touches (tracklock.c), in ascending
 * order, waiting when a track is held; a copier only try-locks.
 *
 * What a host I/O does (docs/arbitration.md has the table):
 *  RESTORING (target standard, source mirror):
 *   - read of a PENDING track: served from the mirror (redirect), or the
 *     track is copied first (hydrate); other tracks read the standard;
 *   - write covering a whole PENDING track: written, PENDING cleared, no copy;
 *   - partial write to a PENDING track: the mirror's track is read, the new
 *     bytes laid over it, the whole track written, PENDING cleared;
 *   - every write marks CHANGED(standard), durably before the data (meta.c);
 *   - unprotected: the same bytes also go to the mirror, under the same lock.
 *  SYNCING (target mirror): writes go to the standard and to the mirror;
 *   a whole-track write to a PENDING mirror track clears it; a partial one
 *   leaves it PENDING (the copier will copy the whole track from the
 *   standard, which already has the new bytes).
 *  ESTABLISHED: writes go to both sides under the track lock, so concurrent
 *   overlapping writers leave both sides identical.
 *  NEW, SPLIT, RESTORED: each side is written alone and marks its CHANGED.
 *  DETACHED: the standard alone (the mirror failed; see below).
 *
 * A failing mirror never fails the host (docs/states.md): a host write or
 * flush that succeeds on the standard and fails on the mirror while SYNCING
 * or ESTABLISHED detaches the mirror (job.c) and succeeds; during an
 * unprotected restore it pauses the job and stops mirroring instead.  A
 * failing standard fails the host's I/O (and pauses a restore).
 *
 * The state is read once per I/O (acquire) under cmd_lock held for reading,
 * so commands cannot change it meanwhile; only the end of a copy can (the
 * copier moves SYNCING -> ESTABLISHED or RESTORING -> RESTORED/ESTABLISHED),
 * and a detach (a host I/O moves SYNCING/ESTABLISHED -> DETACHED; a writer
 * that still acts on the older state writes the mirror too, harmlessly: its
 * tracks are CHANGED(standard) whatever happens there).
 * Acting on the older state is still right: once no track is PENDING, the
 * RESTORING and SYNCING paths do exactly what RESTORED and ESTABLISHED do.
 */
#include <stdlib.h>
#include <string.h>

#include "layout.h"

static void lock_span(pm_pair *p, uint64_t t0, uint64_t t1)
{
    for (uint64_t t = t0; t <= t1; t++)
        pm_track_lock(p, t);
}

static void unlock_span(pm_pair *p, uint64_t t0, uint64_t t1)
{
    for (uint64_t t = t0; t <= t1; t++)
        pm_track_unlock(p, t);
}

/* ---- the I/O barrier ------------------------------------------------------
 *
 * Host writes, write-zeroes and flushes (either side) pass the barrier
 * before anything else; pm_pair_hold_io closes it and waits for those in
 * flight, so a group of pairs can change state at one instant with respect
 * to dependent writes.  Reads and the copier do not pass it.  The fast path
 * is two seq_cst atomics, no lock.  No lost wake-up: a holder increments
 * io_holds then reads io_inflight under io_mu; a writer leaving decrements
 * io_inflight then reads io_holds, and broadcasts under io_mu if held. */

static void io_exit(pm_pair *p)
{
    if (pm_fetch_sub(&p->io_inflight, 1) == 1 && pm_load_seqcst(&p->io_holds) > 0) {
        pthread_mutex_lock(&p->io_mu);
        pthread_cond_broadcast(&p->io_cond);   /* the holder waiting for the drain */
        pthread_mutex_unlock(&p->io_mu);
    }
}

static void io_enter(pm_pair *p)
{
    for (;;) {
        pm_fetch_add(&p->io_inflight, 1);
        if (PM_LIKELY(pm_load_seqcst(&p->io_holds) == 0))
            return;
        io_exit(p);                            /* held: step back and wait */
        pthread_mutex_lock(&p->io_mu);
        while (pm_load_seqcst(&p->io_holds) > 0)
            pthread_cond_wait(&p->io_cond, &p->io_mu);
        pthread_mutex_unlock(&p->io_mu);
    }
}

int pm_pair_hold_io(pm_pair *p)
{
    pthread_mutex_lock(&p->io_mu);
    pm_fetch_add(&p->io_holds, 1);
    while (pm_load_seqcst(&p->io_inflight) > 0)
        pthread_cond_wait(&p->io_cond, &p->io_mu);
    pthread_mutex_unlock(&p->io_mu);
    return 0;
}

int pm_pair_release_io(pm_pair *p)
{
    int rc = 0;
    pthread_mutex_lock(&p->io_mu);
    if (pm_load_seqcst(&p->io_holds) == 0)
        rc = PM_FAIL(PM_E_STATE, "host I/O is not held");
    else if (pm_fetch_sub(&p->io_holds, 1) == 1)
        pthread_cond_broadcast(&p->io_cond);   /* writers waiting at the barrier */
    pthread_mutex_unlock(&p->io_mu);
    return rc;
}

/* ---- checks -------------------------------------------------------------- */

static int check_io(const pm_pair *p, int side, uint64_t len, uint64_t off, const char *func)
{
    if (side != PM_STANDARD && side != PM_MIRROR)
        return pm_fail(func, -EINVAL, "side must be PM_STANDARD or PM_MIRROR, got %d", side);
    if (off > p->size || len > p->size - off)
        return pm_fail(func, PM_E_RANGE, "offset %llu + length %llu is beyond the volume size %llu",
                       (unsigned long long)off, (unsigned long long)len, (unsigned long long)p->size);
    return 0;
}

static int mirror_readable(int state)
{
    return state != PM_STATE_NEW && state != PM_STATE_SYNCING && state != PM_STATE_DETACHED;
}
static int mirror_writable(int state) { return state == PM_STATE_SPLIT || state == PM_STATE_RESTORED; }

static int is_mirrored(pm_pair *p, int state)
{
    return state == PM_STATE_SYNCING || state == PM_STATE_ESTABLISHED ||
           (state == PM_STATE_RESTORING && !pm_load_relaxed(&p->protect));
}

static int read_policy(pm_pair *p)
{
    /* relaxed: a policy is a preference; either one gives the same bytes */
    return pm_load_relaxed(&p->read_policy);
}

/* ---- reads --------------------------------------------------------------- */

/* Read [off, off+len) of the standard while restoring.
 *
 * Runs of non-PENDING tracks are read from the standard, runs of PENDING
 * tracks from the mirror, each in one I/O and without track locks: a
 * PENDING track has not been written by the host since the restore began
 * (a host write clears PENDING), so its final image is the mirror's bytes,
 * which the copier only reads.  A host write racing with this read overlaps
 * it in time, and either result is allowed.  So a read never waits for a
 * copier's batch.  Only the hydrate policy locks, to copy the track first. */
static int read_restoring(pm_pair *p, unsigned char *buf, uint64_t len, uint64_t off)
{
    pm_bitmap *pending = p->table[PM_STANDARD]->flags[PM_PENDING];
    uint64_t end = off + len;
    unsigned char *tbuf = NULL;
    int rc = 0, policy = read_policy(p);
    while (off < end && rc == 0) {
        uint64_t t = off >> p->shift;
        int is_pending = pm_bitmap_get(pending, t) == 1;
        if (is_pending && policy == PM_READ_HYDRATE) {
            uint64_t tend = pm_track_off(p, t) + pm_track_len(p, t);
            uint64_t n = (tend < end ? tend : end) - off;
            pm_track_lock(p, t);
            if (pm_bitmap_get(pending, t) != 1) {
                rc = pm_store_read(p->store[PM_STANDARD], buf, n, off);
            } else {
                if (tbuf == NULL && (tbuf = malloc(p->track_size)) == NULL)
                    rc = PM_FAIL(-ENOMEM, "out of memory");
                if (rc == 0 && (rc = pm_job_copy_track_locked(p, t, tbuf)) == 0) {
                    memcpy(buf, tbuf + (off - pm_track_off(p, t)), (size_t)n);
                    pm_count_add(&p->reads_hydrated, 1);
                }
            }
            pm_track_unlock(p, t);
            buf += n, off += n;
            continue;
        }
        /* the run of tracks with the same PENDING value */
        uint64_t stop = t + 1;
        while (stop < p->tracks && pm_track_off(p, stop) < end &&
               (pm_bitmap_get(pending, stop) == 1) == is_pending)
            stop++;
        uint64_t run_end = stop >= p->tracks ? p->size : pm_track_off(p, stop);
        uint64_t n = (run_end < end ? run_end : end) - off;
        rc = pm_store_read(p->store[is_pending ? PM_MIRROR : PM_STANDARD], buf, n, off);
        if (rc == 0 && is_pending) {
            pm_count_add(&p->reads_redirected, stop - t);
            if (pm_load_relaxed(&p->order) == PM_ORDER_HOT)
                pm_heat_mark(&p->heat, t);   /* the copier takes the run from t first */
        }
        buf += n, off += n;
    }
    free(tbuf);
    return rc;
}

int pm_pair_read(pm_pair *p, int side, void *buf, uint64_t len, uint64_t offset)
{
    int rc = check_io(p, side, len, offset, __func__);
    if (rc || len == 0)
        return rc;
    uint64_t t0 = pm_lat_now_ns();      /* host latency as the arbitration sees it (pace.c) */
    pthread_rwlock_rdlock(&p->cmd_lock);
    int state = pm_pair_state(p);
    if (side == PM_MIRROR) {
        if (state == PM_STATE_DETACHED)
            rc = PM_FAIL(PM_E_DETACHED, "the mirror is detached after an error: it is no point-in-time "
                         "image; establish repairs it");
        else if (!mirror_readable(state))
            rc = PM_FAIL(PM_E_STATE, "the pair is %s; the mirror is readable when established, "
                         "split, restoring or restored", pm_state_name(state));
        else
            rc = pm_store_read(p->store[PM_MIRROR], buf, len, offset);
    } else if (state == PM_STATE_RESTORING) {
        rc = read_restoring(p, buf, len, offset);
    } else {
        rc = pm_store_read(p->store[PM_STANDARD], buf, len, offset);
    }
    pthread_rwlock_unlock(&p->cmd_lock);
    if (side == PM_STANDARD && rc == 0)
        pm_lat_host(&p->lat, PM_LAT_READ, t0);
    return rc;
}

/* pm_pair_read if every byte is in the page cache of a local file (the
 * NBD loop's reader tries it before it hands a read to another thread):
 * PM__READ_DONE, or PM__READ_COLD when none is cached (the read will wait
 * for the device), or -EAGAIN (partly cached, a page still being read in,
 * a busy command lock, a remote store, a restore, whose reads may hydrate,
 * an injected fault, a bad range); nothing said in any case, the caller
 * then reads the ordinary way.  cachestat comes first because a refused
 * RWF_NOWAIT read has already started reading the missing pages in. */
int pm_pair__read_cached(pm_pair *p, int side, void *buf, uint64_t len, uint64_t offset)
{
    if ((side != PM_STANDARD && side != PM_MIRROR) || len == 0 || offset > p->size || len > p->size - offset)
        return -EAGAIN;
    uint64_t t0 = pm_lat_now_ns();
    if (pthread_rwlock_tryrdlock(&p->cmd_lock) != 0)
        return -EAGAIN;
    int state = pm_pair_state(p), rc = -EAGAIN;
    if (side == PM_MIRROR ? mirror_readable(state) : state != PM_STATE_RESTORING) {
        int cached = pm__store_cached(p->store[side], len, offset);
        if (cached == PM__CACHED_NONE)
            rc = PM__READ_COLD;
        else if (cached == PM__CACHED_ALL)
            rc = pm__store_read_nowait(p->store[side], buf, len, offset);
    }
    pthread_rwlock_unlock(&p->cmd_lock);
    if (side == PM_STANDARD && rc == PM__READ_DONE)
        pm_lat_host(&p->lat, PM_LAT_READ, t0);
    return rc;
}

/* ---- writes -------------------------------------------------------------- */

/* Data source for a write: a caller buffer, or zeroes. */
struct wsrc {
    int *merged;                /* set to 1 when a PENDING track was merged (pacing: its own class) */
    const unsigned char *buf;   /* NULL for zeroes */
    unsigned zero_flags;        /* zeroes: PM_ZERO_PUNCH if they may be deallocated */
};

static int store_put(pm_store *s, const struct wsrc *src, uint64_t rel, uint64_t len, uint64_t off)
{
    if (src->buf != NULL)
        return pm_store_write(s, src->buf + rel, len, off);
    /* the store zeroes (fallocate, BLKZEROOUT; zero buffers as its fallback) */
    return pm_store_write_zeroes(s, len, off, src->zero_flags);
}

/* Write the part [off, off+len) of track t of the standard while restoring
 * (track locked).  rel is off's position in the caller's buffer. */
static int write_restoring_track(pm_pair *p, uint64_t t, const struct wsrc *src, uint64_t rel,
                                 uint64_t len, uint64_t off, int mirrored, unsigned char **tbuf)
{
    pm_bitmap *pending = p->table[PM_STANDARD]->flags[PM_PENDING];
    uint64_t toff = pm_track_off(p, t);
    uint32_t tlen = pm_track_len(p, t);
    int rc;
    if (pm_bitmap_get(pending, t) != 1) {
        rc = store_put(p->store[PM_STANDARD], src, rel, len, off);
    } else if (len == tlen) {
        rc = store_put(p->store[PM_STANDARD], src, rel, len, off);
        if (rc == 0)
            pm_job_clear_pending(p, PM_STANDARD, t, &p->tracks_skipped);
    } else {
        if (*tbuf == NULL && (*tbuf = malloc(p->track_size)) == NULL)
            return PM_FAIL(-ENOMEM, "out of memory");
        rc = pm_store_read(p->store[PM_MIRROR], *tbuf, tlen, toff);
        if (rc)   /* the restore's source fails: the host's write cannot be merged */
            return pm_job_restore_write_failed(p, PM_STANDARD, rc, t);
        if (src->buf != NULL)
            memcpy(*tbuf + (off - toff), src->buf + rel, (size_t)len);
        else
            memset(*tbuf + (off - toff), 0, (size_t)len);
        rc = pm_store_write(p->store[PM_STANDARD], *tbuf, tlen, toff);
        if (rc == 0) {
            pm_count_add(&p->bytes_read, tlen);
            pm_count_add(&p->bytes_written, tlen);
            pm_job_clear_pending(p, PM_STANDARD, t, &p->tracks_merged);
            *src->merged = 1;
            /* A merge is the host's slowest write: the tracks after it are
             * likely next (a writer moving on), so they are copied first. */
            if (t + 1 < p->tracks && pm_load_relaxed(&p->order) == PM_ORDER_HOT && pm_bitmap_get(pending, t + 1) == 1)
                pm_heat_mark(&p->heat, t + 1);
        }
    }
    if (rc)   /* a failing standard: the host gets the error, the job pauses on it */
        return pm_job_restore_write_failed(p, PM_STANDARD, rc, t);
    if (mirrored && pm_load_relaxed(&p->protect) == 0) {
        rc = store_put(p->store[PM_MIRROR], src, rel, len, off);
        if (rc)   /* the mirror is the restore's source: pause, stop mirroring, the write stands */
            rc = pm_job_restore_write_failed(p, PM_MIRROR, rc, t);
    }
    return rc;
}

/* A host write reached the standard but failed on the mirror (SYNCING or
 * ESTABLISHED, cmd_lock held for reading): a failing mirror never fails the
 * host.  The pair detaches (job.c) and the write succeeds; PM__DETACHED
 * tells the caller to write the standard alone from now on. */
#define PM__DETACHED 1
static int mirror_failed(pm_pair *p, int rc, uint64_t t)
{
    return pm_job_detach(p, rc, t) ? PM__DETACHED : rc;
}

/* Returns 0, PM__DETACHED (the write is done, the mirror detached) or an error. */
static int write_locked(pm_pair *p, int side, int state, const struct wsrc *src, uint64_t len,
                        uint64_t offset, uint64_t t0, uint64_t t1, unsigned *flush_mask)
{
    int rc;
    if (side == PM_MIRROR) {
        rc = store_put(p->store[PM_MIRROR], src, 0, len, offset);
        *flush_mask |= 2;
        return rc;
    }
    int mirrored = is_mirrored(p, state);
    *flush_mask |= mirrored ? 3 : 1;
    if (state == PM_STATE_RESTORING) {
        unsigned char *tbuf = NULL;
        uint64_t off = offset, end = offset + len;
        rc = 0;
        for (uint64_t t = t0; t <= t1 && rc == 0; t++) {
            uint64_t tend = pm_track_off(p, t) + pm_track_len(p, t);
            uint64_t n = (tend < end ? tend : end) - off;
            rc = write_restoring_track(p, t, src, off - offset, n, off, mirrored, &tbuf);
            off += n;
        }
        free(tbuf);
        return rc;
    }
    rc = store_put(p->store[PM_STANDARD], src, 0, len, offset);
    if (rc || !mirrored)
        return rc;
    if (state != PM_STATE_SYNCING) {
        rc = store_put(p->store[PM_MIRROR], src, 0, len, offset);
        return rc ? mirror_failed(p, rc, t0) : 0;
    }
    /* SYNCING: whole PENDING mirror tracks are written and cleared; partial
     * ones stay PENDING for the copier, which copies them from the standard. */
    pm_bitmap *pending = p->table[PM_MIRROR]->flags[PM_PENDING];
    uint64_t off = offset, end = offset + len;
    for (uint64_t t = t0; t <= t1 && rc == 0; t++) {
        uint64_t toff = pm_track_off(p, t);
        uint64_t tend = toff + pm_track_len(p, t);
        uint64_t n = (tend < end ? tend : end) - off;
        if (pm_bitmap_get(pending, t) != 1) {
            rc = store_put(p->store[PM_MIRROR], src, off - offset, n, off);
        } else if (n == pm_track_len(p, t)) {
            rc = store_put(p->store[PM_MIRROR], src, off - offset, n, off);
            if (rc == 0)
                pm_job_clear_pending(p, PM_MIRROR, t, &p->tracks_skipped);
        }
        if (rc)
            return mirror_failed(p, rc, t);
        off += n;
    }
    return 0;
}

static int do_write_entered(pm_pair *p, int side, const struct wsrc *src, uint64_t len, uint64_t offset,
                            unsigned flags, const char *func);

/* A large write (a copy into the volume: nbdcopy, qemu-img convert, a
 * restore tool) starts its own writeback at once (sync_file_range, no
 * wait), as the copier does: the page cache would otherwise hold it all
 * until the flush, which then writes it alone, and the device idles while
 * the data comes in.  Small writes are left to the page cache, where a
 * block written again soon (a journal, a hot table) is written back once.
 * A sequential 1 GiB rewrite over NBD went from 0.97x to 1.7x nbdkit
 * (benchmarks/README.md, issue 15, "Sixth round"). */
#define WRITE_BEHIND_MIN (256u << 10)

static void write_behind(pm_pair *p, unsigned mask, uint64_t len, uint64_t off)
{
    if (mask & 1)
        pm__store_write_behind(p->store[PM_STANDARD], len, off);
    if (mask & 2)
        pm__store_write_behind(p->store[PM_MIRROR], len, off);
}

/* ---- durability: FUA and flush (FUA-light, docs/format.md) ----------------
 *
 * Make the writes already completed on the sides in `mask` (bit 0 the
 * standard, bit 1 the mirror) durable, with the metadata they need: one
 * data sync per side, then pm_meta_flush_commit, which commits fully only
 * if a PENDING bit of the standard was cleared since the last full commit
 * (a restore is running or just ended), and otherwise only makes durable
 * the write-intent not yet durable (normally none: each write waited for
 * its own).  A mirror that fails its
 * sync while the pair mirrors detaches (the host's flush succeeds); a
 * detached mirror is not synced at all. */
static int make_durable(pm_pair *p, unsigned mask)
{
    int rc = 0;
    if (mask & 1) {
        rc = pm_store_flush(p->store[PM_STANDARD]);
        if (rc && pm_pair_state(p) == PM_STATE_RESTORING)   /* reported like a copy's error */
            return pm_job_restore_write_failed(p, PM_STANDARD, rc, UINT64_MAX);
    }
    if (rc == 0 && (mask & 2) && pm_pair_state(p) != PM_STATE_DETACHED) {
        rc = pm_store_flush(p->store[PM_MIRROR]);
        if (rc && (mask & 1)) {     /* mirrored host I/O: the mirror's failure is not the host's */
            pthread_rwlock_rdlock(&p->cmd_lock);
            if (pm_pair_state(p) == PM_STATE_RESTORING)
                rc = pm_job_restore_write_failed(p, PM_MIRROR, rc, UINT64_MAX);
            else if (pm_job_detach(p, rc, UINT64_MAX))
                rc = 0;
            pthread_rwlock_unlock(&p->cmd_lock);
        }
    }
    return rc ? rc : pm_meta_flush_commit(p->meta);
}

static int do_write(pm_pair *p, int side, const struct wsrc *src, uint64_t len, uint64_t offset,
                    unsigned flags, const char *func)
{
    int rc = check_io(p, side, len, offset, func);
    if (rc || len == 0)
        return rc;
    uint64_t t0 = pm_lat_now_ns();
    int merged = 0;
    struct wsrc mine = *src;
    mine.merged = &merged;
    io_enter(p);
    rc = do_write_entered(p, side, &mine, len, offset, flags, func);
    io_exit(p);
    /* a merging write costs a read of the source's track whatever the copy
     * does: its own class, with its own baseline from quiet windows */
    if (side == PM_STANDARD && rc == 0)
        pm_lat_host(&p->lat, merged ? PM_LAT_MERGE : PM_LAT_WRITE, t0);
    return rc;
}

/* do_write past the I/O barrier. */
static int do_write_entered(pm_pair *p, int side, const struct wsrc *src, uint64_t len, uint64_t offset,
                            unsigned flags, const char *func)
{
    int rc = 0;
    pthread_rwlock_rdlock(&p->cmd_lock);
    int state = pm_pair_state(p);
    if (side == PM_MIRROR && !mirror_writable(state)) {
        pthread_rwlock_unlock(&p->cmd_lock);
        if (state == PM_STATE_NEW)
            return pm_fail(func, PM_E_STATE, "the pair is new; the mirror is writable only when split or restored");
        return pm_fail(func, PM_E_READONLY, "the pair is %s; the mirror is write-protected "
                       "(writable only when split or restored)", pm_state_name(state));
    }
    /* A large write goes in pieces of whole tracks (64 MiB, or one track if
     * larger), each locked, marked and written as a unit, so that a write of
     * a whole big volume neither holds millions of track locks at once nor
     * stalls the copier for its whole length.  Overlapping writers may then
     * interleave piece by piece, which their overlap allows anyway; each
     * track still gets one writer at a time on both sides (invariant 6). */
    const uint64_t piece_tracks = ((uint64_t)64 << 20) >> p->shift ? ((uint64_t)64 << 20) >> p->shift : 1;
    unsigned flush_mask = 0;
    for (uint64_t done = 0; done < len && rc == 0;) {
        uint64_t off = offset + done;
        uint64_t t0 = off >> p->shift;
        uint64_t piece_end = (t0 + piece_tracks) << p->shift;
        uint64_t n = (piece_end < offset + len ? piece_end : offset + len) - off;
        uint64_t t1 = (off + n - 1) >> p->shift;
        struct wsrc part = *src;
        if (part.buf != NULL)
            part.buf += done;
        lock_span(p, t0, t1);
        /* Write-intent: the CHANGED bits covering this write are durable
         * before the data is written (a no-op without metadata, and cheap
         * once the tracks are marked). */
        rc = pm_meta_before_write(p->meta, side, t0, t1);
        if (rc == 0)
            rc = write_locked(p, side, state, &part, n, off, t0, t1, &flush_mask);
        if (rc == PM__DETACHED) {   /* the rest goes to the standard alone */
            rc = 0;
            state = PM_STATE_DETACHED;
        }
        unlock_span(p, t0, t1);
        done += n;
    }
    pthread_rwlock_unlock(&p->cmd_lock);
    if (rc == 0 && (flags & PM_IO_FUA))
        rc = make_durable(p, flush_mask);
    else if (rc == 0 && src->buf != NULL && len >= WRITE_BEHIND_MIN)
        write_behind(p, flush_mask, len, offset);
    return rc;
}

int pm_pair_write(pm_pair *p, int side, const void *buf, uint64_t len, uint64_t offset, unsigned flags)
{
    struct wsrc src = { NULL, buf, 0 };
    if (buf == NULL && len > 0)
        return PM_FAIL(-EINVAL, "buf must not be NULL");
    return do_write(p, side, &src, len, offset, flags, __func__);
}

int pm_pair_write_zeroes(pm_pair *p, int side, uint64_t len, uint64_t offset, unsigned flags)
{
    struct wsrc src = { NULL, NULL, (flags & PM_IO_PUNCH) ? PM_ZERO_PUNCH : 0 };
    return do_write(p, side, &src, len, offset, flags & ~(unsigned)PM_IO_PUNCH, __func__);
}

int pm_pair_flush(pm_pair *p, int side)
{
    if (side != PM_STANDARD && side != PM_MIRROR)
        return PM_FAIL(-EINVAL, "side must be PM_STANDARD or PM_MIRROR, got %d", side);
    uint64_t t0 = pm_lat_now_ns();
    io_enter(p);
    unsigned mask = side == PM_MIRROR ? 2u : is_mirrored(p, pm_pair_state(p)) ? 3u : 1u;
    int rc = make_durable(p, mask);
    io_exit(p);
    if (side == PM_STANDARD && rc == 0)
        pm_lat_host(&p->lat, PM_LAT_FLUSH, t0);
    return rc;
}
