/*
 * store_nbd.c - a volume on an NBD server, through libnbd loaded at run
 * time (dlopen), so neither the wheel nor libpymirror needs libnbd to load.
 *
 * Layer 2 (with table.c, store_volatile.c): may call store.c (1) and
 * store_uri.c, errors.c, clock.c (0).  It builds its store with
 * pm_store_create_ops, so the checks of store.c (bounds, read-only,
 * injected faults) apply to it as to any store.
 *
 * Connections: a small pool.  Each I/O borrows one connection for itself,
 * splits its range into pieces and keeps up to `qd` of them in flight on it
 * (nbd_aio_pread/pwrite/zero, completion callbacks, nbd_poll from the same
 * thread), then returns it.  So the copier stays synchronous per thread,
 * yet a 4 MiB batch travels as several requests at once, and each copier or
 * host thread has its own connection when the server allows more than one
 * (CAN_MULTI_CONN: then a flush on one connection covers the writes of all;
 * without it the pool has one connection, shared in turn).
 *
 * Failures: a command the server fails (EIO, ENOSPC) fails that I/O only.
 * A connection that breaks (the server went away) or stays silent past the
 * timeout is closed; the next I/O connects again, so `resume` after the
 * server is back needs nothing else.  Commands in flight on a connection
 * that broke are reported failed: no write is counted as done unless the
 * server acknowledged it.
 */
#include <dlfcn.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store.h"
#include "store_uri.h"

/* ---- libnbd, as much of its ABI as we use (libnbd.h is not needed) ------ */

struct nbd_handle;
typedef struct {
    int (*callback)(void *user_data, int *error);
    void *user_data;
    void (*free)(void *user_data);
} nbd_completion_callback;
typedef struct {
    int (*callback)(void *user_data, const char *metacontext, uint64_t offset, uint32_t *entries,
                    size_t nr_entries, int *error);
    void *user_data;
    void (*free)(void *user_data);
} nbd_extent_callback;

#define NBD_CMD_FLAG_NO_HOLE 2u
#define NBD_SIZE_MAXIMUM 2
#define NBD_STATE_HOLE 1u
#define NBD_STATE_ZERO 2u
#define BASE_ALLOCATION "base:allocation"

struct nbd_lib {
    struct nbd_handle *(*create)(void);
    void (*close)(struct nbd_handle *);
    const char *(*get_error)(void);
    int (*get_errno)(void);
    int (*aio_connect_uri)(struct nbd_handle *, const char *);
    int (*aio_is_ready)(struct nbd_handle *);
    int64_t (*get_size)(struct nbd_handle *);
    int (*is_read_only)(struct nbd_handle *);
    int (*can_flush)(struct nbd_handle *);
    int (*can_zero)(struct nbd_handle *);
    int (*can_multi_conn)(struct nbd_handle *);
    char *(*get_export_name)(struct nbd_handle *);
    int64_t (*get_block_size)(struct nbd_handle *, int);
    int64_t (*aio_pread)(struct nbd_handle *, void *, size_t, uint64_t, nbd_completion_callback, uint32_t);
    int64_t (*aio_pwrite)(struct nbd_handle *, const void *, size_t, uint64_t, nbd_completion_callback,
                          uint32_t);
    int64_t (*aio_zero)(struct nbd_handle *, uint64_t, uint64_t, nbd_completion_callback, uint32_t);
    int64_t (*aio_flush)(struct nbd_handle *, nbd_completion_callback, uint32_t);
    int (*poll)(struct nbd_handle *, int);
    int (*aio_is_dead)(struct nbd_handle *);
    int (*aio_is_closed)(struct nbd_handle *);
    int (*aio_get_fd)(struct nbd_handle *);
    int (*add_meta_context)(struct nbd_handle *, const char *);
    int (*can_meta_context)(struct nbd_handle *, const char *);
    int64_t (*aio_block_status)(struct nbd_handle *, uint64_t, uint64_t, nbd_extent_callback,
                                nbd_completion_callback, uint32_t);
};

static struct nbd_lib nbd;
static int nbd_loaded;
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

#define DEFAULT_SONAME "libnbd.so.0"

/* Load libnbd once (a failed load is tried again next time).  The
 * environment variable PYMIRROR_LIBNBD names another file to load (tests
 * use it to see the missing-library error). */
