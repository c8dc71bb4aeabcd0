/* test_pace.c - the pacing controller (pace.c) driven by a simulated host.
 *
 * No clocks, no sleeps: each step is a 50 ms window of synthetic samples.
 * The simulated device: a host I/O takes its idle latency times
 * 1 + k * (copy rate / full speed)^2 (queueing behind the copy), with some
 * spread and a 1 % tail.  Checks that the controller
 *  - learns the idle baseline from its quiet windows,
 *  - settles where host p99 meets the target, using the bandwidth left
 *    (not at the floor, not at full speed), with bounded oscillation,
 *  - slows down when the host gets more sensitive, speeds up when less,
 *  - goes back to full speed when the host stops doing I/O,
 *  - holds an absolute target as well as a factor.
 * Also the latency histogram's buckets and quantiles. */
#include <stdint.h>
#include <string.h>

#include "pymirror.h"
#include "check.h"
#include "pace.h"

#define FULL (1000.0 * 1048576)     /* full-speed copy, bytes/s */
#define BASE_NS 100000.0            /* idle host latency, 100 us */
#define DT 0.05

struct sim {
    struct pm_pacer c;
    struct pm_pace_in in;
    double now, k, base_ns;
    int host_iops;                  /* samples per second; 0 = the host is idle */
    uint64_t seed;
};

static double urand(uint64_t *s)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return (double)(*s >> 11) / 9007199254740992.0;
}

/* One window: the copy ran at the controller's rate (0 = full) unless in a quiet window. */
static void step(struct sim *m)
{
    memset(&m->in, 0, sizeof m->in);
    m->now += DT;
    int quiet = m->c.quiet_until > 0 && m->now - DT < m->c.quiet_until;
    double rate = quiet ? 0.0 : (m->c.rate > 0 ? m->c.rate : FULL);
    double load = rate / FULL;
    int n = (int)(m->host_iops * DT);
    for (int i = 0; i < n; i++) {
        double lat = m->base_ns * (quiet ? 1.0 : 1.0 + m->k * load * load) * (0.8 + 0.4 * urand(&m->seed));
        if (urand(&m->seed) < 0.01)
            lat *= 1.5;
        int b = pm_lat_bucket((uint64_t)lat);
        m->in.win[i % 2 ? PM_LAT_READ : PM_LAT_WRITE][b]++;
        if (quiet)
            m->in.idle[i % 2 ? PM_LAT_READ : PM_LAT_WRITE][b]++;
    }
    m->in.now = m->now;
    m->in.dt = DT;
    m->in.copy_bytes = (uint64_t)(rate * DT);
    pm_pace_update(&m->c, &m->in);
}

static void sim_init(struct sim *m, double factor, uint64_t target_ns, double k)
{
    memset(m, 0, sizeof *m);
    pm_pace_init(&m->c, factor, target_ns);
    m->now = 100.0;
    m->k = k;
    m->base_ns = BASE_NS;
    m->host_iops = 4000;
    m->seed = 88172645463325252ull;
}

/* Run `steps` windows; over the last `tail` of them report the paced
 * rate's range (full speed counts as FULL) and the worst p99 ratio. */
static void run(struct sim *m, int steps, int tail, double *lo, double *hi, double *worst)
{
    *lo = 1e300, *hi = 0, *worst = 0;
    for (int i = 0; i < steps; i++) {
        step(m);
        if (i >= steps - tail) {
            double r = m->c.rate > 0 ? m->c.rate : FULL;
            if (r < *lo)
                *lo = r;
            if (r > *hi)
                *hi = r;
            if (m->c.ratio > *worst)
                *worst = m->c.ratio;
        }
    }
}

static void histogram(void)
{
    /* buckets are monotone and a value falls within 19 % of its bucket's */
    int last = -1;
    for (uint64_t ns = 1; ns < (1ull << 36); ns = ns * 9 / 8 + 1) {
        int b = pm_lat_bucket(ns);
        CHECK(b >= last);
        last = b;
        double rep = (double)pm_lat_bucket_ns(b);
        CHECK(rep >= (double)ns * 0.8 && rep <= (double)ns * 1.25);
    }
    CHECK_EQ(pm_lat_bucket(UINT64_MAX), PM_LAT_BUCKETS - 1);
    uint64_t h[PM_LAT_BUCKETS] = { 0 };
    for (int i = 1; i <= 100; i++)
        h[pm_lat_bucket((uint64_t)i * 1000)]++;       /* 1 .. 100 us */
    uint64_t p50 = pm_lat_quantile_u64(h, 0.5), p99 = pm_lat_quantile_u64(h, 0.99);
    CHECK(p50 >= 40000 && p50 <= 60000);
    CHECK(p99 >= 85000 && p99 <= 115000);
    uint64_t empty[PM_LAT_BUCKETS] = { 0 };
    CHECK_EQ(pm_lat_quantile_u64(empty, 0.99), 0);

    /* recording: quiet samples go to idle too, others only to all */
    static struct pm_lat l;
    memset(&l, 0, sizeof l);
    uint64_t t0 = pm_lat_now_ns() - 1000000;
    pm_lat_host(&l, PM_LAT_READ, t0 > 20000000 ? t0 : 1);
    uint64_t all = 0, idle = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++)
        all += l.all[PM_LAT_READ][b], idle += l.idle[PM_LAT_READ][b];
    CHECK_EQ(all, 1);
    CHECK_EQ(idle, 1);                 /* no copy ever ran */
    pm_lat_copy_begin(&l);
    pm_lat_host(&l, PM_LAT_READ, pm_lat_now_ns());
    pm_lat_copy_end(&l);
    pm_lat_host(&l, PM_LAT_READ, pm_lat_now_ns());   /* within the settle time */
    all = idle = 0;
    for (int b = 0; b < PM_LAT_BUCKETS; b++)
        all += l.all[PM_LAT_READ][b], idle += l.idle[PM_LAT_READ][b];
    CHECK_EQ(all, 3);
    CHECK_EQ(idle, 1);
}

