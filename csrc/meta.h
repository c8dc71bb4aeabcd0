/*
 * meta.h - the metadata layer's interface (meta.c, layer 4).
 *
 * meta.c knows the on-disk format and the commit protocol, and nothing of
 * a pair: it takes its own handle, bound at creation to what it describes
 * (the two data stores, the PENDING and CHANGED bitmaps of both sides, the
 * geometry) and to a status callback through which the layer above reports,
 * at each snapshot, the state and the job's error.  Every pair has a handle;
 * one without a metadata store keeps CHANGED and commits nothing.
 *
 * Lock order: a caller may hold track locks; meta.c takes its own lock, then
 * (inside the status callback) the pair's job mutex.
 */
#ifndef PM_META_H
#define PM_META_H

#include "internal.h"
#include "store.h"

struct pm_meta;

/* What the layer above reports at a snapshot (the status callback). */
struct pm_meta_status {
    int32_t state;             /* enum pm_state */
    int32_t incremental, protect;
    int32_t error;             /* the error that paused the job, or 0 */
    int64_t error_track;
    uint64_t mirror_invalid;
    /* branch detach: the detach record (detach_error 0: not detached) */
    int32_t detach_error;
    int64_t detach_track;
    uint64_t detach_time_ns;   /* ns since the Unix epoch */
};

/* What the metadata describes; borrowed, must outlive the handle. */
struct pm_meta_binding {
    pm_store *data[2];          /* standard, mirror: flushed before full commits */
    pm_bitmap *pending[2], *changed[2];
    uint64_t volume_size, tracks;
    uint32_t track_size;
    void (*status)(void *ctx, struct pm_meta_status *out);
    void *ctx;
};

/* What a format-2 header says of the volumes beyond their paths (branch
 * metatrust): their identities, change stamps, a sample of track checksums
 * taken at the last clean close, and outside changes found and not yet
 * resolved.  Empty strings: nothing recorded. */
#define PM_META_SAMPLES 16
struct pm_meta_trust {
    uint32_t flags;                     /* TRUST_* (meta.c) as on disk */
    uint32_t nsamples;
    char id[2][256];
    char stamp[2][128];
    struct { uint64_t track; uint32_t crc[2]; } sample[PM_META_SAMPLES];
};

/* A decoded header (the current slot of a metadata store). */
struct pm_meta_header {
    struct pm_meta_status status;
    int clean;                  /* closed cleanly: CHANGED is precise */
    uint32_t track_size;
    uint64_t volume_size, generation, std_ino, mir_ino;
    uint8_t pair_id[16];
    uint64_t table_bytes, intent_bytes;
    char standard_path[PM_PATH_MAX], mirror_path[PM_PATH_MAX];
    /* -- branch metatrust -- */
    uint32_t version;           /* of the current slot */
    int upgrade;                /* a slot is of an older format: pm_meta_upgrade */
    struct pm_meta_trust trust;
};

/* ---- the handle ---- */
int pm_meta_new(const struct pm_meta_binding *b, struct pm_meta **out);   /* no store yet */
/* Put the metadata in `st` (at least pm_meta_size bytes; PM_E_GEOMETRY if
 * smaller).  `label` names it in messages.  The handle closes st at
 * pm_meta_close once pm_meta_own_store was called. */
int pm_meta_attach(struct pm_meta *m, pm_store *st, const char *label);
void pm_meta_own_store(struct pm_meta *m);
/* A new metadata store: a random pair id, both slots written. */
int pm_meta_format(struct pm_meta *m);
/* Open: read the current slot's tables into the bound bitmaps and the
 * intent regions; with an unclean header, count every track of every
 * intent region as CHANGED (nothing a crash may have written is forgotten). */
int pm_meta_load(struct pm_meta *m, const struct pm_meta_header *h);
/* Commit (if anything changed, marking the header clean), detach, free. */
void pm_meta_close(struct pm_meta *m);