static int load_libnbd(void)
{
    pthread_mutex_lock(&load_lock);
    if (nbd_loaded) {
        pthread_mutex_unlock(&load_lock);
        return 0;
    }
    const char *name = getenv("PYMIRROR_LIBNBD");
    if (name == NULL || name[0] == 0)
        name = DEFAULT_SONAME;
    void *dl = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (dl == NULL) {
        const char *why = dlerror();
        pthread_mutex_unlock(&load_lock);
        return PM_FAIL(PM_E_NOLIB, "NBD volumes need libnbd, which cannot be loaded (%s): install the "
                       "Debian package libnbd0", why ? why : name);
    }
    struct { const char *sym; void **slot; } syms[] = {
#define SYM(f) { "nbd_" #f, (void **)&nbd.f }
        SYM(create), SYM(close), SYM(get_error), SYM(get_errno), SYM(aio_connect_uri), SYM(aio_is_ready),
        SYM(get_size),
        SYM(is_read_only), SYM(can_flush), SYM(can_zero), SYM(can_multi_conn), SYM(get_export_name),
        SYM(get_block_size), SYM(aio_pread), SYM(aio_pwrite), SYM(aio_zero), SYM(aio_flush), SYM(poll),
        SYM(aio_is_dead), SYM(aio_is_closed), SYM(aio_get_fd),
        SYM(add_meta_context), SYM(can_meta_context), SYM(aio_block_status),
#undef SYM
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(dl, syms[i].sym);
        if (*syms[i].slot == NULL) {
            dlclose(dl);
            pthread_mutex_unlock(&load_lock);
            return PM_FAIL(PM_E_NOLIB, "the libnbd found (%s) lacks %s: install the Debian package libnbd0 "
                           "(version 1.14 or later)", name, syms[i].sym);
        }
    }
    nbd_loaded = 1;                      /* dl stays open for the process */
    pthread_mutex_unlock(&load_lock);
    return 0;
}

/* ---- the store ----------------------------------------------------------- */

#define MAX_CONNS 16
#define MAX_QD 64
#define MIN_PIECE (64u << 10)      /* smaller pieces cost more round trips than they save */
#define POLL_SLICE_MS 1000
#define EXTRA_CONN_TIMEOUT_MS 2000u

enum { DEFAULT_QD = 8, DEFAULT_CONNS = 4, DEFAULT_TIMEOUT_S = 30 };

struct conn {
    struct nbd_handle *h;          /* NULL: not connected (yet, or since it broke) */
    int busy;                      /* borrowed by an I/O */
};

struct nbd_store {
    char *uri;                     /* as libnbd takes it: pymirror's parameters removed */
    char *label;                   /* the URI as given, for messages */
    char *export_name;
    uint64_t size;
    uint32_t qd, cap;              /* requests in flight per I/O; connections at most now */
    uint32_t max_conns;            /* ... and when the server takes them all */
    uint32_t timeout_ms;           /* 0: wait for the server forever */
    uint64_t max_piece;            /* the server's largest request */
    int readonly, can_flush, can_zero, can_extents;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct conn conns[MAX_CONNS];
};

/* libnbd's message for the last failing call of this thread, and an errno. */
static int lib_error(int fallback)
{
    int e = nbd.get_errno();
    return -(e > 0 ? e : fallback);
}

static const char *lib_message(void)
{
    const char *m = nbd.get_error();
    return m ? m : "unknown libnbd error";
}

/* A new connection for this store, its handshake given timeout_ms (0:
 * forever): a server that takes no more clients leaves a connection
 * hanging in the handshake (qemu-nbd -e N), and that must not hang an I/O.
 * Checks that it is the same export. */
static int connect_once(struct nbd_store *s, uint32_t timeout_ms, struct nbd_handle **out);

static int connect_one(struct nbd_store *s, uint32_t timeout_ms, struct nbd_handle **out)
{
    /* a server that has just been resumed or restarted may reset the first
     * connection it sees in the handshake: one more try after a moment */
    int rc = connect_once(s, timeout_ms, out);
    if (rc == -ECONNRESET || rc == -EPIPE) {
        pm_sleep(0.1);
        rc = connect_once(s, timeout_ms, out);
    }
    return rc;
}

