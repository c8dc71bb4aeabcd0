/*
 * table.c - the track table of one volume: its geometry (volume_size bytes
 * cut into tracks of track_size bytes, the last one possibly short) and one
 * bitmap per flag (PENDING, CHANGED, BUSY), bit t standing for track t.
 *
 * Layer 2 (with store_volatile.c): may call bitmap.c (1) and errors.c (0).
 *
 * The geometry never changes after creation, so its getters need no
 * synchronisation; the bitmaps are thread-safe on their own (bitmap.c).
 */
#include <stdlib.h>

#include "internal.h"

/* The most tracks a table may have: the bitmap limit (2^48 bits). */
#define PM_TABLE_MAX_TRACKS ((uint64_t)1 << 48)

int pm_table_create(uint64_t volume_size, uint32_t track_size, pm_table **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    *out = NULL;
    if (track_size < PM_TRACK_SIZE_MIN || track_size > PM_TRACK_SIZE_MAX ||
        (track_size & (track_size - 1)) != 0)
        return PM_FAIL(PM_E_GEOMETRY, "track size %u is not a power of two from %d to %d",
                       track_size, PM_TRACK_SIZE_MIN, PM_TRACK_SIZE_MAX);
    if (volume_size == 0)
        return PM_FAIL(PM_E_GEOMETRY, "volume size must be greater than zero");
    uint32_t shift = (uint32_t)__builtin_ctz(track_size);
    uint64_t rem = volume_size & (track_size - 1);
    /* ceil(volume_size / track_size) without overflowing near 2^64 */
    uint64_t tracks = (volume_size >> shift) + (rem != 0);
    if (tracks > PM_TABLE_MAX_TRACKS)
        return PM_FAIL(PM_E_GEOMETRY, "volume size %llu needs %llu tracks of %u bytes, more than 2^48",
                       (unsigned long long)volume_size, (unsigned long long)tracks, track_size);
    pm_table *t = calloc(1, sizeof *t);
    if (t == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    t->volume_size = volume_size;
    t->track_size = track_size;
    t->track_shift = shift;
    t->tracks = tracks;
    t->last_track_size = rem ? (uint32_t)rem : track_size;
    for (int f = 0; f < PM_NFLAGS; f++) {
        int rc = pm_bitmap_create(t->tracks, &t->flags[f]);
        if (rc < 0) {
            pm_table_destroy(t);
            return rc;   /* -ENOMEM, with pm_bitmap_create's message */
        }
    }
    *out = t;
    return 0;
}

void pm_table_destroy(pm_table *t)
{
    if (t == NULL)
        return;
    for (int f = 0; f < PM_NFLAGS; f++)
        pm_bitmap_destroy(t->flags[f]);
    free(t);
}

uint64_t pm_table_volume_size(const pm_table *t) { return t->volume_size; }
uint32_t pm_table_track_size(const pm_table *t) { return t->track_size; }
uint64_t pm_table_tracks(const pm_table *t) { return t->tracks; }
uint32_t pm_table_last_track_size(const pm_table *t) { return t->last_track_size; }

pm_bitmap *pm_table_flag(pm_table *t, int flag)
{
    if (flag < 0 || flag >= PM_NFLAGS) {
        PM_FAIL(-EINVAL, "unknown flag %d (flags are 0 to %d)", flag, PM_NFLAGS - 1);
        return NULL;
    }
    return t->flags[flag];
}

int64_t pm_table_track_of(const pm_table *t, uint64_t offset)
{
    if (offset >= t->volume_size)
        return PM_FAIL(PM_E_RANGE, "offset %llu is beyond the volume size %llu",
                       (unsigned long long)offset, (unsigned long long)t->volume_size);
    return (int64_t)(offset >> t->track_shift);
}

int pm_table_track_span(const pm_table *t, uint64_t track, uint64_t *offset, uint32_t *length)
{
    if (offset == NULL || length == NULL)
        return PM_FAIL(-EINVAL, "offset and length must not be NULL");
    if (track >= t->tracks)
        return PM_FAIL(PM_E_RANGE, "track %llu is beyond the last track %llu",
                       (unsigned long long)track, (unsigned long long)(t->tracks - 1));
    *offset = track << t->track_shift;
    *length = track == t->tracks - 1 ? t->last_track_size : t->track_size;
    return 0;
}
