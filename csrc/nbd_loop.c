/*
 * nbd_loop.c - the transmission phase of one NBD connection in C: requests
 * parsed, carried out on the pair, answered, with no Python per request
 * (the handshake stays in Python: pymirror/nbd/handshake.py and cloop.py).
 *
 * Layer 9: may call pair.c (7), arbitrate.c (6), table.c (2), store.c,
 * bitmap.c and nbd_tls.c (1) and the layer-0 helpers.
 *
 * Threads.  A connection is served by a small pool, the model of nbdkit:
 * each thread takes the receive lock, reads one request (a WRITE with its
 * payload), gives the lock up, carries the request out and sends its reply
 * under the send lock.  So requests run in parallel, and a slow one (a
 * hydrating read, a merge, a flush) holds up only its own thread.  The pool
 * starts with the thread that calls pm_nbd_conn_run and grows by one
 * whenever a thread takes a request while no other waits to read, up to
 * max_threads; the threads live until the connection ends.  Two rules for
 * a client at queue depth 1: a cold short read is carried out by the
 * thread holding the receive lock (keep_receiving), and that thread polls
 * the socket briefly for the next request before it sleeps (recv_next,
 * nbd_spin.h).
 *
 * Requests are read through a 64 KiB buffer (a run of small requests that
 * arrived together costs one recv); a WRITE's payload goes from there, and
 * then straight from the socket, into the thread's own buffer.
 *
 * Large requests (up to PM_NBD_MAX_REQUEST, 64 MiB) never take one buffer:
 * above PM_NBD_PIECE (4 MiB) a READ is read and sent piece by piece (as
 * OFFSET_DATA chunks with structured replies; as one simple reply
 * otherwise, holding the send lock, and a failure after the first piece
 * can then only be told by closing the connection, as the protocol says),
 * and a WRITE is received and written piece by piece while its thread holds
 * the receive lock (the payload is the next thing on the socket anyway).
 * Memory per connection is therefore at most max_threads pieces.
 *
 * Errors follow pymirror/nbd/connection.py exactly (the raw-protocol tests
 * run on both): a broken request (bad magic, a WRITE over the maximum, a
 * truncated request) drops the connection; a request that is merely wrong
 * gets an error reply; a request the pair's state forbids gets EPERM
 * (writes) or EIO (reads), never a disconnect.
 *
 * Stopping.  pm_nbd_conn_stop sets `stopping` and shuts the socket down for
 * reading: from then on only data already received is read, every request
 * not yet started is answered ESHUTDOWN, those running finish.  abort shuts
 * the socket both ways.  detach (the pair is being freed) waits, through a
 * writer-preferring rwlock, for the requests using the pair.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "layout.h"
#include "nbd_proto.h"
#include "nbd_spin.h"
#include "nbd_tls.h"

#define MAX_THREADS 64
#define RBUF_SIZE (64u << 10)
#define MAX_DESCRIPTORS 1024          /* per context in one BLOCK_STATUS reply */
#define KEEP_MAX (64u << 10)          /* the largest cold read that may keep the receive lock */
#define KEEP_HOT_MAX (1u << 20)       /* the largest hot read that may */
#define OBUF_SIZE (128u << 10)        /* replies the reader gathers before one send */

struct req {
    uint16_t flags, type;
    uint64_t cookie, offset;
    uint32_t length;
    int streamed;                     /* a WRITE above the piece size: payload still on the socket */
    int have_data;                    /* a READ whose data the reader already has in the thread's buffer */
};

struct worker {
    unsigned char *buf;
    size_t cap;
};

struct pm_nbd_conn {
    int fd;
    pm_tls *tls;
    int side;
    unsigned flags;
    uint64_t size;
    uint32_t track_size;
    char *name;
    int64_t ctx_alloc, ctx_pending;
    uint32_t max_threads;

    pthread_rwlock_t pair_lock;       /* pair: read by requests, cleared by detach */
    pm_pair *pair;

    pthread_mutex_t recv_mu;          /* the reader: rbuf, and the three below */
    unsigned char *rbuf;
    size_t rpos, rend;
    uint32_t spin_ns;                 /* how long the reader polls for the next request (nbd_spin.h) */
    int last_kept;                    /* the last request was a cold read carried out by the reader */
    pm_atomic_u64 spin_hits;          /* requests the reader's polling caught */
    unsigned char *obuf;              /* replies to hot reads not sent yet (flush_replies) */
    size_t olen;

    pthread_mutex_t send_mu;          /* one reply at a time on the socket */

    pthread_mutex_t mu;               /* the thread list */
    pthread_t threads[MAX_THREADS];
    int nspawned;                     /* threads started besides the caller of run */
    pm_atomic_int readers;            /* threads waiting to read or reading */
    pm_atomic_int inflight;           /* requests read and not yet carried out */
    pm_atomic_int closing;            /* read no further requests */
    pm_atomic_int stopping;           /* answer ESHUTDOWN to requests not started */
    pm_atomic_int start_error;
    pm_atomic_u64 requests, errors;
};

/* ---- creation ------------------------------------------------------------ */

