/*
 * evict.c - a copy's page-cache footprint: the pages a copier's reads
 * brought into the page cache are dropped once copied, and the pages that
 * were cached before (the host's) stay.
 *
 * Layer 2: may call store.c (1) and the layer-0 helpers.
 *
 * Why: on the build machine a copy that leaves its pages in the page cache
 * runs at half speed once it no longer fits in a few GiB (docs/copier.md,
 * "Large copies": every page the cache takes is new memory for the VM
 * host to fault in, and the cache fills); nbdcopy drops its pages the same
 * way.  Which pages were cached before is asked (mincore) for a window
 * ahead of the copier's stream, before its reads, its read-ahead hints or
 * the kernel's read-ahead reach them; a page asked for later (a jump to a
 * new stripe the kernel already read ahead into) may be taken for the
 * host's and kept, which costs cache, never data.  Memory: one byte per
 * page of the window (window / 4 KiB: 19 KiB at the automatic settings).
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "evict.h"

int pm_evict_init(struct pm_evict *e, pm_store *src, uint64_t max_run)
{
    long page = sysconf(_SC_PAGESIZE);
    memset(e, 0, sizeof *e);
    e->src = src;
    e->page = page > 0 ? (uint64_t)page : 4096;
    e->ahead = 2 * max_run + PM_EVICT_READAHEAD;
    e->window = max_run + e->ahead + PM_EVICT_READAHEAD;
    e->window = (e->window + e->page - 1) / e->page * e->page;
    /* only a file store on a buffered descriptor has pages to drop */
    e->active = pm__store_resident(src, 0, 0, NULL) == 0;
    if (!e->active)
        return 0;
    e->vec = malloc((size_t)(e->window / e->page));
    return e->vec ? 0 : -ENOMEM;
}

void pm_evict_destroy(struct pm_evict *e)
{
    pm_evict_flush(e);
    free(e->vec);
    e->vec = NULL;
}

/* Learn which pages of [off, off + len + ahead) are cached, sliding the
 * window forward along a stream and starting it afresh on a jump. */
void pm_evict_before(struct pm_evict *e, uint64_t off, uint64_t len)
{
    if (!e->active)
        return;
    uint64_t size = pm_store_size(e->src);
    uint64_t a = off / e->page * e->page;
    if (a < e->base || a > e->end)
        e->base = e->end = a;               /* a jump: nothing known here */
    uint64_t want = off + len + e->ahead < size ? off + len + e->ahead : size;
    if (e->end >= want)
        return;
    uint64_t keep = (e->end - a) / e->page;  /* what is known from a on */
    memmove(e->vec, e->vec + (a - e->base) / e->page, (size_t)keep);
    e->base = a;
    uint64_t to = a + e->window < size ? a + e->window : size;
    int64_t n = pm__store_resident(e->src, e->end, to - e->end, e->vec + keep);
    if (n < 0)                              /* the store cannot tell: all ours */
        memset(e->vec + keep, 0, (size_t)((to - e->end + e->page - 1) / e->page));
    e->end = to;
}

/* Scattered pieces (the tail of a stream that broke off, an incremental
 * job's lone tracks) are dropped PM_EVICT_LATER at a time.  Pages just read
 * sit in per-CPU batches, and a DONTNEED that finds one there first drains
 * every CPU's batches (lru_add_drain_all: it waits for each CPU): once per
 * group instead of once per track (measured: a 1 % incremental restore of
 * 1 GiB, 163 scattered 64 KiB tracks, took 86-90 ms dropping each at once,
 * 78 ms without dropping). */
static void drop_later_flush(struct pm_evict *e)
{
    for (unsigned i = 0; i < e->nlater; i++)
        pm__store_evict(e->src, e->later[i].hi - e->later[i].lo, e->later[i].lo);
    e->nlater = 0;
}

static void drop_later(struct pm_evict *e, uint64_t lo, uint64_t hi)
{
    if (e->nlater > 0 && e->later[e->nlater - 1].hi == lo) {
        e->later[e->nlater - 1].hi = hi;
        return;
    }
    if (e->nlater == PM_EVICT_LATER)
        drop_later_flush(e);
    e->later[e->nlater++] = (struct pm_evict_range){ lo, hi };
}

/* Drop [lo, hi) now, or keep its unaligned tail for later: the page cache
 * holds large folios (up to PM_EVICT_ALIGN, naturally aligned), and
 * DONTNEED leaves a folio that reaches outside its range, so a stream's
 * range is dropped up to the last aligned boundary and the rest joins the
 * next range when that one follows on (measured: 1 MiB ranges left most of
 * a stream cached once the folios grew past 1 MiB). */
static void drop(struct pm_evict *e, uint64_t lo, uint64_t hi)
{
    if (e->drop_hi > e->drop_lo && lo == e->drop_hi) {
        lo = e->drop_lo;                    /* the stream goes on */
    } else if (e->drop_hi > e->drop_lo) {
        drop_later(e, e->drop_lo, e->drop_hi);   /* a gap: the rest, a little later */
    }
    uint64_t cut = hi / PM_EVICT_ALIGN * PM_EVICT_ALIGN;
    if (cut > lo) {
        pm__store_evict(e->src, cut - lo, lo);
        lo = cut;
    }
    e->drop_lo = lo, e->drop_hi = hi;
}

void pm_evict_flush(struct pm_evict *e)
{
    if (e->active && e->drop_hi > e->drop_lo)
        pm__store_evict(e->src, e->drop_hi - e->drop_lo, e->drop_lo);
    e->drop_lo = e->drop_hi = 0;
    if (e->active)
        drop_later_flush(e);
    e->nlater = 0;
}

/* Drop the pages of [off, off+len) that were not cached before. */
void pm_evict_after(struct pm_evict *e, uint64_t off, uint64_t len)
{
    uint64_t end = off + len;
    if (!e->active)
        return;
    if (off < e->base)
        off = e->base;                      /* before the window: unknown, kept */
    if (end > e->end)
        end = e->end;
    uint64_t i = (off - e->base) / e->page, stop = (end - e->base + e->page - 1) / e->page;
    while (off < end && i < stop) {
        while (i < stop && (e->vec[i] & 1))
            i++;
        uint64_t j = i;
        while (j < stop && !(e->vec[j] & 1))
            j++;
        if (j > i) {
            uint64_t from = e->base + i * e->page, to = e->base + j * e->page;
            drop(e, from, to < end ? to : end);
        }
        i = j;
    }
}
