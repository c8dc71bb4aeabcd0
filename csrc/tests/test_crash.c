/* test_crash.c - power loss at random instants during a restore or an
 * establish with a host writing and flushing, then reopen, finish, check.
 *
 * The standard, the mirror and the metadata live on volatile stores sharing
 * one power line (store_volatile.c): at the cut, every write since the last
 * flush on each of them is kept, lost, or kept in random 512-byte sectors.
 * After reopening and finishing the job, every 512-byte sector of the
 * standard must hold either the image it is being restored to (or kept from)
 * or the bytes of a host write to it; where a host write was acknowledged
 * durable (FUA, or completed before a flush that completed), that write or a
 * later one.  A protected restore leaves the mirror as it was.  An
 * incremental restore afterwards must then make the standard equal the
 * mirror everywhere: no CHANGED track was forgotten.  An establish must end
 * with both sides equal.
 *
 *   ./test_crash            200 crash points (CI)
 *   PM_CRASH_POINTS=5000 ./test_crash
 */
#include <errno.h>
#include <pthread.h>
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
#define MAXW 400

struct hw { uint64_t off, len, seed; int done; };

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

static int reopened_state = -1, run_incremental = -1;

struct run {
    pm_pair *pair;
    struct hw w[MAXW];
    int nw;
    int durable_upto;          /* writes [0, durable_upto) acknowledged durable by a flush */
    int fua[MAXW];
    uint64_t seed;
    int ops;
    pthread_mutex_t mu;
};

static void *writer(void *arg)
{
    struct run *r = arg;
    uint64_t x = r->seed * 7919 + 3;
    static _Thread_local unsigned char buf[3 * TS];
    for (int i = 0; i < r->ops && r->nw < MAXW; i++) {
        if (xs(&x) % 8 == 0) {
            pthread_mutex_lock(&r->mu);
            int upto = r->nw;
            pthread_mutex_unlock(&r->mu);
            if (pm_pair_flush(r->pair, PM_STANDARD) != 0)
                return NULL;
            pthread_mutex_lock(&r->mu);
            r->durable_upto = upto;
            pthread_mutex_unlock(&r->mu);
            continue;
        }
        uint64_t off = (xs(&x) % NSECT) * SECT;
        uint64_t len = (1 + xs(&x) % (3 * TS / SECT)) * SECT;
        if (off + len > VOL)
            len = VOL - off;
        int fua = xs(&x) % 6 == 0;
        pthread_mutex_lock(&r->mu);
        int id = r->nw++;
        r->w[id] = (struct hw){ off, len, r->seed * 100000 + (uint64_t)id + 1, 0 };
        r->fua[id] = fua;
        pthread_mutex_unlock(&r->mu);
        gen(buf, len, off, r->w[id].seed);
        if (pm_pair_write(r->pair, PM_STANDARD, buf, len, off, fua ? PM_IO_FUA : 0) != 0)
            return NULL;
        pthread_mutex_lock(&r->mu);
        r->w[id].done = 1;
        pthread_mutex_unlock(&r->mu);
    }
    return NULL;
}

/* base(sector) -> the image without host writes; returns failures. */
static int check_sectors(struct run *r, pm_store *std, uint64_t base_tag, const unsigned char *base_img)
{
    static unsigned char got[SECT], want[SECT];
    int bad = 0;
    for (uint64_t s = 0; s < NSECT && bad < 3; s++) {
        uint64_t off = s * SECT;
        if (pm_store_read(std, got, SECT, off) != 0)
            return 1;
        int last_durable = -1;
        for (int i = 0; i < r->nw; i++)
            if (r->w[i].off <= off && off < r->w[i].off + r->w[i].len && r->w[i].done &&
                (i < r->durable_upto || r->fua[i]))
                last_durable = i;
        int ok = 0;
        if (last_durable < 0) {
            if (base_img)
                ok = memcmp(got, base_img + off, SECT) == 0;
            else {
                gen(want, SECT, off, base_tag);
                ok = memcmp(got, want, SECT) == 0;
            }
        }
        for (int i = last_durable < 0 ? 0 : last_durable; i < r->nw && !ok; i++) {
            if (r->w[i].off <= off && off < r->w[i].off + r->w[i].len) {
                gen(want, SECT, off, r->w[i].seed);
                ok = memcmp(got, want, SECT) == 0;
            }
        }
        if (!ok) {
            unsigned char orig[SECT];
            gen(orig, SECT, off, 1);
            int n_cover = 0;
            for (int i = 0; i < r->nw; i++)
                n_cover += r->w[i].off <= off && off < r->w[i].off + r->w[i].len;
            fprintf(stderr, "seed %llu: sector %llu (track %llu) holds neither the %s image nor a host write%s "
                    "[byte 0 = %02x, original image %s, %d host writes cover it, durable upto %d of %d; "
                    "reopened %s, incremental %d]\n",
                    (unsigned long long)r->seed, (unsigned long long)s, (unsigned long long)(off / TS),
                    base_img ? "mirror's" : "standard's", last_durable >= 0 ? " at or after a durable one" : "",
                    got[0], memcmp(got, orig, SECT) ? "no" : "yes", n_cover, r->durable_upto, r->nw,
                    pm_state_name(reopened_state), run_incremental);
            bad++;
        }
    }
    return bad;
}

