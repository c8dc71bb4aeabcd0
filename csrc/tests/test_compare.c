/* test_compare.c - comparing the two sides without Python: the engine
 * against a shadow list of differing tracks (several batches, a short last
 * track), verify's paging, the hash path, compare-restore and
 * compare-establish byte counts, host writers racing a compare-establish,
 * adopt, cancel and read errors. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

#define TS 4096u
#define NT 1300u                      /* several 2 MiB batches */
#define SIZE ((uint64_t)NT * TS - 100) /* a short last track */

static uint64_t rnd_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 7;
    rnd_state ^= rnd_state << 17;
    return rnd_state;
}

static uint32_t tlen(uint64_t t) { return t == NT - 1 ? (uint32_t)(SIZE - t * TS) : TS; }

/* Both stores the same pseudo-random bytes, then the tracks in diff[]
 * changed on the mirror by one byte at a random place. */
static void fill_pair(pm_store *a, pm_store *b, const unsigned char *diff)
{
    unsigned char *buf = malloc(TS);
    for (uint64_t t = 0; t < NT; t++) {
        for (uint32_t i = 0; i < TS; i++)
            buf[i] = (unsigned char)rnd();
        CHECK_EQ(pm_store_write(a, buf, tlen(t), t * TS), 0);
        if (diff[t])
            buf[rnd() % tlen(t)] ^= 0x5a;
        CHECK_EQ(pm_store_write(b, buf, tlen(t), t * TS), 0);
    }
    free(buf);
}

static void random_diff(unsigned char *diff, unsigned per_mille)
{
    for (uint64_t t = 0; t < NT; t++)
        diff[t] = (unsigned char)(rnd() % 1000 < per_mille);
    diff[0] = 1;          /* the edges too */
    diff[NT - 1] = 1;
}

static uint64_t count_diff(const unsigned char *diff)
{
    uint64_t n = 0;
    for (uint64_t t = 0; t < NT; t++)
        n += diff[t];
    return n;
}

static void check_bitmap(pm_bitmap *bm, const unsigned char *diff)
{
    int bad = 0;
    for (uint64_t t = 0; t < NT; t++)
        bad += pm_bitmap_get(bm, t) != diff[t];
    CHECK_EQ(bad, 0);
}

