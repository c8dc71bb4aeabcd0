/*
 * store_rbd.c - volumes in a Ceph RBD image, over librbd and librados
 * loaded at run time (dlopen), so neither the wheel nor libpymirror.so has
 * a link-time dependency on Ceph.
 *
 * Layer 2 (with table.c, store_volatile.c): may call store.c (1) and the
 * layer-0 helpers.  It builds its store with pm_store_create_ops, as a
 * caller's store: bounds, read-only checks and injected faults stay in
 * store.c.
 *
 * Queue depth.  The copier stays synchronous per thread: one call to read
 * or write carries a whole batch (4 MiB by default).  Inside the call the
 * batch is cut into up to `qd` pieces, each sent as one asynchronous librbd
 * request (rbd_aio_read / rbd_aio_write with a completion), and the call
 * returns when all of them have completed; the first error wins.  So
 * copiers x qd requests are in flight, where `rbd cp` keeps its own 10.
 *
 * Durability.  The image is opened with librbd's cache off: a write
 * completes when the OSDs have it, and flush (rbd_flush) orders nothing
 * more than that, which keeps the commit protocol's rule ("a flush of the
 * data store makes what was written durable") true and simple.
 *
 * Stalls.  librbd waits for an unavailable OSD forever by default.  The
 * store sets rados_osd_op_timeout, rados_mon_op_timeout and
 * client_mount_timeout (the `timeout` of the config; without it, what
 * ceph.conf sets, or 30 s where that would be "forever"),
 * so a stalled OSD fails the request with -ETIMEDOUT: the copier retries,
 * then pauses the job with the error and its track.
 *
 * Reconnecting.  After a timeout the cluster handle is kept: librados's
 * messenger reconnects to OSDs by itself, and a request that timed out but
 * reached a stalled OSD sits ahead of any later one on the same connection,
 * so it cannot land on top of a later write to the same object.  When the
 * client itself is unusable (blocklisted: -ESHUTDOWN, or -ENOTCONN), the
 * store is marked broken and the next I/O reconnects: it blocklists the
 * old client instance first (best effort: a fenced client cannot land a
 * late write), then builds a new cluster handle, I/O context and image.
 * I/O holds conn_lock shared; the reconnect holds it exclusive.
 *
 * Volumes of one process in the same cluster share one cluster handle
 * ("connections, shared" below).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ---- librbd and librados, loaded at run time ----------------------------- */

typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);

static struct {
    int (*create2)(rados_t *, const char *, const char *, uint64_t);
    int (*conf_read_file)(rados_t, const char *);
    int (*conf_parse_env)(rados_t, const char *);
    int (*conf_set)(rados_t, const char *, const char *);
    int (*conf_get)(rados_t, const char *, char *, size_t);
    int (*connect)(rados_t);
    void (*shutdown)(rados_t);
    int (*ioctx_create)(rados_t, const char *, rados_ioctx_t *);
    void (*ioctx_destroy)(rados_ioctx_t);
    int (*getaddrs)(rados_t, char **);                          /* optional */
    int (*blocklist_add)(rados_t, char *, uint32_t);             /* optional */
    int (*wait_for_latest_osdmap)(rados_t);                      /* optional */
    int (*open)(rados_ioctx_t, const char *, rbd_image_t *, const char *);
    int (*open_read_only)(rados_ioctx_t, const char *, rbd_image_t *, const char *);
    int (*close)(rbd_image_t);
    int (*get_size)(rbd_image_t, uint64_t *);
    int (*get_id)(rbd_image_t, char *, size_t);
    int (*create)(rados_ioctx_t, const char *, uint64_t, int *);
    int (*aio_create_completion)(void *, rbd_callback_t, rbd_completion_t *);
    int (*aio_read)(rbd_image_t, uint64_t, size_t, char *, rbd_completion_t);
    int (*aio_write)(rbd_image_t, uint64_t, size_t, const char *, rbd_completion_t);
    int (*aio_write_zeroes)(rbd_image_t, uint64_t, size_t, rbd_completion_t, int, int);  /* optional */
    int (*aio_wait_for_complete)(rbd_completion_t);
    ssize_t (*aio_get_return_value)(rbd_completion_t);
    void (*aio_release)(rbd_completion_t);
    int (*flush)(rbd_image_t);
    int (*diff_iterate2)(rbd_image_t, const char *, uint64_t, uint64_t, uint8_t, uint8_t,
                         int (*)(uint64_t, size_t, int, void *), void *);   /* optional */
} R;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static int load_rc;
static char load_msg[400];

