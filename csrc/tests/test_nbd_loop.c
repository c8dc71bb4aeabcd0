/* test_nbd_loop.c - the NBD request loop over a socketpair, driven by a
 * hand-written client: pipelined reads and writes from a sender thread
 * while a receiver thread checks every reply, during a restore (hydrating
 * reads, merged partial writes) with the pool at several threads; large
 * requests streamed in pieces (simple and structured); errors that keep the
 * connection; BLOCK_STATUS; a stop that drains; a detach.  Run under TSan
 * and ASan by `make check-tsan` / `make check-asan`. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "pymirror.h"
#include "../nbd_proto.h"
#include "../nbd_spin.h"
#include "check.h"

#define SIZE (16u << 20)
#define TRACK (64u << 10)
#define NREQ 400

static unsigned char model[SIZE];     /* what the standard must read as */

struct server {
    pm_nbd_conn *c;
    pthread_t th;
    int rc;
};

static void *server_main(void *arg)
{
    struct server *s = arg;
    s->rc = pm_nbd_conn_run(s->c);
    return NULL;
}

static void start(struct server *s, int fd, pm_pair *p, unsigned flags, uint32_t threads)
{
    CHECK_EQ(pm_nbd_conn_new(fd, p, PM_STANDARD, flags, "test", threads, NULL, &s->c), 0);
    pthread_create(&s->th, NULL, server_main, s);
}

static void finish(struct server *s)
{
    pthread_join(s->th, NULL);
    CHECK_EQ(s->rc, 0);
    pm_nbd_conn_free(s->c);
}

/* A pair of two memory stores of SIZE bytes, TRACK-sized tracks. */
static pm_pair *memory_pair(pm_store **a, pm_store **b)
{
    pm_pair *p = NULL;
    CHECK_EQ(pm_store_create_memory(SIZE, a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, b), 0);
    CHECK_EQ(pm_pair_create(*a, *b, TRACK, &p), 0);
    return p;
}

static void memory_pair_free(pm_pair *p, pm_store *a, pm_store *b)
{
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void xsend(int fd, const void *buf, size_t n)
{
    const unsigned char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0)
            return;
        p += k;
        n -= (size_t)k;
    }
}

