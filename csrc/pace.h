/* pace.h - host latency as the arbitration sees it, and the pacing
 * controller that sets how fast the copy may go (pace.c; layer 1).
 * docs/arbitration.md "Pacing" explains the design. */
#ifndef PM_PACE_H
#define PM_PACE_H

#include "internal.h"

/* Latency classes of host I/O on the standard (a write that merged a
 * PENDING track is a class of its own: it reads the source's track
 * whatever the copy does). */
enum { PM_LAT_READ = 0, PM_LAT_WRITE = 1, PM_LAT_FLUSH = 2, PM_LAT_MERGE = 3, PM_LAT_CLASSES = 4 };

/* Histogram buckets: four per power of two of nanoseconds (19 % wide),
 * from 1 ns to 2^40 ns (18 minutes). */
#define PM_LAT_BUCKETS 160

/* What host I/O records, lock-free (relaxed counters): every sample in
 * `all`, and those made while no copy I/O was in flight (nor had ended
 * within the settle time before the sample began) also in `idle`. */
struct pm_lat {
    pm_atomic_u64 all[PM_LAT_CLASSES][PM_LAT_BUCKETS];
    pm_atomic_u64 idle[PM_LAT_CLASSES][PM_LAT_BUCKETS];
    pm_atomic_int copy_inflight;   /* copier batches being copied now */
    pm_atomic_u64 copy_end_ns;     /* when the last copier batch ended (its write-back started) */
};

uint64_t pm_lat_now_ns(void);
int pm_lat_bucket(uint64_t ns);
uint64_t pm_lat_bucket_ns(int bucket);    /* a representative value of the bucket */
/* A host I/O of class `cls` that began at t0 (pm_lat_now_ns) ended now. */
void pm_lat_host(struct pm_lat *l, int cls, uint64_t t0);
/* A copier batch begins / ends (its data written, write-back started). */
void pm_lat_copy_begin(struct pm_lat *l);
void pm_lat_copy_end(struct pm_lat *l);

/* ---- the controller (pure: driven by windows of samples) ----------------- */

/* One window of observations. */
struct pm_pace_in {
    double now;                                   /* seconds, monotonic */
    double dt;                                    /* seconds since the previous window */
    uint64_t copy_bytes;                          /* bytes the copy wrote in the window */
    uint64_t win[PM_LAT_CLASSES][PM_LAT_BUCKETS];  /* host samples in the window */
    uint64_t idle[PM_LAT_CLASSES][PM_LAT_BUCKETS]; /* of which made while the copy was quiet */
};

struct pm_pacer {
    /* settings */
    double factor;              /* target = factor x the idle p99 (when target_ns is 0) */
    uint64_t target_ns;         /* an absolute p99 target, or 0 */
    /* state */
    double base[PM_LAT_CLASSES][PM_LAT_BUCKETS];   /* idle samples, decaying (half-life 30 s) */
    uint64_t acc[PM_LAT_CLASSES][PM_LAT_BUCKETS];  /* the window being gathered */
    double acc_dt;
    uint64_t acc_bytes;
    double rate;                /* bytes/s the copy may go, 0 = full speed */
    double full_rate;           /* highest throughput seen at full speed (bytes/s) */
    double next_probe;          /* when to ask for the next quiet window */
    double iops;                /* host samples per second (a moving average) */
    double quiet_until;         /* the copy holds still until then (0: no quiet window) */
    /* what the last decided window saw (for progress) */
    uint64_t p50_ns[PM_LAT_CLASSES], p99_ns[PM_LAT_CLASSES], base99_ns[PM_LAT_CLASSES];
    double ratio;               /* worst p99 / target of the last window (0: none) */
    uint64_t windows, decreases, increases, probes;
};

void pm_pace_init(struct pm_pacer *c, double factor, uint64_t target_ns);
/* A new job: new settings and a fresh start, the idle baseline kept. */
void pm_pace_restart(struct pm_pacer *c, double factor, uint64_t target_ns);
/* Feed one window; updates c->rate (0 = full speed) and c->quiet_until. */
void pm_pace_update(struct pm_pacer *c, const struct pm_pace_in *in);
/* The q-quantile (0..1) of a histogram, in ns (0 if empty). */
uint64_t pm_lat_quantile_u64(const uint64_t *h, double q);
uint64_t pm_lat_quantile_f(const double *h, double q);

/* The pair's side: snapshots `l`'s counters since the last call into a
 * window and feeds it (the caller serialises calls).  `last` holds the
 * previous snapshot. */
struct pm_pace_snap {
    uint64_t all[PM_LAT_CLASSES][PM_LAT_BUCKETS];
    uint64_t idle[PM_LAT_CLASSES][PM_LAT_BUCKETS];
    uint64_t copy_bytes;
    double t;
};
void pm_pace_tick(struct pm_pacer *c, struct pm_lat *l, struct pm_pace_snap *last, struct pm_pace_in *scratch,
                  double now, uint64_t copy_bytes);

#endif
