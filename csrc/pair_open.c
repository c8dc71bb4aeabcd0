/*
 * pair_open.c - pairs from a metadata file or store: create one, open one,
 * and recover what a crash left (the top floor).
 *
 * Layer 8: may call pair.c (7), job.c (5), meta.c (4), store.c/bitmap.c
 * (1) and the layer-0 helpers.
 *
 * Recovery on open (docs/format.md): meta.c loads the committed tables and,
 * after an unclean stop, counts every track of every intent region as
 * CHANGED.  Here: in the mirrored states (syncing, established, unprotected
 * restoring) those tracks are also made PENDING in the copy's direction,
 * since a crash may have landed a mirrored write on one side only (md's
 * resync); an established pair with such tracks comes back syncing.  A pair
 * that was syncing or restoring comes back with its job paused (job.c).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "layout.h"

/* Create the pair and write its first metadata into `st` (which it owns
 * when `own`).  On failure `st` is left to the caller. */
static int create_on_store(pm_store *st, int own, const char *label, pm_store *standard, pm_store *mirror,
                           uint32_t track_size, pm_pair **out)
{
    pm_pair *p;
    int rc = pm_pair_create(standard, mirror, track_size, &p);
    if (rc)
        return rc;
    rc = pm_meta_attach(p->meta, st, label);
    if (rc == 0)
        rc = pm_meta_format(p->meta);
    if (rc) {
        pm_pair_destroy(p);                  /* does not destroy st: not yet owned */
        return rc;
    }
    if (own)
        pm_meta_own_store(p->meta);
    *out = p;
    return 0;
}

/* Make a new file's directory entry durable. */
static void sync_parent_dir(const char *path)
{
    char *dir = strdup(path), *slash = dir ? strrchr(dir, '/') : NULL;
    if (dir == NULL)
        return;
    if (slash == dir)
        slash[1] = 0;
    else if (slash != NULL)
        *slash = 0;
    int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    free(dir);
}

int pm_pair_create_meta(const char *meta_path, pm_store *standard, pm_store *mirror,
                        uint32_t track_size, pm_pair **out)
{
    if (meta_path == NULL || out == NULL || standard == NULL || mirror == NULL)
        return PM_FAIL(-EINVAL, "meta_path, the stores and out must not be NULL");
    *out = NULL;
    if (strlen(standard->path) >= PM_PATH_MAX || strlen(mirror->path) >= PM_PATH_MAX ||
        standard->path[0] == 0 || mirror->path[0] == 0)
        return PM_FAIL(-EINVAL, "a pair with a metadata file needs file volumes with paths shorter than %d",
                       PM_PATH_MAX);
    {   /* check the geometry before creating anything on disk */
        pm_pair *probe;
        int rc = pm_pair_create(standard, mirror, track_size, &probe);
        if (rc)
            return rc;
        pm_pair_destroy(probe);
    }
    pm_store *st;
    int rc = pm_store_open_file(meta_path, PM_STORE_CREATE, pm_meta_size(standard->size, track_size), &st);
    if (rc)
        return PM_FAIL(rc, "%s: cannot create the metadata", meta_path);
    rc = create_on_store(st, 1, meta_path, standard, mirror, track_size, out);
    if (rc) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", pm_last_error());
        pm_store_destroy(st);
        unlink(meta_path);
        pm_fail("pm_pair_create_meta", rc, "%s", msg);
        return rc;
    }
    sync_parent_dir(meta_path);
    return 0;
}

int pm_pair_create_meta_store(pm_store *meta, pm_store *standard, pm_store *mirror,
                              uint32_t track_size, pm_pair **out)
{
    if (meta == NULL || out == NULL || standard == NULL || mirror == NULL)
        return PM_FAIL(-EINVAL, "the stores and out must not be NULL");
    *out = NULL;
    return create_on_store(meta, 0, "metadata store", standard, mirror, track_size, out);
}

static int is_mirrored_state(int state, int protect)
{
    return state == PM_STATE_SYNCING || state == PM_STATE_ESTABLISHED ||
           (state == PM_STATE_RESTORING && !protect);
}