static int xrecv(int fd, void *buf, size_t n)
{
    unsigned char *p = buf;
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void request(int fd, uint16_t type, uint16_t flags, uint64_t cookie, uint64_t off, uint32_t len,
                    const void *payload)
{
    unsigned char h[28];
    nbd_put32(h, NBD_REQUEST_MAGIC);
    nbd_put16(h + 4, flags);
    nbd_put16(h + 6, type);
    nbd_put64(h + 8, cookie);
    nbd_put64(h + 16, off);
    nbd_put32(h + 24, len);
    xsend(fd, h, 28);
    if (payload && len)
        xsend(fd, payload, len);
}

/* a simple reply: error, cookie */
static int simple_reply(int fd, uint32_t *err, uint64_t *cookie)
{
    unsigned char h[16];
    if (xrecv(fd, h, 16))
        return -1;
    if (nbd_get32(h) != NBD_SIMPLE_REPLY_MAGIC)
        return -2;
    *err = nbd_get32(h + 4);
    *cookie = nbd_get64(h + 8);
    return 0;
}

/* ---- pipelined requests during a restore ---------------------------------- */

struct op { int write; uint64_t off; uint32_t len; unsigned char *data; };
static struct op ops[NREQ];

struct sender { int fd; };

static void *sender_main(void *arg)
{
    struct sender *s = arg;
    for (int i = 0; i < NREQ; i++)
        request(s->fd, ops[i].write ? NBD_CMD_WRITE : NBD_CMD_READ, 0, (uint64_t)i, ops[i].off, ops[i].len,
                ops[i].write ? ops[i].data : NULL);
    return NULL;
}

static void test_pipelined_during_restore(void)
{
    pm_store *a, *b;
    pm_pair *p = memory_pair(&a, &b);
    /* the mirror holds the image; the standard must read as it once restored */
    for (uint32_t i = 0; i < SIZE; i++)
        model[i] = (unsigned char)(i * 7 + i / 4096);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, model, SIZE, 0, 0), 0);
    CHECK_EQ(pm_pair_establish(p, 0, NULL), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    unsigned char *junk = calloc(1, SIZE);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, junk, SIZE, 0, 0), 0);    /* the standard drifts */
    free(junk);
    struct pm_copy_config cfg;
    pm_copy_config_default(&cfg);
    cfg.rate_bytes = 4u << 20;                                             /* slow: I/O meets the copy */
    CHECK_EQ(pm_pair_restore(p, 0, 0, &cfg), 0);

    /* writes to the upper half (each its own range, partial tracks: merges),
     * reads of the lower half (hydrating) */
    unsigned seed = 12345;
    for (int i = 0; i < NREQ; i++) {
        seed = seed * 1103515245u + 12345u;
        if (i % 3 == 0) {
            ops[i].write = 1;
            ops[i].len = 1 + seed % 20000;
            ops[i].off = SIZE / 2 + (uint64_t)(i / 3) * 30000;
            ops[i].data = malloc(ops[i].len);
            for (uint32_t k = 0; k < ops[i].len; k++)
                ops[i].data[k] = (unsigned char)(seed >> 8) + (unsigned char)k;
        } else {
            ops[i].len = 4096 + (i % 5 == 0 ? 200000 : 0);
            ops[i].off = (uint64_t)(seed % (SIZE / 2 - 300000));
        }
    }
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    struct server srv;
    start(&srv, sv[0], p, 0, 6);
    struct sender snd = { sv[1] };
    pthread_t st;
    pthread_create(&st, NULL, sender_main, &snd);
    unsigned char *seen = calloc(NREQ, 1);
    unsigned char *buf = malloc(300000);
    for (int n = 0; n < NREQ; n++) {
        uint32_t err;
        uint64_t cookie;
        CHECK_EQ(simple_reply(sv[1], &err, &cookie), 0);
        CHECK_EQ(err, 0);
        if (cookie >= NREQ) {
            CHECK(0);
            break;
        }
        CHECK(!seen[cookie]);
        seen[cookie] = 1;
        if (!ops[cookie].write) {
            CHECK_EQ(xrecv(sv[1], buf, ops[cookie].len), 0);
            CHECK(memcmp(buf, model + ops[cookie].off, ops[cookie].len) == 0);
        }
    }
    pthread_join(st, NULL);
    request(sv[1], NBD_CMD_FLUSH, 0, 9999, 0, 0, NULL);
    uint32_t err;
    uint64_t cookie;
    CHECK_EQ(simple_reply(sv[1], &err, &cookie), 0);
    CHECK_EQ(err, 0);
    CHECK_EQ(cookie, 9999);
    request(sv[1], NBD_CMD_DISC, 0, 0, 0, 0, NULL);
    finish(&srv);
    CHECK_EQ(pm_pair_set_rate(p, 0), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    for (int i = 0; i < NREQ; i++)
        if (ops[i].write) {
            memcpy(model + ops[i].off, ops[i].data, ops[i].len);
            free(ops[i].data);
        }
    unsigned char *all = malloc(SIZE);
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, all, SIZE, 0), 0);
    CHECK(memcmp(all, model, SIZE) == 0);
    free(all);
    free(buf);
    free(seen);
    close(sv[0]);
    close(sv[1]);
    memory_pair_free(p, a, b);
}

/* ---- large requests, errors, block status, stop, detach -------------------- */

