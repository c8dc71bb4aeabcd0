/*
 * nbd_tls.c - TLS sessions for the NBD server, through GnuTLS loaded at
 * run time (dlopen of libgnutls.so.30: the library has no link-time
 * dependency on it; `readelf -d` shows none).
 *
 * Layer 1: may call the layer-0 helpers only.
 *
 * Python's ssl module has no PSK and cannot hand a session to C, so once a
 * client sends NBD_OPT_STARTTLS the whole rest of the connection (the rest
 * of the handshake, from Python through pm_tls_recv/pm_tls_send, then the C
 * request loop) runs over a session made here.  GnuTLS allows one thread
 * receiving and one sending on a session at once, which is how the loop
 * uses it (its receive and send locks).
 *
 * The GnuTLS calls are declared here by hand (their C ABI is stable across
 * 3.x), so the build needs no GnuTLS headers either.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "internal.h"
#include "nbd_tls.h"

typedef void *gt_session;
typedef void *gt_cert_creds;
typedef void *gt_psk_creds;

typedef struct {
    unsigned char *data;
    unsigned size;
} gt_datum;
typedef void *gt_crt;

enum {
    GT_SERVER = 1,
    GT_X509_FMT_DER = 0,
    GT_X509_FMT_PEM = 1,
    GT_CERT_REQUIRE = 2,
    GT_CERT_INVALID = 1 << 1,
    GT_CERT_REVOKED = 1 << 5,
    GT_CERT_SIGNER_NOT_FOUND = 1 << 6,
    GT_CERT_NOT_ACTIVATED = 1 << 9,
    GT_CERT_EXPIRED = 1 << 10,
    GT_E_NO_CERTIFICATE_FOUND = -49,
    GT_E_CERTIFICATE_REQUIRED = -112,
    GT_E_CERTIFICATE_VERIFICATION_ERROR = -348,
    GT_CRD_CERTIFICATE = 1,
    GT_CRD_PSK = 4,
    GT_SHUT_WR = 1,
    GT_E_AGAIN = -28,
    GT_E_INTERRUPTED = -52,
    GT_RECORD_WAIT = 1,
};

#define TLS_RECORD_MAX 16384u         /* the largest record's payload (RFC 8446, 5.1) */

static struct {
    int (*global_init)(void);
    int (*cert_alloc)(gt_cert_creds *);
    void (*cert_free)(gt_cert_creds);
    int (*cert_key_file)(gt_cert_creds, const char *, const char *, int);
    int (*cert_trust_file)(gt_cert_creds, const char *, int);
    int (*cert_crl_file)(gt_cert_creds, const char *, int);
    void (*server_set_request)(gt_session, int);
    void (*set_verify_cert)(gt_session, const char *, unsigned);
    unsigned (*verify_cert_status)(gt_session);
    const gt_datum *(*get_peers)(gt_session, unsigned *);
    int (*crt_init)(gt_crt *);
    void (*crt_deinit)(gt_crt);
    int (*crt_import)(gt_crt, const gt_datum *, int);
    int (*crt_get_dn)(gt_crt, char *, size_t *);
    int (*psk_alloc)(gt_psk_creds *);
    void (*psk_free)(gt_psk_creds);
    int (*psk_file)(gt_psk_creds, const char *);
    int (*init)(gt_session *, unsigned);
    void (*deinit)(gt_session);
    int (*priority_direct)(gt_session, const char *, const char **);
    int (*credentials_set)(gt_session, int, void *);
    void (*transport_int2)(gt_session, int, int);
    void (*handshake_timeout)(gt_session, unsigned);
    int (*handshake)(gt_session);
    ssize_t (*recv)(gt_session, void *, size_t);
    ssize_t (*send)(gt_session, const void *, size_t);
    size_t (*check_pending)(gt_session);
    void (*cork)(gt_session);
    void (*set_pull)(gt_session, ssize_t (*)(void *, void *, size_t));
    void (*set_ptr2)(gt_session, void *, void *);
    int (*uncork)(gt_session, unsigned);
    int (*bye)(gt_session, int);
    const char *(*strerror)(int);
    int (*is_fatal)(int);
    const char *(*psk_username)(gt_session);
} gt;

static pthread_once_t gt_once = PTHREAD_ONCE_INIT;
static int gt_status;                 /* 0 loaded, else PM_E_NOLIB */
static char gt_why[512];

#define GT_SYM(field, name)                                                  \
    do {                                                                     \
        *(void **)&gt.field = dlsym(h, name);                                \
        if (gt.field == NULL) {                                              \
            snprintf(gt_why, sizeof gt_why, "%s has no %s", lib, name);      \
            return;                                                          \
        }                                                                    \
    } while (0)

