/*
 * tracklock.c - one lock per track, for the whole pair.
 *
 * Layer 3 (with state.c): may call bitmap.c (1) and the layer-0 helpers.
 *
 * The locks are the BUSY bits of the standard's table.  Host I/O locks
 * every track it touches in ascending order, waiting (never spinning) when a
 * track is held; a copier only try-locks, so it never waits holding one.
 * Waiting uses hashed buckets of mutex + condvar + waiter count: a waiter
 * increments the count before testing the bit under the bucket mutex, and a
 * releaser clears the bit (seq_cst) before reading the count, so either the
 * waiter sees the bit clear or the releaser sees the waiter and broadcasts
 * under the mutex (no lost wake-up).
 */
#include "layout.h"

void pm_tracklock_init(pm_pair *p)
{
    p->busy = p->table[PM_STANDARD]->flags[PM_BUSY];
    for (int i = 0; i < PM_LOCK_BUCKETS; i++) {
        pthread_mutex_init(&p->buckets[i].m, NULL);
        pthread_cond_init(&p->buckets[i].c, NULL);
    }
}

void pm_tracklock_destroy(pm_pair *p)
{
    for (int i = 0; i < PM_LOCK_BUCKETS; i++) {
        pthread_mutex_destroy(&p->buckets[i].m);
        pthread_cond_destroy(&p->buckets[i].c);
    }
}

static inline struct pm_lock_bucket *bucket_of(pm_pair *p, uint64_t t)
{
    return &p->buckets[(t * 0x9E3779B97F4A7C15ULL) >> 58];
}

int pm_track_trylock(pm_pair *p, uint64_t t)
{
    return pm_bitmap_test_and_set(p->busy, t) == 0;
}

void pm_track_lock(pm_pair *p, uint64_t t)
{
    if (pm_bitmap_test_and_set(p->busy, t) == 0)
        return;
    struct pm_lock_bucket *b = bucket_of(p, t);
    pthread_mutex_lock(&b->m);
    pm_fetch_add(&b->waiters, 1);
    while (pm_bitmap_test_and_set(p->busy, t) != 0)
        pthread_cond_wait(&b->c, &b->m);
    pm_fetch_sub(&b->waiters, 1);
    pthread_mutex_unlock(&b->m);
}

void pm_track_unlock(pm_pair *p, uint64_t t)
{
    pm_bitmap_test_and_clear(p->busy, t);
    struct pm_lock_bucket *b = bucket_of(p, t);
    if (pm_load_seqcst(&b->waiters) > 0) {
        pthread_mutex_lock(&b->m);
        pthread_cond_broadcast(&b->c);
        pthread_mutex_unlock(&b->m);
    }
}

