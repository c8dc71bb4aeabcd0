/* test_crash.c - power loss at random instants while a pair restores,
 * establishes, splits, detaches a failing mirror, or just takes host flushes
 * and FUA writes; with concurrent host writers.  Then reopen, finish, check.
 *
 * The standard, the mirror and the metadata live on volatile stores sharing
 * one power line (store_volatile.c): at the cut, every write since the last
 * flush on each of them is kept, lost, or kept in random 512-byte sectors.
 *
 * The writers' model.  Each host write takes a start and an end stamp from
 * one global counter; a flush a start stamp.  A write is durable if it was
 * written with FUA and completed, or completed before a flush that
 * completed began.  After the reopen and the end of the job, every 512-byte
 * sector of the standard must hold either
 *   - the image it is being restored to (or kept from), if no durable write
 *     covers it, or
 *   - the bytes of a write covering it that no durable covering write
 *     began after (a write that overlapped the durable one in time may have
 *     landed after it; one that ended before it began may not).
 * So no durable write is lost, none is reverted, no track is torn.  Then:
 * a protected restore left the mirror as it was; an incremental operation
 * afterwards makes the two sides equal (no CHANGED track was forgotten);
 * mirrored states end with both sides equal.
 *
 * Scenarios (seed % 7): protected restore (full or incremental), unprotected
 * restore, establish, split while writing, a mirror that fails while
 * established (detach), flushes and FUA writes while established (the
 * FUA-light path), the same after a clean close and reopen.
 *
 *   ./test_crash                 200 crash points (CI; 70 under a sanitizer; PM_CRASH_POINTS overrides)
 *   ./test_crash 10000           10000 points (the first argument)
 *   ./test_crash 1000 5001       1000 points from seed 5001 (to run in chunks)
 *   PM_CRASH_SEED=136 PM_CRASH_POINTS=1000 ./test_crash   one seed, many times
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

#define TS 16384u                 /* 256 tracks per 4 MiB intent region */
#define NTRK 512u
#define VOL ((uint64_t)NTRK * TS) /* 8 MiB, two intent regions */
#define SECT 512u
#define NSECT (VOL / SECT)
#define MAXW 600
#define MAXF 200
#define NWRITERS 3

enum scenario { S_RESTORE, S_RESTORE_UNPROTECTED, S_ESTABLISH, S_SPLIT, S_DETACH, S_FLUSH_FUA,
                S_FLUSH_FUA_REOPENED, S_COUNT };
static const char *const scenario_names[] = {
    "restore", "unprotected restore", "establish", "split", "detach", "flush/FUA", "flush/FUA after reopen",
};
static long scenario_runs[S_COUNT], lost_writes, reopened_detached;

struct hw { uint64_t off, len, seed, t_start, t_end; int fua; };
struct fl { uint64_t t_start; int done; };

static uint64_t xs(uint64_t *x) { *x ^= *x << 13; *x ^= *x >> 7; *x ^= *x << 17; return *x; }

/* Content generators: deterministic bytes for (tag, offset). */
static void gen(unsigned char *buf, uint64_t len, uint64_t off, uint64_t tag)
{
    for (uint64_t i = 0; i < len; i += 8) {
        uint64_t v = ((off + i) / 8) * 0x9E3779B97F4A7C15ULL ^ (tag * 0xC2B2AE3D27D4EB4FULL);
        v ^= v >> 29;
        for (unsigned b = 0; b < 8 && i + b < len; b++)
            buf[i + b] = (unsigned char)(v >> (8 * b));
    }
}

struct run {
    pm_pair *pair;
    struct hw w[MAXW];
    struct fl f[MAXF];
    int nw, nf;
    uint64_t seed;
    int ops;
    atomic_ulong clock;         /* the stamps */
    pthread_mutex_t mu;
    pm_store *fail_mirror;      /* S_DETACH: the mirror to fail at fail_at */
    int fail_at;
};

struct writer_arg { struct run *r; int k; };