/* ---- the commit protocol (all thread-safe; no-ops without a store) ---- */
int pm_meta_commit(struct pm_meta *m);                 /* full: data, tables, header */
/* Before a host write to tracks t0..t1 of a side: mark them CHANGED, and
 * return once the marks are durable (write-intent; free once their regions
 * are durable). */
int pm_meta_before_write(struct pm_meta *m, int side, uint64_t t0, uint64_t t1);
int pm_meta_changed_durable(struct pm_meta *m);        /* everything noted so far is durable */
void pm_meta_note(struct pm_meta *m);                  /* the state changed: commits must carry it */
void pm_meta_dirty(struct pm_meta *m);                 /* the next commit should carry a change */
void pm_meta_need_full(struct pm_meta *m);             /* PENDING was rebuilt (a job began) */
void pm_meta_copied(struct pm_meta *m, uint64_t ntracks);   /* a copier batch: commit ~1/s */
/* Commands hold the metadata lock while they change tables and state, so a
 * commit never snapshots half of one. */
void pm_meta_lock(struct pm_meta *m);
void pm_meta_unlock(struct pm_meta *m);
void pm_meta_intent_reset_locked(struct pm_meta *m);   /* CHANGED was cleared */
void pm_meta_counters(struct pm_meta *m, uint64_t *commits, uint64_t *syncs);

/* ---- the format ---- */
int pm_meta_open_file(const char *path, int lock, pm_store **out);
int pm_meta_read_header(pm_store *st, const char *label, struct pm_meta_header *out);

/* ---- branch detach: the detach record, FUA-light ---- */
/* A PENDING bit of the standard was cleared (restoring: by a copy or a
 * host write): until a full commit records it, a host flush must commit
 * fully, or a crash would restore the track again over a write the flush
 * made durable. */
void pm_meta_std_cleared(struct pm_meta *m);
/* After a host flush or FUA write made the data it covers durable: commit
 * what that needs and no more (docs/format.md, "FUA-light"): a full commit
 * if a PENDING bit of the standard was cleared since the last full commit, else only the
 * write-intent not yet durable (usually nothing). */
int pm_meta_flush_commit(struct pm_meta *m);
/* Commit the header's records (the job's error, the detach record) and the
 * CHANGED tables now, without syncing the data volumes (an intent commit,
 * even when nothing was noted): a failing volume cannot keep its failure
 * from being recorded. */
int pm_meta_commit_records(struct pm_meta *m);

/* ---- branch metatrust: identities, outside changes, upgrade, relocate ---- */
/* At open, after pm_meta_load: check the volumes' identities against the
 * header (PM_E_FOREIGN naming both) and their change stamps (an outside
 * change is recorded, and refuses incremental jobs until trusted).  With
 * `relocate`, identities are not compared: the sample of track checksums
 * is (PM_E_FOREIGN on a mismatch), and the new identities are recorded. */
int pm_meta_trust_open(struct pm_meta *m, const struct pm_meta_header *h, int relocate);
/* Rewrite both slots in the current format (crash-safe: two ordinary
 * commits; the older slot stays valid until the second). */
int pm_meta_upgrade(struct pm_meta *m, const struct pm_meta_header *h);
/* Sides (bit 0 standard, bit 1 mirror) changed outside pymirror and not
 * trusted; pm_meta_trust_all forgets them (a full job, or --trust). */
unsigned pm_meta_outside(struct pm_meta *m);
void pm_meta_trust_all(struct pm_meta *m);
int pm_meta_volume_trust(struct pm_meta *m, int side, struct pm_volume_trust *out);
/* PM_E_OUTSIDE (message from `func`, naming the volumes and the ways on)
 * when a side was changed outside pymirror and not trusted; else 0. */
int pm_meta_refuse_outside(struct pm_meta *m, const char *func);
/* A refused open: close without committing (the store stays the caller's). */
void pm_meta_forget_store(struct pm_meta *m);

#endif