static void *sym(void *h, const char *name, int required)
{
    void *p = dlsym(h, name);
    if (p == NULL && required && load_rc == 0) {
        load_rc = PM_E_NOLIB;
        snprintf(load_msg, sizeof load_msg, "librbd/librados lack %s: install a newer Debian package librbd1", name);
    }
    return p;
}

/* PYMIRROR_LIBRBD / PYMIRROR_LIBRADOS name other files (a private Ceph
 * build, or a missing one in tests of this error). */
static void load(void)
{
    const char *rbd_name = getenv("PYMIRROR_LIBRBD");
    const char *rados_name = getenv("PYMIRROR_LIBRADOS");
    if (rbd_name == NULL || rbd_name[0] == 0)
        rbd_name = "librbd.so.1";
    if (rados_name == NULL || rados_name[0] == 0)
        rados_name = "librados.so.2";
    void *hr = dlopen(rados_name, RTLD_NOW | RTLD_LOCAL);
    void *hb = hr ? dlopen(rbd_name, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (hr == NULL || hb == NULL) {
        load_rc = PM_E_NOLIB;
        const char *why = dlerror();
        snprintf(load_msg, sizeof load_msg, "RBD volumes need librbd, which cannot be loaded (%s): "
                 "install the Debian package librbd1", why ? why : rbd_name);
        if (hr != NULL)
            dlclose(hr);
        return;
    }
    R.create2 = (int (*)(rados_t *, const char *, const char *, uint64_t))sym(hr, "rados_create2", 1);
    R.conf_read_file = (int (*)(rados_t, const char *))sym(hr, "rados_conf_read_file", 1);
    R.conf_parse_env = (int (*)(rados_t, const char *))sym(hr, "rados_conf_parse_env", 1);
    R.conf_set = (int (*)(rados_t, const char *, const char *))sym(hr, "rados_conf_set", 1);
    R.conf_get = (int (*)(rados_t, const char *, char *, size_t))sym(hr, "rados_conf_get", 1);
    R.connect = (int (*)(rados_t))sym(hr, "rados_connect", 1);
    R.shutdown = (void (*)(rados_t))sym(hr, "rados_shutdown", 1);
    R.ioctx_create = (int (*)(rados_t, const char *, rados_ioctx_t *))sym(hr, "rados_ioctx_create", 1);
    R.ioctx_destroy = (void (*)(rados_ioctx_t))sym(hr, "rados_ioctx_destroy", 1);
    R.getaddrs = (int (*)(rados_t, char **))sym(hr, "rados_getaddrs", 0);
    R.blocklist_add = (int (*)(rados_t, char *, uint32_t))sym(hr, "rados_blocklist_add", 0);
    if (R.blocklist_add == NULL)   /* before Pacific */
        R.blocklist_add = (int (*)(rados_t, char *, uint32_t))sym(hr, "rados_blacklist_add", 0);
    R.wait_for_latest_osdmap = (int (*)(rados_t))sym(hr, "rados_wait_for_latest_osdmap", 0);
    R.open = (int (*)(rados_ioctx_t, const char *, rbd_image_t *, const char *))sym(hb, "rbd_open", 1);
    R.open_read_only = (int (*)(rados_ioctx_t, const char *, rbd_image_t *, const char *))sym(hb, "rbd_open_read_only", 1);
    R.close = (int (*)(rbd_image_t))sym(hb, "rbd_close", 1);
    R.get_size = (int (*)(rbd_image_t, uint64_t *))sym(hb, "rbd_get_size", 1);
    R.get_id = (int (*)(rbd_image_t, char *, size_t))sym(hb, "rbd_get_id", 1);
    R.create = (int (*)(rados_ioctx_t, const char *, uint64_t, int *))sym(hb, "rbd_create", 1);
    R.aio_create_completion = (int (*)(void *, rbd_callback_t, rbd_completion_t *))sym(hb, "rbd_aio_create_completion", 1);
    R.aio_read = (int (*)(rbd_image_t, uint64_t, size_t, char *, rbd_completion_t))sym(hb, "rbd_aio_read", 1);
    R.aio_write = (int (*)(rbd_image_t, uint64_t, size_t, const char *, rbd_completion_t))sym(hb, "rbd_aio_write", 1);
    R.aio_write_zeroes = (int (*)(rbd_image_t, uint64_t, size_t, rbd_completion_t, int, int))sym(hb, "rbd_aio_write_zeroes", 0);
    R.aio_wait_for_complete = (int (*)(rbd_completion_t))sym(hb, "rbd_aio_wait_for_complete", 1);
    R.aio_get_return_value = (ssize_t (*)(rbd_completion_t))sym(hb, "rbd_aio_get_return_value", 1);
    R.aio_release = (void (*)(rbd_completion_t))sym(hb, "rbd_aio_release", 1);
    R.flush = (int (*)(rbd_image_t))sym(hb, "rbd_flush", 1);
    R.diff_iterate2 = (int (*)(rbd_image_t, const char *, uint64_t, uint64_t, uint8_t, uint8_t,
                               int (*)(uint64_t, size_t, int, void *), void *))sym(hb, "rbd_diff_iterate2", 0);
    /* the libraries stay loaded for the life of the process: librados's
     * threads and atexit handlers must not lose their code */
}

int pm_rbd_available(void)
{
    pthread_once(&load_once, load);
    if (load_rc < 0)
        return PM_FAIL(load_rc, "%s", load_msg);
    return 0;
}

/* ---- one image ----------------------------------------------------------- */

#define RBD_QD_DEFAULT 8
#define RBD_QD_MAX 256
#define RBD_TIMEOUT_DEFAULT 30
#define RBD_PIECE_MIN (64u << 10)     /* a request is never cut below 64 KiB */

struct rbd_vol {
    pthread_rwlock_t conn_lock;   /* I/O: shared; reconnect and close: exclusive */
    struct rbd_conn *conn;        /* shared with the process's other volumes of the same cluster */
    rados_ioctx_t io;
    rbd_image_t image;
    pm_atomic_int broken;         /* the next I/O reconnects first */
    char *pool, *image_name, *snap, *conf, *id, *cluster_name, *name;
    uint32_t qd, timeout;
    int timeout_given;            /* by the config (the URI): it wins over ceph.conf */
    int readonly;
    char ident[256];
};

static char *dup_or_null(const char *s)
{
    return s != NULL && s[0] != 0 ? strdup(s) : NULL;
}

static void vol_free(struct rbd_vol *v)
{
    free(v->pool), free(v->image_name), free(v->snap), free(v->conf), free(v->id);
    free(v->cluster_name), free(v->name);
    pthread_rwlock_destroy(&v->conn_lock);
    free(v);
}

/* A connected cluster handle with the timeouts set, or a negative code
 * (the message names what failed). */
static int cluster_connect(const struct rbd_vol *v, rados_t *out, const char *func)
{
    char client[200], t[16];
    snprintf(client, sizeof client, "client.%s", v->id ? v->id : "admin");
    rados_t c = NULL;
    int rc = R.create2(&c, v->cluster_name ? v->cluster_name : "ceph", client, 0);
    if (rc < 0)
        return pm_fail(func, rc, "%s: cannot create a Ceph client %s: %s", v->name, client, strerror(-rc));
    rc = R.conf_read_file(c, v->conf);   /* NULL: $CEPH_CONF, /etc/ceph/$cluster.conf, ... */
    if (rc < 0) {
        R.shutdown(c);
        if (v->conf)
            return pm_fail(func, rc, "%s: cannot read the Ceph configuration %s: %s", v->name, v->conf,
                           strerror(-rc));
        return pm_fail(func, rc, "%s: no Ceph configuration found ($CEPH_CONF, /etc/ceph/%s.conf): %s; "
                       "give one with ?conf=PATH", v->name, v->cluster_name ? v->cluster_name : "ceph",
                       strerror(-rc));
    }
    (void)R.conf_parse_env(c, NULL);     /* CEPH_ARGS, as the ceph tools read it */
    /* The timeouts: the config's (the URI's) when given; else what ceph.conf
     * or CEPH_ARGS set, except "wait forever" (0) and the library's default
     * mount timeout (300 s), which become the default (30 s). */
    static const char *const opts[] = { "rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout" };
    snprintf(t, sizeof t, "%u", v->timeout);
    for (size_t i = 0; i < sizeof opts / sizeof opts[0] && rc >= 0; i++) {
        char cur[64] = "";
        if (!v->timeout_given && R.conf_get(c, opts[i], cur, sizeof cur) == 0) {
            double secs = strtod(cur, NULL);
            if (secs > 0 && !(i == 2 && secs == 300))
                continue;
        }
        rc = R.conf_set(c, opts[i], t);
    }
    if (rc >= 0)
        rc = R.conf_set(c, "rbd_cache", "false");
    if (rc < 0) {
        R.shutdown(c);
        return pm_fail(func, rc, "%s: cannot set the Ceph client's timeouts: %s", v->name, strerror(-rc));
    }
    rc = R.connect(c);
    if (rc < 0) {
        R.shutdown(c);
        return pm_fail(func, rc, "%s: cannot connect to the Ceph cluster %s as %s within %u s: %s", v->name,
                       v->cluster_name ? v->cluster_name : "ceph", client, v->timeout, strerror(-rc));
    }
    *out = c;
    return 0;
}

/* ---- connections, shared ------------------------------------------------
 *
 * Volumes of one process that name the same cluster the same way (conf,
 * client id, cluster name, timeout) share one cluster handle: one
 * connection set-up, one set of librados threads, for the standard and the
 * mirror of a pair in one cluster.  A handle found unusable is marked dead
 * (no new user gets it) and fenced once; it is shut down when its last
 * volume lets it go.  conns_lock guards the list and the counts. */
struct rbd_conn {
    struct rbd_conn *next;
    char *key;
    rados_t cluster;
    int refs;
    int dead;
    pm_atomic_int fenced;
};

static pthread_mutex_t conns_lock = PTHREAD_MUTEX_INITIALIZER;
static struct rbd_conn *conns;

static char *conn_key(const struct rbd_vol *v)
{
    size_t n = 64 + strlen(v->conf ? v->conf : "") + strlen(v->id ? v->id : "") +
               strlen(v->cluster_name ? v->cluster_name : "");
    char *k = malloc(n);
    if (k != NULL)
        snprintf(k, n, "%s\n%s\n%s\n%u", v->conf ? v->conf : "", v->id ? v->id : "",
                 v->cluster_name ? v->cluster_name : "", v->timeout);
    return k;
}

static int conn_get(const struct rbd_vol *v, struct rbd_conn **out, const char *func)
{
    char *key = conn_key(v);
    if (key == NULL)
        return pm_fail(func, -ENOMEM, "out of memory");
    pthread_mutex_lock(&conns_lock);
    for (struct rbd_conn *c = conns; c != NULL; c = c->next) {
        if (!c->dead && strcmp(c->key, key) == 0) {
            c->refs++;
            pthread_mutex_unlock(&conns_lock);
            free(key);
            *out = c;
            return 0;
        }
    }
    pthread_mutex_unlock(&conns_lock);
    /* connect outside the lock (it may take the whole mount timeout); two
     * threads racing here make two handles, which is harmless */
    struct rbd_conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        free(key);
        return pm_fail(func, -ENOMEM, "out of memory");
    }
    int rc = cluster_connect(v, &c->cluster, func);
    if (rc < 0) {
        free(key);
        free(c);
        return rc;
    }
    c->key = key;
    c->refs = 1;
    pthread_mutex_lock(&conns_lock);
    c->next = conns;
    conns = c;
    pthread_mutex_unlock(&conns_lock);
    *out = c;
    return 0;
}