static void test_large_errors_status_stop(void)
{
    pm_store *a, *b;
    pm_pair *p = memory_pair(&a, &b);
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    struct server srv;
    CHECK_EQ(pm_nbd_conn_new(sv[0], p, PM_STANDARD, PM_NBD_STRUCTURED, "test", 3, NULL, &srv.c), 0);
    CHECK_EQ(pm_nbd_conn_set_contexts(srv.c, 0, 1), 0);
    pthread_create(&srv.th, NULL, server_main, &srv);

    /* a 10 MiB write (streamed in pieces), read back as OFFSET_DATA chunks */
    uint32_t big = 10u << 20;
    unsigned char *data = malloc(big), *back = calloc(1, big);
    for (uint32_t i = 0; i < big; i++)
        data[i] = (unsigned char)(i * 13 + 5);
    request(sv[1], NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1, 4096, big, data);
    uint32_t err;
    uint64_t cookie;
    CHECK_EQ(simple_reply(sv[1], &err, &cookie), 0);
    CHECK_EQ(err, 0);
    CHECK_EQ(cookie, 1);
    request(sv[1], NBD_CMD_READ, 0, 2, 4096, big, NULL);
    uint32_t got = 0;
    int done = 0, chunks = 0;
    while (!done) {
        unsigned char h[28];
        CHECK_EQ(xrecv(sv[1], h, 20), 0);
        CHECK_EQ(nbd_get32(h), NBD_STRUCTURED_REPLY_MAGIC);
        CHECK_EQ(nbd_get16(h + 6), NBD_REPLY_TYPE_OFFSET_DATA);
        CHECK_EQ(nbd_get64(h + 8), 2);
        uint32_t len = nbd_get32(h + 16) - 8;
        CHECK_EQ(xrecv(sv[1], h + 20, 8), 0);
        uint64_t off = nbd_get64(h + 20) - 4096;
        CHECK(off + len <= big);
        CHECK_EQ(xrecv(sv[1], back + off, len), 0);
        got += len;
        chunks++;
        done = nbd_get16(h + 4) & NBD_REPLY_FLAG_DONE;
    }
    CHECK_EQ(got, big);
    CHECK_EQ(chunks, 3);                     /* 4 + 4 + 2 MiB: never one 10 MiB buffer */
    CHECK(memcmp(back, data, big) == 0);

    /* errors keep the connection: past the end, too large, unknown command */
    uint16_t bad[][2] = { { NBD_CMD_READ, 0 }, { NBD_CMD_CACHE, 0 }, { NBD_CMD_READ, NBD_CMD_FLAG_DF } };
    for (int i = 0; i < 3; i++) {
        request(sv[1], bad[i][0], bad[i][1], 10 + i, i == 0 ? SIZE - 1 : 0, 2, NULL);
        unsigned char h[26];
        CHECK_EQ(xrecv(sv[1], h, 26), 0);
        CHECK_EQ(nbd_get16(h + 6), NBD_REPLY_TYPE_ERROR);
        CHECK_EQ(nbd_get64(h + 8), 10 + i);
        CHECK_EQ(nbd_get32(h + 20), NBD_EINVAL);
        uint32_t mlen = nbd_get32(h + 16) - 6;
        CHECK(mlen > 0 && mlen < 1024);
        char msg[1024];
        CHECK_EQ(xrecv(sv[1], msg, mlen), 0);
    }
    request(sv[1], NBD_CMD_READ, 0, 20, 0, PM_NBD_MAX_REQUEST + 1u, NULL);
    {
        unsigned char h[26];
        char msg[1024];
        CHECK_EQ(xrecv(sv[1], h, 26), 0);
        CHECK_EQ(nbd_get32(h + 20), NBD_EINVAL);
        CHECK_EQ(xrecv(sv[1], msg, nbd_get32(h + 16) - 6), 0);
    }

    /* block status: both contexts, in one reply of two chunks */
    request(sv[1], NBD_CMD_BLOCK_STATUS, 0, 30, 0, 1u << 20, NULL);
    for (int k = 0; k < 2; k++) {
        unsigned char h[24], d[8 * 1024];
        CHECK_EQ(xrecv(sv[1], h, 24), 0);
        CHECK_EQ(nbd_get16(h + 6), NBD_REPLY_TYPE_BLOCK_STATUS);
        CHECK_EQ(nbd_get32(h + 20), (uint32_t)k);
        CHECK_EQ(!!(nbd_get16(h + 4) & NBD_REPLY_FLAG_DONE), k == 1);
        uint32_t n = (nbd_get32(h + 16) - 4) / 8;
        CHECK(n >= 1 && n <= 1024);
        CHECK_EQ(xrecv(sv[1], d, 8 * n), 0);
        uint64_t total = 0;
        for (uint32_t i = 0; i < n; i++)
            total += nbd_get32(d + 8 * i);
        CHECK(total > 0 && total <= (1u << 20));
        if (k == 1)
            CHECK_EQ(nbd_get32(d + 4), 0);   /* nothing PENDING: the pair is new */
    }

    /* detach: later requests answer ESHUTDOWN, the pair is not touched */
    pm_nbd_conn_detach(srv.c);
    request(sv[1], NBD_CMD_WRITE, 0, 40, 0, 4, "dead");
    {
        unsigned char h[26];
        char msg[1024];
        CHECK_EQ(xrecv(sv[1], h, 26), 0);
        CHECK_EQ(nbd_get32(h + 20), NBD_ESHUTDOWN);
        CHECK_EQ(xrecv(sv[1], msg, nbd_get32(h + 16) - 6), 0);
    }

    /* stop: the loop ends with the client still connected */
    pm_nbd_conn_stop(srv.c);
    finish(&srv);
    unsigned char first[4];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, first, 4, 0), 0);
    CHECK(memcmp(first, "dead", 4) != 0);
    free(data);
    free(back);
    close(sv[0]);
    close(sv[1]);
    memory_pair_free(p, a, b);
}

/* ---- a broken client drops only itself ------------------------------------- */

