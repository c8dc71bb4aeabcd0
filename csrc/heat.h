/* heat.h - the tracks the host is using while they are PENDING, for the
 * copier to take first (heat.c; layer 1).  docs/copier.md "Hot tracks first". */
#ifndef PM_HEAT_H
#define PM_HEAT_H

#include <pthread.h>

#include "internal.h"

#define PM_HEAT_SLOTS 1024      /* tracks remembered: the newest win */
#define PM_HEAT_FILTER 256      /* recently marked tracks, not queued twice */

struct pm_heat {
    pthread_mutex_t mu;
    pm_atomic_u64 n;             /* tracks queued (read relaxed to skip the lock when 0) */
    uint64_t top;                /* the newest is ring[(top - 1) % PM_HEAT_SLOTS] */
    uint64_t ring[PM_HEAT_SLOTS];
    pm_atomic_u64 recent[PM_HEAT_FILTER];   /* track + 1 of a queued track, by hash */
    pm_atomic_u64 marked, dropped;          /* counters (tests, docs) */
};

void pm_heat_init(struct pm_heat *h);
void pm_heat_destroy(struct pm_heat *h);
void pm_heat_reset(struct pm_heat *h);                  /* a new job: forget all */
void pm_heat_mark(struct pm_heat *h, uint64_t track);   /* thread-safe, bounded */
/* The most recently marked track not yet taken: 1 with *track, or 0. */
int pm_heat_pop(struct pm_heat *h, uint64_t *track);

#endif