static void conn_put(struct rbd_conn *c)
{
    pthread_mutex_lock(&conns_lock);
    int last = --c->refs == 0;
    if (last) {
        for (struct rbd_conn **pp = &conns; *pp != NULL; pp = &(*pp)->next) {
            if (*pp == c) {
                *pp = c->next;
                break;
            }
        }
    }
    pthread_mutex_unlock(&conns_lock);
    if (last) {
        R.shutdown(c->cluster);
        free(c->key);
        free(c);
    }
}

/* The handle is unusable (blocklisted, disconnected): no new user gets it,
 * and the cluster is asked once to fence it, so that none of its requests
 * still queued somewhere can land after a new client's (best effort). */
static void conn_kill(struct rbd_conn *c)
{
    pthread_mutex_lock(&conns_lock);
    c->dead = 1;
    pthread_mutex_unlock(&conns_lock);
    /* relaxed: the exchange itself makes exactly one caller fence it */
    if (atomic_exchange_explicit(&c->fenced, 1, memory_order_relaxed) || R.getaddrs == NULL ||
        R.blocklist_add == NULL)
        return;
    char *addr = NULL;
    if (R.getaddrs(c->cluster, &addr) == 0 && addr != NULL) {
        char *copy = strdup(addr);
        if (copy != NULL) {
            (void)R.blocklist_add(c->cluster, copy, 3600);
            free(copy);
        }
    }
}