static void one_crash(uint64_t seed, int establish)
{
    pm_store *std, *mir, *meta;
    uint64_t x = seed * 2654435761u + 17;
    CHECK_EQ(pm_store_create_volatile(VOL, NULL, &std), 0);
    CHECK_EQ(pm_store_create_volatile(VOL, std, &mir), 0);
    CHECK_EQ(pm_store_create_volatile(pm_meta_size(VOL, TS), std, &meta), 0);
    unsigned char *img = malloc(VOL), *mirror_img = malloc(VOL);
    gen(img, VOL, 0, 1);
    CHECK_EQ(pm_store_write(std, img, VOL, 0), 0);
    if (!establish)
        CHECK_EQ(pm_store_write(mir, img, VOL, 0), 0);     /* equal: really established */
    CHECK_EQ(pm_store_flush(std), 0);
    CHECK_EQ(pm_store_flush(mir), 0);
    pm_pair *p;
    CHECK_EQ(pm_pair_create_meta_store(meta, std, mir, TS, &p), 0);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    c.batch_bytes = 4 * TS;
    c.rate_bytes = (xs(&x) % 3) ? 0 : 64u << 20;
    int incremental = 0;
    if (!establish) {
        CHECK_EQ(pm_pair_assume_established(p), 0);
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
        incremental = (int)(xs(&x) & 1);
    }
    struct run *r = calloc(1, sizeof *r);
    r->pair = p, r->seed = seed, r->ops = 20 + (int)(xs(&x) % 150);
    pthread_mutex_init(&r->mu, NULL);
    if (establish)
        CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    else
        CHECK_EQ(pm_pair_restore(p, incremental, 1, &c), 0);
    pthread_t th;
    pthread_create(&th, NULL, writer, r);
    struct timespec ts = { 0, (long)(xs(&x) % 3000000) };     /* cut within 3 ms */
    nanosleep(&ts, NULL);
    pm_store_power_loss(std, seed);
    pthread_join(th, NULL);
    pm_pair_destroy(p);                                         /* its last commit fails: no power */
    pm_store_power_on(std);

    int rc = pm_pair_open_meta_store(meta, std, mir, &p);
    CHECK_EQ(rc, 0);
    if (rc != 0) {
        fprintf(stderr, "seed %llu: reopen failed: %s\n", (unsigned long long)seed, pm_last_error());
        goto out;
    }
    int state = pm_pair_state(p);
    reopened_state = state, run_incremental = incremental;
    if (getenv("PM_CRASH_DEBUG") && establish) {
        pm_bitmap *pd = pm_table_flag(pm_pair_table(p, PM_MIRROR), PM_PENDING);
        pm_bitmap *cs = pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_CHANGED);
        unsigned char a[16], b[16], want[16];
        for (uint64_t t = 250; t < 262; t++) {
            pm_store_read(std, a, 16, t * TS), pm_store_read(mir, b, 16, t * TS);
            gen(want, 16, t * TS, 1);
            fprintf(stderr, "  seed %llu track %llu: pending %d changed %d std=%s mir=%s\n",
                    (unsigned long long)seed, (unsigned long long)t, pm_bitmap_get(pd, t), pm_bitmap_get(cs, t),
                    memcmp(a, want, 16) ? "other" : "img", memcmp(b, want, 16) ? (b[0] || b[1] ? "other" : "zero") : "img");
        }
    }
    if (state == PM_STATE_SYNCING || state == PM_STATE_RESTORING)
        CHECK_EQ(pm_pair_resume(p), 0);
    else if (state == PM_STATE_SPLIT) {           /* the restore never became durable: nothing moved */
        CHECK_EQ(r->durable_upto == 0 || !establish, 1);
        CHECK_EQ(pm_pair_restore(p, incremental, 1, &c), 0);
    } else
        CHECK(state == (establish ? PM_STATE_ESTABLISHED : PM_STATE_RESTORED));
    pm_pair_set_rate(p, 0);
    CHECK_EQ(pm_pair_wait(p, 30000), 0);
    CHECK_EQ(pm_pair_state(p), establish ? PM_STATE_ESTABLISHED : PM_STATE_RESTORED);

    if (establish) {
        CHECK_EQ(check_sectors(r, std, 1, NULL), 0);
        uint64_t out[4], next;
        int64_t nd = pm_pair_verify(p, 0, out, 4, &next);
        CHECK_EQ(nd, 0);                                         /* both sides equal */
        if (nd > 0)
            fprintf(stderr, "seed %llu: after the establish, track %llu differs (state after reopen: %s)\n",
                    (unsigned long long)seed, (unsigned long long)out[0], pm_state_name(state));
    } else {
        CHECK_EQ(check_sectors(r, std, 0, mirror_img), 0);
        unsigned char *now = malloc(VOL);
        CHECK_EQ(pm_store_read(mir, now, VOL, 0), 0);
        CHECK(memcmp(now, mirror_img, VOL) == 0);               /* protected: mirror untouched */
        /* nothing CHANGED was forgotten: an incremental restore makes them equal */
        CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
        CHECK_EQ(pm_pair_wait(p, 30000), 0);
        CHECK_EQ(pm_store_read(std, now, VOL, 0), 0);
        if (memcmp(now, mirror_img, VOL) != 0) {
            CHECK(0);
            fprintf(stderr, "seed %llu: a written track was not CHANGED\n", (unsigned long long)seed);
        }
        free(now);
    }
    pm_pair_destroy(p);
out:
    pthread_mutex_destroy(&r->mu);
    free(r), free(img), free(mirror_img);
    pm_store_destroy(meta);
    pm_store_destroy(mir);
    pm_store_destroy(std);
}

int main(void)
{
    const char *env = getenv("PM_CRASH_POINTS"), *only = getenv("PM_CRASH_SEED");
    long n = env ? atol(env) : 200;
    for (long i = 0; i < n; i++) {
        long k = only ? atol(only) - 1 : i;                 /* PM_CRASH_SEED: repeat one seed */
        one_crash((uint64_t)k + 1, (int)(k % 3 == 2));      /* two restores, then an establish */
    }
    printf("%ld crash points\n", n);
    return CHECK_DONE("test_crash");
}