static void *writer(void *arg)
{
    struct writer_arg *wa = arg;
    struct run *r = wa->r;
    uint64_t x = r->seed * 7919 + 3 + (uint64_t)wa->k * 1000003;
    unsigned char *buf = malloc(3 * TS);
    for (int i = 0; i < r->ops; i++) {
        if (r->fail_mirror && wa->k == 0 && i == r->fail_at)
            pm_store_inject_fault(r->fail_mirror, PM_FAULT_WRITE, 0, VOL, (x & 1) ? -EIO : -ENOSPC, -1);
        if (xs(&x) % 8 == 0) {
            pthread_mutex_lock(&r->mu);
            int id = r->nf < MAXF ? r->nf++ : -1;
            if (id >= 0)
                r->f[id].t_start = atomic_fetch_add(&r->clock, 1);
            pthread_mutex_unlock(&r->mu);
            if (id < 0 || pm_pair_flush(r->pair, PM_STANDARD) != 0)
                break;
            pthread_mutex_lock(&r->mu);
            r->f[id].done = 1;
            pthread_mutex_unlock(&r->mu);
            continue;
        }
        uint64_t off = (xs(&x) % NSECT) * SECT;
        uint64_t len = (1 + xs(&x) % (3 * TS / SECT)) * SECT;
        if (off + len > VOL)
            len = VOL - off;
        int fua = xs(&x) % 6 == 0;
        pthread_mutex_lock(&r->mu);
        int id = r->nw < MAXW ? r->nw++ : -1;
        if (id >= 0) {
            r->w[id] = (struct hw){ off, len, r->seed * 100000 + (uint64_t)id + 1, 0, 0, fua };
            r->w[id].t_start = atomic_fetch_add(&r->clock, 1);
        }
        pthread_mutex_unlock(&r->mu);
        if (id < 0)
            break;
        gen(buf, len, off, r->w[id].seed);
        if (pm_pair_write(r->pair, PM_STANDARD, buf, len, off, fua ? PM_IO_FUA : 0) != 0)
            break;
        pthread_mutex_lock(&r->mu);
        r->w[id].t_end = atomic_fetch_add(&r->clock, 1);
        pthread_mutex_unlock(&r->mu);
    }
    free(buf);
    return NULL;
}

static int durable(const struct run *r, const struct hw *w)
{
    if (w->t_end == 0)
        return 0;
    if (w->fua)
        return 1;
    for (int i = 0; i < r->nf; i++)
        if (r->f[i].done && r->f[i].t_start > w->t_end)
            return 1;
    return 0;
}

/* base_img: what a sector holds without host writes.  Returns failures. */
static int check_sectors(struct run *r, pm_store *std, const unsigned char *base_img, const char *what,
                         int scen, int state)
{
    static unsigned char got[SECT], want[SECT];
    int *dur = malloc(sizeof(int) * (size_t)(r->nw + 1));
    for (int i = 0; i < r->nw; i++)
        dur[i] = durable(r, &r->w[i]);
    int bad = 0;
    for (uint64_t s = 0; s < NSECT && bad < 3; s++) {
        uint64_t off = s * SECT;
        if (pm_store_read(std, got, SECT, off) != 0) {
            free(dur);
            return 1;
        }
        /* the latest start of a durable write covering it */
        uint64_t dstart = 0;
        int covered = 0;
        for (int i = 0; i < r->nw; i++)
            if (dur[i] && r->w[i].off <= off && off < r->w[i].off + r->w[i].len) {
                covered = 1;
                if (r->w[i].t_start > dstart)
                    dstart = r->w[i].t_start;
            }
        int ok = !covered && memcmp(got, base_img + off, SECT) == 0;
        for (int i = 0; i < r->nw && !ok; i++) {
            const struct hw *w = &r->w[i];
            if (!(w->off <= off && off < w->off + w->len))
                continue;
            if (covered && w->t_end != 0 && w->t_end < dstart)
                continue;   /* ended before a durable covering write began */
            gen(want, SECT, off, w->seed);
            ok = memcmp(got, want, SECT) == 0;
        }
        if (!ok) {
            fprintf(stderr, "seed %llu (%s): sector %llu (track %llu) holds neither the %s image nor an allowed "
                    "host write%s [byte 0 = %02x; reopened %s]\n",
                    (unsigned long long)r->seed, scenario_names[scen], (unsigned long long)s,
                    (unsigned long long)(off / TS), what, covered ? " (a durable one covers it)" : "",
                    got[0], pm_state_name(state));
            bad++;
        }
    }
    free(dur);
    lost_writes += bad;
    return bad;
}

static int equal_sides(pm_pair *p, uint64_t seed, const char *when)
{
    uint64_t out[4], next;
    int64_t nd = pm_pair_verify(p, 0, out, 4, &next);
    if (nd != 0)
        fprintf(stderr, "seed %llu: %s, track %llu differs\n", (unsigned long long)seed, when,
                nd > 0 ? (unsigned long long)out[0] : 0ULL);
    return nd == 0;
}