static void converges(void)
{
    static struct sim m;
    double lo, hi, worst;
    /* k = 24: at full speed the host sees 25x its idle latency; 2x is met
     * at about (1/24)^0.5 = 20 % of full speed */
    sim_init(&m, 2.0, 0, 24.0);
    run(&m, 1200, 400, &lo, &hi, &worst);
    printf("k=24, 2x: rate %.0f..%.0f MiB/s, worst ratio %.2f, %llu probes, %llu down, %llu up\n",
           lo / 1048576, hi / 1048576, worst, (unsigned long long)m.c.probes,
           (unsigned long long)m.c.decreases, (unsigned long long)m.c.increases);
    CHECK(m.c.probes > 0);                                      /* quiet windows were taken */
    CHECK(m.c.base99_ns[PM_LAT_READ] > 90000 && m.c.base99_ns[PM_LAT_READ] < 160000);   /* learned */
    CHECK(hi < FULL);                                           /* throttled, */
    CHECK(lo > 0.05 * FULL);                                    /* well above the floor, */
    CHECK(hi / lo < 3.0);                                       /* a bounded oscillation */
    CHECK(worst < 2.0);                                         /* around the target */
    double settled24 = (lo + hi) / 2;
    CHECK(settled24 > 0.08 * FULL && settled24 < 0.45 * FULL);

    /* a less sensitive host: more bandwidth for the copy */
    m.k = 6.0;
    run(&m, 1200, 400, &lo, &hi, &worst);
    double settled6 = (lo + hi) / 2;
    printf("k=6, 2x: rate %.0f..%.0f MiB/s, worst ratio %.2f\n", lo / 1048576, hi / 1048576, worst);
    CHECK(settled6 > settled24 * 1.3);
    CHECK(worst < 2.0);

    /* more sensitive again: it slows down */
    m.k = 96.0;
    run(&m, 1200, 400, &lo, &hi, &worst);
    double settled96 = (lo + hi) / 2;
    printf("k=96, 2x: rate %.0f..%.0f MiB/s, worst ratio %.2f\n", lo / 1048576, hi / 1048576, worst);
    CHECK(settled96 < settled24);
    CHECK(lo >= 1048576);                                       /* never below the floor */

    /* the host stops: full speed within a few windows */
    m.host_iops = 0;
    for (int i = 0; i < 10; i++)
        step(&m);
    CHECK_EQ(m.c.rate, 0);
    /* and it comes back: throttled again */
    m.host_iops = 4000;
    m.k = 24.0;
    run(&m, 400, 100, &lo, &hi, &worst);
    CHECK(hi < FULL);

    /* a host that does not mind: full speed throughout */
    sim_init(&m, 2.0, 0, 0.2);
    run(&m, 600, 300, &lo, &hi, &worst);
    CHECK_EQ(lo, FULL);

    /* a looser factor lets the copy go faster */
    sim_init(&m, 4.0, 0, 24.0);
    run(&m, 1200, 400, &lo, &hi, &worst);
    double settled4x = (lo + hi) / 2;
    printf("k=24, 4x: rate %.0f..%.0f MiB/s, worst ratio %.2f\n", lo / 1048576, hi / 1048576, worst);
    CHECK(settled4x > settled24 * 1.3);

    /* an absolute target: 300 us = 3x the idle 100 us (whose p99 is ~120 us) */
    sim_init(&m, 2.0, 300000, 24.0);
    run(&m, 1200, 400, &lo, &hi, &worst);
    printf("k=24, 300us: rate %.0f..%.0f MiB/s, worst ratio %.2f, p99 %llu ns\n", lo / 1048576, hi / 1048576,
           worst, (unsigned long long)m.c.p99_ns[PM_LAT_READ]);
    CHECK(hi < FULL && lo > 0.05 * FULL);
    CHECK(worst < 2.0);
    CHECK_EQ(m.c.probes, 0);                                    /* no baseline needed */

    /* a slow host (100 I/O per second): longer quiet windows gather its
     * baseline, and the copy is still throttled to meet the target */
    sim_init(&m, 2.0, 0, 24.0);
    m.host_iops = 100;
    run(&m, 1200, 400, &lo, &hi, &worst);
    printf("k=24, 2x, 100 IOPS: rate %.0f..%.0f MiB/s, worst ratio %.2f, %llu probes\n", lo / 1048576,
           hi / 1048576, worst, (unsigned long long)m.c.probes);
    CHECK(m.c.base99_ns[PM_LAT_READ] > 0);
    CHECK(hi < FULL && lo > 0.05 * FULL);

    /* restart keeps the baseline, forgets the rate */
    sim_init(&m, 2.0, 0, 24.0);
    run(&m, 200, 1, &lo, &hi, &worst);
    uint64_t b99 = m.c.base99_ns[PM_LAT_READ];
    pm_pace_restart(&m.c, 3.0, 0);
    CHECK_EQ(m.c.rate, 0);
    CHECK(m.c.factor == 3.0);
    CHECK(pm_lat_quantile_f(m.c.base[PM_LAT_READ], 0.99) == b99);
}

int main(void)
{
    histogram();
    converges();
    return CHECK_DONE("test_pace");
}