static void test_bad_magic_and_truncation(void)
{
    pm_store *a, *b;
    pm_pair *p = memory_pair(&a, &b);
    for (int k = 0; k < 3; k++) {
        int sv[2];
        CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
        struct server srv;
        start(&srv, sv[0], p, 0, 2);
        if (k == 0) {
            unsigned char h[28] = { 0xde, 0xad };
            xsend(sv[1], h, 28);
        } else if (k == 1) {
            request(sv[1], NBD_CMD_WRITE, 0, 1, 0, 1000, NULL);
            xsend(sv[1], "half", 4);
            shutdown(sv[1], SHUT_WR);
        } else {
            request(sv[1], NBD_CMD_WRITE, 0, 1, 0, PM_NBD_MAX_REQUEST + 1u, NULL);
        }
        finish(&srv);
        char c;
        CHECK(recv(sv[1], &c, 1, MSG_DONTWAIT) <= 0);   /* no reply */
        close(sv[0]);
        close(sv[1]);
    }
    unsigned char z[1000], zero[1000] = { 0 };
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, z, 1000, 0), 0);
    CHECK(memcmp(z, zero, 1000) == 0);                  /* nothing half-received was written */
    memory_pair_free(p, a, b);
}

/* ---- the reader's poll for the next request (nbd_spin.h) ------------------ */

/* The window rule against its description: within {0} u [MIN, MAX]; a hit
 * keeps it; waits shorter than GROW grow it to MAX, longer ones shrink it to
 * 0 (an idle connection polls no more), each in a few steps. */
static void test_spin_rule(void)
{
    uint32_t w = PM_NBD_SPIN_MAX_NS;
    unsigned seed = 7;
    for (int i = 0; i < 100000; i++) {
        seed = seed * 1103515245u + 12345u;
        int hit = (seed >> 16) % 3 == 0;
        uint64_t waited = (seed >> 8) % (4 * PM_NBD_SPIN_MAX_NS);
        uint32_t n = pm_nbd_spin_next(w, hit, waited);
        CHECK(n == 0 || (n >= PM_NBD_SPIN_MIN_NS && n <= PM_NBD_SPIN_MAX_NS));
        if (hit)
            CHECK_EQ(n, w);
        else if (waited < PM_NBD_SPIN_GROW_NS)
            CHECK(n > w || n == PM_NBD_SPIN_MAX_NS);
        else
            CHECK(n < w || n == 0);
        w = n;
    }
    int steps = 0;
    for (w = PM_NBD_SPIN_MAX_NS; w; steps++)
        w = pm_nbd_spin_next(w, 0, 1000000);
    CHECK(steps <= 5);
    CHECK_EQ(pm_nbd_spin_next(0, 0, 1000000), 0);
    for (steps = 0; w < PM_NBD_SPIN_MAX_NS; steps++)
        w = pm_nbd_spin_next(w, 0, 1000);
    CHECK(steps <= 5);
}

static int read_one(int fd, uint64_t cookie, uint64_t off, unsigned char *buf)
{
    uint32_t err;
    uint64_t got;
    request(fd, NBD_CMD_READ, 0, cookie, off, 4096, NULL);
    if (simple_reply(fd, &err, &got) || err || got != cookie)
        return -1;
    return xrecv(fd, buf, 4096);
}

/* A client at queue depth 1 that answers at once is caught by the poll (on
 * a machine with a CPU to spare for it); one that pauses between requests
 * makes the poll stop. */
static void test_spin_catches_queue_depth_one(void)
{
    pm_store *a, *b;
    pm_pair *p = memory_pair(&a, &b);
    unsigned char *pat = malloc(SIZE), buf[4096];
    for (uint32_t i = 0; i < SIZE; i++)
        pat[i] = (unsigned char)(i * 7 + 3);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, pat, SIZE, 0, 0), 0);
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    struct server srv;
    start(&srv, sv[0], p, 0, 4);
    for (int i = 0; i < 400; i++) {
        uint64_t off = (uint64_t)(i * 7919 % (SIZE / 4096)) * 4096;
        CHECK_EQ(read_one(sv[1], (uint64_t)i, off, buf), 0);
        CHECK(memcmp(buf, pat + off, 4096) == 0);
    }
    uint64_t hits = pm__nbd_conn_spin_hits(srv.c);
    if (sysconf(_SC_NPROCESSORS_ONLN) > 1)
        CHECK(hits > 0);
    else
        CHECK_EQ(hits, 0);                      /* no CPU to spare: no poll */
    struct timespec pause = { 0, 2000000 };
    for (int i = 0; i < 30; i++) {
        nanosleep(&pause, NULL);
        CHECK_EQ(read_one(sv[1], (uint64_t)i, 4096, buf), 0);
        if (i == 9)
            hits = pm__nbd_conn_spin_hits(srv.c);   /* by now the window is 0 */
    }
    CHECK_EQ(pm__nbd_conn_spin_hits(srv.c), hits);
    close(sv[1]);
    finish(&srv);
    close(sv[0]);
    free(pat);
    memory_pair_free(p, a, b);
}

int main(void)
{
    test_spin_rule();
    test_spin_catches_queue_depth_one();
    test_pipelined_during_restore();
    test_large_errors_status_stop();
    test_bad_magic_and_truncation();
    return CHECK_DONE("test_nbd_loop");
}