static void engine_against_shadow(void)
{
    unsigned char diff[NT];
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &b), 0);
    CHECK_EQ(pm_pair_create(a, b, TS, &p), 0);
    for (int round = 0; round < 4; round++) {
        random_diff(diff, round * 100u);
        fill_pair(a, b, diff);
        pm_bitmap *bm;
        CHECK_EQ(pm_bitmap_create(NT, &bm), 0);
        pm_compare *c;
        CHECK_EQ(pm_compare_create(&c), 0);
        CHECK_EQ(pm_pair_compare(p, 0, 0, bm, c), (int64_t)count_diff(diff));
        check_bitmap(bm, diff);
        struct pm_compare_progress pr = { .size = sizeof pr };
        CHECK_EQ(pm_compare_progress(c, &pr), 0);
        CHECK_EQ(pr.running, 0);
        CHECK_EQ(pr.tracks_total, NT);
        CHECK_EQ(pr.tracks_done, NT);
        CHECK_EQ(pr.tracks_differ, count_diff(diff));
        CHECK_EQ(pr.bytes_read, 2 * SIZE);
        CHECK_EQ(pr.tracks_hashed, 0);

        /* verify pages through the same engine: 7 at a time */
        uint64_t out[7], next = 0, from = 0, got = 0;
        int bad = 0;
        for (;;) {
            int64_t n = pm_pair_verify(p, from, out, 7, &next);
            CHECK(n >= 0);
            for (int64_t i = 0; i < n; i++)
                bad += !diff[out[i]];
            got += (uint64_t)n;
            if (next >= NT)
                break;
            CHECK(next > from);
            from = next;
        }
        CHECK_EQ(bad, 0);
        CHECK_EQ(got, count_diff(diff));

        /* a sub-range */
        pm_bitmap_zero(bm);
        int64_t part = pm_pair_compare(p, 500, 300, bm, NULL);
        uint64_t want = 0;
        for (uint64_t t = 500; t < 800; t++)
            want += diff[t];
        CHECK_EQ(part, (int64_t)want);
        CHECK_EQ(pm_bitmap_count_range(bm, 0, 500) + pm_bitmap_count_range(bm, 800, NT - 800), 0);

        /* the hash path: the mirror hashes next to its data */
        CHECK_EQ(pm_store_set_track_hash(b, pm_store_crc32c_tracks, b), 0);
        pm_bitmap_zero(bm);
        CHECK_EQ(pm_pair_compare(p, 0, 0, bm, c), (int64_t)count_diff(diff));
        check_bitmap(bm, diff);
        CHECK_EQ(pm_compare_progress(c, &pr), 0);
        CHECK_EQ(pr.bytes_read, SIZE);          /* only the standard's data was read here */
        CHECK_EQ(pr.tracks_hashed, NT);
        CHECK_EQ(pm_store_set_track_hash(b, NULL, NULL), 0);

        pm_compare_destroy(c);
        pm_bitmap_destroy(bm);
    }
    /* bad input */
    pm_bitmap *small;
    CHECK_EQ(pm_bitmap_create(NT - 1, &small), 0);
    CHECK_EQ(pm_pair_compare(p, 0, 0, small, NULL), PM_E_GEOMETRY);
    pm_bitmap_destroy(small);
    uint32_t h[2];
    CHECK_EQ(pm_store_track_hashes(a, 100, TS, TS, h), PM_E_ALIGN);
    CHECK_EQ(pm_store_track_hashes(a, 0, SIZE + 1, TS, h), PM_E_RANGE);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void read_errors(void)
{
    unsigned char diff[NT];
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &b), 0);
    CHECK_EQ(pm_pair_create(a, b, TS, &p), 0);
    random_diff(diff, 10);
    fill_pair(a, b, diff);
    pm_bitmap *bm;
    CHECK_EQ(pm_bitmap_create(NT, &bm), 0);
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_READ, 900 * TS, TS, -EIO, 1), 0);
    CHECK_EQ(pm_pair_compare(p, 0, 0, bm, NULL), -EIO);
    CHECK(strstr(pm_last_error(), "the mirror") != NULL);
    CHECK_EQ(pm_pair_compare(p, 0, 0, bm, NULL), (int64_t)count_diff(diff));   /* the fault was used up */
    pm_bitmap_destroy(bm);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* ---- cancel: a store whose reads are slow ---- */
static int slow_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    usleep(2000);
    memset(buf, 0, (size_t)len);
    return 0;
}
static int ok_write(void *ctx, const void *buf, uint64_t len, uint64_t off) { return 0; }
static int ok_flush(void *ctx) { return 0; }
static void no_close(void *ctx) { }

static void *cancel_later(void *arg)
{
    usleep(20000);
    pm_compare_cancel(arg);
    return NULL;
}

static void cancel(void)
{
    struct pm_store_ops ops = { .size = sizeof ops, .read = slow_read, .write = ok_write,
                                .flush = ok_flush, .close = no_close };
    pm_store *a, *b;
    pm_pair *p;
    uint64_t size = (uint64_t)1 << 30;       /* 512 batches of 2 ms: a second if not cancelled */
    CHECK_EQ(pm_store_create_ops(&ops, NULL, size, "slow-a", PM_STORE_NOLOCK, &a), 0);
    CHECK_EQ(pm_store_create_ops(&ops, NULL, size, "slow-b", PM_STORE_NOLOCK, &b), 0);
    CHECK_EQ(pm_pair_create(a, b, 65536, &p), 0);
    pm_bitmap *bm;
    CHECK_EQ(pm_bitmap_create(size / 65536, &bm), 0);
    pm_compare *c;
    CHECK_EQ(pm_compare_create(&c), 0);
    pthread_t th;
    pthread_create(&th, NULL, cancel_later, c);
    CHECK_EQ(pm_pair_compare(p, 0, 0, bm, c), -ECANCELED);
    pthread_join(th, NULL);
    struct pm_compare_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_compare_progress(c, &pr), 0);
    CHECK(pr.tracks_done < pr.tracks_total);
    CHECK_EQ(pr.running, 0);
    pm_compare_destroy(c);
    pm_bitmap_destroy(bm);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* ---- compare jobs ---- */
