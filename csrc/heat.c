/*
 * heat.c - a small bounded queue of hot tracks: tracks the host read from
 * the source (redirected reads) or merged into while they were PENDING.
 * The copier takes them, newest first, before its stripes (copier.c), so
 * the host's working set becomes local soon and its redirects stop.
 *
 * Layer 1 (with bitmap.c, store.c, pace.c): calls only libc and layer 0.
 *
 * Bounded: PM_HEAT_SLOTS tracks (8 KiB); when full, a new mark overwrites
 * the oldest (heat is about now).  A direct-mapped filter of recently
 * queued tracks keeps a host reading one track over and over from filling
 * the queue with it.  A mark is a hint: the copier re-checks PENDING and
 * claims as always, so heat changes only the order of the copy.
 */
#include <string.h>

#include "heat.h"

static unsigned slot_of(uint64_t t) { return (unsigned)((t * 0x9E3779B97F4A7C15ull) >> 56) % PM_HEAT_FILTER; }

void pm_heat_init(struct pm_heat *h)
{
    memset(h, 0, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
}

void pm_heat_destroy(struct pm_heat *h) { pthread_mutex_destroy(&h->mu); }

void pm_heat_reset(struct pm_heat *h)
{
    pthread_mutex_lock(&h->mu);
    h->top = 0;
    pm_store_relaxed(&h->n, 0);
    for (int i = 0; i < PM_HEAT_FILTER; i++)
        pm_store_relaxed(&h->recent[i], 0);
    pthread_mutex_unlock(&h->mu);
}

void pm_heat_mark(struct pm_heat *h, uint64_t t)
{
    pm_atomic_u64 *f = &h->recent[slot_of(t)];
    if (pm_load_relaxed(f) == t + 1)
        return;                           /* queued already */
    pthread_mutex_lock(&h->mu);
    pm_store_relaxed(f, t + 1);
    h->ring[h->top % PM_HEAT_SLOTS] = t;
    h->top++;
    uint64_t n = pm_load_relaxed(&h->n);
    if (n < PM_HEAT_SLOTS)
        pm_store_relaxed(&h->n, n + 1);
    else
        pm_count_add(&h->dropped, 1);     /* the oldest was overwritten */
    pm_count_add(&h->marked, 1);
    pthread_mutex_unlock(&h->mu);
}

int pm_heat_pop(struct pm_heat *h, uint64_t *t)
{
    if (pm_load_relaxed(&h->n) == 0)
        return 0;
    pthread_mutex_lock(&h->mu);
    uint64_t n = pm_load_relaxed(&h->n);
    int got = n > 0;
    if (got) {
        h->top--;
        *t = h->ring[h->top % PM_HEAT_SLOTS];
        pm_store_relaxed(&h->n, n - 1);
        pm_atomic_u64 *f = &h->recent[slot_of(*t)];
        if (pm_load_relaxed(f) == *t + 1)
            pm_store_relaxed(f, 0);       /* it may be marked again */
    }
    pthread_mutex_unlock(&h->mu);
    return got;
}
