/*
 * meta.c - the metadata format and its commit protocol, behind a handle of
 * its own (meta.h): it knows nothing of a pair.
 *
 * Layer 4: may call store.c, bitmap.c (1), crc32c.c and the layer-0
 * helpers.  The layer above reports the state through the handle's status
 * callback; pair_open.c builds pairs from what pm_meta_read_header decodes.
 *
 * File layout (docs/format.md):
 *   [0, 16 KiB)           header slot 0
 *   [16 KiB, 32 KiB)      header slot 1
 *   [32 KiB, +T)          tables of slot 0
 *   [32 KiB + T, +T)      tables of slot 1
 * Tables, in order: PENDING(standard), CHANGED(standard), PENDING(mirror),
 * CHANGED(mirror), each round_up(ceil(tracks/8), 4 KiB) bytes, then
 * INTENT(standard), INTENT(mirror), each round_up(ceil(regions/8), 4 KiB),
 * all in the bitmap serial format.  An intent region is 4 MiB of tracks.  A header holds the
 * generation, the state, the geometry and identity of both volumes, their
 * paths, the CRC-32C of each table and its own CRC-32C.  The valid slot with
 * the highest generation is current.
 *
 * A commit writes the *other* slot: snapshot the tables, make the volumes'
 * data durable (fdatasync both stores), write the tables, fdatasync, write
 * the header, fdatasync.  A torn commit leaves the previous slot current.
 * Snapshot before the data flush: every PENDING bit cleared in the snapshot
 * was cleared after its data write completed, so the flush makes that data
 * durable before the cleared bit can be.
 *
 * Write-intent (group commit), after md's write-intent bitmap: a host write
 * (pm_meta_before_write) sets its CHANGED bits in memory and the INTENT bit
 * of each 4 MiB region it touches; if a region bit is new it notes it
 * (noted++), and waits until everything noted before it is durable.  A write
 * that continues a sequential stream also marks regions ahead of it (see
 * mark_ahead), so a stream waits for a commit about once per 16 regions.
 * Commits are serialised by meta->lock, so writers that noted
 * before a commit's snapshot share that commit; once a region's bit is
 * durable, writes there wait for nothing.  The precise CHANGED tables reach
 * the disk with any commit.  After an unclean shutdown, opening adds every
 * track of every INTENT region to CHANGED (a superset: nothing is forgotten);
 * a clean close marks the header so that the precise tables are used alone.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "meta.h"

#define SLOT_SIZE 16384u
#define TABLES_AT (2u * SLOT_SIZE)
#define FORMAT_VERSION 2u         /* written; 1 is read and upgraded in place */
#define FORMAT_OLDEST 1u
static const char MAGIC[8] = { 'P', 'M', 'I', 'R', 'M', 'E', 'T', 'A' };

/* On-disk header, little-endian; paths follow at fixed offsets. */
struct disk_header {
    char magic[8];
    uint32_t version;
    uint32_t slot_size;
    uint64_t generation;
    uint32_t state;
    uint32_t flags;            /* bit 0 incremental, bit 1 protect */
    uint32_t track_size;
    uint32_t ntables;          /* 6 */
    uint64_t volume_size;
    uint64_t tracks;
    uint64_t table_bytes;      /* one PENDING/CHANGED table, padded */
    uint64_t std_ino, mir_ino;
    uint8_t pair_id[16];
    uint32_t table_crc[6];
    uint64_t region_tracks;    /* tracks per intent region */
    uint64_t intent_bytes;     /* one INTENT table, padded */
    /* Added in place (older files hold zeros here, which read as "no
     * error, mirror consistent"; the format version stays 1): */
    int32_t job_error;         /* the error that paused the job, or 0 */
    uint32_t reserved;
    int64_t job_error_track;   /* its track (meaningful when job_error != 0) */
    uint64_t mirror_invalid;   /* mirror tracks not part of a point-in-time image */
    /* -- format 2, branch detach: the detach record -- */
    int32_t detach_error;      /* the mirror's error that detached it; 0: not detached */
    uint32_t detach_reserved;
    int64_t detach_track;      /* the first track of the write it failed */
    uint64_t detach_time_ns;   /* when (CLOCK_REALTIME, ns since the epoch) */

    /* -- format 2, branch metatrust: volume identities, change stamps -- */
    uint32_t trust_flags;      /* TRUST_*: what the identity area after the paths holds */
    uint32_t samples;          /* sampled tracks at SAMPLE_AT (at most PM_META_SAMPLES) */

};
#define FLAG_INCREMENTAL 1u
#define FLAG_PROTECT 2u
#define FLAG_CLEAN 4u              /* closed cleanly: CHANGED is complete */
#define NTABLES 6
#define REGION_BYTES (4u << 20)
#define STD_PATH_AT 512u
#define MIR_PATH_AT (512u + 4096u)
#define CRC_AT (SLOT_SIZE - 4u)
/* format 2 (branch metatrust): after the paths, in every slot */
#define ID_AT (MIR_PATH_AT + 4096u)        /* two identities of 256 bytes */
#define STAMP_AT (ID_AT + 512u)            /* two change stamps of 128 bytes */
#define SAMPLE_AT (STAMP_AT + 256u)        /* samples of 16 bytes: track u64, CRC std u32, CRC mir u32 */
#define SAMPLE_BYTES 65536u                /* each sample: the CRC-32C of a track's first 64 KiB */
#define V1_HEADER_END (offsetof(struct disk_header, mirror_invalid) + 8u)   /* where format 1 ended */
#define TRUST_IDS 1u                       /* identities recorded */
#define TRUST_STAMPS 2u                    /* change stamps recorded ("" for a store that cannot tell) */
#define TRUST_OUTSIDE_STD 4u               /* the standard was changed outside pymirror, not yet trusted */
#define TRUST_OUTSIDE_MIR 8u               /* ... the mirror */
#define TRUST_SAMPLES 16u                  /* samples taken at the last clean close */
#define TRUST_KNOWN 31u
_Static_assert(SAMPLE_AT + 16u * PM_META_SAMPLES <= CRC_AT, "the identity area must end before the CRC");
_Static_assert(sizeof(struct disk_header) <= STD_PATH_AT, "the header must end before the paths");

struct pm_meta {
    struct pm_meta_binding b;   /* what it describes (borrowed) */
    pm_store *store;            /* where the metadata lives; NULL: nothing is persisted */
    int own_store;              /* closed with the handle */
    char *path;
    pthread_mutex_t lock;       /* serialises commits */
    uint64_t generation;        /* of the current slot */
    uint8_t pair_id[16];
    uint64_t table_bytes, intent_bytes, region_tracks, nregions;
    pm_bitmap *intent[2];       /* write-intent regions per side */
    pm_bitmap *intent_durable[2];   /* ... of which a commit made these durable */
    pm_bitmap *intent_snap[2];      /* ... as the commit in progress saw them */
    unsigned char *snap;        /* the six tables, for commits */
    pm_atomic_u64 noted;        /* changes that writers wait for */
    pm_atomic_u64 durable;      /* ... known durable */
    pm_atomic_u64 dirty;        /* changes nobody waits for (commit on close) */
    uint64_t dirty_committed;
    int last_clean;             /* the current slot says "closed cleanly" */
    uint32_t snap_state, snap_flags;   /* state recorded with the PENDING snapshot */
    uint64_t snap_invalid;      /* mirror_invalid as of that snapshot */
    double last_commit;
    pm_atomic_u64 commits, syncs;
    pm_atomic_int need_full;    /* the next commit must refresh PENDING (a job began) */
    pm_atomic_u64 host_clears;  /* PENDING bits of the standard cleared (pm_meta_std_cleared) */
    uint64_t host_clears_durable;   /* ... as of the last full commit (m->lock) */
    int flush_full;             /* PYMIRROR_FLUSH_FULL_COMMIT=1: every host flush commits fully (as before
                                   FUA-light; for benchmarks and diagnosis) */
    uint32_t crc[NTABLES];      /* of the tables in snap */
    int have_snap;              /* snap holds a full snapshot */
    /* -- branch metatrust -- */
    struct pm_meta_trust trust;  /* recorded with every commit (m->lock) */
    int outside[2];              /* enum pm_outside found at open */
    char note[2][256];
};