static void gt_load_once(void)
{
    const char *lib = getenv("PYMIRROR_GNUTLS");     /* tests: another file, or none */
    if (lib == NULL || lib[0] == 0)
        lib = "libgnutls.so.30";
    gt_status = PM_E_NOLIB;
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        snprintf(gt_why, sizeof gt_why, "%s", dlerror());
        return;
    }
    GT_SYM(global_init, "gnutls_global_init");
    GT_SYM(cert_alloc, "gnutls_certificate_allocate_credentials");
    GT_SYM(cert_free, "gnutls_certificate_free_credentials");
    GT_SYM(cert_key_file, "gnutls_certificate_set_x509_key_file");
    GT_SYM(cert_trust_file, "gnutls_certificate_set_x509_trust_file");
    GT_SYM(cert_crl_file, "gnutls_certificate_set_x509_crl_file");
    GT_SYM(server_set_request, "gnutls_certificate_server_set_request");
    GT_SYM(set_verify_cert, "gnutls_session_set_verify_cert");
    GT_SYM(verify_cert_status, "gnutls_session_get_verify_cert_status");
    GT_SYM(get_peers, "gnutls_certificate_get_peers");
    GT_SYM(crt_init, "gnutls_x509_crt_init");
    GT_SYM(crt_deinit, "gnutls_x509_crt_deinit");
    GT_SYM(crt_import, "gnutls_x509_crt_import");
    GT_SYM(crt_get_dn, "gnutls_x509_crt_get_dn");
    GT_SYM(psk_alloc, "gnutls_psk_allocate_server_credentials");
    GT_SYM(psk_free, "gnutls_psk_free_server_credentials");
    GT_SYM(psk_file, "gnutls_psk_set_server_credentials_file");
    GT_SYM(init, "gnutls_init");
    GT_SYM(deinit, "gnutls_deinit");
    GT_SYM(priority_direct, "gnutls_priority_set_direct");
    GT_SYM(credentials_set, "gnutls_credentials_set");
    GT_SYM(transport_int2, "gnutls_transport_set_int2");
    GT_SYM(handshake_timeout, "gnutls_handshake_set_timeout");
    GT_SYM(handshake, "gnutls_handshake");
    GT_SYM(recv, "gnutls_record_recv");
    GT_SYM(send, "gnutls_record_send");
    GT_SYM(check_pending, "gnutls_record_check_pending");
    GT_SYM(cork, "gnutls_record_cork");
    GT_SYM(set_pull, "gnutls_transport_set_pull_function");
    GT_SYM(set_ptr2, "gnutls_transport_set_ptr2");
    GT_SYM(uncork, "gnutls_record_uncork");
    GT_SYM(bye, "gnutls_bye");
    GT_SYM(strerror, "gnutls_strerror");
    GT_SYM(is_fatal, "gnutls_error_is_fatal");
    GT_SYM(psk_username, "gnutls_psk_server_get_username");
    if (gt.global_init() < 0) {
        snprintf(gt_why, sizeof gt_why, "gnutls_global_init failed");
        return;
    }
    gt_status = 0;
}

static int gt_load(const char *func)
{
    pthread_once(&gt_once, gt_load_once);
    if (gt_status)
        return pm_fail(func, PM_E_NOLIB, "TLS needs GnuTLS, which is not installed (Debian package "
                       "libgnutls30): %s", gt_why);
    return 0;
}

/* ---- credentials ----------------------------------------------------------- */

struct pm_tls_creds {
    int psk;
    int verify_peer;                  /* x509: clients must show a certificate signed by the CA */
    void *cred;
};

static int readable(const char *path)
{
    return access(path, R_OK) == 0;
}

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

