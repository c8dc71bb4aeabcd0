/*
 * store_uri.c - pymirror's own query parameters in a volume URI (qd=,
 * conns=, timeout=), taken out before the URI goes to the backend's
 * library, which has its own parser for the rest.
 *
 * Layer 1 (with bitmap.c, store.c): may call errors.c (0).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "store_uri.h"

/* One parameter "key=value" (or "key") in [p, end): does its key equal key? */
static int key_is(const char *p, const char *end, const char *key)
{
    size_t k = strlen(key);
    const char *eq = memchr(p, '=', (size_t)(end - p));
    const char *kend = eq ? eq : end;
    return (size_t)(kend - p) == k && memcmp(p, key, k) == 0;
}

int pm__uri_take(char *uri, const char *key, char *val, size_t vallen)
{
    char *q = strchr(uri, '?');
    if (q == NULL)
        return 0;
    char *frag = strchr(q, '#');
    size_t qlen = frag ? (size_t)(frag - q) : strlen(q);
    char *kept = malloc(qlen + 1);       /* the parameters that stay */
    if (kept == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    size_t nkept = 0;
    int found = 0;
    const char *p = q + 1, *qend = q + qlen;
    while (p < qend) {
        const char *amp = memchr(p, '&', (size_t)(qend - p));
        const char *pend = amp ? amp : qend;
        if (pend > p && key_is(p, pend, key)) {
            if (found++) {
                free(kept);
                return PM_FAIL(-EINVAL, "the URI gives %s= twice", key);
            }
            const char *eq = memchr(p, '=', (size_t)(pend - p));
            size_t n = eq ? (size_t)(pend - eq - 1) : 0;
            if (n >= vallen) {
                free(kept);
                return PM_FAIL(-EINVAL, "the value of %s= in the URI is too long", key);
            }
            if (n)
                memcpy(val, eq + 1, n);
            val[n] = 0;
        } else if (pend > p) {
            kept[nkept] = nkept == 0 ? '?' : '&';
            nkept++;
            memcpy(kept + nkept, p, (size_t)(pend - p));
            nkept += (size_t)(pend - p);
        }
        p = pend + 1;
    }
    if (found) {                          /* the rest (a fragment) moves up */
        memmove(q + nkept, q + qlen, strlen(q + qlen) + 1);
        memcpy(q, kept, nkept);
    }
    free(kept);
    return found;
}

int pm__uri_take_uint(char *uri, const char *key, uint64_t min, uint64_t max, uint64_t *out)
{
    char val[32];
    int rc = pm__uri_take(uri, key, val, sizeof val);
    if (rc <= 0)
        return rc;
    char *end = NULL;
    errno = 0;
    unsigned long long v = val[0] >= '0' && val[0] <= '9' ? strtoull(val, &end, 10) : 0;
    if (end == NULL || *end != 0 || errno != 0)
        return PM_FAIL(-EINVAL, "%s=%s in the URI is not a whole number", key, val);
    if (v < min || v > max)
        return PM_FAIL(PM_E_RANGE, "%s=%llu in the URI is out of range (%llu to %llu)", key, v,
                       (unsigned long long)min, (unsigned long long)max);
    *out = v;
    return 0;
}