static uint64_t round4k(uint64_t n) { return (n + 4095) & ~(uint64_t)4095; }

/* Metadata I/O goes through a store, so tests can put it on a store that
 * simulates power loss.  A read past the end means a truncated file. */
static int meta_read(pm_store *st, void *buf, uint64_t len, uint64_t off)
{
    if (off > pm_store_size(st) || len > pm_store_size(st) - off)
        return -ENODATA;
    return pm_store_read(st, buf, len, off);
}

static pm_bitmap *table_of(struct pm_meta *m, int i)
{
    if (i >= 4)
        return m->intent_snap[i - 4];
    return i % 2 == 0 ? m->b.pending[i / 2] : m->b.changed[i / 2];
}

/* Offset of table i within a slot's table area, and its padded size. */
static uint64_t table_off(uint64_t tb, uint64_t ib, int i)
{
    return i < 4 ? (uint64_t)i * tb : 4 * tb + (uint64_t)(i - 4) * ib;
}
static uint64_t table_len(uint64_t tb, uint64_t ib, int i) { return i < 4 ? tb : ib; }
static uint64_t slot_tables(uint64_t tb, uint64_t ib) { return 4 * tb + 2 * ib; }

/* ---- the handle ---------------------------------------------------------- */

int pm_meta_new(const struct pm_meta_binding *b, struct pm_meta **out)
{
    struct pm_meta *m = calloc(1, sizeof *m);
    if (m == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    m->b = *b;
    m->table_bytes = round4k((b->tracks + 7) / 8);
    m->region_tracks = REGION_BYTES / b->track_size ? REGION_BYTES / b->track_size : 1;
    m->nregions = (b->tracks + m->region_tracks - 1) / m->region_tracks;
    m->intent_bytes = round4k((m->nregions + 7) / 8);
    int ok = 1;
    for (int side = 0; side < 2 && ok; side++)
        ok = pm_bitmap_create(m->nregions, &m->intent[side]) == 0 &&
             pm_bitmap_create(m->nregions, &m->intent_durable[side]) == 0 &&
             pm_bitmap_create(m->nregions, &m->intent_snap[side]) == 0;
    if (!ok) {
        for (int side = 0; side < 2; side++) {
            pm_bitmap_destroy(m->intent[side]);
            pm_bitmap_destroy(m->intent_durable[side]);
            pm_bitmap_destroy(m->intent_snap[side]);
        }
        free(m);
        return PM_FAIL(-ENOMEM, "out of memory");
    }
    pthread_mutex_init(&m->lock, NULL);
    m->last_clean = 1;          /* nothing to mark clean without a store */
    const char *ff = getenv("PYMIRROR_FLUSH_FULL_COMMIT");
    m->flush_full = ff != NULL && ff[0] != 0 && ff[0] != '0';
    *out = m;
    return 0;
}

int pm_meta_attach(struct pm_meta *m, pm_store *st, const char *label)
{
    uint64_t need = pm_meta_size(m->b.volume_size, m->b.track_size);
    if (pm_store_size(st) < need)
        return PM_FAIL(PM_E_GEOMETRY, "%s: a metadata store of %llu bytes is smaller than the %llu needed",
                       label, (unsigned long long)pm_store_size(st), (unsigned long long)need);
    m->path = strdup(label);
    m->snap = malloc((size_t)slot_tables(m->table_bytes, m->intent_bytes));
    if (m->path == NULL || m->snap == NULL) {
        free(m->path), free(m->snap);
        m->path = NULL, m->snap = NULL;
        return PM_FAIL(-ENOMEM, "out of memory");
    }
    m->store = st;
    m->last_clean = 0;
    m->last_commit = pm_now();
    return 0;
}

void pm_meta_own_store(struct pm_meta *m) { m->own_store = 1; }

/* ---- commit -------------------------------------------------------------- */

/* branch detach: the detach record in a header, and back (zeros, as in a
 * file written before it existed, read as "not detached"). */
static void put_detach_record(struct disk_header *h, const struct pm_meta_status *st)
{
    if (st->detach_error == 0)
        return;
    h->detach_error = st->detach_error;
    h->detach_track = st->detach_track;
    h->detach_time_ns = st->detach_time_ns;
}

static void get_detach_record(const struct disk_header *h, struct pm_meta_status *st)
{
    st->detach_error = h->detach_error;
    st->detach_track = h->detach_error ? h->detach_track : -1;
    st->detach_time_ns = h->detach_error ? h->detach_time_ns : 0;
}

/* A full commit need not flush the mirror when nothing durable is expected
 * of it: detached (its tracks the standard has are CHANGED), or the source
 * of a protected restore (nothing writes it).  So a failing mirror cannot
 * fail the commits that record its failure. */
static int mirror_needs_no_flush(const struct pm_meta_status *st)
{
    return st->state == PM_STATE_DETACHED || (st->state == PM_STATE_RESTORING && st->protect);
}

static void trust_fill(struct pm_meta *m, struct disk_header *h, unsigned char *hdr, int clean);


/* ---- branch sparse: the data flush beside the tables' write (issue 13) ----
 *
 * A full commit must have the volumes' data durable before the header that
 * makes its tables current; the tables themselves go to the slot that is not
 * current, so they may be written while the data is flushed.  The data
 * flushes (each store's, on a thread of its own; one that was not written
 * since its last flush costs nothing, store.c) run beside the tables' write
 * and sync, and the filesystem may commit them in one journal transaction:
 * one sync's wait instead of two or three in a row, which is most of a
 * short job's cost (an incremental restore).  Returns once all are done,
 * with the first error. */
struct flush_arg { pm_store *s; int rc; };

static void *flush_thread(void *arg)
{
    struct flush_arg *a = arg;
    a->rc = pm_store_flush(a->s);
    return NULL;
}

static int data_and_tables(struct pm_meta *m, int full, int skip_mirror, const void *tables, uint64_t len,
                           uint64_t off)
{
    struct flush_arg args[2];
    pthread_t th[2];
    int started[2] = { 0, 0 }, rc = 0;
    for (int s = 0; s < 2 && full; s++) {
        args[s] = (struct flush_arg){ m->b.data[s], 0 };   /* rc 0: nothing to flush */
        if (m->b.data[s]->readonly || (s == PM_MIRROR && skip_mirror))
            continue;
        started[s] = pthread_create(&th[s], NULL, flush_thread, &args[s]) == 0;
        if (!started[s])
            args[s].rc = pm_store_flush(m->b.data[s]);   /* no thread: in turn */
    }
    rc = pm_store_write(m->store, tables, len, off);
    if (rc == 0)
        rc = pm_store_flush(m->store);
    for (int s = 0; s < 2 && full; s++) {
        if (started[s])
            pthread_join(th[s], NULL);
        if (rc == 0)
            rc = args[s].rc;
    }
    return rc;
}

/* A full commit snapshots all four tables and makes the volumes' data
 * durable first.  An intent commit (for write-intent) refreshes only the
 * CHANGED tables and the state, and writes PENDING as of the last full
 * commit, so it needs no data flush: a PENDING bit is never durable-clear
 * before the data behind it.  m->lock held. */
static int commit_locked(struct pm_meta *m, int full, int clean)
{
    if (m->store == NULL)
        return 0;
    uint64_t seq = pm_load_seqcst(&m->noted);
    uint64_t dirty = pm_load_seqcst(&m->dirty);
    uint64_t host_clears = pm_load_seqcst(&m->host_clears);   /* before the snapshot */
    unsigned char *hdr = calloc(1, SLOT_SIZE);
    if (hdr == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    struct disk_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, MAGIC, 8);
    h.version = FORMAT_VERSION;
    h.slot_size = SLOT_SIZE;
    h.generation = m->generation + 1;
    /* The state and the PENDING tables are recorded as a pair: a state
     * that ends a job ("restored") must never sit beside PENDING tables of
     * an earlier instant, or a reopen would skip tracks never made durable.
     * So an intent commit writes both as of the last full snapshot. */
    struct pm_meta_status now;
    memset(&now, 0, sizeof now);
    m->b.status(m->b.ctx, &now);
    uint32_t flags_now = (now.incremental ? FLAG_INCREMENTAL : 0u) | (now.protect ? FLAG_PROTECT : 0u);
    h.track_size = m->b.track_size;
    h.ntables = NTABLES;
    h.region_tracks = m->region_tracks;
    h.intent_bytes = m->intent_bytes;
    h.volume_size = m->b.volume_size;
    h.tracks = m->b.tracks;
    h.table_bytes = m->table_bytes;
    h.std_ino = m->b.data[PM_STANDARD]->ino;
    h.mir_ino = m->b.data[PM_MIRROR]->ino;
    memcpy(h.pair_id, m->pair_id, 16);
    /* A job that just began rebuilt PENDING: snapshot it fresh.  No data
     * flush is needed for that: no host write or copy can have cleared a
     * bit of the new set before this commit (both wait for it). */
    int job_began = atomic_exchange(&m->need_full, 0);   /* always consumed, full commit or not */
    int fresh = full || !m->have_snap || job_began;
    if (fresh) {
        m->snap_state = (uint32_t)now.state;
        m->snap_flags = flags_now;
        m->snap_invalid = now.mirror_invalid;
    }
    h.state = m->snap_state;
    h.flags = m->snap_flags | (clean ? FLAG_CLEAN : 0u);
    h.mirror_invalid = m->snap_invalid;
    if (now.error) {
        h.job_error = now.error;
        h.job_error_track = now.error_track;
    }
    put_detach_record(&h, &now);
    pm_bitmap_copy(m->intent_snap[0], m->intent[0]);
    pm_bitmap_copy(m->intent_snap[1], m->intent[1]);
    for (int i = 0; i < NTABLES; i++) {
        if (!fresh && i < 4 && i % 2 == 0)
            continue;   /* PENDING: keep the last full snapshot */
        uint64_t len = table_len(m->table_bytes, m->intent_bytes, i);
        unsigned char *dst = m->snap + table_off(m->table_bytes, m->intent_bytes, i);
        memset(dst, 0, (size_t)len);
        pm_bitmap_save(table_of(m, i), dst, len);
        m->crc[i] = pm_crc32c(0, dst, (size_t)len);
    }
    m->have_snap = 1;
    memcpy(h.table_crc, m->crc, sizeof h.table_crc);
    trust_fill(m, &h, hdr, clean);
    memcpy(hdr, &h, sizeof h);
    snprintf((char *)hdr + STD_PATH_AT, PM_PATH_MAX, "%s", m->b.data[PM_STANDARD]->path);
    snprintf((char *)hdr + MIR_PATH_AT, PM_PATH_MAX, "%s", m->b.data[PM_MIRROR]->path);
    uint32_t crc = pm_crc32c(0, hdr, CRC_AT);
    memcpy(hdr + CRC_AT, &crc, 4);

    int slot = (int)(h.generation % 2);
    uint64_t st = slot_tables(m->table_bytes, m->intent_bytes);
    /* data before the bits that describe it: durable before the header */
    int rc = data_and_tables(m, full, mirror_needs_no_flush(&now), m->snap, st, TABLES_AT + (uint64_t)slot * st);
    if (rc == 0)
        rc = pm_store_write(m->store, hdr, SLOT_SIZE, (uint64_t)slot * SLOT_SIZE);
    if (rc == 0)
        rc = pm_store_flush(m->store);
    free(hdr);
    if (rc < 0)
        return PM_FAIL(rc, "%s: cannot commit the metadata", m->path);
    m->generation = h.generation;
    m->last_commit = pm_now();
    pm_count_add(&m->commits, 1);
    pm_count_add(&m->syncs, full ? 4 : 2);
    pm_bitmap_union(m->intent_durable[0], m->intent_snap[0]);
    pm_bitmap_union(m->intent_durable[1], m->intent_snap[1]);
    pm_store_seqcst(&m->durable, seq);
    if (full)
        m->host_clears_durable = host_clears;
    m->dirty_committed = dirty;
    m->last_clean = clean;
    return 0;
}

int pm_meta_commit(struct pm_meta *m)
{
    if (m == NULL || m->store == NULL)
        return 0;
    pthread_mutex_lock(&m->lock);
    int rc = commit_locked(m, 1, 0);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

void pm_meta_counters(struct pm_meta *m, uint64_t *commits, uint64_t *syncs)
{
    *commits = m ? pm_load_relaxed(&m->commits) : 0;
    *syncs = m ? pm_load_relaxed(&m->syncs) : 0;
}

void pm_meta_dirty(struct pm_meta *m)
{
    if (m != NULL)
        pm_count_add(&m->dirty, 1);
}

/* Mark-ahead: a write that opens a region right after a run of marked ones
 * is part of a sequential stream (a restore of a file system image, a
 * database's log, nbdcopy).  Mark as many regions beyond it as the run behind
 * it is long, up to AHEAD_MAX, so that the commit this write waits for covers
 * the stream's next writes too: a stream of n regions costs about log2(n) +
 * n / AHEAD_MAX commits instead of n.  The price is paid only after an
 * unclean stop, when the marked regions count as CHANGED: at most AHEAD_MAX
 * regions (64 MiB) beyond each stream's last write.  A write with no marked
 * region before it (random I/O) marks nothing ahead. */
#define AHEAD_MAX 16u

static void mark_ahead(struct pm_meta *m, int side, uint64_t r0, uint64_t r1)
{
    uint64_t run = 0;
    while (run < AHEAD_MAX && run < r0 && pm_bitmap_get(m->intent[side], r0 - 1 - run) == 1)
        run++;
    for (uint64_t r = r1 + 1; r <= r1 + run && r < m->nregions; r++)
        pm_bitmap_set(m->intent[side], r);
}

/* Write-intent for tracks t0..t1 of a side: sets their intent regions (and
 * those marked ahead) and notes any region not yet durable.  Returns 1 if
 * one was. */
static int intent(struct pm_meta *m, int side, uint64_t t0, uint64_t t1)
{
    int need = 0;
    uint64_t r0 = t0 / m->region_tracks, r1 = t1 / m->region_tracks;
    for (uint64_t r = r0; r <= r1; r++) {
        if (pm_bitmap_get(m->intent_durable[side], r) == 1)
            continue;                  /* already on disk: nothing to wait for */
        pm_bitmap_set(m->intent[side], r);
        need = 1;   /* set by us or by a writer whose commit may still be running */
    }
    if (need)
        mark_ahead(m, side, r0, r1);
    if (need)
        pm_fetch_add(&m->noted, 1);   /* after the bits: a commit that reads it sees them */
    return need;
}

int pm_meta_before_write(struct pm_meta *m, int side, uint64_t t0, uint64_t t1)
{
    pm_bitmap *changed = m->b.changed[side];
    int fresh = 0;
    for (uint64_t t = t0; t <= t1; t++) {
        /* plain check first: most writes hit tracks already marked */
        if (pm_bitmap_get(changed, t) != 1 && pm_bitmap_test_and_set(changed, t) == 0)
            fresh = 1;
    }
    if (m->store == NULL)
        return 0;
    if (fresh)
        pm_meta_dirty(m);
    if (!intent(m, side, t0, t1))
        return 0;
    return pm_meta_changed_durable(m);
}

void pm_meta_intent_reset_locked(struct pm_meta *m)
{
    if (m == NULL)
        return;
    /* under the commit lock, so no commit in flight marks an old region durable */
    for (int side = 0; side < 2; side++) {
        pm_bitmap_zero(m->intent[side]);
        pm_bitmap_zero(m->intent_durable[side]);
    }
    pm_fetch_add(&m->noted, 1);
}

void pm_meta_lock(struct pm_meta *m)
{
    if (m != NULL)
        pthread_mutex_lock(&m->lock);
}

void pm_meta_unlock(struct pm_meta *m)
{
    if (m != NULL)
        pthread_mutex_unlock(&m->lock);
}

void pm_meta_need_full(struct pm_meta *m)
{
    if (m != NULL) {
        pm_store_seqcst(&m->need_full, 1);
        pm_fetch_add(&m->noted, 1);
    }
}

void pm_meta_note(struct pm_meta *m)
{
    if (m != NULL)
        pm_fetch_add(&m->noted, 1);
}

int pm_meta_changed_durable(struct pm_meta *m)
{
    if (m == NULL || m->store == NULL)
        return 0;
    uint64_t want = pm_load_seqcst(&m->noted);
    if (pm_load_seqcst(&m->durable) >= want)
        return 0;
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    if (pm_load_seqcst(&m->durable) < want)
        rc = commit_locked(m, 0, 0);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

void pm_meta_copied(struct pm_meta *m, uint64_t ntracks)
{
    if (m == NULL || m->store == NULL)
        return;
    /* Bound the copy work a crash can lose to about a second. */
    if (pthread_mutex_trylock(&m->lock) != 0)
        return;
    if (pm_now() - m->last_commit > 1.0)
        commit_locked(m, 1, 0);
    pthread_mutex_unlock(&m->lock);
}

void pm_meta_close(struct pm_meta *m)
{
    if (m == NULL)
        return;
    pthread_mutex_lock(&m->lock);
    /* only if something changed: opening and closing a pair writes nothing */
    if (m->store != NULL && (pm_load_seqcst(&m->durable) < pm_load_seqcst(&m->noted) ||
                             pm_load_seqcst(&m->dirty) != m->dirty_committed || !m->last_clean))
        commit_locked(m, 1, 1);
    pthread_mutex_unlock(&m->lock);
    if (m->own_store)
        pm_store_destroy(m->store);   /* closes the file, dropping the flock */
    pthread_mutex_destroy(&m->lock);
    for (int side = 0; side < 2; side++) {
        pm_bitmap_destroy(m->intent[side]);
        pm_bitmap_destroy(m->intent_durable[side]);
        pm_bitmap_destroy(m->intent_snap[side]);
    }
    free(m->snap);
    free(m->path);
    free(m);
}

/* ---- reading headers ----------------------------------------------------- */

/* Validate slot `slot`; fill h/hdr.  Returns 0, PM_E_CORRUPT or PM_E_FOREIGN. */
static int read_slot(pm_store *st, int slot, unsigned char *hdr, struct disk_header *h, const char *path,
                     int *newer)
{
    int rc = meta_read(st, hdr, SLOT_SIZE, (uint64_t)slot * SLOT_SIZE);
    if (rc == -ENODATA) {
        if (meta_read(st, hdr, 8, 0) == 0 && memcmp(hdr, MAGIC, 8) != 0)
            return PM_FAIL(PM_E_FOREIGN, "%s: not a pymirror metadata file", path);
        return PM_FAIL(PM_E_CORRUPT, "%s: the metadata is truncated (no header slot %d)", path, slot);
    }
    if (rc < 0)
        return PM_FAIL(rc, "%s: cannot read the metadata", path);
    memcpy(h, hdr, sizeof *h);
    if (memcmp(h->magic, MAGIC, 8) != 0)
        return PM_FAIL(PM_E_FOREIGN, "%s: not a pymirror metadata file", path);
    uint32_t crc;
    memcpy(&crc, hdr + CRC_AT, 4);
    if (pm_crc32c(0, hdr, CRC_AT) != crc)
        return PM_FAIL(PM_E_CORRUPT, "%s: header slot %d fails its checksum", path, slot);
    if (h->version > FORMAT_VERSION) {
        if (newer)
            *newer = (int)h->version;
        return PM_FAIL(PM_E_FOREIGN, "%s: metadata format %u is newer than this pymirror (reads up to %u): "
                       "upgrade pymirror", path, h->version, FORMAT_VERSION);
    }
    if (h->version < FORMAT_OLDEST)
        return PM_FAIL(PM_E_FOREIGN, "%s: metadata format version %u is unknown", path, h->version);
    if (h->version < 2)   /* format 1 had nothing past mirror_invalid: zeros, "none recorded" */
        memset((char *)h + V1_HEADER_END, 0, sizeof *h - V1_HEADER_END);
    uint64_t rt = h->track_size ? ((uint64_t)REGION_BYTES / h->track_size ? (uint64_t)REGION_BYTES / h->track_size : 1) : 1;
    if (h->slot_size != SLOT_SIZE || h->ntables != NTABLES || h->state > PM_STATE_DETACHED ||
        h->region_tracks != rt || h->tracks == 0 ||
        h->intent_bytes != round4k(((h->tracks + rt - 1) / rt + 7) / 8) ||
        h->track_size < PM_TRACK_SIZE_MIN || h->track_size > PM_TRACK_SIZE_MAX ||
        (h->track_size & (h->track_size - 1)) || h->volume_size == 0 ||
        h->tracks != (h->volume_size + h->track_size - 1) / h->track_size ||
        h->table_bytes != round4k((h->tracks + 7) / 8) ||
        h->job_error > 0 || h->mirror_invalid > h->tracks || h->detach_error > 0 ||
        (h->trust_flags & ~TRUST_KNOWN) || h->samples > PM_META_SAMPLES ||
        (h->version >= 2 && (hdr[ID_AT + 255] != 0 || hdr[ID_AT + 511] != 0 ||
                             hdr[STAMP_AT + 127] != 0 || hdr[STAMP_AT + 255] != 0)) ||
        hdr[STD_PATH_AT + PM_PATH_MAX - 1] != 0 || hdr[MIR_PATH_AT + PM_PATH_MAX - 1] != 0)
        return PM_FAIL(PM_E_CORRUPT, "%s: header slot %d has impossible values", path, slot);
    unsigned char *buf = malloc((size_t)h->table_bytes);
    if (buf == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    uint64_t stb = slot_tables(h->table_bytes, h->intent_bytes);
    for (int i = 0; i < NTABLES && rc == 0; i++) {
        uint64_t len = table_len(h->table_bytes, h->intent_bytes, i);
        rc = meta_read(st, buf, len, TABLES_AT + (uint64_t)slot * stb + table_off(h->table_bytes, h->intent_bytes, i));
        if (rc == -ENODATA)
            rc = PM_FAIL(PM_E_CORRUPT, "%s: the metadata is truncated (tables of slot %d)", path, slot);
        else if (rc < 0)
            rc = PM_FAIL(rc, "%s: cannot read the metadata", path);
        else if (pm_crc32c(0, buf, (size_t)len) != h->table_crc[i])
            rc = PM_FAIL(PM_E_CORRUPT, "%s: table %d of slot %d fails its checksum", path, i, slot);
    }
    free(buf);
    return rc;
}

static _Thread_local char last_warning[640];

const char *pm_meta_last_warning(void) { return last_warning; }

/* The text after "func: path: " of the last error, for a warning. */
static const char *reason(const char *msg, const char *path)
{
    const char *at = strstr(msg, path);
    if (at != NULL && at[strlen(path)] == ':')
        return at + strlen(path) + 2;
    return strchr(msg, ':') ? strchr(msg, ':') + 2 : msg;
}

/* The current slot: the valid one with the highest generation.  A slot of
 * a newer format refuses the whole file (its other slot is an older state).
 * When one slot is invalid, last_warning says so.  *other_version: the
 * version of the other slot when valid, else 0. */
static int pick_slot_v(pm_store *st, unsigned char *hdr, struct disk_header *h, const char *path,
                       uint32_t *other_version)
{
    last_warning[0] = 0;
    unsigned char *other = malloc(SLOT_SIZE);
    if (other == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    struct disk_header h1;
    int newer = 0;
    int rc0 = read_slot(st, 0, hdr, h, path, &newer);
    char msg0[512], msg1[512];
    snprintf(msg0, sizeof msg0, "%s", pm_last_error());
    int rc1 = read_slot(st, 1, other, &h1, path, &newer);
    snprintf(msg1, sizeof msg1, "%s", pm_last_error());
    int rc;
    if (newer) {
        free(other);
        return PM_FAIL(PM_E_FOREIGN, "%s: metadata format %d is newer than this pymirror (reads up to %u): "
                       "upgrade pymirror", path, newer, FORMAT_VERSION);
    }
    if (other_version) {
        /* the other slot's format, valid or not (an upgrade cut short leaves
         * an older, damaged slot: it is rewritten like an older one) */
        int cur = rc1 == 0 && (rc0 != 0 || h1.generation > h->generation) ? 1 : 0;
        const unsigned char *o = cur ? hdr : other;   /* hdr holds slot 0 here */
        uint32_t v = 0;
        if (memcmp(o, MAGIC, 8) == 0)
            memcpy(&v, o + 8, 4);
        *other_version = v;
    }
    if ((rc0 == 0) != (rc1 == 0) && rc0 != PM_E_FOREIGN && rc1 != PM_E_FOREIGN) {
        int bad = rc0 ? 0 : 1;
        const struct disk_header *good = rc0 ? &h1 : h;
        snprintf(last_warning, sizeof last_warning,
                 "%s: header slot %d is damaged (%s); using the other slot, generation %llu (a commit cut "
                 "short by a crash leaves this too; else the file was damaged: pymirror check %s)", path, bad,
                 reason(bad ? msg1 : msg0, path), (unsigned long long)good->generation, path);
    }
    if (rc1 == 0 && (rc0 != 0 || h1.generation > h->generation)) {
        memcpy(hdr, other, SLOT_SIZE);
        *h = h1;
        rc = 0;
    } else if (rc0 == 0) {
        rc = 0;
    } else {
        /* neither slot is valid: report the more telling error */
        rc = rc0 == PM_E_FOREIGN || rc1 == PM_E_FOREIGN ? PM_E_FOREIGN : rc0;
        if (rc == rc0)
            pm_fail("pm_meta", rc0, "%s", strchr(msg0, ':') ? strchr(msg0, ':') + 2 : msg0);
    }
    free(other);
    return rc;
}

static int pick_slot(pm_store *st, unsigned char *hdr, struct disk_header *h, const char *path)
{
    return pick_slot_v(st, hdr, h, path, NULL);
}

/* Open a metadata file as a store; with `lock`, take an exclusive flock. */
static int open_meta_store(const char *path, int lock, pm_store **out)
{
    struct stat sb;
    if (stat(path, &sb) < 0)
        return PM_FAIL(-errno, "%s: cannot open the metadata", path);
    if (!S_ISREG(sb.st_mode))
        return PM_FAIL(PM_E_FOREIGN, "%s: not a pymirror metadata file (not a regular file)", path);
    if (sb.st_size == 0)
        return PM_FAIL(PM_E_CORRUPT, "%s: the metadata file is empty", path);
    pm_store *st;
    int rc = pm_store_open_file(path, PM_STORE_NOLOCK, 0, &st);
    if (rc == -EACCES && !lock)
        rc = pm_store_open_file(path, PM_STORE_READONLY | PM_STORE_NOLOCK, 0, &st);
    if (rc < 0)
        return rc;
    if (lock && flock(st->fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        pm_store_destroy(st);
        if (e != EWOULDBLOCK)
            return PM_FAIL(-e, "%s: cannot lock the metadata", path);
        int pid = pm__lock_holder((uint64_t)sb.st_dev, (uint64_t)sb.st_ino);
        if (pid > 0)
            return PM_FAIL(PM_E_BUSY, "%s: the pair is in use by another pair object or process (pid %d)",
                           path, pid);
        return PM_FAIL(PM_E_BUSY, "%s: the pair is in use by another pair object or process", path);
    }
    *out = st;
    return 0;
}

static void fill_info(const struct disk_header *h, const unsigned char *hdr, struct pm_meta_info *out)
{
    memset(out, 0, sizeof *out);
    out->state = (int32_t)h->state;
    out->incremental = (h->flags & FLAG_INCREMENTAL) != 0;
    out->protect = (h->flags & FLAG_PROTECT) != 0;
    out->track_size = h->track_size;
    out->volume_size = h->volume_size;
    out->generation = h->generation;
    out->error = h->job_error;
    out->error_track = h->job_error ? h->job_error_track : -1;
    out->mirror_invalid = h->mirror_invalid;
    memcpy(out->standard_path, hdr + STD_PATH_AT, PM_PATH_MAX);
    memcpy(out->mirror_path, hdr + MIR_PATH_AT, PM_PATH_MAX);
}

int pm_meta_peek(const char *meta_path, struct pm_meta_info *out)
{
    if (meta_path == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "meta_path and out must not be NULL");
    pm_store *st;
    int rc = open_meta_store(meta_path, 0, &st);
    if (rc)
        return rc;
    unsigned char *hdr = malloc(SLOT_SIZE);
    struct disk_header h;
    rc = hdr ? pick_slot(st, hdr, &h, meta_path) : PM_FAIL(-ENOMEM, "out of memory");
    pm_store_destroy(st);
    if (rc == 0)
        fill_info(&h, hdr, out);
    free(hdr);
    return rc;
}

uint64_t pm_meta_size(uint64_t volume_size, uint32_t track_size)
{
    if (track_size == 0 || volume_size == 0)
        return 0;
    uint64_t tracks = (volume_size + track_size - 1) / track_size;
    uint64_t rt = REGION_BYTES / track_size ? REGION_BYTES / track_size : 1;
    uint64_t tb = round4k((tracks + 7) / 8), ib = round4k(((tracks + rt - 1) / rt + 7) / 8);
    return TABLES_AT + 2 * slot_tables(tb, ib);
}

/* ---- decoding, formatting and loading ------------------------------------ */

static void trust_decode(const struct disk_header *h, const unsigned char *hdr, struct pm_meta_trust *t);

int pm_meta_read_header(pm_store *st, const char *label, struct pm_meta_header *out)
{
    unsigned char *hdr = malloc(SLOT_SIZE);
    struct disk_header h;
    uint32_t other_version = 0;
    int rc = hdr ? pick_slot_v(st, hdr, &h, label, &other_version) : PM_FAIL(-ENOMEM, "out of memory");
    if (rc == 0) {
        memset(out, 0, sizeof *out);
        out->version = h.version;
        out->upgrade = h.version < FORMAT_VERSION || (other_version != 0 && other_version < FORMAT_VERSION);
        trust_decode(&h, hdr, &out->trust);
        out->status.state = (int32_t)h.state;
        out->status.incremental = (h.flags & FLAG_INCREMENTAL) != 0;
        out->status.protect = (h.flags & FLAG_PROTECT) != 0;
        out->status.error = h.job_error;
        out->status.error_track = h.job_error ? h.job_error_track : -1;
        out->status.mirror_invalid = h.mirror_invalid;
        get_detach_record(&h, &out->status);
        out->clean = (h.flags & FLAG_CLEAN) != 0;
        out->track_size = h.track_size;
        out->volume_size = h.volume_size;
        out->generation = h.generation;
        out->std_ino = h.std_ino;
        out->mir_ino = h.mir_ino;
        memcpy(out->pair_id, h.pair_id, 16);
        out->table_bytes = h.table_bytes;
        out->intent_bytes = h.intent_bytes;
        memcpy(out->standard_path, hdr + STD_PATH_AT, PM_PATH_MAX);
        memcpy(out->mirror_path, hdr + MIR_PATH_AT, PM_PATH_MAX);
    }
    free(hdr);
    return rc;
}

int pm_meta_open_file(const char *path, int lock, pm_store **out)
{
    return open_meta_store(path, lock, out);
}

static void trust_new(struct pm_meta *m);

int pm_meta_format(struct pm_meta *m)
{
    if (getrandom(m->pair_id, 16, 0) != 16)
        memset(m->pair_id, 0x5a, 16);
    trust_new(m);
    int rc = pm_meta_commit(m);          /* generation 1, slot 1 */
    if (rc == 0)
        rc = pm_meta_commit(m);          /* generation 2, slot 0: both slots valid */
    return rc;
}

int pm_meta_load(struct pm_meta *m, const struct pm_meta_header *h)
{
    unsigned char *buf = malloc((size_t)h->table_bytes);
    if (buf == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    int rc = 0;
    int slot = (int)(h->generation % 2);
    uint64_t stb = slot_tables(h->table_bytes, h->intent_bytes);
    for (int i = 0; i < NTABLES && rc == 0; i++) {
        pm_bitmap *bm = table_of(m, i);
        rc = meta_read(m->store, buf, pm_bitmap_serial_size(bm),
                       TABLES_AT + (uint64_t)slot * stb + table_off(h->table_bytes, h->intent_bytes, i));
        if (rc < 0)
            rc = PM_FAIL(PM_E_CORRUPT, "%s: cannot read table %d", m->path, i);
        else
            rc = pm_bitmap_load(bm, buf, pm_bitmap_serial_size(bm));
    }
    free(buf);
    if (rc)
        return rc;
    for (int side = 0; side < 2; side++) {   /* the intent regions on disk are durable ones */
        pm_bitmap_copy(m->intent[side], m->intent_snap[side]);
        /* ... but a header marked clean makes a reopen ignore them (the
         * precise CHANGED tables are used alone), so until a commit marks
         * the file unclean no region protects a write: the first write to
         * each waits for one. */
        if (!h->clean)
            pm_bitmap_copy(m->intent_durable[side], m->intent_snap[side]);
    }
    if (!h->clean) {
        /* Unclean shutdown: writes may have landed after the precise CHANGED
         * tables were committed, but never outside their durable intent
         * regions.  Count every track of those regions as CHANGED. */
        for (int side = 0; side < 2; side++) {
            pm_bitmap *changed = m->b.changed[side];
            for (int64_t r = pm_bitmap_next_set(m->intent[side], 0); r >= 0;
                 r = pm_bitmap_next_set(m->intent[side], (uint64_t)r + 1)) {
                uint64_t first = (uint64_t)r * m->region_tracks;
                uint64_t n = m->b.tracks - first < m->region_tracks ? m->b.tracks - first : m->region_tracks;
                pm_bitmap_set_range(changed, first, n);
            }
        }
        pm_meta_dirty(m);
    }
    m->generation = h->generation;
    m->last_clean = h->clean;
    memcpy(m->pair_id, h->pair_id, 16);
    m->last_commit = pm_now();
    return 0;
}

/* ---- branch detach: FUA-light ------------------------------------------ */

void pm_meta_std_cleared(struct pm_meta *m)
{
    if (m != NULL)
        pm_fetch_add(&m->host_clears, 1);   /* after the bit was cleared */
}

int pm_meta_flush_commit(struct pm_meta *m)
{
    if (m == NULL || m->store == NULL)
        return 0;
    pthread_mutex_lock(&m->lock);
    /* host_clears_durable is written under the lock; a clear counted after
     * this read is covered by a later flush (its write completed after
     * this flush began). */
    int full = m->flush_full || pm_load_seqcst(&m->host_clears) != m->host_clears_durable;
    pthread_mutex_unlock(&m->lock);
    if (full)
        return pm_meta_commit(m);
    return pm_meta_changed_durable(m);
}

int pm_meta_commit_records(struct pm_meta *m)
{
    if (m == NULL || m->store == NULL)
        return 0;
    pthread_mutex_lock(&m->lock);
    int rc = commit_locked(m, 0, 0);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* ---- branch metatrust: identities, outside changes, upgrade, check -------
 *
 * Format 2 records, in every slot after the paths: each volume's identity
 * (pm_store_identity, unless it is only a memory address), its change stamp
 * (pm_store_change_stamp: files give size, inode, mtime and ctime) as of
 * the commit, and at a clean close the CRC-32C of the first 64 KiB of up to
 * 16 tracks spread over the volume.  A stamp is compared at open only when
 * the header says the pair was closed cleanly: otherwise pymirror's own
 * writes after the last commit moved the times.  An outside change found
 * is kept in trust_flags (sticky) until a full job or pm_pair_trust.
 */

/* The identity worth recording: none for memory or unnamed stores. */
static void identity_of(pm_store *s, char *buf, size_t len)
{
    pm_store_identity(s, buf, len);
    if (strncmp(buf, "store:", 6) == 0 || strncmp(buf, "memory:", 7) == 0)
        buf[0] = 0;
}

/* The sample tracks: spread evenly over the volume. */
static uint64_t sample_track(uint64_t tracks, uint32_t n, uint32_t i) { return (uint64_t)i * tracks / n; }

static void take_samples(struct pm_meta *m)
{
    uint32_t n = m->b.tracks < PM_META_SAMPLES ? (uint32_t)m->b.tracks : PM_META_SAMPLES;
    uint32_t len = m->b.track_size < SAMPLE_BYTES ? m->b.track_size : SAMPLE_BYTES;
    unsigned char *buf = malloc(len);
    m->trust.nsamples = 0;
    if (buf == NULL)
        return;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t t = sample_track(m->b.tracks, n, i), off = t * m->b.track_size;
        uint64_t l = m->b.volume_size - off < len ? m->b.volume_size - off : len;
        m->trust.sample[i].track = t;
        for (int s = 0; s < 2; s++) {
            if (pm_store_read(m->b.data[s], buf, l, off) < 0) {
                free(buf);
                m->trust.nsamples = 0;   /* no sample rather than a wrong one */
                return;
            }
            m->trust.sample[i].crc[s] = pm_crc32c(0, buf, (size_t)l);
        }
    }
    free(buf);
    m->trust.nsamples = n;
}

/* File times come from a coarse clock (a tick of a few ms): a write in
 * the same tick as pymirror's last one would leave the stamp unchanged.
 * At a clean close, wait (at most ~50 ms) until that clock has moved past
 * the recorded times, so that any later write changes them. */
static void settle_tick(const char *stamp)
{
    const char *at = strstr(stamp, "ctime=");
    long long sec;
    long nsec;
    if (at == NULL || sscanf(at, "ctime=%lld.%ld", &sec, &nsec) != 2)
        return;
    for (int i = 0; i < 50; i++) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME_COARSE, &now);
        if (now.tv_sec > sec || (now.tv_sec == sec && now.tv_nsec > nsec))
            return;
        struct timespec ms = { 0, 1000000 };
        nanosleep(&ms, NULL);
    }
}

static void trust_fill(struct pm_meta *m, struct disk_header *h, unsigned char *hdr, int clean)
{
    struct pm_meta_trust *t = &m->trust;
    for (int s = 0; s < 2; s++) {
        pm_store_change_stamp(m->b.data[s], t->stamp[s], sizeof t->stamp[s]);   /* "" if it cannot tell */
        if (clean && t->stamp[s][0])
            settle_tick(t->stamp[s]);
    }
    t->flags |= TRUST_IDS | TRUST_STAMPS;
    if (clean) {
        take_samples(m);
        t->flags = (t->flags & ~TRUST_SAMPLES) | (t->nsamples ? TRUST_SAMPLES : 0u);
    }
    h->trust_flags = t->flags;
    h->samples = t->nsamples;
    for (int s = 0; s < 2; s++) {
        snprintf((char *)hdr + ID_AT + 256u * (unsigned)s, 256, "%s", t->id[s]);
        snprintf((char *)hdr + STAMP_AT + 128u * (unsigned)s, 128, "%s", t->stamp[s]);
    }
    for (uint32_t i = 0; i < t->nsamples; i++) {
        unsigned char *e = hdr + SAMPLE_AT + 16u * i;
        memcpy(e, &t->sample[i].track, 8);
        memcpy(e + 8, &t->sample[i].crc[0], 4);
        memcpy(e + 12, &t->sample[i].crc[1], 4);
    }
}

static void trust_decode(const struct disk_header *h, const unsigned char *hdr, struct pm_meta_trust *t)
{
    memset(t, 0, sizeof *t);
    if (h->version < 2)
        return;                 /* format 1: nothing recorded */
    t->flags = h->trust_flags;
    t->nsamples = h->samples;
    for (int s = 0; s < 2; s++) {
        memcpy(t->id[s], hdr + ID_AT + 256u * (unsigned)s, 256);
        memcpy(t->stamp[s], hdr + STAMP_AT + 128u * (unsigned)s, 128);
    }
    for (uint32_t i = 0; i < t->nsamples && i < PM_META_SAMPLES; i++) {
        const unsigned char *e = hdr + SAMPLE_AT + 16u * i;
        memcpy(&t->sample[i].track, e, 8);
        memcpy(&t->sample[i].crc[0], e + 8, 4);
        memcpy(&t->sample[i].crc[1], e + 12, 4);
    }
}

static const char *side_name(int s) { return s == PM_STANDARD ? "standard" : "mirror"; }

/* Relocate: each recorded sample must match the new volume. */
static int check_samples(struct pm_meta *m, const struct pm_meta_header *h)
{
    const struct pm_meta_trust *t = &h->trust;
    uint32_t len = m->b.track_size < SAMPLE_BYTES ? m->b.track_size : SAMPLE_BYTES;
    unsigned char *buf = malloc(len);
    if (buf == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    int rc = 0;
    for (uint32_t i = 0; i < t->nsamples && rc == 0; i++) {
        uint64_t tr = t->sample[i].track, off = tr * m->b.track_size;
        if (tr >= m->b.tracks) {
            rc = PM_FAIL(PM_E_CORRUPT, "%s: sample track %llu is beyond the volume", m->path,
                         (unsigned long long)tr);
            break;
        }
        uint64_t l = m->b.volume_size - off < len ? m->b.volume_size - off : len;
        for (int s = 0; s < 2 && rc == 0; s++) {
            rc = pm_store_read(m->b.data[s], buf, l, off);
            if (rc == 0 && pm_crc32c(0, buf, (size_t)l) != t->sample[i].crc[s])
                rc = PM_FAIL(PM_E_FOREIGN, "%s: %s is not the %s this pair was closed with: track %llu "
                             "differs from its checksum recorded at the last clean close", m->path,
                             m->b.data[s]->path, side_name(s), (unsigned long long)tr);
        }
    }
    free(buf);
    return rc;
}

int pm_meta_trust_open(struct pm_meta *m, const struct pm_meta_header *h, int relocate)
{
    if (m->store == NULL)
        return 0;
    char now_id[2][256], now_stamp[2][128];
    for (int s = 0; s < 2; s++) {
        identity_of(m->b.data[s], now_id[s], sizeof now_id[s]);
        pm_store_change_stamp(m->b.data[s], now_stamp[s], sizeof now_stamp[s]);
    }
    const struct pm_meta_trust *t = &h->trust;
    if (relocate) {
        if (h->clean && (t->flags & TRUST_SAMPLES)) {
            int rc = check_samples(m, h);
            if (rc)
                return rc;
        }
    } else if (t->flags & TRUST_IDS) {
        for (int s = 0; s < 2; s++)
            if (t->id[s][0] && strcmp(t->id[s], now_id[s]) != 0)
                return PM_FAIL(PM_E_FOREIGN, "%s: the %s %s is not the volume this pair was made with: "
                               "the pair recorded %s, the volume now is %s (if the volumes moved: "
                               "pymirror pair %s --relocate --standard NEW --mirror NEW)", m->path,
                               side_name(s), m->b.data[s]->path, t->id[s], now_id[s][0] ? now_id[s] : "unnamed",
                               m->path);
    }
    pthread_mutex_lock(&m->lock);
    m->trust = *t;
    for (int s = 0; s < 2; s++) {
        unsigned bit = s == PM_STANDARD ? TRUST_OUTSIDE_STD : TRUST_OUTSIDE_MIR;
        snprintf(m->trust.id[s], sizeof m->trust.id[s], "%s", now_id[s]);
        if (relocate) {
            m->outside[s] = (t->flags & bit) ? PM_OUTSIDE_CHANGED : PM_OUTSIDE_NONE;
            snprintf(m->note[s], sizeof m->note[s], "%s", (t->flags & bit)
                     ? "changed outside pymirror (found before the move; not yet trusted)"
                     : h->clean && (t->flags & TRUST_SAMPLES) ? "relocated: size and sampled checksums match"
                     : "relocated: only the size was checked (no checksums recorded at a clean close)");
        } else if (t->flags & bit) {
            m->outside[s] = PM_OUTSIDE_CHANGED;
            snprintf(m->note[s], sizeof m->note[s], "changed outside pymirror (found at an earlier open, "
                     "not yet trusted)");
        } else if (!(t->flags & TRUST_STAMPS)) {
            m->outside[s] = PM_OUTSIDE_NO_STAMP;
            snprintf(m->note[s], sizeof m->note[s], "not checked: nothing recorded yet (metadata from an older "
                     "pymirror); checked from the next clean close on");
        } else if (now_stamp[s][0] == 0 || t->stamp[s][0] == 0) {
            m->outside[s] = PM_OUTSIDE_UNDETECTABLE;
            snprintf(m->note[s], sizeof m->note[s], "changes outside pymirror cannot be detected on this "
                     "volume (it offers no change stamp)");
        } else if (!h->clean) {
            m->outside[s] = PM_OUTSIDE_UNCHECKED;
            snprintf(m->note[s], sizeof m->note[s], "not checked for changes outside pymirror: the pair was "
                     "not closed cleanly, so its own last writes changed the file's times");
        } else if (strcmp(t->stamp[s], now_stamp[s]) != 0) {
            m->outside[s] = PM_OUTSIDE_CHANGED;
            m->trust.flags |= bit;
            snprintf(m->note[s], sizeof m->note[s], "changed outside pymirror since the pair was closed "
                     "(recorded %.90s; now %.90s)", t->stamp[s], now_stamp[s]);
            pm_meta_dirty(m);   /* the finding is persisted by the next commit */
        } else {
            m->outside[s] = PM_OUTSIDE_NONE;
            snprintf(m->note[s], sizeof m->note[s], "unchanged since the pair was last closed");
        }
    }
    if (relocate)
        pm_meta_dirty(m);
    pthread_mutex_unlock(&m->lock);
    return 0;
}

int pm_meta_upgrade(struct pm_meta *m, const struct pm_meta_header *h)
{
    if (m->store == NULL || !h->upgrade)
        return 0;
    /* Two ordinary commits: the first writes the slot that is not current,
     * the second the other one.  Until the first is complete the old slot is
     * current (a crash: the upgrade starts again at the next open); after it,
     * the new slot is current and an old-format slot may remain, which the
     * next open upgrades the same way.  The clean flag is kept as found. */
    pthread_mutex_lock(&m->lock);
    int rc = commit_locked(m, 1, h->clean);
    if (rc == 0)
        rc = commit_locked(m, 1, h->clean);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

unsigned pm_meta_outside(struct pm_meta *m)
{
    if (m == NULL || m->store == NULL)
        return 0;
    pthread_mutex_lock(&m->lock);
    unsigned out = ((m->trust.flags & TRUST_OUTSIDE_STD) ? 1u : 0u) | ((m->trust.flags & TRUST_OUTSIDE_MIR) ? 2u : 0u);
    pthread_mutex_unlock(&m->lock);
    return out;
}

void pm_meta_trust_all(struct pm_meta *m)
{
    if (m == NULL || m->store == NULL)
        return;
    pthread_mutex_lock(&m->lock);
    if (m->trust.flags & (TRUST_OUTSIDE_STD | TRUST_OUTSIDE_MIR)) {
        m->trust.flags &= ~(TRUST_OUTSIDE_STD | TRUST_OUTSIDE_MIR);
        for (int s = 0; s < 2; s++)
            if (m->outside[s] == PM_OUTSIDE_CHANGED) {
                m->outside[s] = PM_OUTSIDE_NONE;
                snprintf(m->note[s], sizeof m->note[s], "was changed outside pymirror; trusted since");
            }
        pm_meta_dirty(m);
    }
    pthread_mutex_unlock(&m->lock);
}

int pm_meta_volume_trust(struct pm_meta *m, int side, struct pm_volume_trust *out)
{
    struct pm_volume_trust v;
    memset(&v, 0, sizeof v);
    v.size = sizeof v;
    pm_store *st = m->b.data[side];
    identity_of(st, v.identity, sizeof v.identity);
    v.identity_stable = pm__identity_stable(v.identity);
    if (m->store == NULL) {
        v.outside = PM_OUTSIDE_UNDETECTABLE;
        snprintf(v.note, sizeof v.note, "a pair without a metadata file records nothing");
    } else {
        pthread_mutex_lock(&m->lock);
        v.outside = m->outside[side];
        v.identity_recorded = m->trust.id[side][0] != 0;
        snprintf(v.note, sizeof v.note, "%s", m->note[side]);
        pthread_mutex_unlock(&m->lock);
    }
    size_t n = out->size == 0 || out->size > sizeof v ? sizeof v : out->size;
    memcpy(out, &v, n);
    out->size = (uint32_t)n;
    return 0;
}

int pm_meta_check(const char *meta_path, struct pm_meta_health *out)
{
    if (meta_path == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "meta_path and out must not be NULL");
    struct pm_meta_health r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.current = -1;
    last_warning[0] = 0;
    pm_store *st;
    int rc = open_meta_store(meta_path, 0, &st);
    if (rc)
        return rc;
    r.file_size = pm_store_size(st);
    unsigned char *hdr = malloc(SLOT_SIZE);
    uint64_t best = 0;
    for (int slot = 0; slot < 2 && hdr != NULL; slot++) {
        struct pm_meta_slot_health *sh = &r.slot[slot];
        struct disk_header h;
        int newer = 0;
        sh->status = read_slot(st, slot, hdr, &h, meta_path, &newer);
        if (sh->status != 0)
            snprintf(sh->why, sizeof sh->why, "%s", reason(pm_last_error(), meta_path));
        if (meta_read(st, hdr, SLOT_SIZE, (uint64_t)slot * SLOT_SIZE) < 0 || memcmp(hdr, MAGIC, 8) != 0)
            continue;           /* no header to describe */
        memcpy(&h, hdr, sizeof h);
        sh->version = h.version;
        sh->generation = h.generation;
        sh->state = (int32_t)h.state;
        sh->clean = (h.flags & FLAG_CLEAN) != 0;
        memcpy(sh->table_crc, h.table_crc, sizeof sh->table_crc);
        if (sh->status == 0 && (r.current < 0 || h.generation > best)) {
            r.current = slot;
            best = h.generation;
            r.needed_size = pm_meta_size(h.volume_size, h.track_size);
        }
        /* every table, also after the first bad one (read_slot stops there) */
        if (h.ntables == NTABLES && h.table_bytes && h.table_bytes < ((uint64_t)1 << 40) &&
            h.intent_bytes < ((uint64_t)1 << 40)) {
            uint64_t stb = slot_tables(h.table_bytes, h.intent_bytes);
            unsigned char *buf = malloc((size_t)(h.table_bytes > h.intent_bytes ? h.table_bytes : h.intent_bytes));
            for (int i = 0; i < NTABLES && buf != NULL; i++) {
                uint64_t len = table_len(h.table_bytes, h.intent_bytes, i);
                if (meta_read(st, buf, len, TABLES_AT + (uint64_t)slot * stb + table_off(h.table_bytes, h.intent_bytes, i)) < 0 ||
                    pm_crc32c(0, buf, (size_t)len) != h.table_crc[i])
                    sh->tables_bad |= 1u << i;
                sh->ntables++;
            }
            free(buf);
        }
    }
    free(hdr);
    pm_store_destroy(st);
    if (r.slot[0].version > FORMAT_VERSION || r.slot[1].version > FORMAT_VERSION)
        r.current = -1;         /* a newer pymirror wrote it: the other slot is an older state */
    if (r.current >= 0 && r.slot[1 - r.current].status != 0 && r.slot[1 - r.current].status != PM_E_FOREIGN)
        snprintf(last_warning, sizeof last_warning, "%s: header slot %d is damaged (%s); using slot %d",
                 meta_path, 1 - r.current, r.slot[1 - r.current].why, r.current);
    size_t n = out->size == 0 || out->size > sizeof r ? sizeof r : out->size;
    memcpy(out, &r, n);
    out->size = (uint32_t)n;
    return 0;
}

static void trust_new(struct pm_meta *m)
{
    memset(&m->trust, 0, sizeof m->trust);
    for (int s = 0; s < 2; s++) {
        identity_of(m->b.data[s], m->trust.id[s], sizeof m->trust.id[s]);
        m->outside[s] = PM_OUTSIDE_NONE;
        snprintf(m->note[s], sizeof m->note[s], "a new pair: checked at each open after a clean close");
    }
}

int pm_meta_refuse_outside(struct pm_meta *m, const char *func)
{
    unsigned o = pm_meta_outside(m);
    if (o == 0)
        return 0;
    const char *std = m->b.data[PM_STANDARD]->path, *mir = m->b.data[PM_MIRROR]->path;
    char which[2 * PM_PATH_MAX + 64];
    if (o == 3)
        snprintf(which, sizeof which, "the standard %s and the mirror %s were", std, mir);
    else
        snprintf(which, sizeof which, "the %s %s was", o == 1 ? "standard" : "mirror", o == 1 ? std : mir);
    return pm_fail(func, PM_E_OUTSIDE, "%s changed outside pymirror since the pair was last closed, so the "
                   "changed-track tables are incomplete and an incremental copy could miss tracks: use "
                   "--compare (copy the tracks that differ) or --trust (accept the tables as they are), "
                   "or a full copy", which);
}

void pm_meta_forget_store(struct pm_meta *m)
{
    if (m != NULL && !m->own_store)
        m->store = NULL;
}