int pm_tls_creds_x509(const char *dir, unsigned flags, pm_tls_creds **out)
{
    if (out == NULL || dir == NULL)
        return PM_FAIL(-EINVAL, "a directory and an output pointer are required");
    *out = NULL;
    if (flags & ~(unsigned)PM_TLS_VERIFY_PEER)
        return PM_FAIL(-EINVAL, "unknown flags %#x", flags);
    int verify = (flags & PM_TLS_VERIFY_PEER) != 0;
    int rc = gt_load(__func__);
    if (rc)
        return rc;
    char cert[4096], key[4096], ca[4096], crl[4096];
    if (snprintf(cert, sizeof cert, "%s/server-cert.pem", dir) >= (int)sizeof cert)
        return PM_FAIL(-ENAMETOOLONG, "the directory name is too long: %s", dir);
    snprintf(key, sizeof key, "%s/server-key.pem", dir);
    snprintf(ca, sizeof ca, "%s/ca-cert.pem", dir);
    snprintf(crl, sizeof crl, "%s/ca-crl.pem", dir);
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
        return PM_FAIL(-ENOENT, "%s is not a directory of certificates", dir);
    if (!readable(cert))
        return PM_FAIL(-ENOENT, "%s: cannot read the server certificate (%s)", cert, strerror(errno));
    if (!readable(key))
        return PM_FAIL(-ENOENT, "%s: cannot read the server key (%s)", key, strerror(errno));
    if (verify && !readable(ca))
        return PM_FAIL(-ENOENT, "%s: cannot read the CA certificate that client certificates are checked "
                       "against (--tls-verify-peer): %s", ca, strerror(errno));
    if (verify && exists(crl) && !readable(crl))
        return PM_FAIL(-EACCES, "%s: cannot read the certificate revocation list (%s)", crl, strerror(errno));
    gt_cert_creds cr;
    int g = gt.cert_alloc(&cr);
    if (g < 0)
        return PM_FAIL(-ENOMEM, "cannot allocate TLS credentials: %s", gt.strerror(g));
    g = gt.cert_key_file(cr, cert, key, GT_X509_FMT_PEM);
    if (g < 0) {
        gt.cert_free(cr);
        return PM_FAIL(-EINVAL, "%s and %s: not a usable certificate and key: %s", cert, key, gt.strerror(g));
    }
    if (readable(ca)) {
        g = gt.cert_trust_file(cr, ca, GT_X509_FMT_PEM);
        if (g < 0 || (g == 0 && verify)) {
            gt.cert_free(cr);
            return PM_FAIL(-EINVAL, "%s: not a usable CA certificate: %s", ca,
                           g < 0 ? gt.strerror(g) : "it holds no certificate");
        }
    }
    /* revoked client certificates, as qemu-nbd and nbdkit read them */
    if (verify && exists(crl)) {
        g = gt.cert_crl_file(cr, crl, GT_X509_FMT_PEM);
        if (g < 0) {
            gt.cert_free(cr);
            return PM_FAIL(-EINVAL, "%s: not a usable certificate revocation list: %s", crl, gt.strerror(g));
        }
    }
    pm_tls_creds *c = calloc(1, sizeof *c);
    if (c == NULL) {
        gt.cert_free(cr);
        return PM_FAIL(-ENOMEM, "no memory");
    }
    c->cred = cr;
    c->verify_peer = verify;
    *out = c;
    return 0;
}

int pm_tls_creds_psk(const char *file, pm_tls_creds **out)
{
    if (out == NULL || file == NULL)
        return PM_FAIL(-EINVAL, "a file and an output pointer are required");
    *out = NULL;
    int rc = gt_load(__func__);
    if (rc)
        return rc;
    FILE *f = fopen(file, "r");
    if (f == NULL)
        return PM_FAIL(-errno, "%s: cannot read the PSK file (%s)", file, strerror(errno));
    /* psktool's format: one "username:hexkey" per line */
    char line[1024];
    int n = 0, lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t len = strcspn(line, "\r\n");
        line[len] = 0;
        if (len == 0)
            continue;
        char *colon = strchr(line, ':');
        size_t hex = colon ? strlen(colon + 1) : 0;
        int bad = colon == NULL || colon == line || hex == 0 || hex % 2;
        for (size_t i = 0; !bad && i < hex; i++)
            bad = strchr("0123456789abcdefABCDEF", colon[1 + i]) == NULL;
        if (bad) {
            fclose(f);
            return PM_FAIL(-EINVAL, "%s line %d: not a psktool line (username:hexkey)", file, lineno);
        }
        n++;
    }
    fclose(f);
    if (n == 0)
        return PM_FAIL(-EINVAL, "%s holds no key (make one with: psktool -u USER -p %s)", file, file);
    gt_psk_creds cr;
    int g = gt.psk_alloc(&cr);
    if (g < 0)
        return PM_FAIL(-ENOMEM, "cannot allocate TLS credentials: %s", gt.strerror(g));
    g = gt.psk_file(cr, file);
    if (g < 0) {
        gt.psk_free(cr);
        return PM_FAIL(-EINVAL, "%s: %s", file, gt.strerror(g));
    }
    pm_tls_creds *c = calloc(1, sizeof *c);
    if (c == NULL) {
        gt.psk_free(cr);
        return PM_FAIL(-ENOMEM, "no memory");
    }
    c->psk = 1;
    c->cred = cr;
    *out = c;
    return 0;
}