int pm_nbd_conn_new(int fd, pm_pair *pair, int side, unsigned flags, const char *name,
                    uint32_t max_threads, pm_tls *tls, pm_nbd_conn **out)
{
    if (out == NULL || pair == NULL || fd < 0)
        return PM_FAIL(-EINVAL, "a socket, a pair and an output pointer are required");
    *out = NULL;
    if (side != PM_STANDARD && side != PM_MIRROR)
        return PM_FAIL(-EINVAL, "side %d is neither PM_STANDARD nor PM_MIRROR", side);
    if (max_threads < 1 || max_threads > MAX_THREADS)
        return PM_FAIL(-EINVAL, "max_threads %u is outside 1..%d", max_threads, MAX_THREADS);
    if (flags & ~(unsigned)(PM_NBD_STRUCTURED | PM_NBD_READONLY))
        return PM_FAIL(-EINVAL, "unknown flags %#x", flags);
    pm_nbd_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return PM_FAIL(-ENOMEM, "no memory for a connection");
    c->rbuf = malloc(RBUF_SIZE);
    c->name = strdup(name ? name : "");
    if (c->rbuf == NULL || c->name == NULL) {
        free(c->rbuf);
        free(c->name);
        free(c);
        return PM_FAIL(-ENOMEM, "no memory for a connection");
    }
    c->fd = fd;
    c->tls = tls;
    c->pair = pair;
    c->side = side;
    c->flags = flags;
    c->size = pm_pair_size(pair);
    c->track_size = pm_pair_track_size(pair);
    c->max_threads = max_threads;
    c->ctx_alloc = c->ctx_pending = -1;
    c->spin_ns = PM_NBD_SPIN_MAX_NS;
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* a detach must not starve behind a stream of requests */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&c->pair_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&c->recv_mu, NULL);
    pthread_mutex_init(&c->send_mu, NULL);
    pthread_mutex_init(&c->mu, NULL);
    *out = c;
    return 0;
}

int pm_nbd_conn_set_contexts(pm_nbd_conn *c, int64_t allocation_id, int64_t pending_id)
{
    if (allocation_id > UINT32_MAX || pending_id > UINT32_MAX)
        return PM_FAIL(-EINVAL, "a meta context id is 32 bits");
    if ((allocation_id >= 0 || pending_id >= 0) && !(c->flags & PM_NBD_STRUCTURED))
        return PM_FAIL(-EINVAL, "meta contexts need structured replies");
    c->ctx_alloc = allocation_id < 0 ? -1 : allocation_id;
    c->ctx_pending = pending_id < 0 ? -1 : pending_id;
    return 0;
}

void pm_nbd_conn_free(pm_nbd_conn *c)
{
    if (c == NULL)
        return;
    pthread_rwlock_destroy(&c->pair_lock);
    pthread_mutex_destroy(&c->recv_mu);
    pthread_mutex_destroy(&c->send_mu);
    pthread_mutex_destroy(&c->mu);
    free(c->rbuf);
    free(c->obuf);
    free(c->name);
    free(c);
}

uint64_t pm_nbd_conn_requests(const pm_nbd_conn *c) { return pm_load_relaxed(&c->requests); }
uint64_t pm_nbd_conn_errors(const pm_nbd_conn *c) { return pm_load_relaxed(&c->errors); }
uint64_t pm__nbd_conn_spin_hits(const pm_nbd_conn *c) { return pm_load_relaxed(&c->spin_hits); }

/* ---- stopping ------------------------------------------------------------ */

void pm_nbd_conn_stop(pm_nbd_conn *c)
{
    pm_store_seqcst(&c->stopping, 1);
    shutdown(c->fd, SHUT_RD);          /* wakes the thread waiting for the next request */
}

void pm_nbd_conn_abort(pm_nbd_conn *c)
{
    pm_store_seqcst(&c->closing, 1);
    shutdown(c->fd, SHUT_RDWR);
}

void pm_nbd_conn_detach(pm_nbd_conn *c)
{
    pthread_rwlock_wrlock(&c->pair_lock);
    c->pair = NULL;
    pthread_rwlock_unlock(&c->pair_lock);
}

/* ---- the socket (or the TLS session over it) ----------------------------- */

/* One receive: bytes, or 0 when the client is gone (or, once stopping,
 * when nothing more has already arrived). */
static size_t xrecv(pm_nbd_conn *c, void *buf, size_t len)
{
    for (;;) {
        int stopping = pm_load_acquire(&c->stopping);
        if (c->tls) {
            if (stopping && pm_tls_pending(c->tls) == 0)
                return 0;
            int64_t k = pm_tls_recv(c->tls, buf, len);
            return k > 0 ? (size_t)k : 0;
        }
        ssize_t k = recv(c->fd, buf, len, stopping ? MSG_DONTWAIT : 0);
        if (k >= 0)
            return (size_t)k;
        if (errno != EINTR)
            return 0;
    }
}

/* Send every byte of iov[0..n) (the send lock held); -1 if the client is gone. */
static int xsendv(pm_nbd_conn *c, struct iovec *iov, int n)
{
    if (c->tls)
        return pm__tls_sendv(c->tls, iov, n);
    while (n > 0) {
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t k = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        while (n > 0 && (size_t)k >= iov->iov_len) {
            k -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= (size_t)k;
        }
    }
    return 0;
}

