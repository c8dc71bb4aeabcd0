/* test_store_ops.c - a tool's own store, through the public callback table
 * (struct pm_store_ops).  This file is also the example of docs/c-api.md.
 *
 * The example store, "chunky", keeps its volume in memory in 64 KiB chunks
 * allocated on first write: unwritten chunks are holes (extents), a punched
 * range gives its chunks back (write_zeroes), its identity is the volume
 * object's address, a lock table lets one owner at a time use it, and
 * submit() hands I/O to a worker thread that completes it later (the shape
 * of a remote store with several requests in flight).
 *
 * The tests: a pair of two chunky volumes (and its metadata on a third)
 * establishes, splits, restores and reopens; a table with only the required
 * callbacks gets the fallbacks; older (shorter) and newer (longer) tables;
 * the lock refuses a second owner; asynchronous I/O completes once each;
 * the built-in file store answers the same optional calls. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

/* ---- the example store ---------------------------------------------------- */

#define CHUNK 65536u

struct chunky {
    uint64_t size;
    unsigned char **chunk;      /* NULL: a hole */
    pthread_mutex_t mu;         /* guards chunk[] (a real store would lock finer) */
    int owner;                  /* 0 free, 1 shared (count in readers), 2 exclusive */
    int readers;
    int closed;
    /* asynchronous I/O: a queue and a worker */
    pthread_t worker;
    pthread_cond_t cv;
    struct pm_io *queue[256];
    int head, tail, stop;
    int flushes;
};

static int chunky_rw(struct chunky *c, unsigned char *buf, uint64_t len, uint64_t off, int write)
{
    pthread_mutex_lock(&c->mu);
    while (len > 0) {
        uint64_t i = off / CHUNK, at = off % CHUNK, n = CHUNK - at < len ? CHUNK - at : len;
        if (write && c->chunk[i] == NULL && (c->chunk[i] = calloc(1, CHUNK)) == NULL) {
            pthread_mutex_unlock(&c->mu);
            return -ENOMEM;
        }
        if (write)
            memcpy(c->chunk[i] + at, buf, n);
        else if (c->chunk[i] != NULL)
            memcpy(buf, c->chunk[i] + at, n);
        else
            memset(buf, 0, n);
        buf += n, off += n, len -= n;
    }
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static int ch_read(void *ctx, void *buf, uint64_t len, uint64_t off) { return chunky_rw(ctx, buf, len, off, 0); }
static int ch_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    return chunky_rw(ctx, (unsigned char *)buf, len, off, 1);
}
static int ch_flush(void *ctx)
{
    struct chunky *c = ctx;
    __atomic_add_fetch(&c->flushes, 1, __ATOMIC_RELAXED);   /* memory: nothing to make durable */
    return 0;
}
static void ch_close(void *ctx)
{
    struct chunky *c = ctx;
    __atomic_store_n(&c->closed, 1, __ATOMIC_RELEASE);
}

