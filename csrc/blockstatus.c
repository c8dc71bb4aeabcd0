/*
 * blockstatus.c - what a side of a pair holds, as extents, for NBD's
 * BLOCK_STATUS (pymirror/nbd packs the replies; a C request loop can call
 * the same function):
 *  - allocation: data, holes and zeroes as the stores report them
 *    (pm_store_extents); a PENDING track is described by the other side's
 *    store, since a read of it is served from there (a restore's standard
 *    reads its PENDING tracks from the mirror);
 *  - pending: 1 for tracks still PENDING on the side, 0 for local ones.
 *
 * Layer 6 (with copier.c, arbitrate.c): may call state.c (3), bitmap.c and
 * store.c (1) and the layer-0 helpers.
 *
 * A snapshot: it takes cmd_lock for reading (no command changes the tables
 * meanwhile) but no track locks, so host I/O and the copier go on and may
 * change what it described once it returns, as with any block status.
 */
#include "layout.h"

/* Append (or extend the last) extent; 0 when out is full. */
static int add(struct pm_extent *out, uint64_t max, int64_t *n, uint64_t off, uint64_t len, uint32_t kind)
{
    if (*n > 0 && out[*n - 1].kind == kind && out[*n - 1].offset + out[*n - 1].length == off) {
        out[*n - 1].length += len;
        return 1;
    }
    if ((uint64_t)*n >= max)
        return 0;
    out[(*n)++] = (struct pm_extent){ off, len, kind, 0 };
    return 1;
}

/* The end (exclusive, in tracks) of the run of tracks from t with t's PENDING value. */
static uint64_t run_end(const pm_pair *p, pm_bitmap *pending, uint64_t t, int is_pending)
{
    int64_t e = is_pending ? pm_bitmap_next_clear(pending, t) : pm_bitmap_next_set(pending, t);
    return e < 0 ? p->tracks : (uint64_t)e;
}

/* Append the store's extents over [off, end); 0 when out is full. */
static int add_store(pm_store *s, struct pm_extent *out, uint64_t max, int64_t *n, uint64_t off, uint64_t end)
{
    struct pm_extent ext[32];
    while (off < end) {
        int64_t k = pm_store_extents(s, off, end - off, ext, 32);
        if (k <= 0) {                        /* the query failed: say "data", which is never wrong */
            ext[0] = (struct pm_extent){ off, end - off, PM_EXTENT_DATA, 0 };
            k = 1;
        }
        for (int64_t i = 0; i < k && off < end; i++) {
            if (ext[i].offset != off || ext[i].length == 0)
                break;
            uint64_t len = ext[i].length < end - off ? ext[i].length : end - off;
            uint32_t kind = ext[i].kind <= PM_EXTENT_ZERO ? ext[i].kind : PM_EXTENT_DATA;
            if (!add(out, max, n, off, len, kind))
                return 0;
            off += len;
        }
    }
    return 1;
}

int64_t pm_pair_block_status(pm_pair *p, int side, int context, uint64_t offset, uint64_t len,
                             struct pm_extent *out, uint64_t max)
{
    if (p == NULL || out == NULL || max == 0)
        return PM_FAIL(-EINVAL, "the pair and out must not be NULL, and max at least 1");
    if (side != PM_STANDARD && side != PM_MIRROR)
        return PM_FAIL(-EINVAL, "side must be PM_STANDARD or PM_MIRROR, got %d", side);
    if (context != PM_CONTEXT_ALLOCATION && context != PM_CONTEXT_PENDING)
        return PM_FAIL(-EINVAL, "context must be PM_CONTEXT_ALLOCATION or PM_CONTEXT_PENDING, got %d", context);
    if (offset > p->size || len > p->size - offset)
        return PM_FAIL(PM_E_RANGE, "offset %llu + length %llu is beyond the volume size %llu",
                       (unsigned long long)offset, (unsigned long long)len, (unsigned long long)p->size);
    int64_t n = 0;
    uint64_t end = offset + len;
    pm_bitmap *pending = p->table[side]->flags[PM_PENDING];
    pthread_rwlock_rdlock(&p->cmd_lock);
    for (uint64_t off = offset; off < end;) {
        uint64_t t = off >> p->shift;
        int is_pending = pm_bitmap_get(pending, t) == 1;
        uint64_t stop = run_end(p, pending, t, is_pending);
        uint64_t stop_off = stop >= p->tracks ? p->size : pm_track_off(p, stop);
        uint64_t e = stop_off < end ? stop_off : end;
        int more = context == PM_CONTEXT_PENDING
                       ? add(out, max, &n, off, e - off, (uint32_t)is_pending)
                       : add_store(p->store[is_pending ? 1 - side : side], out, max, &n, off, e);
        if (!more)
            break;
        off = e;
    }
    pthread_rwlock_unlock(&p->cmd_lock);
    return n;
}