static int connect_once(struct nbd_store *s, uint32_t timeout_ms, struct nbd_handle **out)
{
    struct nbd_handle *h = nbd.create();
    if (h == NULL)
        return PM_FAIL(lib_error(ENOMEM), "%s: %s", s->label, lib_message());
    double t0 = pm_now();
    int rc = 0;
    (void)nbd.add_meta_context(h, BASE_ALLOCATION);   /* holes and zeroes, if the server tells them */
    if (nbd.aio_connect_uri(h, s->uri) == -1)
        rc = PM_FAIL(lib_error(ECONNREFUSED), "%s: cannot connect: %s", s->label, lib_message());
    while (rc == 0 && nbd.aio_is_ready(h) != 1) {
        if (nbd.aio_is_dead(h) == 1 || nbd.aio_is_closed(h) == 1 || nbd.poll(h, 100) == -1)
            rc = PM_FAIL(lib_error(ECONNREFUSED), "%s: cannot connect: %s", s->label, lib_message());
        else if (timeout_ms && (pm_now() - t0) * 1000 >= timeout_ms)
            rc = PM_FAIL(-ETIMEDOUT, "%s: the server did not complete the handshake within %.1f s", s->label,
                         timeout_ms / 1000.0);
    }
    if (rc < 0) {
        nbd.close(h);
        return rc;
    }
    int64_t size = nbd.get_size(h);
    if (size < 0 || (s->size && (uint64_t)size != s->size)) {
        rc = size < 0 ? PM_FAIL(lib_error(EIO), "%s: %s", s->label, lib_message())
                     : PM_FAIL(PM_E_GEOMETRY, "%s: the export is now %lld bytes, it was %llu", s->label,
                                    (long long)size, (unsigned long long)s->size);
        nbd.close(h);
        return rc;
    }
    *out = h;
    return 0;
}

/* An idle connection has nothing to read (NBD servers send only replies):
 * readable means the server closed it, or died, while it was idle. */
static int idle_alive(struct nbd_handle *h)
{
    int fd = nbd.aio_get_fd(h);
    if (fd < 0)
        return 0;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    return poll(&p, 1, 0) == 0;
}

/* Borrow a connection: a free one (checked alive), else a new one (up to
 * the cap), else wait for one.  A new connection that the server refuses
 * while others are open lowers the cap to those (a server that takes fewer
 * clients); a reconnect after every connection was lost raises it again. */
static int borrow(struct nbd_store *s, struct conn **out)
{
    pthread_mutex_lock(&s->mu);
    for (;;) {
        struct conn *pick = NULL, *empty = NULL;
        uint32_t open = 0;
        for (uint32_t i = 0; i < s->cap; i++) {
            struct conn *c = &s->conns[i];
            if (c->h != NULL)
                open++;
            if (c->busy)
                continue;
            if (c->h != NULL && pick == NULL)
                pick = c;
            else if (c->h == NULL && empty == NULL)
                empty = c;
        }
        if (pick == NULL)
            pick = empty;
        if (pick == NULL) {
            pthread_cond_wait(&s->cv, &s->mu);
            continue;
        }
        pick->busy = 1;
        struct nbd_handle *stale = pick->h;
        pthread_mutex_unlock(&s->mu);
        if (stale != NULL && idle_alive(stale)) {
            *out = pick;
            return 0;
        }
        if (stale != NULL) {               /* closed by the server while idle: connect again */
            nbd.close(stale);
            pthread_mutex_lock(&s->mu);
            pick->h = NULL;
            open--;
            pthread_mutex_unlock(&s->mu);
        }
        struct nbd_handle *h = NULL;
        /* an extra connection gets a short handshake: see connect_one */
        int rc = connect_one(s, open ? EXTRA_CONN_TIMEOUT_MS : s->timeout_ms, &h);
        pthread_mutex_lock(&s->mu);
        if (rc == 0) {
            pick->h = h;
            if (open == 0)
                s->cap = s->max_conns;
            pthread_mutex_unlock(&s->mu);
            *out = pick;
            return 0;
        }
        pick->busy = 0;
        pthread_cond_broadcast(&s->cv);
        if (open == 0 || stale != NULL) {  /* the server is not there: fail this I/O */
            pthread_mutex_unlock(&s->mu);
            return rc;
        }
        s->cap = open;                     /* it takes no more clients: share those */
    }
}

/* Give a connection back; a broken one is closed (the next borrower
 * connects again). */
static void give_back(struct nbd_store *s, struct conn *c, int broken)
{
    struct nbd_handle *dead = NULL;
    pthread_mutex_lock(&s->mu);
    if (broken) {
        dead = c->h;
        c->h = NULL;
    }
    c->busy = 0;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (dead != NULL)
        nbd.close(dead);
}

/* ---- one I/O as several requests in flight ------------------------------- */

enum { OP_READ, OP_WRITE, OP_ZERO, OP_FLUSH, OP_EXTENTS };
static const char *const op_names[] = { "read", "write", "write of zeroes", "flush", "block status query" };

