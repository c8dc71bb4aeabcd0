/* store_uri.h - the query parameters of a volume URI that pymirror reads
 * itself (store_uri.c, layer 1), for the remote stores (store_nbd.c, and
 * store_rbd.c if it needs them).  Internal: never installed. */
#ifndef PM_STORE_URI_H
#define PM_STORE_URI_H

#include <stddef.h>
#include <stdint.h>

/* Take the parameter `key` out of the query string of `uri` (edited in
 * place: "a?x=1&qd=8&y=2" becomes "a?x=1&y=2", "a?qd=8" becomes "a") and
 * copy its value into val (vallen bytes).  Returns 1 when found, 0 when
 * absent, a negative code when it is given twice or its value is too long
 * (the message says which). */
int pm__uri_take(char *uri, const char *key, char *val, size_t vallen);

/* Take `key` as a whole number from min to max; *out keeps its default when
 * the parameter is absent.  0, or PM_E_RANGE / -EINVAL naming the key. */
int pm__uri_take_uint(char *uri, const char *key, uint64_t min, uint64_t max, uint64_t *out);

#endif
