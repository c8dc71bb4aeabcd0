/* test_pair_threads.c - pthreads against the copier on shared tracks.
 *
 * Restore: each writer thread owns the bytes of every NT-th 1000-byte
 * segment (segments straddle track boundaries, so all threads share every
 * track), writes random pieces of its own segments and reads them back;
 * untouched segments must read as the mirror.  Afterwards the standard
 * equals the mirror overlaid with each thread's writes and the mirror is
 * unchanged (protected restores, both read policies); an unprotected
 * restore ends with both sides equal to the model.  The restores run with 2
 * copiers and with 16 copiers of one-track batches, in both orders (hot
 * tracks first, ascending).  Established, then
 * syncing: threads write overlapping ranges with different bytes at once;
 * both sides must end identical (invariant 6).
 *
 * Why the model is sound: a byte belongs to one thread, which writes it and
 * reads it back with no other writer, so its expected value is exact, while
 * every track is shared by all threads and the copier. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pymirror.h"
#include "check.h"

#define TS 4096u
#define SIZE (256u * TS + 777u)
#define SEG 1000u
#define NTH 4

static pm_pair *pair;
static unsigned char *mirror_img, *expect;
static pthread_barrier_t barrier;
static int failures;

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return *s;
}

static void *writer(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t seed = 0x1234567ULL * (uint64_t)(id + 1);
    unsigned char buf[SEG], back[SEG];
    unsigned char *written = calloc(SIZE / SEG + 1, 1);
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < 400; i++) {
        uint64_t seg = (rnd(&seed) % (SIZE / SEG / NTH)) * NTH + (uint64_t)id;
        uint64_t start = rnd(&seed) % SEG, len = 1 + rnd(&seed) % (SEG - start);
        uint64_t off = seg * SEG + start;
        if (off + len > SIZE)
            continue;
        for (uint64_t k = 0; k < len; k++)
            buf[k] = (unsigned char)rnd(&seed);
        if (pm_pair_write(pair, PM_STANDARD, buf, len, off, 0) != 0)
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
        memcpy(expect + off, buf, len);          /* this thread owns these bytes */
        written[seg] = 1;
        if (pm_pair_read(pair, PM_STANDARD, back, len, off) != 0 || memcmp(back, buf, len) != 0)
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
        uint64_t fresh = (rnd(&seed) % (SIZE / SEG / NTH)) * NTH + (uint64_t)id;
        if (!written[fresh] && (fresh + 1) * SEG <= SIZE) {
            if (pm_pair_read(pair, PM_STANDARD, back, SEG, fresh * SEG) != 0 ||
                memcmp(back, mirror_img + fresh * SEG, SEG) != 0)
                __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
        }
    }
    free(written);
    return NULL;
}

