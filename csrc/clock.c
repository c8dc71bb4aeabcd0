/*
 * clock.c - monotonic time, absolute deadlines for timed waits, and sleeps.
 *
 * Layer 0 (with errors.c and crc32c.c): calls nothing of pymirror's.
 * Every timed wait in the core uses CLOCK_MONOTONIC (condition variables
 * are created with it), so a jump of the wall clock never cuts a wait short
 * or makes it last forever.
 */
#include <errno.h>
#include <time.h>

#include "internal.h"

double pm_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct timespec pm_deadline(double t)
{
    struct timespec ts;
    if (t > 4e9)
        t = 4e9;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    if (ts.tv_nsec < 0)
        ts.tv_nsec = 0;
    return ts;
}

void pm_sleep(double s)
{
    if (s <= 0)
        return;
    struct timespec ts = { (time_t)s, (long)((s - (double)(time_t)s) * 1e9) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}