static int pool_open(const struct rbd_vol *v, rados_t c, rados_ioctx_t *out, const char *func)
{
    int rc = R.ioctx_create(c, v->pool, out);
    if (rc < 0)
        return pm_fail(func, rc, "%s: cannot open the pool %s: %s", v->name, v->pool,
                       rc == -ENOENT ? "no such pool" : strerror(-rc));
    return 0;
}

/* Connect (or share a connection), open the pool and the image; on
 * success v holds all three. */
static int vol_connect(struct rbd_vol *v, const char *func)
{
    struct rbd_conn *c = NULL;
    rados_ioctx_t io;
    rbd_image_t img;
    int rc = conn_get(v, &c, func);
    if (rc < 0)
        return rc;
    if ((rc = pool_open(v, c->cluster, &io, func)) < 0) {
        conn_put(c);
        return rc;
    }
    rc = v->readonly ? R.open_read_only(io, v->image_name, &img, v->snap) : R.open(io, v->image_name, &img, NULL);
    if (rc < 0) {
        R.ioctx_destroy(io);
        conn_put(c);
        if (rc == -ENOENT)
            return pm_fail(func, rc, "%s: no image %s%s%s in the pool %s (make one with 'pymirror create')",
                           v->name, v->image_name, v->snap ? " or no snapshot " : "", v->snap ? v->snap : "",
                           v->pool);
        return pm_fail(func, rc, "%s: cannot open the image: %s", v->name, strerror(-rc));
    }
    v->conn = c, v->io = io, v->image = img;
    return 0;
}