static void gone(pm_nbd_conn *c)
{
    pm_nbd_conn_abort(c);
}

static void send_locked(pm_nbd_conn *c, struct iovec *iov, int n)
{
    if (xsendv(c, iov, n) < 0)
        gone(c);
}

static void send_reply(pm_nbd_conn *c, struct iovec *iov, int n)
{
    pthread_mutex_lock(&c->send_mu);
    send_locked(c, iov, n);
    pthread_mutex_unlock(&c->send_mu);
}

/* ---- gathered replies ------------------------------------------------------
 * The reader serves a run of hot reads alone (keep_receiving); while the
 * next request is already received, their replies are gathered in obuf
 * (recv_mu held) and leave in one send, one TLS record per 16 KiB instead
 * of one per reply: the system calls, records and the client's wake-ups
 * of a burst are shared.  The batch is sent before the reader does
 * anything that may wait (a receive that may sleep, a request it does not
 * serve this way, the end of the connection), so no reply waits for the
 * client. */
static void flush_replies(pm_nbd_conn *c)
{
    if (c->olen == 0)
        return;
    struct iovec iov = { c->obuf, c->olen };
    send_reply(c, &iov, 1);
    c->olen = 0;
}

/* Room for n more bytes of replies in obuf (recv_mu held), after sending
 * what is gathered if it must; NULL for a reply larger than obuf, or with
 * no memory: the caller sends its reply alone. */
static unsigned char *reply_room(pm_nbd_conn *c, size_t n)
{
    if (n > OBUF_SIZE)
        return NULL;
    if (c->obuf == NULL && (c->obuf = malloc(OBUF_SIZE)) == NULL)
        return NULL;
    if (OBUF_SIZE - c->olen < n)
        flush_replies(c);
    return c->obuf + c->olen;
}

/* May the reader leave the replies it gathered unsent for one more
 * request?  Only if the next request can be read without waiting: its
 * header is in rbuf, or over TLS GnuTLS holds received bytes. */
static int more_ready(pm_nbd_conn *c)
{
    return c->rend - c->rpos >= NBD_REQUEST_SIZE || (c->tls != NULL && pm_tls_pending(c->tls) > 0);
}

static void simple_header(unsigned char h[16], uint32_t error, uint64_t cookie)
{
    nbd_put32(h, NBD_SIMPLE_REPLY_MAGIC);
    nbd_put32(h + 4, error);
    nbd_put64(h + 8, cookie);
}

static void chunk_header(unsigned char h[20], uint16_t flags, uint16_t type, uint64_t cookie, uint32_t len)
{
    nbd_put32(h, NBD_STRUCTURED_REPLY_MAGIC);
    nbd_put16(h + 4, flags);
    nbd_put16(h + 6, type);
    nbd_put64(h + 8, cookie);
    nbd_put32(h + 16, len);
}

/* Success without data: a simple reply (the protocol allows one for every
 * command but READ even once structured replies are negotiated, and the
 * Python loop does the same); `none` for a READ of 0 bytes. */
static void reply_ok2(pm_nbd_conn *c, uint64_t cookie, int none)
{
    unsigned char h[20];
    struct iovec iov = { h, 0 };
    if (none && (c->flags & PM_NBD_STRUCTURED)) {
        chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
        iov.iov_len = 20;
    } else {
        simple_header(h, 0, cookie);
        iov.iov_len = 16;
    }
    send_reply(c, &iov, 1);
    pm_count_add(&c->requests, 1);
}

static void reply_ok(pm_nbd_conn *c, uint64_t cookie)
{
    reply_ok2(c, cookie, 0);
}

static void reply_error(pm_nbd_conn *c, uint64_t cookie, uint32_t error, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void reply_error(pm_nbd_conn *c, uint64_t cookie, uint32_t error, const char *fmt, ...)
{
    pm_count_add(&c->requests, 1);
    pm_count_add(&c->errors, 1);
    if (!(c->flags & PM_NBD_STRUCTURED)) {
        unsigned char h[16];
        simple_header(h, error, cookie);
        struct iovec iov = { h, 16 };
        send_reply(c, &iov, 1);
        return;
    }
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    unsigned char h[26];
    chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, 6 + (uint32_t)n);
    nbd_put32(h + 20, error);
    nbd_put16(h + 24, (uint16_t)n);
    struct iovec iov[2] = { { h, 26 }, { msg, (size_t)n } };
    send_reply(c, iov, 2);
}

/* The NBD error for a pair's return code (as errno_of in exports.py). */
static uint32_t nbd_error_of(int rc, int write)
{
    switch (rc) {
    case PM_E_READONLY: return NBD_EPERM;
    case PM_E_STATE: return write ? NBD_EPERM : NBD_EIO;
    case PM_E_CLOSED: return NBD_ESHUTDOWN;
    case PM_E_RANGE: return NBD_EINVAL;
    case -ENOMEM: return NBD_ENOMEM;
    case -ENOSPC: case -EDQUOT: case -EFBIG: return NBD_ENOSPC;
    case -EPERM: case -EACCES: case -EROFS: return NBD_EPERM;
    case -EINVAL: return NBD_EINVAL;
    default: return NBD_EIO;
    }
}