/* Open (or, with `relocate`, re-point) a pair from its metadata store. */
static int open_on_store(pm_store *st, int own, const char *label, pm_store *standard, pm_store *mirror,
                         pm_pair **out, int relocate)
{
    struct pm_meta_header *h = malloc(sizeof *h);
    pm_pair *p = NULL;
    int rc = h ? pm_meta_read_header(st, label, h) : PM_FAIL(-ENOMEM, "out of memory");
    if (rc == 0 && (standard->size != h->volume_size || mirror->size != h->volume_size))
        rc = PM_FAIL(PM_E_FOREIGN, "%s: the pair's volumes are %llu bytes, but %s is %llu and %s is %llu",
                     label, (unsigned long long)h->volume_size, standard->path,
                     (unsigned long long)standard->size, mirror->path, (unsigned long long)mirror->size);
    /* format 1 recorded inode numbers; format 2 identities (pm_meta_trust_open) */
    if (rc == 0 && !relocate && !(h->trust.flags & 1u /* identities recorded */) &&
        ((h->std_ino && standard->ino != h->std_ino) || (h->mir_ino && mirror->ino != h->mir_ino)))
        rc = PM_FAIL(PM_E_FOREIGN, "%s: %s or %s is not the volume this pair was made with "
                     "(the file was replaced or the two were swapped)", label, standard->path, mirror->path);
    if (rc == 0 && pm_store_size(st) < pm_meta_size(h->volume_size, h->track_size))
        rc = PM_FAIL(PM_E_CORRUPT, "%s: the metadata is truncated (%llu bytes of the %llu its header describes)",
                     label, (unsigned long long)pm_store_size(st),
                     (unsigned long long)pm_meta_size(h->volume_size, h->track_size));
    if (rc == 0)
        rc = pm_pair_create(standard, mirror, h->track_size, &p);
    if (rc == 0)
        rc = pm_meta_attach(p->meta, st, label);
    if (rc == 0)
        rc = pm_meta_load(p->meta, h);
    if (rc == 0)
        rc = pm_meta_trust_open(p->meta, h, relocate);
    if (rc) {
        free(h);
        if (p != NULL)
            pm_meta_forget_store(p->meta);   /* a refused open writes nothing */
        pm_pair_destroy(p);   /* the store is not owned yet: left to the caller */
        return rc;
    }
    int state = h->status.state, protect = h->status.protect;
    pm_store_relaxed(&p->incremental, h->status.incremental);
    pm_store_relaxed(&p->protect, protect);
    pm_store_relaxed(&p->mirror_invalid, h->status.mirror_invalid);
    p->detach_error = h->status.detach_error;   /* the detach record (zeros: none) */
    p->detach_track = h->status.detach_track;
    p->detach_time_ns = h->status.detach_time_ns;
    if (!h->clean && is_mirrored_state(state, protect)) {
        /* Host writes were mirrored: a crash may have landed one on one side
         * only.  Copy every track they may have touched again, in the job's
         * direction (md's resync of the write-intent regions). */
        int target = state == PM_STATE_RESTORING ? PM_STANDARD : PM_MIRROR;
        pm_bitmap *pending = p->table[target]->flags[PM_PENDING];
        pm_bitmap_union(pending, p->table[PM_STANDARD]->flags[PM_CHANGED]);
        pm_bitmap_union(pending, p->table[PM_MIRROR]->flags[PM_CHANGED]);
        if (state == PM_STATE_ESTABLISHED && pm_bitmap_count(pending) > 0)
            state = PM_STATE_SYNCING;      /* resumable like any interrupted establish */
    }
    if (state == PM_STATE_SYNCING || state == PM_STATE_RESTORING)
        pm_job_reopen(p, state, h->status.error, h->status.error_track);
    else
        pm_store_release(&p->state, state);
    /* An older format is rewritten now, in place (two ordinary commits:
     * crash-safe), and a relocation is committed before it is reported. */
    rc = pm_meta_upgrade(p->meta, h);
    if (rc == 0 && relocate)
        rc = pm_meta_commit(p->meta);
    free(h);
    if (rc) {
        pm_meta_forget_store(p->meta);
        pm_pair_destroy(p);   /* the store is left to the caller */
        return rc;
    }
    if (own)
        pm_meta_own_store(p->meta);
    *out = p;
    return 0;
}

int pm_pair_open_meta(const char *meta_path, pm_store *standard, pm_store *mirror, pm_pair **out)
{
    if (meta_path == NULL || out == NULL || standard == NULL || mirror == NULL)
        return PM_FAIL(-EINVAL, "meta_path, the stores and out must not be NULL");
    *out = NULL;
    pm_store *st;
    int rc = pm_meta_open_file(meta_path, 1, &st);
    if (rc)
        return rc;
    rc = open_on_store(st, 1, meta_path, standard, mirror, out, 0);
    if (rc)
        pm_store_destroy(st);   /* and its lock */
    return rc;
}

int pm_pair_open_meta_store(pm_store *meta, pm_store *standard, pm_store *mirror, pm_pair **out)
{
    if (meta == NULL || out == NULL || standard == NULL || mirror == NULL)
        return PM_FAIL(-EINVAL, "the stores and out must not be NULL");
    *out = NULL;
    return open_on_store(meta, 0, "metadata store", standard, mirror, out, 0);
}

/* ---- branch metatrust: relocate, trust ------------------------------------ */

int pm_pair_relocate_meta(const char *meta_path, pm_store *standard, pm_store *mirror, pm_pair **out)
{
    if (meta_path == NULL || out == NULL || standard == NULL || mirror == NULL)
        return PM_FAIL(-EINVAL, "meta_path, the stores and out must not be NULL");
    *out = NULL;
    if (strlen(standard->path) >= PM_PATH_MAX || strlen(mirror->path) >= PM_PATH_MAX ||
        standard->path[0] == 0 || mirror->path[0] == 0)
        return PM_FAIL(-EINVAL, "relocating a pair needs file volumes with paths shorter than %d", PM_PATH_MAX);
    pm_store *st;
    int rc = pm_meta_open_file(meta_path, 1, &st);
    if (rc)
        return rc;
    rc = open_on_store(st, 1, meta_path, standard, mirror, out, 1);
    if (rc)
        pm_store_destroy(st);
    return rc;
}

int pm_pair_trust(pm_pair *p)
{
    if (p == NULL)
        return PM_FAIL(-EINVAL, "the pair must not be NULL");
    pm_meta_trust_all(p->meta);
    return pm_meta_commit(p->meta);
}

int pm_pair_volume_trust(pm_pair *p, int side, struct pm_volume_trust *out)
{
    if (p == NULL || out == NULL)
        return PM_FAIL(-EINVAL, "the pair and out must not be NULL");
    if (side != PM_STANDARD && side != PM_MIRROR)
        return PM_FAIL(PM_E_RANGE, "side %d is neither PM_STANDARD nor PM_MIRROR", side);
    return pm_meta_volume_trust(p->meta, side, out);
}