static void vol_disconnect(struct rbd_vol *v)
{
    if (v->image)
        R.close(v->image);
    if (v->io)
        R.ioctx_destroy(v->io);
    if (v->conn)
        conn_put(v->conn);
    v->image = v->io = NULL;
    v->conn = NULL;
}

/* Errors after which this client instance cannot be used again. */
static int is_connection_error(int rc)
{
    return rc == -ESHUTDOWN || rc == -ENOTCONN || rc == -EBADF || rc == -ECONNRESET;
}

/* Replace the client: fence the old instance, then connect anew.  Called
 * with conn_lock held exclusive. */
static int reconnect_locked(struct rbd_vol *v, const char *func)
{
    if (v->conn != NULL)
        conn_kill(v->conn);
    vol_disconnect(v);
    int rc = vol_connect(v, func);
    if (rc == 0)
        atomic_store_explicit(&v->broken, 0, memory_order_relaxed);
    return rc;
}

/* Take conn_lock shared with a usable connection (reconnecting first when
 * it was broken).  0, or an error with the lock not held.  v->image is
 * read only under the lock; a failed reconnect is tried again by the next
 * I/O. */
static int io_begin(struct rbd_vol *v, const char *func)
{
    for (;;) {
        pthread_rwlock_rdlock(&v->conn_lock);
        /* relaxed: the flag is a hint; the reconnect re-checks it under
         * the exclusive lock */
        if (!atomic_load_explicit(&v->broken, memory_order_relaxed) && v->image != NULL)
            return 0;
        pthread_rwlock_unlock(&v->conn_lock);
        pthread_rwlock_wrlock(&v->conn_lock);
        int rc = 0;
        if (atomic_load_explicit(&v->broken, memory_order_relaxed) || v->image == NULL)
            rc = reconnect_locked(v, func);
        pthread_rwlock_unlock(&v->conn_lock);
        if (rc < 0)
            return rc;
    }
}

static int io_end(struct rbd_vol *v, int rc)
{
    if (rc < 0 && is_connection_error(rc))
        atomic_store_explicit(&v->broken, 1, memory_order_relaxed);
    pthread_rwlock_unlock(&v->conn_lock);
    return rc;
}