static const char *side_name(const pm_nbd_conn *c)
{
    return c->side == PM_STANDARD ? "standard" : "mirror";
}

static void reply_failure(pm_nbd_conn *c, uint64_t cookie, int rc, int write, const char *what)
{
    const char *why = pm_last_error();
    reply_error(c, cookie, nbd_error_of(rc, write), "%s %s of export '%s': %s", what, side_name(c),
                c->name, why[0] ? why : pm_strerror(rc));
}

/* ---- receiving ----------------------------------------------------------- */

static int grow(struct worker *w, size_t n)
{
    if (n <= w->cap)
        return 0;
    size_t cap = w->cap ? w->cap : 65536;
    while (cap < n)
        cap *= 2;
    unsigned char *b = malloc(cap);
    if (b == NULL)
        return -ENOMEM;
    free(w->buf);
    w->buf = b;
    w->cap = cap;
    return 0;
}

/* ---- polling for the next request (nbd_spin.h) --------------------------- */

static pm_atomic_int spinners;        /* readers polling now, in the whole process */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A CPU for one more poller?  At most one fewer than the CPUs online poll
 * at once, so a client (or the other connections) always has one. */
static int spin_enter(void)
{
    static pm_atomic_int limit = -1;
    int lim = pm_load_relaxed(&limit);
    if (lim < 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        lim = n > 1 ? (int)(n - 1) : 0;
        pm_store_relaxed(&limit, lim);
    }
    if (pm_fetch_add(&spinners, 1) < lim)
        return 1;
    pm_fetch_sub(&spinners, 1);
    return 0;
}

/* The first bytes of the next request into the empty rbuf (recv_mu held),
 * as xrecv.  Unless the last request was a cold read the reader carried
 * out itself, the socket is first polled without sleeping for up to
 * spin_ns: a client at queue depth 1 on cached data sends its next request
 * a few microseconds after our reply, and catching it awake saves the
 * sleep and the wake-up (on this VM most of a hot request's time).  After
 * a cold read it is not: polling then only took the CPU the read's
 * completion and the client needed (docs/nbd.md).  Over TLS the poll
 * receives into the buffer GnuTLS reads its records from (pm__tls_poll),
 * and bytes already received need no poll. */
static size_t recv_next(pm_nbd_conn *c)
{
    void *buf = c->rbuf;
    size_t len = RBUF_SIZE;
    uint32_t spun = 0;
    if (c->tls != NULL && pm_tls_pending(c->tls) > 0)
        return xrecv(c, buf, len);
    if (c->spin_ns > 0 && !c->last_kept && !pm_load_acquire(&c->stopping) && spin_enter()) {
        uint64_t t0 = now_ns(), t = t0;
        ssize_t k = 0;
        int got;                      /* 1: bytes came, 0: not yet, -1: the client is gone */
        do {
            if (c->tls) {
                got = pm__tls_poll(c->tls);
            } else {
                k = recv(c->fd, buf, len, MSG_DONTWAIT);
                got = k > 0 ? 1 : k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
            }
        } while (got == 0 && (t = now_ns()) - t0 < c->spin_ns);
        pm_fetch_sub(&spinners, 1);
        if (got < 0)
            return 0;
        if (got > 0) {
            pm_count_add(&c->spin_hits, 1);
            c->spin_ns = pm_nbd_spin_next(c->spin_ns, 1, 0);
            return c->tls ? xrecv(c, buf, len) : (size_t)k;
        }
        spun = (uint32_t)(t - t0);
    }
    uint64_t t0 = now_ns();
    size_t k = xrecv(c, buf, len);
    c->spin_ns = pm_nbd_spin_next(c->spin_ns, 0, spun + (now_ns() - t0));
    return k;
}

/* At least n bytes in rbuf (recv_mu held); 0 if the client is gone. */
static int need(pm_nbd_conn *c, size_t n)
{
    size_t avail = c->rend - c->rpos;
    if (avail >= n)
        return 1;
    if (c->rpos) {
        memmove(c->rbuf, c->rbuf + c->rpos, avail);
        c->rpos = 0;
        c->rend = avail;
    }
    while (c->rend < n) {
        size_t k = c->rend == 0 ? recv_next(c) : xrecv(c, c->rbuf + c->rend, RBUF_SIZE - c->rend);
        if (k == 0)
            return 0;
        c->rend += k;
    }
    return 1;
}

/* n bytes of payload into dst (recv_mu held): first what is buffered. */
static int recv_payload(pm_nbd_conn *c, unsigned char *dst, size_t n)
{
    size_t k = c->rend - c->rpos;
    if (k > n)
        k = n;
    memcpy(dst, c->rbuf + c->rpos, k);
    c->rpos += k;
    while (k < n) {
        size_t got = xrecv(c, dst + k, n - k);
        if (got == 0)
            return 0;
        k += got;
    }
    return 1;
}

/* The next request (recv_mu held): 1, or 0 when the connection must end
 * (the client left, sent DISC or broke the protocol). */
