/*
 * pace.c - host I/O latency as the arbitration sees it, and the pacing
 * controller that sets how fast the background copy may go so that the
 * host's p99 stays within a target (docs/arbitration.md, "Pacing").
 *
 * Layer 1 (with bitmap.c, store.c): calls only libc and the layer-0
 * helpers.  arbitrate.c records host I/O (pm_lat_host), copier.c marks its
 * batches (pm_lat_copy_begin/end) and ticks the controller (pm_pace_tick).
 *
 * Recording costs two clock reads and one relaxed increment per host I/O
 * (two when the copy is quiet): a histogram of four buckets per power of
 * two of nanoseconds, per class (read, write, flush).  A sample is "idle"
 * when no copier batch was in flight during it and none had ended within
 * the settle time before it began (the device has drained the copy's
 * write-back by then): the idle samples give the baseline.
 *
 * The controller (pm_pace_update) is pure: it takes windows of samples and
 * the copy's throughput and decides a rate; tests drive it with a simulated
 * latency signal (csrc/tests/test_pace.c).
 */
#include <string.h>
#include <time.h>

#include "pace.h"

#define SETTLE_NS 10000000ull        /* a copy batch's write-back is drained 10 ms after it */
#define MIN_TARGET_NS 20000ull       /* no target below 20 us: a host cannot tell less apart */
#define WINDOW_MIN_S 0.1             /* a window lasts at least this long ... */
#define WINDOW_MIN_SAMPLES 64        /* ... and gathers this many host samples, */
#define WINDOW_MAX_S 1.0             /* or ends after this long with at least a few */
#define CLASS_MIN_SAMPLES 8          /* a class counts in a window with this many samples */
#define BASE_MIN_SAMPLES 24.0        /* a baseline is known with this many idle samples */
#define BASE_GOOD_SAMPLES 200.0      /* ... and trusted with this many */
#define BASE_HALF_LIFE_S 30.0
#define IDLE_HOST_S 0.2              /* no host I/O for this long: full speed */
#define QUIET_SETTLE_S 0.01         /* a quiet window: settle, then idle samples ... */
#define QUIET_MIN_S 0.04             /* ... for at least this long, */
#define QUIET_MAX_S 0.2              /* at most this long, */
#define QUIET_SAMPLES 16.0           /* time for about this many samples at the host's rate */
#define PROBE_YOUNG_S 0.5            /* quiet windows while the baseline is young ... */
#define PROBE_OLD_S 4.0              /* ... and once it is trusted (1.25 % of the time) */
#define HEADROOM 0.75                /* below this ratio to the target, speed up */
#define MIN_RATE (1.0 * 1048576)     /* the copy never goes slower than 1 MiB/s ... */
#define MIN_RATE_FRACTION (1.0 / 64) /* ... nor than 1/64 of its full speed */

uint64_t pm_lat_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int pm_lat_bucket(uint64_t ns)
{
    if (ns < 4)
        return (int)ns;
    int msb = 63 - __builtin_clzll(ns);
    int b = msb * 4 + (int)((ns >> (msb - 2)) & 3);
    return b < PM_LAT_BUCKETS ? b : PM_LAT_BUCKETS - 1;
}

uint64_t pm_lat_bucket_ns(int b)
{
    if (b < 4)
        return (uint64_t)b;
    int msb = b / 4, frac = b % 4;
    /* the middle of [ (4+frac) << (msb-2), (5+frac) << (msb-2) ) */
    return ((uint64_t)(4 + frac) << (msb - 2)) + ((uint64_t)1 << (msb - 2)) / 2;
}

void pm_lat_host(struct pm_lat *l, int cls, uint64_t t0)
{
    uint64_t t1 = pm_lat_now_ns();
    int b = pm_lat_bucket(t1 - t0);
    pm_count_add(&l->all[cls][b], 1);
    /* quiet: no batch in flight now, and none ended after t0 - settle (a
     * batch that began and ended during the I/O moves copy_end_ns past t0) */
    if (pm_load_seqcst(&l->copy_inflight) == 0 && pm_load_seqcst(&l->copy_end_ns) + SETTLE_NS < t0)
        pm_count_add(&l->idle[cls][b], 1);
}

void pm_lat_copy_begin(struct pm_lat *l) { pm_fetch_add(&l->copy_inflight, 1); }

void pm_lat_copy_end(struct pm_lat *l)
{
    pm_store_seqcst(&l->copy_end_ns, pm_lat_now_ns());
    pm_fetch_sub(&l->copy_inflight, 1);
}

/* ---- quantiles ------------------------------------------------------------ */