enum { OP_READ, OP_WRITE, OP_ZERO };

/* One call: [off, off+len) cut into up to qd pieces, all in flight at once,
 * waited for in order.  The first error is returned. */
static int rbd_io(struct rbd_vol *v, int op, void *buf, uint64_t len, uint64_t off, const char *func)
{
    int rc = io_begin(v, func);
    if (rc < 0)
        return rc;
    uint64_t piece = (len + v->qd - 1) / v->qd;
    piece = (piece + 4095) / 4096 * 4096;
    if (piece < RBD_PIECE_MIN)
        piece = RBD_PIECE_MIN;
    rbd_completion_t comp[RBD_QD_MAX];
    unsigned n = 0;
    int err = 0;
    const char *what = op == OP_READ ? "read" : op == OP_WRITE ? "write" : "zeroing";
    for (uint64_t done = 0; done < len && err == 0; n++) {
        uint64_t l = len - done < piece ? len - done : piece;
        rc = R.aio_create_completion(NULL, NULL, &comp[n]);
        if (rc < 0) {
            err = rc;
            break;
        }
        char *p = (char *)buf + done;
        if (op == OP_READ)
            rc = R.aio_read(v->image, off + done, (size_t)l, p, comp[n]);
        else if (op == OP_WRITE)
            rc = R.aio_write(v->image, off + done, (size_t)l, p, comp[n]);
        else
            rc = R.aio_write_zeroes(v->image, off + done, (size_t)l, comp[n], 0, 0);
        if (rc < 0) {
            R.aio_release(comp[n]);
            err = rc;
            break;
        }
        done += l;
    }
    for (unsigned i = 0; i < n; i++) {
        R.aio_wait_for_complete(comp[i]);
        ssize_t r = R.aio_get_return_value(comp[i]);
        R.aio_release(comp[i]);
        if (r < 0 && err == 0)
            err = (int)r;
    }
    if (err < 0) {
        pm_fail(func, err, "%s: %s of %llu bytes at %llu failed: %s%s", v->name, what, (unsigned long long)len,
                (unsigned long long)off, strerror(-err),
                err == -ETIMEDOUT ? " (no answer from the OSDs within the timeout; see ?timeout=)" : "");
    }
    return io_end(v, err);
}

static int rbd_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    return rbd_io(ctx, OP_READ, buf, len, off, "rbd_read");
}

static int rbd_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    return rbd_io(ctx, OP_WRITE, (void *)buf, len, off, "rbd_write");
}

static int rbd_write_zeroes(void *ctx, uint64_t len, uint64_t off, unsigned flags)
{
    if (R.aio_write_zeroes == NULL)
        return -EOPNOTSUPP;   /* pymirror writes zero buffers */
    return rbd_io(ctx, OP_ZERO, NULL, len, off, "rbd_write_zeroes");
}

static int rbd_flush_op(void *ctx)
{
    struct rbd_vol *v = ctx;
    if (v->readonly)
        return 0;
    int rc = io_begin(v, "rbd_flush");
    if (rc < 0)
        return rc;
    rc = R.flush(v->image);
    if (rc < 0)
        pm_fail("rbd_flush", rc, "%s: flush failed: %s", v->name, strerror(-rc));
    return io_end(v, rc);
}

/* Extents: librbd's allocated extents (rbd_diff_iterate2 from the image's
 * creation, parent data included) are data; what lies between them was never
 * written, or was discarded, and reads as zeroes: a hole. */
struct extent_acc {
    struct pm_extent *out;
    uint64_t max, n, cur, end;
    int full;          /* out is full: the walk may go on, the answer may not */
};

#define EXTENTS_FULL (-ECANCELED)   /* the callback's "out is full": not an error */

static int extent_add(struct extent_acc *a, uint64_t off, uint64_t end, uint32_t kind)
{
    if (a->n > 0 && a->out[a->n - 1].kind == kind && a->out[a->n - 1].offset + a->out[a->n - 1].length == off) {
        a->out[a->n - 1].length += end - off;
        return 0;
    }
    if (a->n == a->max) {
        a->full = 1;
        return EXTENTS_FULL;
    }
    a->out[a->n++] = (struct pm_extent){ off, end - off, kind, 0 };
    return 0;
}