static int read_request(pm_nbd_conn *c, struct worker *w, struct req *r)
{
    if (!need(c, NBD_REQUEST_SIZE))
        return 0;
    const unsigned char *h = c->rbuf + c->rpos;
    uint32_t magic = nbd_get32(h);
    r->flags = nbd_get16(h + 4);
    r->type = nbd_get16(h + 6);
    r->cookie = nbd_get64(h + 8);
    r->offset = nbd_get64(h + 16);
    r->length = nbd_get32(h + 24);
    r->streamed = 0;
    r->have_data = 0;
    c->rpos += NBD_REQUEST_SIZE;
    if (magic != NBD_REQUEST_MAGIC || r->type == NBD_CMD_DISC)
        return 0;
    if (r->type == NBD_CMD_WRITE) {
        if (r->length > PM_NBD_MAX_REQUEST)
            return 0;                    /* its payload cannot be skipped safely */
        if (r->length > PM_NBD_PIECE) {
            r->streamed = 1;
            return 1;
        }
        if (grow(w, r->length) < 0)
            return 0;
        return recv_payload(c, w->buf, r->length);
    }
    return 1;
}

/* ---- carrying requests out ------------------------------------------------ */

static unsigned allowed_flags(const pm_nbd_conn *c, unsigned type, int *known)
{
    *known = 1;
    switch (type) {
    case NBD_CMD_READ: case NBD_CMD_WRITE: case NBD_CMD_FLUSH: case NBD_CMD_TRIM:
        return NBD_CMD_FLAG_FUA;
    case NBD_CMD_WRITE_ZEROES:
        return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
    case NBD_CMD_BLOCK_STATUS:
        if (c->ctx_alloc >= 0 || c->ctx_pending >= 0)
            return NBD_CMD_FLAG_REQ_ONE;
        break;
    }
    *known = 0;
    return 0;
}

/* The pair for one request, or NULL once detached (then unlocked). */
static pm_pair *pair_get(pm_nbd_conn *c)
{
    pthread_rwlock_rdlock(&c->pair_lock);
    pm_pair *p = c->pair;
    if (p == NULL)
        pthread_rwlock_unlock(&c->pair_lock);
    return p;
}

static void pair_put(pm_nbd_conn *c)
{
    pthread_rwlock_unlock(&c->pair_lock);
}

static void do_read(pm_nbd_conn *c, struct worker *w, const struct req *r)
{
    int structured = c->flags & PM_NBD_STRUCTURED;
    uint64_t len = r->length, off = r->offset;
    if (len == 0) {
        reply_ok2(c, r->cookie, 1);
        return;
    }
    size_t piece = len < PM_NBD_PIECE ? len : PM_NBD_PIECE;
    if (grow(w, piece) < 0) {
        reply_error(c, r->cookie, NBD_ENOMEM, "no memory for a read of %zu bytes", piece);
        return;
    }
    pm_pair *p = pair_get(c);
    if (p == NULL) {
        reply_error(c, r->cookie, NBD_ESHUTDOWN, "the pair is closed");
        return;
    }
    int rc = r->have_data ? 0 : pm_pair_read(p, c->side, w->buf, piece, off);
    if (rc < 0) {
        pair_put(c);
        reply_failure(c, r->cookie, rc, 0, "read");
        return;
    }
    size_t hl = structured ? 28 : 16;
    unsigned char *o = r->have_data ? reply_room(c, hl + piece) : NULL;
    if (o != NULL) {                  /* the reader's hot read (one piece): gathered */
        if (structured) {
            chunk_header(o, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, r->cookie, 8 + (uint32_t)piece);
            nbd_put64(o + 20, off);
        } else {
            simple_header(o, 0, r->cookie);
        }
        memcpy(o + hl, w->buf, piece);
        c->olen += hl + piece;
        pair_put(c);
        pm_count_add(&c->requests, 1);
        return;
    }
    if (r->have_data)                 /* too large to gather: the gathered ones go first */
        flush_replies(c);
    unsigned char h[28];
    struct iovec iov[2];
    if (structured) {
        /* one OFFSET_DATA chunk per piece; other replies may come between */
        for (;;) {
            int last = piece == len;
            chunk_header(h, last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, r->cookie,
                         8 + (uint32_t)piece);
            nbd_put64(h + 20, off);
            iov[0] = (struct iovec){ h, 28 };
            iov[1] = (struct iovec){ w->buf, piece };
            send_reply(c, iov, 2);
            if (last || pm_load_relaxed(&c->closing))
                break;
            off += piece;
            len -= piece;
            piece = len < PM_NBD_PIECE ? len : PM_NBD_PIECE;
            rc = pm_pair_read(p, c->side, w->buf, piece, off);
            if (rc < 0) {
                pair_put(c);
                reply_failure(c, r->cookie, rc, 0, "read");
                return;
            }
        }
        pair_put(c);
        pm_count_add(&c->requests, 1);
        return;
    }
    /* simple reply: the header, then every piece, under the send lock */
    simple_header(h, 0, r->cookie);
    pthread_mutex_lock(&c->send_mu);
    iov[0] = (struct iovec){ h, 16 };
    iov[1] = (struct iovec){ w->buf, piece };
    send_locked(c, iov, 2);
    while (piece < len && !pm_load_relaxed(&c->closing)) {
        off += piece;
        len -= piece;
        piece = len < PM_NBD_PIECE ? len : PM_NBD_PIECE;
        rc = pm_pair_read(p, c->side, w->buf, piece, off);
        if (rc < 0) {
            /* the header promised data: the protocol leaves only a disconnect */
            gone(c);
            break;
        }
        iov[0] = (struct iovec){ w->buf, piece };
        send_locked(c, iov, 1);
    }
    pthread_mutex_unlock(&c->send_mu);
    pair_put(c);
    pm_count_add(&c->requests, 1);
}

