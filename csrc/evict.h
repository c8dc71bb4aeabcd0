/* evict.h - a copy's page-cache footprint (evict.c; layer 2):
 * docs/copier.md, "Large copies". */
#ifndef PM_EVICT_H
#define PM_EVICT_H

#include "store.h"

/* How far past a run the kernel may read ahead on its own (read_ahead_kb
 * is 8 MiB on the build machine, doubled for a sequential stream), with
 * room to spare: which pages are cached is asked this far ahead. */
#define PM_EVICT_READAHEAD (32u << 20)

/* The largest folio the page cache builds (x86-64: a PMD, 2 MiB), aligned
 * to its size: ranges are dropped in whole pieces of this (evict.c). */
#define PM_EVICT_ALIGN (2u << 20)

/* Scattered pieces are dropped this many at a time (evict.c, drop_later). */
#define PM_EVICT_LATER 32

struct pm_evict_range {
    uint64_t lo, hi;
};

struct pm_evict {              /* one copier's view of its source */
    pm_store *src;
    int active;                /* the store has pages to drop */
    uint64_t page;
    uint64_t ahead, window;    /* bytes asked past a run; bytes of vec */
    uint64_t base, end;        /* vec holds pages [base, end) */
    unsigned char *vec;        /* mincore bytes: bit 0 set = cached before */
    uint64_t drop_lo, drop_hi; /* to drop, waiting for the rest of its folio */
    struct pm_evict_range later[PM_EVICT_LATER];   /* scattered pieces to drop */
    unsigned nlater;
};

/* max_run: the largest run a copier copies (its batch).  0, or -ENOMEM. */
int pm_evict_init(struct pm_evict *e, pm_store *src, uint64_t max_run);
void pm_evict_destroy(struct pm_evict *e);
/* Before a copier reads [off, off+len) or asks for it ahead: learn which
 * pages of it, and of the stretch ahead, are in the page cache now. */
void pm_evict_before(struct pm_evict *e, uint64_t off, uint64_t len);
/* After [off, off+len) is copied: drop its pages that were not cached
 * before (a file store; a no-op for others). */
void pm_evict_after(struct pm_evict *e, uint64_t off, uint64_t len);
/* Drop what pm_evict_after kept back for the rest of a folio (also done by
 * pm_evict_destroy). */
void pm_evict_flush(struct pm_evict *e);

#endif