static int extent_cb(uint64_t off, size_t len, int exists, void *arg)
{
    struct extent_acc *a = arg;
    if (a->full)
        return EXTENTS_FULL;
    uint64_t end = off + len > a->end ? a->end : off + len;
    if (off < a->cur)
        off = a->cur;
    if (!exists || off >= end)
        return 0;    /* not allocated: part of the hole before the next extent */
    int rc = 0;
    if (off > a->cur && (rc = extent_add(a, a->cur, off, PM_EXTENT_HOLE)) < 0)
        return rc;
    a->cur = off;
    if ((rc = extent_add(a, off, end, PM_EXTENT_DATA)) < 0)
        return rc;
    a->cur = end;
    return 0;
}

static int64_t rbd_extents(void *ctx, uint64_t off, uint64_t len, struct pm_extent *out, uint64_t max)
{
    struct rbd_vol *v = ctx;
    if (R.diff_iterate2 == NULL)
        return -EOPNOTSUPP;   /* all data */
    int rc = io_begin(v, "rbd_extents");
    if (rc < 0)
        return rc;
    struct extent_acc a = { out, max, 0, off, off + len, 0 };
    rc = R.diff_iterate2(v->image, NULL, off, len, 1, 0, extent_cb, &a);
    int full = a.full;
    rc = io_end(v, full && rc == EXTENTS_FULL ? 0 : rc);
    if (rc < 0)
        return pm_fail("rbd_extents", rc, "%s: the allocation query failed: %s", v->name, strerror(-rc));
    /* what follows the last allocated extent is a hole; when out was full,
     * the extents end where the walk stopped (the caller asks again) */
    if (!full && a.cur < a.end)
        (void)extent_add(&a, a.cur, a.end, PM_EXTENT_HOLE);
    return (int64_t)a.n;
}

static int rbd_identity(void *ctx, char *buf, size_t len)
{
    struct rbd_vol *v = ctx;
    snprintf(buf, len, "%s", v->ident);
    return 0;
}

static void rbd_close_op(void *ctx)
{
    struct rbd_vol *v = ctx;
    pthread_rwlock_wrlock(&v->conn_lock);
    vol_disconnect(v);
    pthread_rwlock_unlock(&v->conn_lock);
    vol_free(v);
}

static const struct pm_store_ops rbd_ops = {
    .size = sizeof(struct pm_store_ops),
    .read = rbd_read, .write = rbd_write, .flush = rbd_flush_op, .close = rbd_close_op,
    .write_zeroes = rbd_write_zeroes, .extents = rbd_extents, .identity = rbd_identity,
};

/* ---- the public calls ---------------------------------------------------- */

/* Check the config and fill a new vol's settings (not connected). */
static int vol_new(const struct pm_rbd_config *cfg, const char *name, int readonly, struct rbd_vol **out,
                   const char *func)
{
    *out = NULL;
    if (cfg == NULL)
        return pm_fail(func, -EINVAL, "cfg must not be NULL");
    if (cfg->size != 0 && cfg->size != sizeof *cfg)
        return pm_fail(func, -EINVAL, "cfg->size is %u: set it to sizeof(struct pm_rbd_config)", cfg->size);
    if (cfg->pool == NULL || cfg->pool[0] == 0 || cfg->image == NULL || cfg->image[0] == 0)
        return pm_fail(func, -EINVAL, "an RBD volume needs a pool and an image name (rbd:POOL/IMAGE)");
    if (cfg->qd > RBD_QD_MAX)
        return pm_fail(func, -EINVAL, "queue depth %u is out of range (1 to %d)", cfg->qd, RBD_QD_MAX);
    if (cfg->timeout > 86400)
        return pm_fail(func, -EINVAL, "timeout %u s is out of range (1 to 86400)", cfg->timeout);
    int rc = pm_rbd_available();
    if (rc < 0)
        return rc;
    struct rbd_vol *v = calloc(1, sizeof *v);
    if (v == NULL)
        return pm_fail(func, -ENOMEM, "out of memory");
    pthread_rwlock_init(&v->conn_lock, NULL);
    v->pool = strdup(cfg->pool), v->image_name = strdup(cfg->image);
    v->snap = dup_or_null(cfg->snap), v->conf = dup_or_null(cfg->conf), v->id = dup_or_null(cfg->id);
    v->cluster_name = dup_or_null(cfg->cluster);
    char fallback[600];
    snprintf(fallback, sizeof fallback, "rbd:%s/%s%s%s", cfg->pool, cfg->image, cfg->snap ? "@" : "",
             cfg->snap ? cfg->snap : "");
    v->name = strdup(name != NULL && name[0] ? name : fallback);
    if (v->pool == NULL || v->image_name == NULL || v->name == NULL || (cfg->snap && cfg->snap[0] && !v->snap) ||
        (cfg->conf && cfg->conf[0] && !v->conf) || (cfg->id && cfg->id[0] && !v->id) ||
        (cfg->cluster && cfg->cluster[0] && !v->cluster_name)) {
        vol_free(v);
        return pm_fail(func, -ENOMEM, "out of memory");
    }
    v->qd = cfg->qd ? cfg->qd : RBD_QD_DEFAULT;
    v->timeout = cfg->timeout ? cfg->timeout : RBD_TIMEOUT_DEFAULT;
    v->timeout_given = cfg->timeout != 0;
    v->readonly = readonly || v->snap != NULL;
    *out = v;
    return 0;
}