/* Extents being gathered (OP_EXTENTS). */
struct ext_out {
    struct pm_extent *out;
    uint64_t max, n, end;
};

struct flight {
    uint32_t inflight;
    int error;                     /* the first failed request's errno, or 0 */
    struct ext_out *ext;
};

/* base:allocation entries (length, flags) from `offset`.  A hole that is not
 * also flagged zero may read as anything (NBD): it counts as data. */
static int got_extents(void *user, const char *context, uint64_t offset, uint32_t *entries, size_t nr,
                       int *error)
{
    struct ext_out *e = user;
    if (strcmp(context, BASE_ALLOCATION) != 0)
        return 0;
    uint64_t pos = offset;
    for (size_t i = 0; i + 1 < nr && pos < e->end; i += 2) {
        uint64_t len = entries[i];
        if (len == 0)
            break;
        if (len > e->end - pos)
            len = e->end - pos;
        uint32_t fl = entries[i + 1];
        uint32_t kind = !(fl & NBD_STATE_ZERO) ? PM_EXTENT_DATA : (fl & NBD_STATE_HOLE) ? PM_EXTENT_HOLE
                                                                                        : PM_EXTENT_ZERO;
        struct pm_extent *last = e->n ? &e->out[e->n - 1] : NULL;
        if (last && last->kind == kind && last->offset + last->length == pos)
            last->length += len;
        else if (e->n < e->max)
            e->out[e->n++] = (struct pm_extent){ pos, len, kind, 0 };
        else
            break;
        pos += len;
    }
    return 0;
}

static int piece_done(void *user, int *error)
{
    struct flight *f = user;
    if (*error != 0 && f->error == 0)
        f->error = *error;
    f->inflight--;
    return 1;                      /* retire the command */
}

static int64_t issue(struct nbd_handle *h, int op, unsigned char *buf, uint64_t len, uint64_t off,
                     uint32_t flags, struct flight *f)
{
    nbd_completion_callback cb = { .callback = piece_done, .user_data = f, .free = NULL };
    switch (op) {
    case OP_READ: return nbd.aio_pread(h, buf, (size_t)len, off, cb, 0);
    case OP_WRITE: return nbd.aio_pwrite(h, buf, (size_t)len, off, cb, 0);
    case OP_ZERO: return nbd.aio_zero(h, len, off, cb, flags);
    case OP_EXTENTS: {
        nbd_extent_callback ecb = { .callback = got_extents, .user_data = f->ext, .free = NULL };
        return nbd.aio_block_status(h, len, off, ecb, cb, 0);
    }
    default: return nbd.aio_flush(h, cb, 0);
    }
}

/* [off, off+len) as pieces of up to `piece` bytes, up to qd in flight on
 * one connection; returns when none is in flight any more, or when the
 * connection broke (*broken: the caller closes it, which retires the rest
 * while f is still alive). */
static int run_pieces(struct nbd_store *s, struct nbd_handle *h, int op, unsigned char *buf, uint64_t len,
                      uint64_t off, uint32_t flags, uint64_t piece, struct flight *f, int *broken)
{
    uint64_t pos = 0;
    int rc = 0, flush_left = op == OP_FLUSH;
    double quiet_since = pm_now();
    for (;;) {
        while (rc == 0 && f->error == 0 && f->inflight < s->qd && (pos < len || flush_left)) {
            uint64_t n = op == OP_FLUSH ? 0 : (len - pos < piece ? len - pos : piece);
            f->inflight++;
            if (issue(h, op, buf ? buf + pos : NULL, n, off + pos, flags, f) == -1) {
                f->inflight--;
                *broken = nbd.aio_is_dead(h) || nbd.aio_is_closed(h);
                rc = PM_FAIL(*broken ? -ENOTCONN : lib_error(EIO), "%s: %s of %llu bytes at %llu failed: %s",
                             s->label, op_names[op], (unsigned long long)n, (unsigned long long)(off + pos),
                             lib_message());
                break;
            }
            pos += n;
            flush_left = 0;
        }
        if (f->inflight == 0 || *broken)
            break;
        int p = nbd.poll(h, POLL_SLICE_MS);
        if (p == -1 || nbd.aio_is_dead(h) || nbd.aio_is_closed(h)) {
            if (rc == 0)
                rc = PM_FAIL(-ENOTCONN, "%s: the connection to the server broke during a %s at %llu: %s",
                             s->label, op_names[op], (unsigned long long)off,
                             p == -1 ? lib_message() : "closed by the server");
            *broken = 1;
            break;
        }
        if (p > 0) {
            quiet_since = pm_now();        /* progress: the timeout counts silence only */
        } else if (s->timeout_ms && (pm_now() - quiet_since) * 1000 >= s->timeout_ms) {
            rc = PM_FAIL(-ETIMEDOUT, "%s: the server did not answer a %s at %llu within %u s", s->label,
                         op_names[op], (unsigned long long)off, s->timeout_ms / 1000);
            *broken = 1;
            break;
        }
    }
    /* the connection may have died inside a call that issued a request */
    if (!*broken && (nbd.aio_is_dead(h) || nbd.aio_is_closed(h)))
        *broken = 1;
    if (rc == 0 && f->error != 0)
        rc = *broken ? PM_FAIL(-f->error, "%s: the connection to the server broke during a %s at %llu: %s",
                               s->label, op_names[op], (unsigned long long)off, strerror(f->error))
                     : PM_FAIL(-f->error, "%s: the server failed a %s at %llu (%llu bytes): %s", s->label,
                               op_names[op], (unsigned long long)off, (unsigned long long)len, strerror(f->error));
    return rc;
}

