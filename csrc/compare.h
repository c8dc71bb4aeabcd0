/*
 * compare.h - the compare engine (compare.c, layer 2): two stores read in
 * parallel, batch by batch, into a bounded ring per side; each batch's
 * per-track verdict goes to a callback of the layer above.
 */
#ifndef PM_COMPARE_H
#define PM_COMPARE_H

#include "internal.h"
#include "store.h"

#define PM_COMPARE_BATCH (2u << 20)   /* bytes per read, rounded to whole tracks */
#define PM_COMPARE_DEPTH 3u           /* batches in flight per side (the ring) */

struct pm_compare_job {
    pm_store *store[2];
    const char *name[2];           /* "the standard", "the mirror": for messages */
    uint64_t size;                 /* bytes of each volume */
    uint32_t track_size;           /* a power of two */
    uint64_t first, count;         /* the tracks to compare */
    uint32_t batch_bytes, depth;   /* 0: the defaults above */
    /* Called on the comparing thread after each batch, in track order:
     * differ[i] is 1 when track first+i differs.  Return non-zero to stop
     * (the compare then returns what it counted so far). */
    int (*batch)(void *ctx, uint64_t first, uint64_t n, const unsigned char *differ);
    void *ctx;
    pm_compare *ctl;               /* progress and cancel; may be NULL */
};

/* Run a compare; returns the number of differing tracks or a negative code
 * (-ECANCELED when ctl was cancelled; a read error names the side and the
 * track).  Thread-safe for different jobs. */
int64_t pm__compare_run(const struct pm_compare_job *job);

#endif