void pm_tls_creds_free(pm_tls_creds *c)
{
    if (c == NULL)
        return;
    if (c->psk)
        gt.psk_free(c->cred);
    else
        gt.cert_free(c->cred);
    free(c);
}

/* ---- sessions -------------------------------------------------------------- */

struct pm_tls {
    gt_session s;
    int psk;
    int fd;
    char peer[1024];                  /* x509 with verify_peer: the client certificate's DN */
    /* bytes taken off the socket (by pull, or by a poll: pm__tls_poll)
     * that GnuTLS has not read yet: the receiving thread's only */
    size_t spos, send;
    unsigned char stash[4096];
};

/* GnuTLS's reads of the socket once the handshake is over.  GnuTLS asks
 * for a record's 5-byte header, then its body: two system calls a record,
 * where one receive into the stash often holds several short records (the
 * requests of a client at a queue depth above 1) and what a poll took.
 * A read as large as the stash goes straight to GnuTLS's buffer. */
static ssize_t pull(void *ptr, void *buf, size_t len)
{
    pm_tls *t = ptr;
    size_t have = t->send - t->spos;
    if (have == 0) {
        if (len >= sizeof t->stash)
            return recv(t->fd, buf, len, 0);
        ssize_t k = recv(t->fd, t->stash, sizeof t->stash, 0);
        if (k <= 0)
            return k;
        t->spos = 0;
        t->send = (size_t)k;
        have = (size_t)k;
    }
    size_t n = have < len ? have : len;
    memcpy(buf, t->stash + t->spos, n);
    t->spos += n;
    return (ssize_t)n;
}

/* Why a client certificate was refused, from the verification status. */
static const char *refusal(gt_session s, int g)
{
    if (g == GT_E_NO_CERTIFICATE_FOUND || g == GT_E_CERTIFICATE_REQUIRED)
        /* a client sends only a certificate whose CA the server names: none,
         * or one from another CA, looks the same here */
        return "the client presented no certificate signed by the CA of ca-cert.pem (--tls-verify-peer)";
    if (g != GT_E_CERTIFICATE_VERIFICATION_ERROR)
        return NULL;
    unsigned st = gt.verify_cert_status(s);
    if (st & GT_CERT_REVOKED)
        return "the client certificate is revoked (ca-crl.pem)";
    if (st & GT_CERT_SIGNER_NOT_FOUND)
        return "the client certificate is not signed by the CA in ca-cert.pem";
    if (st & GT_CERT_EXPIRED)
        return "the client certificate has expired";
    if (st & GT_CERT_NOT_ACTIVATED)
        return "the client certificate is not valid yet";
    return "the client certificate is invalid";
}

/* The DN of the client's certificate into t->peer ("" if none). */
static void peer_dn(pm_tls *t)
{
    unsigned n = 0;
    const gt_datum *certs = gt.get_peers(t->s, &n);
    gt_crt crt;
    if (certs == NULL || n == 0 || gt.crt_init(&crt) < 0)
        return;
    size_t len = sizeof t->peer;
    if (gt.crt_import(crt, &certs[0], GT_X509_FMT_DER) < 0 || gt.crt_get_dn(crt, t->peer, &len) < 0)
        t->peer[0] = 0;
    gt.crt_deinit(crt);
}