static void one_crash(uint64_t seed, int scen)
{
    pm_store *std, *mir, *meta;
    uint64_t x = seed * 2654435761u + 17;
    scenario_runs[scen]++;
    CHECK_EQ(pm_store_create_volatile(VOL, NULL, &std), 0);
    CHECK_EQ(pm_store_create_volatile(VOL, std, &mir), 0);
    CHECK_EQ(pm_store_create_volatile(pm_meta_size(VOL, TS), std, &meta), 0);
    unsigned char *img = malloc(VOL), *mirror_img = malloc(VOL), *now = malloc(VOL);
    gen(img, VOL, 0, 1);
    CHECK_EQ(pm_store_write(std, img, VOL, 0), 0);
    if (scen != S_ESTABLISH)
        CHECK_EQ(pm_store_write(mir, img, VOL, 0), 0);     /* equal: really established */
    CHECK_EQ(pm_store_flush(std), 0);
    CHECK_EQ(pm_store_flush(mir), 0);
    pm_pair *p;
    CHECK_EQ(pm_pair_create_meta_store(meta, std, mir, TS, &p), 0);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    c.batch_bytes = 4 * TS;
    c.retries = 1;
    c.rate_bytes = (xs(&x) % 3) ? 0 : 64u << 20;
    int incremental = 0, restore = scen == S_RESTORE || scen == S_RESTORE_UNPROTECTED;
    const unsigned char *base = img;
    if (scen != S_ESTABLISH)
        CHECK_EQ(pm_pair_assume_established(p), 0);
    if (restore) {
        CHECK_EQ(pm_pair_split(p), 0);
        unsigned char t[TS];
        for (int i = 0; i < 40; i++) {          /* damage the standard, change the mirror */
            uint64_t tr = xs(&x) % NTRK;
            memset(t, 0xD0 + i % 16, TS);
            CHECK_EQ(pm_pair_write(p, (i % 4) ? PM_STANDARD : PM_MIRROR, t, TS - 1000, tr * TS + 500, 0), 0);
        }
        CHECK_EQ(pm_pair_flush(p, PM_STANDARD), 0);
        CHECK_EQ(pm_pair_flush(p, PM_MIRROR), 0);
        CHECK_EQ(pm_store_read(mir, mirror_img, VOL, 0), 0);
        base = mirror_img;
        incremental = (int)(xs(&x) & 1);
    }
    if (scen == S_FLUSH_FUA_REOPENED) {          /* writes in both intent regions, a clean close, then the writes */
        for (uint64_t tr = 7; tr < NTRK; tr += 256) {
            gen(img + tr * TS, TS, tr * TS, 2);
            CHECK_EQ(pm_pair_write(p, PM_STANDARD, img + tr * TS, TS, tr * TS, 0), 0);
        }
        CHECK_EQ(pm_pair_flush(p, PM_STANDARD), 0);
        pm_pair_destroy(p);
        CHECK_EQ(pm_pair_open_meta_store(meta, std, mir, &p), 0);
        CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    }
    struct run *r = calloc(1, sizeof *r);
    r->pair = p, r->seed = seed, r->ops = 10 + (int)(xs(&x) % 60);
    atomic_init(&r->clock, 1);
    pthread_mutex_init(&r->mu, NULL);
    if (scen == S_DETACH) {
        r->fail_mirror = mir;
        r->fail_at = (int)(xs(&x) % (uint64_t)r->ops);
    }
    if (scen == S_ESTABLISH)
        CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    else if (restore)
        CHECK_EQ(pm_pair_restore(p, incremental, scen == S_RESTORE, &c), 0);
    pthread_t th[NWRITERS];
    struct writer_arg wa[NWRITERS];
    for (int k = 0; k < NWRITERS; k++) {
        wa[k] = (struct writer_arg){ r, k };
        pthread_create(&th[k], NULL, writer, &wa[k]);
    }
    struct timespec ts = { 0, (long)(xs(&x) % 3000000) };     /* cut within 3 ms */
    if (scen == S_SPLIT) {
        struct timespec half = { 0, ts.tv_nsec / 2 };
        nanosleep(&half, NULL);
        CHECK_EQ(pm_pair_split(p), 0);
        ts.tv_nsec -= half.tv_nsec;
    }
    nanosleep(&ts, NULL);
    pm_store_power_loss(std, seed);
    for (int k = 0; k < NWRITERS; k++)
        pthread_join(th[k], NULL);
    pm_pair_destroy(p);                                         /* its last commit fails: no power */
    pm_store_power_on(std);
    pm_store_clear_faults(mir);

    int rc = pm_pair_open_meta_store(meta, std, mir, &p);
    CHECK_EQ(rc, 0);
    if (rc != 0) {
        fprintf(stderr, "seed %llu: reopen failed: %s\n", (unsigned long long)seed, pm_last_error());
        goto out;
    }
    int state = pm_pair_state(p);
    c.rate_bytes = 0;
    pm_pair_configure(p, &c);
    if (state == PM_STATE_SYNCING || state == PM_STATE_RESTORING) {
        CHECK_EQ(pm_pair_resume(p), 0);
    } else if (scen == S_RESTORE && state == PM_STATE_SPLIT) {   /* the restore never became durable */
        CHECK_EQ(pm_pair_restore(p, incremental, 1, &c), 0);
    } else if (scen == S_RESTORE_UNPROTECTED && state == PM_STATE_SPLIT) {
        CHECK_EQ(pm_pair_restore(p, incremental, 0, &c), 0);
    } else if (state == PM_STATE_DETACHED) {
        CHECK_EQ(scen, S_DETACH);
        reopened_detached++;
        CHECK_EQ(pm_pair_establish(p, 1, &c), 0);               /* repairs what the mirror missed */
    }
    CHECK_EQ(pm_pair_wait(p, 30000), 0);
    state = pm_pair_state(p);
    switch (scen) {
    case S_RESTORE:
        CHECK_EQ(state, PM_STATE_RESTORED);
        CHECK_EQ(check_sectors(r, std, base, "mirror's", scen, state), 0);
        CHECK_EQ(pm_store_read(mir, now, VOL, 0), 0);
        CHECK(memcmp(now, mirror_img, VOL) == 0);               /* protected: mirror untouched */
        /* nothing CHANGED was forgotten: an incremental restore makes them equal */
        CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
        CHECK_EQ(pm_pair_wait(p, 30000), 0);
        CHECK(equal_sides(p, seed, "after an incremental restore"));
        break;
    case S_RESTORE_UNPROTECTED:
        CHECK_EQ(state, PM_STATE_ESTABLISHED);
        CHECK_EQ(check_sectors(r, std, base, "mirror's", scen, state), 0);
        CHECK(equal_sides(p, seed, "after an unprotected restore"));
        break;
    case S_SPLIT:
        CHECK(state == PM_STATE_SPLIT || state == PM_STATE_ESTABLISHED);
        CHECK_EQ(check_sectors(r, std, base, "standard's", scen, state), 0);
        if (state == PM_STATE_SPLIT) {   /* the mirror may hold writes of before the split: CHANGED says which */
            CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
            CHECK_EQ(pm_pair_wait(p, 30000), 0);
        }
        CHECK(equal_sides(p, seed, "after the split and an incremental establish"));
        break;
    default:   /* establish, detach, flush/FUA: mirrored to the end */
        CHECK_EQ(state, PM_STATE_ESTABLISHED);
        CHECK_EQ(check_sectors(r, std, base, "standard's", scen, state), 0);
        CHECK(equal_sides(p, seed, "mirrored"));
        break;
    }
    pm_pair_destroy(p);
out:
    pthread_mutex_destroy(&r->mu);
    free(r), free(img), free(mirror_img), free(now);
    pm_store_destroy(meta);
    pm_store_destroy(mir);
    pm_store_destroy(std);
}

int main(int argc, char **argv)
{
    const char *env = getenv("PM_CRASH_POINTS"), *only = getenv("PM_CRASH_SEED");
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
    const long default_points = 70;      /* ten per scenario: sanitizers run them 10-20x slower */
#else
    const long default_points = 200;
#endif
    long n = argc > 1 ? atol(argv[1]) : env ? atol(env) : default_points;
    long first = argc > 2 ? atol(argv[2]) : 1;
    for (long i = 0; i < n; i++) {
        long k = only ? atol(only) : first + i;              /* PM_CRASH_SEED: repeat one seed */
        one_crash((uint64_t)k, (int)(k % S_COUNT));
    }
    printf("%ld crash points from seed %ld:", n, only ? atol(only) : first);
    for (int s = 0; s < S_COUNT; s++)
        printf(" %s %ld%s", scenario_names[s], scenario_runs[s], s + 1 < S_COUNT ? "," : "");
    printf("; reopened detached %ld; sectors lost or wrong: %ld\n", reopened_detached, lost_writes);
    return CHECK_DONE("test_crash");
}