static int ch_write_zeroes(void *ctx, uint64_t len, uint64_t off, unsigned flags)
{
    struct chunky *c = ctx;
    if (!(flags & PM_ZERO_PUNCH))
        return -EOPNOTSUPP;                 /* let pymirror write zero buffers */
    pthread_mutex_lock(&c->mu);
    for (uint64_t i = off / CHUNK; i * CHUNK < off + len; i++) {
        uint64_t s = i * CHUNK > off ? i * CHUNK : off;
        uint64_t e = (i + 1) * CHUNK < off + len ? (i + 1) * CHUNK : off + len;
        if (c->chunk[i] == NULL)
            continue;
        if (s == i * CHUNK && e == (i + 1) * CHUNK) {
            free(c->chunk[i]);              /* a whole chunk: give it back */
            c->chunk[i] = NULL;
        } else {
            memset(c->chunk[i] + (s - i * CHUNK), 0, e - s);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static int64_t ch_extents(void *ctx, uint64_t off, uint64_t len, struct pm_extent *out, uint64_t max)
{
    struct chunky *c = ctx;
    int64_t n = 0;
    pthread_mutex_lock(&c->mu);
    for (uint64_t end = off + len; off < end && (uint64_t)n < max;) {
        uint64_t i = off / CHUNK, e = (i + 1) * CHUNK < end ? (i + 1) * CHUNK : end;
        uint32_t kind = c->chunk[i] ? PM_EXTENT_DATA : PM_EXTENT_HOLE;
        if (n > 0 && out[n - 1].kind == kind)
            out[n - 1].length += e - off;   /* merge with the previous extent */
        else
            out[n++] = (struct pm_extent){ off, e - off, kind, 0 };
        off = e;
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

static int ch_identity(void *ctx, char *buf, size_t len)
{
    snprintf(buf, len, "chunky:%p", ctx);
    return 0;
}

static int ch_lock(void *ctx, int mode)
{
    struct chunky *c = ctx;
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    if (mode == PM_LOCK_RELEASE) {
        if (c->owner == 1 && --c->readers > 0)
            ;
        else
            c->owner = 0;
    } else if (mode == PM_LOCK_SHARED && c->owner != 2) {
        c->owner = 1;
        c->readers++;
    } else if (mode == PM_LOCK_EXCLUSIVE && c->owner == 0) {
        c->owner = 2;
    } else {
        rc = PM_E_BUSY;
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static void *ch_worker(void *arg)
{
    struct chunky *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (c->head == c->tail && !c->stop)
            pthread_cond_wait(&c->cv, &c->mu);
        if (c->head == c->tail)
            break;
        struct pm_io *io = c->queue[c->head++ % 256];
        pthread_mutex_unlock(&c->mu);
        int rc = 0;
        if (io->op == PM_IO_READ)
            rc = ch_read(c, io->buf, io->len, io->offset);
        else if (io->op == PM_IO_WRITE)
            rc = ch_write(c, io->buf, io->len, io->offset);
        else if (io->op == PM_IO_FLUSH)
            rc = ch_flush(c);
        else
            rc = -EOPNOTSUPP;
        pm_io_complete(io, rc);             /* later, on another thread */
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

static int ch_submit(void *ctx, struct pm_io *io)
{
    struct chunky *c = ctx;
    pthread_mutex_lock(&c->mu);
    int full = c->tail - c->head >= 256;
    if (!full) {
        c->queue[c->tail++ % 256] = io;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return full ? -EAGAIN : 0;
}

static const struct pm_store_ops chunky_ops = {
    .size = sizeof(struct pm_store_ops),
    .read = ch_read, .write = ch_write, .flush = ch_flush, .close = ch_close,
    .write_zeroes = ch_write_zeroes, .extents = ch_extents, .identity = ch_identity,
    .lock = ch_lock, .submit = ch_submit,
};

static struct chunky *chunky_new(uint64_t size)
{
    struct chunky *c = calloc(1, sizeof *c);
    c->size = size;
    c->chunk = calloc((size + CHUNK - 1) / CHUNK, sizeof *c->chunk);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    pthread_create(&c->worker, NULL, ch_worker, c);
    return c;
}

static void chunky_free(struct chunky *c)
{
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->worker, NULL);
    for (uint64_t i = 0; i < (c->size + CHUNK - 1) / CHUNK; i++)
        free(c->chunk[i]);
    free(c->chunk);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* ---- tests ---------------------------------------------------------------- */

#define TS 4096u
#define SIZE (64u * TS + 1000u)

static int sides_equal(pm_pair *p)
{
    uint64_t out[8], next;
    return pm_pair_verify(p, 0, out, 8, &next) == 0;
}

static void a_pair_on_own_stores(void)
{
    struct chunky *cs = chunky_new(SIZE), *cm = chunky_new(SIZE), *cmeta = chunky_new(pm_meta_size(SIZE, TS));
    pm_store *s, *m, *meta;
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cs, SIZE, "chunky-std", 0, &s), 0);
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cm, SIZE, "chunky-mirror", 0, &m), 0);
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cmeta, pm_meta_size(SIZE, TS), "chunky-meta", 0, &meta), 0);
    pm_pair *p;
    CHECK_EQ(pm_pair_create_meta_store(meta, s, m, TS, &p), 0);
    unsigned char buf[3 * TS];
    for (unsigned i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)(i * 7 + 1);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, buf, sizeof buf, 5 * TS + 11, 0), 0);
    struct pm_copy_config cfg;
    pm_copy_config_init(&cfg, sizeof cfg);
    CHECK_EQ(pm_pair_establish(p, 0, &cfg), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK(sides_equal(p));
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "damage", 6, 40 * TS, PM_IO_FUA), 0);
    CHECK(__atomic_load_n(&cs->flushes, __ATOMIC_RELAXED) > 0);   /* FUA reached the store */
    CHECK_EQ(pm_pair_restore(p, 1, 1, &cfg), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK(sides_equal(p));
    pm_pair_destroy(p);
    /* the metadata on the own store reopens the pair */
    CHECK_EQ(pm_pair_open_meta_store(meta, s, m, &p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    unsigned char back[3 * TS];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, back, sizeof back, 5 * TS + 11), 0);
    CHECK(memcmp(back, buf, sizeof buf) == 0);
    pm_pair_destroy(p);
    /* holes and punching, through the pair's stores */
    struct pm_extent ext[8];
    int64_t n = pm_store_extents(s, 0, SIZE, ext, 8);
    CHECK(n >= 2);
    CHECK_EQ(ext[0].kind, PM_EXTENT_DATA);                 /* chunk 0 holds the write */
    CHECK_EQ(ext[n - 1].kind, PM_EXTENT_HOLE);             /* the end was never written */
    CHECK_EQ(pm_store_write_zeroes(s, CHUNK, 0, PM_ZERO_PUNCH), 0);
    n = pm_store_extents(s, 0, CHUNK, ext, 8);
    CHECK_EQ(n, 1);
    CHECK_EQ(ext[0].kind, PM_EXTENT_HOLE);
    CHECK_EQ(pm_store_write_zeroes(s, 100, CHUNK + 5, 0), 0);    /* -EOPNOTSUPP: zero buffers */
    char id[64];
    CHECK_EQ(pm_store_identity(s, id, sizeof id), 0);
    CHECK(strncmp(id, "chunky:", 7) == 0);
    /* the lock: one writable owner; released at destroy, with close called */
    pm_store *again = (pm_store *)1;
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cs, SIZE, "chunky-std", 0, &again), PM_E_BUSY);
    CHECK(again == NULL);
    CHECK(strstr(pm_last_error(), "chunky-std") != NULL);
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cs, SIZE, "chunky-std", PM_STORE_READONLY, &again), PM_E_BUSY);
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cs, SIZE, "look", PM_STORE_NOLOCK, &again), 0);
    pm_pair *twice;
    CHECK_EQ(pm_pair_create(s, again, TS, &twice), PM_E_GEOMETRY);   /* one volume, two stores */
    CHECK(strstr(pm_last_error(), "same volume") != NULL);
    pm_store_destroy(again);
    CHECK_EQ(cs->closed, 1);
    cs->closed = 0;
    pm_store_destroy(s);
    CHECK_EQ(cs->closed, 1);
    CHECK_EQ(pm_store_create_ops(&chunky_ops, cs, SIZE, "chunky-std", PM_STORE_READONLY, &s), 0);
    CHECK_EQ(pm_store_write(s, "x", 1, 0), -EROFS);
    pm_store_destroy(s);
    pm_store_destroy(m);
    pm_store_destroy(meta);
    chunky_free(cs), chunky_free(cm), chunky_free(cmeta);
}