uint64_t pm_lat_quantile_u64(const uint64_t *h, double q)
{
    uint64_t n = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++)
        n += h[b];
    if (n == 0)
        return 0;
    /* the smallest bucket at which at least q of the samples lie */
    double want = q * (double)n, seen = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++) {
        seen += (double)h[b];
        if (seen >= want && h[b])
            return pm_lat_bucket_ns(b);
    }
    return pm_lat_bucket_ns(PM_LAT_BUCKETS - 1);
}

uint64_t pm_lat_quantile_f(const double *h, double q)
{
    double n = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++)
        n += h[b];
    if (n <= 0)
        return 0;
    double want = q * n, seen = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++) {
        seen += h[b];
        if (seen >= want && h[b] > 0)
            return pm_lat_bucket_ns(b);
    }
    return pm_lat_bucket_ns(PM_LAT_BUCKETS - 1);
}

static uint64_t sum_u64(const uint64_t *h)
{
    uint64_t n = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++)
        n += h[b];
    return n;
}

static double sum_f(const double *h)
{
    double n = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++)
        n += h[b];
    return n;
}

/* ---- the controller -------------------------------------------------------- */

void pm_pace_init(struct pm_pacer *c, double factor, uint64_t target_ns)
{
    memset(c, 0, sizeof *c);
    c->factor = factor > 1.0 ? factor : 1.0;
    c->target_ns = target_ns;
}

void pm_pace_restart(struct pm_pacer *c, double factor, uint64_t target_ns)
{
    double (*keep)[PM_LAT_BUCKETS] = c->base;
    double saved[PM_LAT_CLASSES][PM_LAT_BUCKETS];
    memcpy(saved, keep, sizeof saved);
    pm_pace_init(c, factor, target_ns);
    memcpy(c->base, saved, sizeof saved);
}

static double min_rate(const struct pm_pacer *c)
{
    double m = c->full_rate * MIN_RATE_FRACTION;
    return m > MIN_RATE ? m : MIN_RATE;
}

/* Decide on the gathered window (enough samples in it). */
static void decide(struct pm_pacer *c, double now)
{
    double worst = 0;
    for (int k = 0; k < PM_LAT_CLASSES; k++) {
        uint64_t n = sum_u64(c->acc[k]);
        c->p50_ns[k] = pm_lat_quantile_u64(c->acc[k], 0.50);
        c->p99_ns[k] = pm_lat_quantile_u64(c->acc[k], 0.99);
        double nb = sum_f(c->base[k]);
        c->base99_ns[k] = nb >= BASE_MIN_SAMPLES ? pm_lat_quantile_f(c->base[k], 0.99) : 0;
        if (n < CLASS_MIN_SAMPLES)
            continue;
        uint64_t target = c->target_ns;
        if (target == 0) {
            if (c->base99_ns[k] == 0)
                continue;          /* no baseline yet: maybe_probe asks for one */
            target = (uint64_t)(c->factor * (double)c->base99_ns[k]);
        }
        if (target < MIN_TARGET_NS)
            target = MIN_TARGET_NS;
        double r = (double)c->p99_ns[k] / (double)target;
        if (r > worst)
            worst = r;
    }
    c->ratio = worst;
    c->windows++;
    double thr = c->acc_dt > 0 ? (double)c->acc_bytes / c->acc_dt : 0;
    if (c->rate == 0 && thr > c->full_rate)
        c->full_rate = thr;             /* what the copy does unthrottled, with this host load */
    if (worst > 1.0) {
        /* over the target: cut by the overshoot (at most half, at least a quarter) */
        double from = c->rate > 0 ? c->rate : (thr > 0 ? thr : c->full_rate);
        if (from <= 0)
            from = 64.0 * 1048576;
        double cut = 1.0 / worst;
        cut = cut < 0.5 ? 0.5 : (cut > 0.75 ? 0.75 : cut);
        c->rate = from * cut;
        if (c->rate < min_rate(c))
            c->rate = min_rate(c);
        c->decreases++;
    } else if (worst < HEADROOM && c->rate > 0) {
        /* room to spare: speed up by a quarter; past the full speed seen, unthrottle */
        c->rate = c->rate * 1.25 + MIN_RATE;
        if (c->full_rate > 0 && c->rate >= c->full_rate)
            c->rate = 0;
        c->increases++;
    }
}

/* 2^-x for x >= 0, without libm (the core links none). */
static double half_pow(double x)
{
    double r = 1.0;
    while (x > 1.0)
        r *= 0.5, x -= 1.0;
    double y = x * 0.6931471805599453;   /* e^-y, |y| < 0.7: a short series */
    return r * (1 - y + y * y / 2 - y * y * y / 6 + y * y * y * y / 24 - y * y * y * y * y / 120);
}