/* A WRITE above the piece size, its payload still on the socket (recv_mu
 * held).  `refuse` (an NBD error, or 0) was decided before; the payload is
 * consumed either way.  0 if the client vanished mid-payload. */
static int do_streamed_write(pm_nbd_conn *c, struct worker *w, const struct req *r, uint32_t refuse,
                             const char *why)
{
    uint64_t left = r->length, off = r->offset;
    int rc = 0;
    pm_pair *p = NULL;
    if (grow(w, PM_NBD_PIECE) < 0)
        return 0;
    if (!refuse) {
        p = pair_get(c);
        if (p == NULL) {
            refuse = NBD_ESHUTDOWN;
            why = "the pair is closed";
        }
    }
    while (left) {
        size_t piece = left < PM_NBD_PIECE ? left : PM_NBD_PIECE;
        if (!recv_payload(c, w->buf, piece)) {
            if (p)
                pair_put(c);
            return 0;
        }
        if (!refuse && rc == 0)
            rc = pm_pair_write(p, c->side, w->buf, piece, off, (r->flags & NBD_CMD_FLAG_FUA) ? PM_IO_FUA : 0);
        off += piece;
        left -= piece;
    }
    if (p)
        pair_put(c);
    if (refuse)
        reply_error(c, r->cookie, refuse, "%s", why);
    else if (rc < 0)
        reply_failure(c, r->cookie, rc, 1, "write");
    else
        reply_ok(c, r->cookie);
    return 1;
}

/* ---- BLOCK_STATUS ---------------------------------------------------------- */

/* Descriptors for one context from pm_pair_block_status (the one answer
 * the Python loop packs too, pymirror/nbd/status.py): base:allocation gives
 * HOLE|ZERO for holes and ZERO for zero extents; pymirror:pending gives 1
 * for tracks not yet restored.  Nothing described: one extent, "data" or
 * "local", over the whole request (the client may ask again). */
static uint32_t context_descriptors(pm_pair *p, int side, int context, uint64_t off, uint64_t len,
                                    unsigned char *out, uint32_t max, struct pm_extent *ext)
{
    int64_t k = pm_pair_block_status(p, side, context, off, len, ext, max);
    if (k <= 0) {
        nbd_put32(out, (uint32_t)len);
        nbd_put32(out + 4, 0);
        return 1;
    }
    for (int64_t i = 0; i < k; i++) {
        uint32_t fl;
        if (context == PM_CONTEXT_ALLOCATION)
            fl = ext[i].kind == PM_EXTENT_HOLE ? NBD_STATE_HOLE | NBD_STATE_ZERO
                 : ext[i].kind == PM_EXTENT_ZERO ? NBD_STATE_ZERO : 0;
        else
            fl = ext[i].kind ? 1u : 0u;
        nbd_put32(out + 8 * i, (uint32_t)ext[i].length);
        nbd_put32(out + 8 * i + 4, fl);
    }
    return (uint32_t)k;
}

static void do_block_status(pm_nbd_conn *c, struct worker *w, const struct req *r)
{
    if (r->length == 0) {
        reply_error(c, r->cookie, NBD_EINVAL, "a block status query of 0 bytes");
        return;
    }
    uint32_t max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_DESCRIPTORS;
    size_t bytes = 2 * (24 + 8 * (size_t)max) + sizeof(struct pm_extent) * (size_t)max;
    if (grow(w, bytes) < 0) {
        reply_error(c, r->cookie, NBD_ENOMEM, "no memory for a block status reply");
        return;
    }
    pm_pair *p = pair_get(c);
    if (p == NULL) {
        reply_error(c, r->cookie, NBD_ESHUTDOWN, "the pair is closed");
        return;
    }
    struct iovec iov[2];
    int n = 0;
    unsigned char *b = w->buf;
    struct pm_extent *ext = (struct pm_extent *)(void *)(w->buf + 2 * (24 + 8 * (size_t)max));
    int64_t ids[2] = { c->ctx_alloc, c->ctx_pending };
    for (int k = 0; k < 2; k++) {
        if (ids[k] < 0)
            continue;
        uint32_t d = context_descriptors(p, c->side, k == 0 ? PM_CONTEXT_ALLOCATION : PM_CONTEXT_PENDING,
                                         r->offset, r->length, b + 24, max, ext);
        chunk_header(b, 0, NBD_REPLY_TYPE_BLOCK_STATUS, r->cookie, 4 + 8 * d);
        nbd_put32(b + 20, (uint32_t)ids[k]);
        iov[n++] = (struct iovec){ b, 24 + 8 * (size_t)d };
        b += 24 + 8 * (size_t)max;
    }
    pair_put(c);
    nbd_put16((unsigned char *)iov[n - 1].iov_base + 4, NBD_REPLY_FLAG_DONE);
    send_reply(c, iov, n);
    pm_count_add(&c->requests, 1);
}