/* asynchronous I/O: every submitted I/O completes exactly once */
struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, failed;
};

static void io_done(struct pm_io *io, int result)
{
    struct waiter *w = io->user;
    pthread_mutex_lock(&w->mu);
    w->done++;
    if (result != 0)
        w->failed++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void wait_done(struct waiter *w, int n)
{
    pthread_mutex_lock(&w->mu);
    while (w->done < n)
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

static void async_io(pm_store *s, int synchronous)
{
    enum { N = 64 };
    static struct pm_io io[N];
    static unsigned char data[N][512], back[N][512];
    struct waiter w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0 };
    for (int i = 0; i < N; i++) {
        memset(data[i], i + 1, 512);
        io[i] = (struct pm_io){ PM_IO_WRITE, 0, data[i], 512, (uint64_t)i * 1024, io_done, &w };
        CHECK_EQ(pm_store_submit(s, &io[i]), 0);
        if (synchronous)
            CHECK_EQ(w.done, i + 1);        /* no submit callback: done before returning */
    }
    wait_done(&w, N);
    struct pm_io fl = { PM_IO_FLUSH, 0, NULL, 0, 0, io_done, &w };
    CHECK_EQ(pm_store_submit(s, &fl), 0);
    wait_done(&w, N + 1);
    for (int i = 0; i < N; i++) {
        io[i] = (struct pm_io){ PM_IO_READ, 0, back[i], 512, (uint64_t)i * 1024, io_done, &w };
        CHECK_EQ(pm_store_submit(s, &io[i]), 0);
    }
    wait_done(&w, 2 * N + 1);
    CHECK_EQ(w.failed, 0);
    CHECK_EQ(w.done, 2 * N + 1);
    for (int i = 0; i < N; i++)
        CHECK(memcmp(back[i], data[i], 512) == 0);
    struct pm_io bad = { PM_IO_READ, 0, back[0], 512, pm_store_size(s), io_done, &w };
    CHECK_EQ(pm_store_submit(s, &bad), PM_E_RANGE);       /* refused: done is not called */
    bad.op = 99, bad.offset = 0;
    CHECK_EQ(pm_store_submit(s, &bad), -EINVAL);
    CHECK_EQ(w.done, 2 * N + 1);
}

static void fallbacks_and_versions(void)
{
    struct chunky *c = chunky_new(SIZE);
    /* only the required callbacks */
    struct pm_store_ops minimal = { .size = sizeof minimal, .read = ch_read, .write = ch_write,
                                    .flush = ch_flush, .close = ch_close };
    pm_store *s;
    CHECK_EQ(pm_store_create_ops(&minimal, c, SIZE, "minimal", 0, &s), 0);
    CHECK_EQ(pm_store_write(s, "abc", 3, 10), 0);
    CHECK_EQ(pm_store_write_zeroes(s, 2, 10, PM_ZERO_PUNCH), 0);
    char got[3];
    CHECK_EQ(pm_store_read(s, got, 3, 10), 0);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 'c');
    struct pm_extent e;
    CHECK_EQ(pm_store_extents(s, 100, 200, &e, 1), 1);      /* unknown: all data */
    CHECK(e.offset == 100 && e.length == 200 && e.kind == PM_EXTENT_DATA);
    char id[32];
    CHECK_EQ(pm_store_identity(s, id, sizeof id), 0);
    CHECK(strcmp(id, "minimal") == 0);
    async_io(s, 1);
    pm_store_destroy(s);
    /* the example store's own asynchronous path */
    CHECK_EQ(pm_store_create_ops(&chunky_ops, c, SIZE, "chunky", 0, &s), 0);
    async_io(s, 0);
    pm_store_destroy(s);
    /* an older, shorter table: what lies past its size is never read */
    struct { struct pm_store_ops ops; } older;
    memset(&older, 0xEE, sizeof older);                     /* garbage past the old size */
    memcpy(&older.ops, &minimal, offsetof(struct pm_store_ops, write_zeroes));
    older.ops.size = offsetof(struct pm_store_ops, write_zeroes);
    CHECK_EQ(pm_store_create_ops(&older.ops, c, SIZE, "older", 0, &s), 0);
    CHECK_EQ(pm_store_write_zeroes(s, 4, 0, 0), 0);         /* the fallback, not garbage */
    CHECK_EQ(pm_store_identity(s, id, sizeof id), 0);
    CHECK(strcmp(id, "older") == 0);
    pm_store_destroy(s);
    /* a newer, longer table: unknown callbacks must be NULL */
    struct { struct pm_store_ops ops; void (*future)(void *); } newer;
    memset(&newer, 0, sizeof newer);
    newer.ops = minimal;
    newer.ops.size = sizeof newer;
    CHECK_EQ(pm_store_create_ops(&newer.ops, c, SIZE, "newer", 0, &s), 0);
    pm_store_destroy(s);
    newer.future = (void (*)(void *))ch_close;
    CHECK_EQ(pm_store_create_ops(&newer.ops, c, SIZE, "newer", 0, &s), -E2BIG);
    /* bad tables */
    struct pm_store_ops bad = minimal;
    bad.flush = NULL;
    CHECK_EQ(pm_store_create_ops(&bad, c, SIZE, "bad", 0, &s), -EINVAL);
    CHECK_EQ(pm_store_create_ops(&minimal, c, 0, "bad", 0, &s), PM_E_GEOMETRY);
    CHECK_EQ(pm_store_create_ops(&minimal, c, SIZE, "bad", PM_STORE_CREATE, &s), -EINVAL);
    CHECK_EQ(pm_store_create_ops(NULL, c, SIZE, "bad", 0, &s), -EINVAL);
    chunky_free(c);
}