/* Ask for a quiet window (the copy holds still, the host's samples are
 * idle ones) when the host does I/O in a class with no baseline, while
 * the baseline is young, and now and then once it is trusted.  The window
 * lasts long enough for about QUIET_SAMPLES samples at the host's rate. */
static void maybe_probe(struct pm_pacer *c, const struct pm_pace_in *in, uint64_t host)
{
    if (c->target_ns != 0 || host == 0 || in->dt <= 0 || in->now < c->next_probe ||
        (c->quiet_until > 0 && in->now < c->quiet_until))
        return;
    double iops = (double)host / in->dt;
    c->iops = c->iops > 0 ? 0.7 * c->iops + 0.3 * iops : iops;
    int young = 0;
    for (int k = 0; k < PM_LAT_CLASSES; k++) {
        uint64_t n = 0;
        for (int b = 0; b < PM_LAT_BUCKETS; b++)
            n += in->win[k][b];
        if (n > 0 && sum_f(c->base[k]) < BASE_GOOD_SAMPLES)
            young = 1;
    }
    double len = QUIET_SAMPLES / c->iops;
    len = len < QUIET_MIN_S ? QUIET_MIN_S : (len > QUIET_MAX_S ? QUIET_MAX_S : len);
    c->quiet_until = in->now + QUIET_SETTLE_S + len;
    c->next_probe = c->quiet_until + (young ? PROBE_YOUNG_S : PROBE_OLD_S);
    c->probes++;
}

void pm_pace_update(struct pm_pacer *c, const struct pm_pace_in *in)
{
    double decay = in->dt > 0 ? half_pow(in->dt / BASE_HALF_LIFE_S) : 1.0;
    uint64_t host = 0;
    /* a window overlapping a quiet one says nothing of the load, nor does
     * the first one or one after a long gap (samples from between jobs):
     * their idle samples still count in the baseline */
    int quiet = c->quiet_until > 0 && in->now - in->dt < c->quiet_until;
    int skip = quiet || in->dt <= 0 || in->dt > 2 * WINDOW_MAX_S;
    for (int k = 0; k < PM_LAT_CLASSES; k++)
        for (int b = 0; b < PM_LAT_BUCKETS; b++) {
            c->base[k][b] = c->base[k][b] * decay + (double)in->idle[k][b];
            host += in->win[k][b];
            if (!skip)
                c->acc[k][b] += in->win[k][b];
        }
    if (skip) {
        if (quiet && in->now >= c->quiet_until)
            c->quiet_until = 0;
        return;
    }
    maybe_probe(c, in, host);
    c->acc_dt += in->dt;
    c->acc_bytes += in->copy_bytes;
    uint64_t n = 0;
    for (int k = 0; k < PM_LAT_CLASSES; k++)
        n += sum_u64(c->acc[k]);
    if (n == 0 && host == 0) {
        if (c->acc_dt >= IDLE_HOST_S) {
            /* the host is idle: full speed */
            double thr = (double)c->acc_bytes / c->acc_dt;
            if (c->rate == 0 && thr > c->full_rate)
                c->full_rate = thr;
            c->rate = 0;
            c->ratio = 0;
            c->acc_dt = 0;
            c->acc_bytes = 0;
        }
        return;
    }
    if (!((n >= WINDOW_MIN_SAMPLES && c->acc_dt >= WINDOW_MIN_S) || c->acc_dt >= WINDOW_MAX_S))
        return;
    decide(c, in->now);
    memset(c->acc, 0, sizeof c->acc);
    c->acc_dt = 0;
    c->acc_bytes = 0;
}

void pm_pace_tick(struct pm_pacer *c, struct pm_lat *l, struct pm_pace_snap *last, struct pm_pace_in *in,
                  double now, uint64_t copy_bytes)
{
    for (int k = 0; k < PM_LAT_CLASSES; k++)
        for (int b = 0; b < PM_LAT_BUCKETS; b++) {
            uint64_t a = pm_load_relaxed(&l->all[k][b]), i = pm_load_relaxed(&l->idle[k][b]);
            in->win[k][b] = a - last->all[k][b];
            in->idle[k][b] = i - last->idle[k][b];
            last->all[k][b] = a;
            last->idle[k][b] = i;
        }
    in->now = now;
    in->dt = last->t > 0 ? now - last->t : 0;
    in->copy_bytes = copy_bytes >= last->copy_bytes ? copy_bytes - last->copy_bytes : 0;
    last->copy_bytes = copy_bytes;
    last->t = now;
    pm_pace_update(c, in);
}