/* Carry out one request (recv_mu held only for a streamed write). 0 if the
 * connection must end. */
static int execute(pm_nbd_conn *c, struct worker *w, const struct req *r)
{
    uint32_t refuse = 0;
    char why[512];
    int known;
    unsigned allowed = allowed_flags(c, r->type, &known);
    uint64_t end = r->offset + r->length;
    int overflow = end < r->offset;
    int ro = (c->flags & PM_NBD_READONLY) != 0;

    if (pm_load_acquire(&c->stopping)) {
        refuse = NBD_ESHUTDOWN;
        snprintf(why, sizeof why, "the server is shutting down");
    } else if (!known) {
        refuse = NBD_EINVAL;
        snprintf(why, sizeof why, "unknown or unsupported command %u", r->type);
    } else if (r->flags & ~allowed) {
        refuse = NBD_EINVAL;
        snprintf(why, sizeof why, "unsupported command flags %#x for command %u", r->flags, r->type);
    } else if (r->type == NBD_CMD_READ || r->type == NBD_CMD_BLOCK_STATUS) {
        if (r->type == NBD_CMD_READ && r->length > PM_NBD_MAX_REQUEST) {
            refuse = NBD_EINVAL;
            snprintf(why, sizeof why, "a read of %u bytes is larger than the maximum %u", r->length,
                     (unsigned)PM_NBD_MAX_REQUEST);
        } else if (overflow || end > c->size) {
            refuse = NBD_EINVAL;
            snprintf(why, sizeof why, "%u bytes at %llu end beyond the end of the export (%llu bytes)",
                     r->length, (unsigned long long)r->offset, (unsigned long long)c->size);
        }
    } else if (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES || r->type == NBD_CMD_TRIM) {
        if (ro) {
            refuse = NBD_EPERM;
            snprintf(why, sizeof why, "the %s export is read-only", c->name);
        } else if (overflow || end > c->size) {
            refuse = r->type == NBD_CMD_TRIM ? NBD_EINVAL : NBD_ENOSPC;
            snprintf(why, sizeof why, "%u bytes at %llu end beyond the end of the export (%llu bytes)",
                     r->length, (unsigned long long)r->offset, (unsigned long long)c->size);
        }
    }
    if (r->streamed)
        return do_streamed_write(c, w, r, refuse, why);
    if (refuse) {
        reply_error(c, r->cookie, refuse, "%s", why);
        return 1;
    }
    unsigned fua = (r->flags & NBD_CMD_FLAG_FUA) ? PM_IO_FUA : 0;
    pm_pair *p;
    int rc;
    switch (r->type) {
    case NBD_CMD_READ:
        do_read(c, w, r);
        return 1;
    case NBD_CMD_BLOCK_STATUS:
        do_block_status(c, w, r);
        return 1;
    }
    p = pair_get(c);
    if (p == NULL) {
        /* as the Python loop: a TRIM of the mirror is refused as a write the state forbids */
        int trim_mirror = r->type == NBD_CMD_TRIM && c->side == PM_MIRROR;
        reply_error(c, r->cookie, trim_mirror ? NBD_EPERM : NBD_ESHUTDOWN, "the pair is closed");
        return 1;
    }
    const char *what = "flush";
    switch (r->type) {
    case NBD_CMD_WRITE:
        rc = pm_pair_write(p, c->side, w->buf, r->length, r->offset, fua);
        what = "write";
        break;
    case NBD_CMD_WRITE_ZEROES:   /* deallocated unless NO_HOLE asks to keep the zeroes allocated */
        rc = pm_pair_write_zeroes(p, c->side, r->length, r->offset,
                                  fua | ((r->flags & NBD_CMD_FLAG_NO_HOLE) ? 0u : (unsigned)PM_IO_PUNCH));
        what = "write zeroes to";
        break;
    case NBD_CMD_TRIM:           /* zeroes, deallocated: a trimmed range never shows old bytes */
        rc = pm_pair_write_zeroes(p, c->side, r->length, r->offset, fua | (unsigned)PM_IO_PUNCH);
        what = "trim";
        break;
    default:
        rc = pm_pair_flush(p, c->side);
        break;
    }
    pair_put(c);
    if (rc < 0)
        reply_failure(c, r->cookie, rc, 1, what);
    else
        reply_ok(c, r->cookie);
    return 1;
}

/* ---- the threads ----------------------------------------------------------- */