static int do_io(struct nbd_store *s, int op, void *buf, uint64_t len, uint64_t off, uint32_t flags,
                 struct ext_out *ext)
{
    struct conn *c = NULL;
    int rc = borrow(s, &c);
    if (rc < 0)
        return rc;
    uint64_t piece;
    if (op == OP_ZERO) {
        piece = (uint64_t)1 << 30;         /* no data moves: big requests */
    } else if (op == OP_EXTENTS) {
        len = piece = len < ((uint64_t)1 << 30) ? len : (uint64_t)1 << 30;   /* one query: a prefix is enough */
    } else {
        piece = (len + s->qd - 1) / s->qd;
        piece = (piece + 4095) & ~(uint64_t)4095;
        if (piece < MIN_PIECE)
            piece = MIN_PIECE;
        if (piece > s->max_piece)
            piece = s->max_piece;
    }
    struct flight f = { 0, 0, ext };
    int broken = 0;
    rc = run_pieces(s, c->h, op, buf, len, off, flags, piece, &f, &broken);
    give_back(s, c, broken);               /* a broken handle closes here, f still alive */
    return rc;
}

static int nbd_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    return do_io(ctx, OP_READ, buf, len, off, 0, NULL);
}

static int nbd_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    return do_io(ctx, OP_WRITE, (void *)buf, len, off, 0, NULL);
}

static int nbd_flush(void *ctx)
{
    struct nbd_store *s = ctx;
    if (s->readonly || !s->can_flush)
        return 0;       /* a server without flush offers no more durability than its replies */
    return do_io(s, OP_FLUSH, NULL, 0, 0, 0, NULL);
}

static int nbd_write_zeroes(void *ctx, uint64_t len, uint64_t off, unsigned flags)
{
    struct nbd_store *s = ctx;
    if (!s->can_zero)
        return -EOPNOTSUPP;
    return do_io(s, OP_ZERO, NULL, len, off, (flags & PM_ZERO_PUNCH) ? 0 : NBD_CMD_FLAG_NO_HOLE, NULL);
}

/* Holes and zeroes from NBD_CMD_BLOCK_STATUS (base:allocation), when the
 * server offers it; else the caller counts everything as data. */
static int64_t nbd_extents(void *ctx, uint64_t off, uint64_t len, struct pm_extent *out, uint64_t max)
{
    struct nbd_store *s = ctx;
    if (!s->can_extents)
        return -EOPNOTSUPP;
    struct ext_out e = { out, max, 0, off + len };
    int rc = do_io(s, OP_EXTENTS, NULL, len, off, 0, &e);
    return rc < 0 ? rc : (int64_t)e.n;
}

static int nbd_identity(void *ctx, char *buf, size_t len)
{
    struct nbd_store *s = ctx;
    /* the export's name and size, and where it is served: two servers
     * exporting "" of one size are two volumes */
    const char *q = strchr(s->uri, '?');
    const char *at = strstr(s->uri, "://");
    char where[200] = "";
    if (at != NULL) {
        const char *host = at + 3, *slash = strchr(host, '/');
        size_t n = slash ? (size_t)(slash - host) : strlen(host);
        if (n >= sizeof where)
            n = sizeof where - 1;
        memcpy(where, host, n);
        where[n] = 0;
    }
    const char *sock = q ? strstr(q, "socket=") : NULL;
    if (sock != NULL) {
        size_t n = strcspn(sock + 7, "&#");
        if (n >= sizeof where)
            n = sizeof where - 1;
        memcpy(where, sock + 7, n);
        where[n] = 0;
    }
    snprintf(buf, len, "nbd:%s:%llu@%s", s->export_name, (unsigned long long)s->size, where);
    return 0;
}