int pm_store_open_rbd(const struct pm_rbd_config *cfg, const char *name, unsigned flags, pm_store **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    *out = NULL;
    if (flags & ~(unsigned)(PM_STORE_READONLY | PM_STORE_NOLOCK))
        return PM_FAIL(-EINVAL, "flags 0x%x: only PM_STORE_READONLY and PM_STORE_NOLOCK apply", flags);
    struct rbd_vol *v;
    int rc = vol_new(cfg, name, (flags & PM_STORE_READONLY) != 0, &v, __func__);
    if (rc < 0)
        return rc;
    if ((rc = vol_connect(v, __func__)) < 0) {
        vol_free(v);
        return rc;
    }
    uint64_t size = 0;
    char id[128] = "";
    if ((rc = R.get_size(v->image, &size)) < 0) {
        pm_fail(__func__, rc, "%s: cannot read the image size: %s", v->name, strerror(-rc));
        goto fail;
    }
    if (R.get_id(v->image, id, sizeof id) < 0 || id[0] == 0)
        snprintf(id, sizeof id, "%s", v->image_name);   /* an old format-1 image has no id: its name */
    snprintf(v->ident, sizeof v->ident, "rbd:%s/%s%s%s", v->pool, id, v->snap ? "@" : "", v->snap ? v->snap : "");
    if (size == 0) {
        rc = PM_FAIL(PM_E_GEOMETRY, "%s: the image is empty (0 bytes)", v->name);
        goto fail;
    }
    /* the rbd_vol now belongs to the store: its close callback frees it */
    rc = pm_store_create_ops(&rbd_ops, v, size, v->name, (v->readonly ? PM_STORE_READONLY : 0) | PM_STORE_NOLOCK,
                             out);
    if (rc < 0)
        goto fail;
    return 0;
fail:
    vol_disconnect(v);
    vol_free(v);
    return rc;
}

int pm_rbd_create(const struct pm_rbd_config *cfg, uint64_t size)
{
    if (size == 0)
        return PM_FAIL(PM_E_GEOMETRY, "a new volume needs a size greater than zero");
    struct rbd_vol *v;
    int rc = vol_new(cfg, NULL, 0, &v, __func__);
    if (rc < 0)
        return rc;
    if (v->snap != NULL) {
        rc = PM_FAIL(-EINVAL, "%s: cannot create a snapshot, only an image", v->name);
        vol_free(v);
        return rc;
    }
    rados_t c;
    rados_ioctx_t io;
    if ((rc = cluster_connect(v, &c, __func__)) < 0) {
        vol_free(v);
        return rc;
    }
    if ((rc = pool_open(v, c, &io, __func__)) == 0) {
        int order = 0;   /* librbd's default object size (4 MiB) */
        rc = R.create(io, v->image_name, size, &order);
        if (rc == -EEXIST)
            PM_FAIL(rc, "%s: the image already exists; pymirror create never overwrites", v->name);
        else if (rc < 0)
            PM_FAIL(rc, "%s: cannot create the image: %s", v->name, strerror(-rc));
        R.ioctx_destroy(io);
    }
    R.shutdown(c);
    vol_free(v);
    return rc;
}