static pm_pair *split_pair(pm_store **a, pm_store **b, unsigned char *diff, unsigned per_mille)
{
    pm_pair *p;
    CHECK_EQ(pm_store_create_memory(SIZE, a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, b), 0);
    CHECK_EQ(pm_pair_create(*a, *b, TS, &p), 0);
    CHECK_EQ(pm_pair_assume_established(p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    random_diff(diff, per_mille);
    fill_pair(*a, *b, diff);   /* behind the pair's back: CHANGED knows nothing */
    return p;
}

static int sides_equal(pm_pair *p)
{
    pm_bitmap *bm;
    pm_bitmap_create(NT, &bm);
    int64_t n = pm_pair_compare(p, 0, 0, bm, NULL);
    pm_bitmap_destroy(bm);
    return n == 0;
}

static void compare_restore_and_establish(void)
{
    unsigned char diff[NT];
    pm_store *a, *b;
    for (int restore = 0; restore < 2; restore++) {
        pm_pair *p = split_pair(&a, &b, diff, 30);
        uint64_t nd = count_diff(diff);
        uint64_t want_bytes = (nd - 1) * TS + tlen(NT - 1);   /* the last track is one of them */
        CHECK_EQ(restore ? pm_pair_restore_compare(p, 1, NULL) : pm_pair_establish_compare(p, NULL), 0);
        CHECK_EQ(pm_pair_state(p), restore ? PM_STATE_RESTORING : PM_STATE_SYNCING);
        CHECK_EQ(pm_pair_wait(p, -1), 0);
        CHECK_EQ(pm_pair_state(p), restore ? PM_STATE_RESTORED : PM_STATE_ESTABLISHED);
        struct pm_progress pr = { .size = sizeof pr };
        CHECK_EQ(pm_pair_progress(p, &pr), 0);
        CHECK_EQ(pr.compare, 1);
        CHECK_EQ(pr.comparing, 0);
        CHECK_EQ(pr.tracks_total, NT);
        CHECK_EQ(pr.tracks_compared, NT);
        CHECK_EQ(pr.tracks_equal, NT - nd);
        CHECK_EQ(pr.tracks_copied, nd);
        CHECK_EQ(pr.bytes_written, want_bytes);
        CHECK_EQ(pr.compare_bytes, 2 * SIZE);
        CHECK(sides_equal(p));
        /* the restore took the mirror's bytes, the establish the standard's */
        pm_pair_destroy(p);
        pm_store_destroy(a);
        pm_store_destroy(b);
    }
    /* states: a new pair may establish --compare, not restore */
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &b), 0);
    pm_pair *p;
    CHECK_EQ(pm_pair_create(a, b, TS, &p), 0);
    CHECK_EQ(pm_pair_restore_compare(p, 1, NULL), PM_E_STATE);
    CHECK_EQ(pm_pair_establish_compare(p, NULL), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.bytes_written, 0);             /* two zero volumes: nothing to copy */
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK_EQ(pm_pair_establish_compare(p, NULL), PM_E_STATE);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Host writers hammer the standard while a compare-establish runs. */
struct writer { pm_pair *p; unsigned seed; void *stop; };
static volatile int writers_stop;
static int write_errors;

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    unsigned char buf[3 * TS];
    unsigned s = w->seed;
    while (!__atomic_load_n(&writers_stop, __ATOMIC_RELAXED)) {
        s = s * 1103515245u + 12345u;
        uint64_t off = (uint64_t)(s >> 4) % (SIZE - sizeof buf);
        uint64_t len = 1 + (s >> 8) % sizeof buf;
        memset(buf, (int)(s >> 16), sizeof buf);
        if (pm_pair_write(w->p, PM_STANDARD, buf, len, off, 0) != 0)
            __atomic_add_fetch(&write_errors, 1, __ATOMIC_RELAXED);   /* checked by the main thread */
        usleep(100);     /* sparse enough that most tracks are compared unwritten */
    }
    return NULL;
}

/* A memory volume whose reads take a while, so the readers run batches
 * ahead of the decisions and host writes land in between. */