int pm_tls_start(pm_tls_creds *creds, int fd, int timeout_ms, pm_tls **out)
{
    if (out == NULL || creds == NULL || fd < 0)
        return PM_FAIL(-EINVAL, "credentials, a socket and an output pointer are required");
    *out = NULL;
    int rc = gt_load(__func__);
    if (rc)
        return rc;
    gt_session s;
    int g = gt.init(&s, GT_SERVER);
    if (g < 0)
        return PM_FAIL(-ENOMEM, "cannot start a TLS session: %s", gt.strerror(g));
    const char *errpos = NULL;
    /* PSK needs its key exchanges named (TLS 1.2); TLS 1.3 takes either */
    g = gt.priority_direct(s, creds->psk ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL", &errpos);
    if (g >= 0)
        g = gt.credentials_set(s, creds->psk ? GT_CRD_PSK : GT_CRD_CERTIFICATE, creds->cred);
    if (g < 0) {
        gt.deinit(s);
        return PM_FAIL(-EINVAL, "cannot set up a TLS session: %s", gt.strerror(g));
    }
    if (creds->verify_peer) {
        /* ask for the client's certificate; the handshake fails without one
         * or when it does not verify against ca-cert.pem (and ca-crl.pem) */
        gt.server_set_request(s, GT_CERT_REQUIRE);
        gt.set_verify_cert(s, NULL, 0);
    }
    gt.transport_int2(s, fd, fd);
    if (timeout_ms > 0)
        gt.handshake_timeout(s, (unsigned)timeout_ms);
    do {
        g = gt.handshake(s);
    } while (g < 0 && !gt.is_fatal(g));
    if (g < 0) {
        const char *why = creds->verify_peer ? refusal(s, g) : NULL;
        rc = why ? PM_FAIL(-EACCES, "the TLS handshake failed: %s", why)
                 : PM_FAIL(-ECONNABORTED, "the TLS handshake failed: %s", gt.strerror(g));
        gt.deinit(s);
        return rc;
    }
    pm_tls *t = calloc(1, sizeof *t);
    if (t == NULL) {
        gt.deinit(s);
        return PM_FAIL(-ENOMEM, "no memory");
    }
    t->s = s;
    t->psk = creds->psk;
    t->fd = fd;
    if (creds->verify_peer)
        peer_dn(t);
    gt.set_ptr2(s, t, (void *)(intptr_t)fd);  /* sends stay GnuTLS's own, on fd */
    gt.set_pull(s, pull);
    *out = t;
    return 0;
}

int64_t pm_tls_recv(pm_tls *t, void *buf, uint64_t len)
{
    for (;;) {
        ssize_t k = gt.recv(t->s, buf, len);
        if (k >= 0)
            return k;
        if (k == GT_E_INTERRUPTED)
            continue;
        if (k == GT_E_AGAIN)            /* the socket's receive timeout (the handshake's) */
            return PM_FAIL(-EAGAIN, "TLS: timed out waiting for the client");
        return PM_FAIL(-ECONNRESET, "TLS: %s", gt.strerror((int)k));
    }
}

int64_t pm_tls_send(pm_tls *t, const void *buf, uint64_t len)
{
    for (;;) {
        ssize_t k = gt.send(t->s, buf, len);
        if (k >= 0)
            return k;
        if (k == GT_E_AGAIN || k == GT_E_INTERRUPTED)
            continue;
        return PM_FAIL(-EPIPE, "TLS: %s", gt.strerror((int)k));
    }
}

/* Send what the session holds corked (GNUTLS_RECORD_WAIT: all of it). */
static int uncork(pm_tls *t)
{
    for (;;) {
        int g = gt.uncork(t->s, GT_RECORD_WAIT);
        if (g >= 0)
            return 0;
        if (g != GT_E_AGAIN && g != GT_E_INTERRUPTED)
            return pm_fail("pm_tls_send", -EPIPE, "TLS: %s", gt.strerror(g));
    }
}

int pm__tls_sendv(pm_tls *t, const struct iovec *iov, int n)
{
    /* Corked, gnutls_record_send only copies into the session (taking every
     * byte) and the uncork encrypts and sends.  Only the first record's
     * worth is corked: that puts a reply's header into the record of its
     * first data bytes, and copies no more than a record. */
    size_t budget = n > 1 ? TLS_RECORD_MAX : 0;
    if (budget)
        gt.cork(t->s);
    for (int i = 0; i < n; i++) {
        const unsigned char *p = iov[i].iov_base;
        size_t left = iov[i].iov_len;
        while (left) {
            size_t chunk = budget && left > budget ? budget : left;
            int64_t k = pm_tls_send(t, p, chunk);
            if (k <= 0) {
                if (budget)
                    uncork(t);
                return -1;
            }
            p += k;
            left -= (size_t)k;
            if (budget) {
                budget -= (size_t)k;
                if (budget == 0 && uncork(t) < 0)
                    return -1;
            }
        }
    }
    return budget && uncork(t) < 0 ? -1 : 0;
}

uint64_t pm_tls_pending(pm_tls *t)
{
    return gt.check_pending(t->s) + (t->send - t->spos);
}

int pm__tls_poll(pm_tls *t)
{
    /* the caller polls only with nothing received yet (pm_tls_pending 0);
     * a stash not yet read must never be overwritten all the same */
    if (t->send > t->spos)
        return 1;
    ssize_t k = recv(t->fd, t->stash, sizeof t->stash, MSG_DONTWAIT);
    if (k > 0) {
        t->spos = 0;
        t->send = (size_t)k;
        return 1;
    }
    if (k == 0)
        return -1;
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
}

const char *pm_tls_user(pm_tls *t)
{
    if (!t->psk)
        return t->peer;
    const char *u = gt.psk_username(t->s);
    return u ? u : "";
}

void pm_tls_free(pm_tls *t)
{
    if (t == NULL)
        return;
    gt.deinit(t->s);
    free(t);
}