static void *same_bytes_writer(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint64_t seed = 99 + (uint64_t)id;
    unsigned char buf[3 * TS];
    for (unsigned k = 0; k < sizeof buf; k++)     /* differs per thread and per byte */
        buf[k] = (unsigned char)(id * 61 + k * 7);
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < 500; i++) {
        uint64_t off = rnd(&seed) % (8 * TS), len = 1 + rnd(&seed) % (3 * TS);
        if (pm_pair_write(pair, PM_STANDARD, buf, len, off, 0) != 0)
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* ---- the I/O barrier, and cancel under load ------------------------------ */

static int stop_writers;
static uint64_t acked[NTH];

/* Writes its own 8-byte counters (and flushes now and then) until told to
 * stop; acked[id] is the last sequence number whose write returned. */
static void *counting_writer(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (uint64_t seq = 1; !__atomic_load_n(&stop_writers, __ATOMIC_ACQUIRE); seq++) {
        uint64_t off = ((uint64_t)id * 16 + seq % 16) * TS + (seq % 7) * 8;
        if (pm_pair_write(pair, PM_STANDARD, &seq, 8, off, 0) != 0)
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
        if (seq % 32 == 0 && pm_pair_flush(pair, PM_STANDARD) != 0)
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&acked[id], seq, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void start_writers(pthread_t *t)
{
    __atomic_store_n(&stop_writers, 0, __ATOMIC_RELEASE);
    for (int i = 0; i < NTH; i++)
        pthread_create(&t[i], NULL, counting_writer, (void *)(intptr_t)i);
}

static void stop_all(pthread_t *t)
{
    __atomic_store_n(&stop_writers, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < NTH; i++)
        pthread_join(t[i], NULL);
}

static void snapshot_acked(uint64_t *out)
{
    for (int i = 0; i < NTH; i++)
        out[i] = __atomic_load_n(&acked[i], __ATOMIC_ACQUIRE);
}

static void sleep_ms(int ms)
{
    struct timespec ts = { 0, ms * 1000000L };
    nanosleep(&ts, NULL);
}

static void hold_io_barrier(void)
{
    /* established -> split -> a rate-limited restore with writers on top */
    CHECK_EQ(pm_pair_state(pair), PM_STATE_ESTABLISHED);
    CHECK_EQ(pm_pair_release_io(pair), PM_E_STATE);            /* not held */
    CHECK_EQ(pm_pair_split(pair), 0);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    c.batch_bytes = TS;
    c.rate_bytes = 2u << 20;
    CHECK_EQ(pm_pair_restore(pair, 0, 1, &c), 0);
    pthread_t t[NTH];
    start_writers(t);
    sleep_ms(20);
    uint64_t before[NTH], after[NTH];
    unsigned char *img1 = malloc(SIZE), *img2 = malloc(SIZE);
    struct pm_progress p1 = { .size = sizeof p1 }, p2 = { .size = sizeof p2 };
    CHECK_EQ(pm_pair_hold_io(pair), 0);
    snapshot_acked(before);
    CHECK_EQ(pm_pair_read(pair, PM_STANDARD, img1, SIZE, 0), 0);   /* reads go on */
    pm_pair_progress(pair, &p1);
    CHECK_EQ(pm_pair_hold_io(pair), 0);                         /* nested */
    sleep_ms(30);
    uint64_t mid[NTH];
    snapshot_acked(mid);     /* a writer acknowledges a write that drained before the hold */
    sleep_ms(30);
    CHECK_EQ(pm_pair_release_io(pair), 0);                      /* one of two */
    sleep_ms(20);
    snapshot_acked(after);
    CHECK_EQ(pm_pair_read(pair, PM_STANDARD, img2, SIZE, 0), 0);
    pm_pair_progress(pair, &p2);
    for (int i = 0; i < NTH; i++) {
        CHECK(after[i] <= before[i] + 1);                       /* at most the drained one */
        CHECK_EQ(after[i], mid[i]);                             /* no write completed while held */
    }
    CHECK(memcmp(img1, img2, SIZE) == 0);                       /* ... and none was in flight */
    CHECK(p2.tracks_pending < p1.tracks_pending || p2.running == 0);   /* the copier went on */
    CHECK_EQ(pm_pair_set_rate(pair, 0), 0);                     /* commands work while held */
    CHECK_EQ(pm_pair_release_io(pair), 0);
    int moved = 0;
    for (int tries = 0; tries < 200 && !moved; tries++) {       /* up to 6 s on a loaded machine */
        sleep_ms(30);
        snapshot_acked(after);
        moved = 1;
        for (int i = 0; i < NTH; i++)
            moved &= after[i] > before[i];
    }
    CHECK(moved);                                               /* and writes go on after */
    CHECK_EQ(pm_pair_wait(pair, -1), 0);
    /* a split while held, under the writers: no deadlock, and the mirror
     * image is the standard at the instant of the hold */
    CHECK_EQ(pm_pair_establish(pair, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(pair, -1), 0);
    for (int round = 0; round < 20; round++) {
        CHECK_EQ(pm_pair_hold_io(pair), 0);
        CHECK_EQ(pm_pair_read(pair, PM_STANDARD, img1, SIZE, 0), 0);
        CHECK_EQ(pm_pair_split(pair), 0);
        CHECK_EQ(pm_pair_release_io(pair), 0);
        CHECK_EQ(pm_pair_read(pair, PM_MIRROR, img2, SIZE, 0), 0);
        CHECK(memcmp(img1, img2, SIZE) == 0);
        CHECK_EQ(pm_pair_establish(pair, 1, &c), 0);
        CHECK_EQ(pm_pair_wait(pair, -1), 0);
    }
    /* cancel an establish under the writers: split, mirror invalid; an
     * incremental establish afterwards makes the sides equal (no CHANGED
     * track was lost) */
    CHECK_EQ(pm_pair_split(pair), 0);
    unsigned char *junk = malloc(SIZE);
    memset(junk, 0x5A, SIZE);
    CHECK_EQ(pm_pair_write(pair, PM_MIRROR, junk, SIZE, 0, 0), 0);
    free(junk);
    c.rate_bytes = 1u << 20;
    CHECK_EQ(pm_pair_establish(pair, 1, &c), 0);
    sleep_ms(30);
    CHECK_EQ(pm_pair_cancel(pair), 0);
    CHECK_EQ(pm_pair_state(pair), PM_STATE_SPLIT);
    CHECK(pm_pair_mirror_invalid(pair) > 0);
    sleep_ms(10);
    stop_all(t);
    CHECK_EQ(failures, 0);
    c.rate_bytes = 0;
    CHECK_EQ(pm_pair_establish(pair, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(pair, -1), 0);
    CHECK_EQ(pm_pair_mirror_invalid(pair), 0);
    uint64_t out[8], next;
    CHECK_EQ(pm_pair_verify(pair, 0, out, 8, &next), 0);
    free(img1), free(img2);
}

/* Hot first, deterministically: a restore that can copy nothing yet (a
 * rate of 1 byte/s: the copier is paying for its first run and holds no
 * track), paused; a host read of a PENDING track far from the start is
 * redirected and marks it hot; resumed at full speed, the copier takes it
 * before anything else (tracks_hot), and the restore is exact. */
static void hot_first(struct pm_copy_config *c)
{
    for (int order = PM_ORDER_HOT; order <= PM_ORDER_ASCENDING; order++) {
        CHECK_EQ(pm_pair_split(pair), 0);
        c->order = order;
        c->copiers = 1;
        c->read_policy = PM_READ_REDIRECT;   /* a redirected read marks its track */
        c->rate_bytes = 1;
        CHECK_EQ(pm_pair_restore(pair, 0, 1, c), 0);
        CHECK_EQ(pm_pair_pause(pair), 0);
        unsigned char buf[100];
        uint64_t off = 200 * TS + 10;
        CHECK_EQ(pm_pair_read(pair, PM_STANDARD, buf, sizeof buf, off), 0);
        CHECK(memcmp(buf, mirror_img + off, sizeof buf) == 0);
        struct pm_progress pr = { .size = sizeof pr };
        CHECK_EQ(pm_pair_progress(pair, &pr), 0);
        CHECK(pr.reads_redirected >= 1);
        CHECK_EQ(pm_pair_set_rate(pair, 0), 0);
        CHECK_EQ(pm_pair_resume(pair), 0);
        CHECK_EQ(pm_pair_wait(pair, -1), 0);
        CHECK_EQ(pm_pair_progress(pair, &pr), 0);
        if (order == PM_ORDER_HOT)
            CHECK(pr.tracks_hot >= 1);     /* the read's track went first */
        else
            CHECK_EQ(pr.tracks_hot, 0);
        unsigned char *got = malloc(SIZE);
        CHECK_EQ(pm_pair_read(pair, PM_STANDARD, got, SIZE, 0), 0);
        CHECK(memcmp(got, mirror_img, SIZE) == 0);
        free(got);
    }
    c->order = PM_ORDER_HOT;
    c->copiers = 2;
}

int main(void)
{
    pm_store *a, *b;
    CHECK_EQ(pm_store_create_memory(SIZE, &a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &b), 0);
    CHECK_EQ(pm_pair_create(a, b, TS, &pair), 0);
    mirror_img = malloc(SIZE);
    expect = malloc(SIZE);
    uint64_t seed = 7;
    for (uint64_t i = 0; i < SIZE; i++)
        mirror_img[i] = (unsigned char)rnd(&seed);
    CHECK_EQ(pm_pair_write(pair, PM_STANDARD, mirror_img, SIZE, 0, 0), 0);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(pair, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(pair, -1), 0);
    CHECK_EQ(pm_pair_split(pair), 0);
    unsigned char *junk = malloc(SIZE);
    memset(junk, 0xEE, SIZE);
    CHECK_EQ(pm_pair_write(pair, PM_STANDARD, junk, SIZE, 0, 0), 0);
    free(junk);
    memcpy(expect, mirror_img, SIZE);

    /* rounds 2 and 3: many copiers with one-track batches, so stripes are
     * small and cut often (copier.c), against the same writers; rounds 4-7
     * the same in ascending order (0-3 take hot tracks first: the writers'
     * merges and the redirected reads mark them) */
    pm_copy_config_init(&c, sizeof c);
    uint64_t hot_tracks[2] = { 0, 0 };
    for (int round = 0; round < 8; round++) {
        int policy = round % 2;
        c.order = round < 4 ? PM_ORDER_HOT : PM_ORDER_ASCENDING;
        pthread_barrier_init(&barrier, NULL, NTH + 1);
        pthread_t t[NTH];
        for (int i = 0; i < NTH; i++)
            pthread_create(&t[i], NULL, writer, (void *)(intptr_t)i);
        c.copiers = round % 4 < 2 ? 2 : 16;
        c.batch_bytes = round % 4 < 2 ? 4 * TS : TS;
        c.rate_bytes = 4u << 20;          /* slow enough that the writers overlap the copy */
        c.read_policy = policy;
        CHECK_EQ(pm_pair_restore(pair, 0, 1, &c), 0);
        pthread_barrier_wait(&barrier);
        for (int i = 0; i < NTH; i++)
            pthread_join(t[i], NULL);
        pm_pair_set_rate(pair, 0);
        CHECK_EQ(pm_pair_wait(pair, -1), 0);
        pthread_barrier_destroy(&barrier);
        struct pm_progress pr = { .size = sizeof pr };
        CHECK_EQ(pm_pair_progress(pair, &pr), 0);
        hot_tracks[c.order] += pr.tracks_hot;
        CHECK_EQ(failures, 0);
        CHECK_EQ(pm_pair_state(pair), PM_STATE_RESTORED);
        unsigned char *got = malloc(SIZE);
        CHECK_EQ(pm_pair_read(pair, PM_STANDARD, got, SIZE, 0), 0);
        CHECK(memcmp(got, expect, SIZE) == 0);          /* invariant 3 */
        CHECK_EQ(pm_pair_read(pair, PM_MIRROR, got, SIZE, 0), 0);
        CHECK(memcmp(got, mirror_img, SIZE) == 0);      /* invariant 1 */
        free(got);
        memcpy(expect, mirror_img, SIZE);               /* the next full restore starts over */
    }

    CHECK_EQ(hot_tracks[PM_ORDER_ASCENDING], 0);   /* the order changes only when asked */
    hot_first(&c);

    /* An unprotected restore: the same writers, every write mirrored; it
     * ends established with both sides equal to the model. */
    CHECK_EQ(pm_pair_split(pair), 0);
    {
        pthread_barrier_init(&barrier, NULL, NTH + 1);
        pthread_t t[NTH];
        for (int i = 0; i < NTH; i++)
            pthread_create(&t[i], NULL, writer, (void *)(intptr_t)i);
        c.read_policy = PM_READ_REDIRECT;
        CHECK_EQ(pm_pair_restore(pair, 0, 0, &c), 0);
        pthread_barrier_wait(&barrier);
        for (int i = 0; i < NTH; i++)
            pthread_join(t[i], NULL);
        pm_pair_set_rate(pair, 0);
        CHECK_EQ(pm_pair_wait(pair, -1), 0);
        pthread_barrier_destroy(&barrier);
        CHECK_EQ(failures, 0);
        CHECK_EQ(pm_pair_state(pair), PM_STATE_ESTABLISHED);
        unsigned char *got = malloc(SIZE);
        CHECK_EQ(pm_pair_read(pair, PM_STANDARD, got, SIZE, 0), 0);
        CHECK(memcmp(got, expect, SIZE) == 0);
        CHECK_EQ(pm_pair_read(pair, PM_MIRROR, got, SIZE, 0), 0);
        CHECK(memcmp(got, expect, SIZE) == 0);
        free(got);
    }

    /* Invariant 6: first while established, then while syncing (an
     * incremental establish copying at a limited rate under the writers). */
    for (int phase = 0; phase < 2; phase++) {
        if (phase == 1) {
            CHECK_EQ(pm_pair_split(pair), 0);
            unsigned char *junk2 = malloc(SIZE);
            memset(junk2, 0x11, SIZE);
            CHECK_EQ(pm_pair_write(pair, PM_STANDARD, junk2, SIZE / 2, 0, 0), 0);
            free(junk2);
            c.rate_bytes = 2u << 20;
            CHECK_EQ(pm_pair_establish(pair, 1, &c), 0);
            CHECK_EQ(pm_pair_state(pair), PM_STATE_SYNCING);
        }
        pthread_barrier_init(&barrier, NULL, NTH);
        pthread_t t[NTH];
        for (int i = 0; i < NTH; i++)
            pthread_create(&t[i], NULL, same_bytes_writer, (void *)(intptr_t)i);
        for (int i = 0; i < NTH; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&barrier);
        pm_pair_set_rate(pair, 0);
        CHECK_EQ(pm_pair_wait(pair, -1), 0);
        CHECK_EQ(pm_pair_state(pair), PM_STATE_ESTABLISHED);
        uint64_t out[8], next;
        CHECK_EQ(pm_pair_verify(pair, 0, out, 8, &next), 0);
        CHECK_EQ(failures, 0);
    }

    hold_io_barrier();
    pm_pair_destroy(pair);
    pm_store_destroy(a);
    pm_store_destroy(b);
    free(mirror_img), free(expect);
    return CHECK_DONE("test_pair_threads");
}