struct slowvol { unsigned char *data; pthread_mutex_t mu; };
static int slowvol_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    struct slowvol *v = ctx;
    usleep(4000);
    pthread_mutex_lock(&v->mu);
    memcpy(buf, v->data + off, (size_t)len);
    pthread_mutex_unlock(&v->mu);
    return 0;
}
static int slowvol_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    struct slowvol *v = ctx;
    pthread_mutex_lock(&v->mu);
    memcpy(v->data + off, buf, (size_t)len);
    pthread_mutex_unlock(&v->mu);
    return 0;
}
static void slowvol_close(void *ctx)
{
    struct slowvol *v = ctx;
    pthread_mutex_destroy(&v->mu);
    free(v->data);
    free(v);
}
static pm_store *slowvol(const char *name)
{
    static const struct pm_store_ops ops = { .size = sizeof ops, .read = slowvol_read, .write = slowvol_write,
                                             .flush = ok_flush, .close = slowvol_close };
    struct slowvol *v = calloc(1, sizeof *v);
    v->data = calloc(1, SIZE);
    pthread_mutex_init(&v->mu, NULL);
    pm_store *s = NULL;
    CHECK_EQ(pm_store_create_ops(&ops, v, SIZE, name, PM_STORE_NOLOCK, &s), 0);
    return s;
}

static void writers_during_compare_establish(void)
{
    unsigned char diff[NT];
    pm_store *a, *b;
    for (int round = 0; round < 8; round++) {
        pm_pair *p;
        a = slowvol("slow-std");
        b = slowvol("slow-mir");
        CHECK_EQ(pm_pair_create(a, b, TS, &p), 0);
        CHECK_EQ(pm_pair_assume_established(p), 0);
        CHECK_EQ(pm_pair_split(p), 0);
        random_diff(diff, 200);
        fill_pair(a, b, diff);
        __atomic_store_n(&writers_stop, 0, __ATOMIC_RELAXED);
        pthread_t th[3];
        struct writer w[3];
        for (int i = 0; i < 3; i++) {
            w[i].p = p;
            w[i].seed = (unsigned)(round * 10 + i + 1);
            w[i].stop = NULL;
            pthread_create(&th[i], NULL, writer_main, &w[i]);
        }
        usleep(1000);
        struct pm_copy_config cfg;
        pm_copy_config_default(&cfg);
        cfg.rate_bytes = (uint64_t)SIZE * 20;   /* the copy takes ~50 ms: more writes meet it */
        CHECK_EQ(pm_pair_establish_compare(p, &cfg), 0);
        CHECK_EQ(pm_pair_wait(p, -1), 0);
        usleep(2000);           /* writes on the established pair too */
        __atomic_store_n(&writers_stop, 1, __ATOMIC_RELAXED);
        for (int i = 0; i < 3; i++)
            pthread_join(th[i], NULL);
        CHECK_EQ(__atomic_load_n(&write_errors, __ATOMIC_RELAXED), 0);
        CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
        CHECK(sides_equal(p));
        pm_pair_destroy(p);
        pm_store_destroy(a);
        pm_store_destroy(b);
    }
}

static void compare_job_read_error(void)
{
    unsigned char diff[NT];
    pm_store *a, *b;
    pm_pair *p = split_pair(&a, &b, diff, 50);
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_READ, 700 * TS, TS, -EIO, 1), 0);
    CHECK_EQ(pm_pair_restore_compare(p, 1, NULL), 0);
    CHECK_EQ(pm_pair_wait(p, -1), PM_E_JOB);
    struct pm_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.error, -EIO);
    CHECK_EQ(pr.comparing, 0);
    CHECK_EQ(pm_pair_resume(p), 0);          /* copies every track not found equal */
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK(sides_equal(p));
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void adopt(void)
{
    unsigned char diff[NT];
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &b), 0);
    random_diff(diff, 40);
    fill_pair(a, b, diff);
    CHECK_EQ(pm_pair_create(a, b, TS, &p), 0);
    pm_compare *c;
    CHECK_EQ(pm_compare_create(&c), 0);
    CHECK_EQ(pm_pair_adopt(p, c), (int64_t)count_diff(diff));
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    for (int side = 0; side < 2; side++)
        check_bitmap(pm_table_flag(pm_pair_table(p, side), PM_CHANGED), diff);
    CHECK_EQ(pm_pair_adopt(p, c), PM_E_STATE);
    /* an incremental restore now copies exactly those tracks */
    CHECK_EQ(pm_pair_restore(p, 1, 1, NULL), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.tracks_copied, count_diff(diff));
    CHECK(sides_equal(p));
    pm_compare_destroy(c);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