/* The built-in file store answers the same optional calls. */
static void file_store_options(void)
{
    char path[] = "/tmp/pm_ops_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    unlink(path);
    pm_store *s;
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, 1u << 20, &s), 0);
    unsigned char blk[4096];
    memset(blk, 0x42, sizeof blk);
    CHECK_EQ(pm_store_write(s, blk, sizeof blk, 512u * 1024), 0);
    CHECK_EQ(pm_store_flush(s), 0);
    struct pm_extent ext[8];
    int64_t n = pm_store_extents(s, 0, 1u << 20, ext, 8);
    CHECK(n >= 1);
    uint64_t covered = 0;
    int saw_data = 0;
    for (int64_t i = 0; i < n; i++) {
        CHECK_EQ(ext[i].offset, covered);                   /* consecutive, from the start */
        covered += ext[i].length;
        saw_data |= ext[i].kind == PM_EXTENT_DATA && ext[i].offset <= 512u * 1024 &&
                    ext[i].offset + ext[i].length >= 512u * 1024 + 4096;
    }
    CHECK_EQ(covered, 1u << 20);
    CHECK(saw_data);
    CHECK_EQ(pm_store_write_zeroes(s, 4096, 512u * 1024, PM_ZERO_PUNCH), 0);
    unsigned char back[4096];
    CHECK_EQ(pm_store_read(s, back, sizeof back, 512u * 1024), 0);
    for (int i = 0; i < 4096; i++)
        CHECK_EQ(back[i], 0);
    char id[64];
    CHECK_EQ(pm_store_identity(s, id, sizeof id), 0);
    CHECK(strncmp(id, "file:", 5) == 0);
    async_io(s, 1);
    pm_store_destroy(s);
    unlink(path);
}

int main(void)
{
    a_pair_on_own_stores();
    fallbacks_and_versions();
    file_store_options();
    return CHECK_DONE("test_store_ops");
}
