/*
 * nbd_tls.h - what the C request loop (nbd_loop.c) needs of a TLS session
 * beyond the public pm_tls_* calls.
 */
#ifndef PM_NBD_TLS_H
#define PM_NBD_TLS_H

#include <sys/uio.h>

#include "pymirror.h"

/* Send every byte of iov[0..n) as one corked run of records: a reply's
 * header and its data leave in one record (and one send) where they fit,
 * not in a record each.  0, or -1 when the session failed. */
int pm__tls_sendv(pm_tls *t, const struct iovec *iov, int n);

/* Poll the socket once without sleeping (the C loop's poll for the next
 * request, nbd_spin.h), when nothing received is left to read
 * (pm_tls_pending 0): 1 if bytes came (taken off the socket for GnuTLS to
 * read first), 0 if none yet, -1 if the client is gone.  The receiving
 * thread's only. */
int pm__tls_poll(pm_tls *t);

#endif