static void free_store(struct nbd_store *s)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (s->conns[i].h != NULL)
            nbd.close(s->conns[i].h);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->uri);
    free(s->label);
    free(s->export_name);
    free(s);
}

static void nbd_store_close(void *ctx)
{
    free_store(ctx);
}

static const struct pm_store_ops nbd_ops = {
    .size = sizeof(struct pm_store_ops),
    .read = nbd_read, .write = nbd_write, .flush = nbd_flush, .close = nbd_store_close,
    .write_zeroes = nbd_write_zeroes, .extents = nbd_extents, .identity = nbd_identity,
};

/* ---- opening ------------------------------------------------------------- */

int pm_store_open_nbd(const char *uri, unsigned flags, pm_store **out)
{
    if (out == NULL || uri == NULL)
        return PM_FAIL(-EINVAL, "uri and out must not be NULL");
    *out = NULL;
    if (flags & ~(unsigned)(PM_STORE_READONLY | PM_STORE_NOLOCK))
        return PM_FAIL(-EINVAL, "flags 0x%x: only PM_STORE_READONLY and PM_STORE_NOLOCK apply to NBD", flags);
    if (strncmp(uri, "nbd", 3) != 0 || strstr(uri, "://") == NULL)
        return PM_FAIL(-EINVAL, "%s: not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                       "nbd+unix:///EXPORT?socket=PATH)", uri);
    int rc = load_libnbd();
    if (rc < 0)
        return rc;
    struct nbd_store *s = calloc(1, sizeof *s);
    if (s == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->uri = strdup(uri);
    s->label = strdup(uri);
    if (s->uri == NULL || s->label == NULL) {
        free_store(s);
        return PM_FAIL(-ENOMEM, "out of memory");
    }
    uint64_t qd = DEFAULT_QD, conns = DEFAULT_CONNS, timeout = DEFAULT_TIMEOUT_S;
    if ((rc = pm__uri_take_uint(s->uri, "qd", 1, MAX_QD, &qd)) < 0 ||
        (rc = pm__uri_take_uint(s->uri, "conns", 1, MAX_CONNS, &conns)) < 0 ||
        (rc = pm__uri_take_uint(s->uri, "timeout", 0, 86400, &timeout)) < 0) {
        free_store(s);
        return rc;
    }
    s->qd = (uint32_t)qd;
    s->timeout_ms = (uint32_t)timeout * 1000u;
    s->cap = 1;
    struct nbd_handle *h = NULL;
    if ((rc = connect_one(s, s->timeout_ms, &h)) < 0) {
        free_store(s);
        return rc;
    }
    s->conns[0].h = h;
    int64_t size = nbd.get_size(h);
    s->size = (uint64_t)size;
    s->readonly = (flags & PM_STORE_READONLY) != 0;
    if (!s->readonly && nbd.is_read_only(h) == 1) {
        free_store(s);
        return PM_FAIL(-EROFS, "%s: the server exports it read-only", uri);
    }
    if (size == 0) {
        free_store(s);
        return PM_FAIL(PM_E_GEOMETRY, "%s: the export is empty (0 bytes)", uri);
    }
    s->can_flush = nbd.can_flush(h) == 1;
    s->can_zero = nbd.can_zero(h) == 1;
    s->can_extents = nbd.can_meta_context(h, BASE_ALLOCATION) == 1;
    s->max_conns = s->cap = nbd.can_multi_conn(h) == 1 ? (uint32_t)conns : 1;
    int64_t maxb = nbd.get_block_size(h, NBD_SIZE_MAXIMUM);
    s->max_piece = maxb >= 4096 && maxb < (32 << 20) ? (uint64_t)maxb & ~(uint64_t)4095 : (32u << 20);
    char *name = nbd.get_export_name(h);
    s->export_name = strdup(name ? name : "");
    free(name);
    if (s->export_name == NULL) {
        free_store(s);
        return PM_FAIL(-ENOMEM, "out of memory");
    }
    rc = pm_store_create_ops(&nbd_ops, s, s->size, uri, flags, out);
    if (rc < 0) {
        free_store(s);
        return rc;
    }
    return 0;
}