/* May the thread that read request r carry it out before it gives the
 * receive lock up, and then read the next request itself?  Only a READ
 * from a local file outside a restore (whose reads of PENDING tracks may
 * hydrate), in two cases, told by cachestat (which reads nothing in;
 * pm_pair__read_cached):
 *  - all of it is in the page cache (a hot read of at most KEEP_HOT_MAX:
 *    nbdcopy's 256 KiB reads too, which read 1 GiB 1.4x faster than when
 *    each was handed to the pool): the reader reads it at
 *    once, without waiting (RWF_NOWAIT, into w: r->have_data).  Such a
 *    read is a copy from memory, shorter than handing the socket to
 *    another thread, whose wake-up and the lock's hand-over cost more CPU
 *    than the read; the reader then goes through a burst of such requests
 *    alone, without a context switch.  With four connections on this
 *    2-vCPU VM those switches were half the server's CPU per request, and
 *    the throughput swung by 2x from run to run (docs/nbd.md).
 *  - none of it is (a cold read of at most KEEP_MAX), while nothing else
 *    waits to be read (no other request in the receive buffer, none on
 *    the socket, over TLS no record GnuTLS has read) or is being carried
 *    out: a client at queue depth 1.  The next request can then wait at most this one read; in
 *    exchange no other thread has to be woken to take the socket over,
 *    which on this VM cost a cold 4 KiB read about 30 us.  A deeper
 *    client's cold reads go to the pool, which reads them in parallel.
 * Anything else (partly cached data, writes, flushes, a read during a
 * restore or from a remote store) is carried out after the lock is given
 * up, so a slow request holds up only its own thread.  0: give it up. */
enum { KEEP_HOT = 1, KEEP_COLD = 2 };
static int keep_receiving(pm_nbd_conn *c, struct worker *w, struct req *r)
{
    if (r->type != NBD_CMD_READ || r->length == 0 || r->length > KEEP_HOT_MAX || pm_load_relaxed(&c->stopping) ||
        grow(w, r->length) < 0)
        return 0;
    pm_pair *p = pair_get(c);
    if (p == NULL)
        return 0;
    int rc = pm_pair__read_cached(p, c->side, w->buf, r->length, r->offset);
    pair_put(c);
    if (rc == PM__READ_DONE) {
        r->have_data = 1;
        return KEEP_HOT;
    }
    if (rc != PM__READ_COLD || r->length > KEEP_MAX || c->rend > c->rpos || pm_load_relaxed(&c->inflight) > 1 ||
        (c->tls != NULL && pm_tls_pending(c->tls) > 0))
        return 0;
    int waiting = 0;
    return ioctl(c->fd, FIONREAD, &waiting) == 0 && waiting == 0 ? KEEP_COLD : 0;
}

static void *worker_main(void *arg);

/* A thread took a request and none is left to read the next: start one. */
static void maybe_spawn(pm_nbd_conn *c)
{
    pthread_mutex_lock(&c->mu);
    if (!pm_load_relaxed(&c->closing) && pm_load_relaxed(&c->readers) == 0 &&
        (uint32_t)c->nspawned + 1 < c->max_threads) {
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 << 10);
        if (pthread_create(&c->threads[c->nspawned], &a, worker_main, c) == 0)
            c->nspawned++;
        pthread_attr_destroy(&a);
    }
    pthread_mutex_unlock(&c->mu);
}

static void serve(pm_nbd_conn *c)
{
    struct worker w = { NULL, 0 };
    struct req r;
    for (;;) {
        pm_fetch_add(&c->readers, 1);
        pthread_mutex_lock(&c->recv_mu);
    next:
        if (pm_load_acquire(&c->closing)) {
            flush_replies(c);
            pm_fetch_sub(&c->readers, 1);
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        int ok = read_request(c, &w, &r);
        if (!ok) {
            flush_replies(c);
            pm_store_seqcst(&c->closing, 1);
            pm_fetch_sub(&c->readers, 1);
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        pm_fetch_add(&c->inflight, 1);
        int keep = r.streamed ? 0 : keep_receiving(c, &w, &r);
        if (keep != KEEP_HOT)
            flush_replies(c);
        if (keep) {
            /* still counted as a reader, and the lock is not given up in
             * between: an unlock would wake a thread waiting for it only
             * for that thread to find it taken again and sleep (a wake-up
             * per request, which took the CPU the client needed) */
            c->last_kept = keep == KEEP_COLD;
            execute(c, &w, &r);
            pm_fetch_sub(&c->inflight, 1);
            if (!more_ready(c))
                flush_replies(c);
            goto next;
        }
        c->last_kept = 0;
        if (pm_fetch_sub(&c->readers, 1) == 1)
            maybe_spawn(c);
        if (r.streamed) {
            ok = execute(c, &w, &r);
            pm_fetch_sub(&c->inflight, 1);
            if (!ok)
                pm_store_seqcst(&c->closing, 1);
            pthread_mutex_unlock(&c->recv_mu);
            if (!ok)
                break;
            continue;
        }
        pthread_mutex_unlock(&c->recv_mu);
        execute(c, &w, &r);
        pm_fetch_sub(&c->inflight, 1);
        /* keep at most one piece between requests */
        if (w.cap > PM_NBD_PIECE) {
            free(w.buf);
            w.buf = NULL;
            w.cap = 0;
        }
    }
    free(w.buf);
}

static void *worker_main(void *arg)
{
    serve(arg);
    return NULL;
}

int pm_nbd_conn_run(pm_nbd_conn *c)
{
    serve(c);
    /* every thread started before the last one ended is joined; an ended
     * thread starts no other, so the list cannot grow once all are joined */
    for (int i = 0;; i++) {
        pthread_mutex_lock(&c->mu);
        if (i >= c->nspawned) {
            pthread_mutex_unlock(&c->mu);
            break;
        }
        pthread_t t = c->threads[i];
        pthread_mutex_unlock(&c->mu);
        pthread_join(t, NULL);
    }
    return pm_load_relaxed(&c->start_error);
}
