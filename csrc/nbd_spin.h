/*
 * nbd_spin.h - how long the reader of an NBD connection polls its socket
 * for the next request before it sleeps (nbd_loop.c, recv_next).
 *
 * A client at queue depth 1 sends its next request a few microseconds after
 * it gets a reply.  A reader that sleeps in recv() pays a sleep and a
 * wake-up for every request, and on a VM whose idle vCPUs halt that is most
 * of a cached 4 KiB read's time; polling (recv with MSG_DONTWAIT) for a
 * little while first catches the request awake.  QEMU's event loop does the
 * same (its poll-max-ns, 32 us by default) and adapts the window the same
 * way: a client that keeps its requests coming within the window keeps it,
 * a client that pauses longer makes it shrink to nothing, so an idle
 * connection costs no CPU, and a short wait makes it grow back.
 *
 * The window is the connection's (read and written under its receive lock).
 */
#ifndef PM_NBD_SPIN_H
#define PM_NBD_SPIN_H

#include <stdint.h>

#define PM_NBD_SPIN_MAX_NS 32000u     /* the longest poll */
#define PM_NBD_SPIN_MIN_NS 2000u      /* below this, no poll at all */
/* A wait shorter than this counts as one a longer poll would have caught:
 * twice the longest poll, because a wait measured across a sleep includes
 * the wake-up (20-40 us on this VM), so a request that came within reach
 * of the poll can look twice as late. */
#define PM_NBD_SPIN_GROW_NS (2 * PM_NBD_SPIN_MAX_NS)

/* The next window, after a receive that the poll caught (hit), or that
 * slept (hit 0: waited_ns from the poll's start, or from the sleep's when
 * there was no poll, until the bytes came). */
static inline uint32_t pm_nbd_spin_next(uint32_t cur, int hit, uint64_t waited_ns)
{
    if (hit)
        return cur;
    if (waited_ns < PM_NBD_SPIN_GROW_NS) {         /* a longer poll would have caught it */
        uint32_t next = cur < PM_NBD_SPIN_MIN_NS ? PM_NBD_SPIN_MIN_NS : cur * 2;
        return next > PM_NBD_SPIN_MAX_NS ? PM_NBD_SPIN_MAX_NS : next;
    }
    cur /= 2;                                      /* the client paused: poll less */
    return cur < PM_NBD_SPIN_MIN_NS ? 0 : cur;
}

struct pm_nbd_conn;
/* Requests the reader's poll caught, since the connection began (tests). */
uint64_t pm__nbd_conn_spin_hits(const struct pm_nbd_conn *c);

#endif
