/* errors.c - pm_strerror, and the thread-local last-error message.
 *
 * Layer 0 (the floor): calls nothing of pymirror's. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

static _Thread_local char last_error[512];

int pm_fail(const char *func, int code, const char *fmt, ...)
{
    int n = snprintf(last_error, sizeof last_error, "%s: ", func);
    if (n < 0 || (size_t)n >= sizeof last_error)
        n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + n, sizeof last_error - (size_t)n, fmt, ap);
    va_end(ap);
    return code;
}

void pm_clear_error(void)
{
    last_error[0] = '\0';
}

const char *pm_last_error(void)
{
    return last_error;
}

const char *pm_strerror(int code)
{
    switch (code) {
    case PM_OK: return "success";
    case PM_E_RANGE: return "offset, length or index out of range";
    case PM_E_ALIGN: return "misaligned offset or length";
    case PM_E_GEOMETRY: return "bad or mismatched volume geometry";
    case PM_E_STATE: return "command not allowed in the pair's state";
    case PM_E_READONLY: return "volume is write-protected";
    case PM_E_CORRUPT: return "metadata is corrupt";
    case PM_E_FOREIGN: return "metadata belongs to another version, pair or volume";
    case PM_E_JOB: return "copy job stopped on an error";
    case PM_E_TIMEDOUT: return "timed out";
    case PM_E_CLOSED: return "object is closed";
    case PM_E_BUSY: return "volume is in use by another pair";
    case PM_E_OUTSIDE: return "volume was changed outside pymirror";
    case PM_E_DETACHED: return "mirror is detached";
    case PM_E_NOLIB: return "optional library is not installed";
    default: break;
    }
    if (code < 0 && code > -4096) {
        /* strerror is not thread-safe in general; glibc's strerrordesc_np
         * would be, but is not portable.  Cover the codes the core returns. */
        switch (-code) {
        case EIO: return "Input/output error";
        case ENOSPC: return "No space left on device";
        case ENOMEM: return "Cannot allocate memory";
        case EINVAL: return "Invalid argument";
        case ENOENT: return "No such file or directory";
        case EEXIST: return "File exists";
        case EACCES: return "Permission denied";
        case EPERM: return "Operation not permitted";
        case EROFS: return "Read-only file system";
        case EBADF: return "Bad file descriptor";
        case ENOSYS: return "Function not implemented";
        case EFBIG: return "File too large";
        case EISDIR: return "Is a directory";
        case EAGAIN: return "Resource temporarily unavailable";
        case EBUSY: return "Device or resource busy";
        /* remote stores (NBD, RBD) */
        case ECONNREFUSED: return "Connection refused";
        case ENOTCONN: return "Transport endpoint is not connected";
        case ETIMEDOUT: return "Connection timed out";
        case ECONNRESET: return "Connection reset by peer";
        case EPIPE: return "Broken pipe";
        case ESHUTDOWN: return "Cannot send after transport endpoint shutdown";   /* an RBD client blocklisted */
        default: return "system error";
        }
    }
    return "unknown error";
}