/* Power lost at a random instant of a compare-restore or compare-establish
 * (volatile stores on one power line, metadata included): after reopening
 * and finishing, the sides are equal, the restore took the mirror's image
 * and left the mirror untouched, the establish kept the standard's. */
static void crash_during_compare_jobs(int points)
{
    int mid_job = 0;
    unsigned char diff[NT];
    unsigned char *img_std = malloc(SIZE), *img_mir = malloc(SIZE);
    for (int k = 0; k < points; k++) {
        int restore = k % 2 == 0;
        pm_store *a, *b, *meta;
        CHECK_EQ(pm_store_create_volatile(SIZE, NULL, &a), 0);
        CHECK_EQ(pm_store_create_volatile(SIZE, a, &b), 0);
        CHECK_EQ(pm_store_create_volatile(pm_meta_size(SIZE, TS), a, &meta), 0);
        pm_pair *p;
        CHECK_EQ(pm_pair_create_meta_store(meta, a, b, TS, &p), 0);
        CHECK_EQ(pm_pair_assume_established(p), 0);
        CHECK_EQ(pm_pair_split(p), 0);
        random_diff(diff, 100);
        fill_pair(a, b, diff);              /* behind the pair's back */
        CHECK_EQ(pm_store_flush(a), 0);
        CHECK_EQ(pm_store_flush(b), 0);
        CHECK_EQ(pm_store_read(a, img_std, SIZE, 0), 0);
        CHECK_EQ(pm_store_read(b, img_mir, SIZE, 0), 0);
        struct pm_copy_config c;
        pm_copy_config_default(&c);
        c.batch_bytes = 4 * TS;
        CHECK_EQ(restore ? pm_pair_restore_compare(p, 1, &c) : pm_pair_establish_compare(p, &c), 0);
        usleep((useconds_t)(rnd() % 4000));
        pm_store_power_loss(a, (uint64_t)k + 1);
        pm_pair_destroy(p);                 /* its last commit fails: no power */
        pm_store_power_on(a);
        CHECK_EQ(pm_pair_open_meta_store(meta, a, b, &p), 0);
        int s = pm_pair_state(p);
        mid_job += s == PM_STATE_SYNCING || s == PM_STATE_RESTORING;
        if (s == PM_STATE_SYNCING || s == PM_STATE_RESTORING)
            CHECK_EQ(pm_pair_resume(p), 0);
        else if (s == PM_STATE_SPLIT)       /* the job never became durable */
            CHECK_EQ(restore ? pm_pair_restore_compare(p, 1, &c) : pm_pair_establish_compare(p, &c), 0);
        CHECK_EQ(pm_pair_wait(p, 30000), 0);
        CHECK_EQ(pm_pair_state(p), restore ? PM_STATE_RESTORED : PM_STATE_ESTABLISHED);
        unsigned char *now = malloc(SIZE);
        for (int side = 0; side < 2; side++) {
            CHECK_EQ(pm_store_read(side ? b : a, now, SIZE, 0), 0);
            CHECK(memcmp(now, restore ? img_mir : img_std, SIZE) == 0);
        }
        free(now);
        pm_pair_destroy(p);
        pm_store_destroy(meta);
        pm_store_destroy(b);
        pm_store_destroy(a);
    }
    free(img_std);
    free(img_mir);
    printf("compare jobs: %d crash points, %d reopened in the middle of the job\n", points, mid_job);
}

int main(void)
{
    engine_against_shadow();
    read_errors();
    cancel();
    compare_restore_and_establish();
    writers_during_compare_establish();
    compare_job_read_error();
    adopt();
    const char *env = getenv("PM_COMPARE_CRASH_POINTS");
    crash_during_compare_jobs(env ? atoi(env) : 24);
    return CHECK_DONE("test_compare");
}
