/* store.h - internal layout of stores (store.c, store_volatile.c), shared
 * with the layers above: a store is a callback table (struct pm_store_ops,
 * public in pymirror.h) and its context, plus bounds and injected faults. */
#ifndef PM_STORE_H
#define PM_STORE_H

#include <pthread.h>

#include "internal.h"

struct pm_fault {
    struct pm_fault *next;
    int op;                /* PM_FAULT_READ or PM_FAULT_WRITE */
    uint64_t offset, len;
    int error;             /* negative errno */
    int64_t count;         /* -1: until cleared */
};

struct pm_power;            /* a power line shared by volatile stores */
struct pm_unflushed;        /* a write since the last flush */

struct pm_store {
    const struct pm_store_ops *ops;   /* the callback table (pymirror.h); built-ins: static */
    void *ctx;                        /* its context: the store itself for built-ins */
    struct pm_store_ops own_ops;      /* a caller's table, copied (pm_store_create_ops) */
    int locked;                       /* ops->lock was taken: release it at destroy */
    uint64_t size;
    char *path;            /* "" for memory */
    int fd;                /* -1 for memory */
    int fd_buffered;       /* PM_STORE_DIRECT: a second, buffered descriptor
                              for I/O that is not 4 KiB-aligned (else -1) */
    int readonly;
    int blockdev;          /* a block device: zeroes by BLKZEROOUT when fallocate cannot */
    pm_atomic_int no_kernel_copy;  /* copy_file_range failed with "not supported" once */
    /* File stores: writes completed through the store, and how many of
     * them the last successful flush covered; a flush with nothing new to
     * cover skips its fdatasync (store.c, pm_store_flush). */
    pm_atomic_u64 written, synced;
    uint64_t dev, ino;     /* identity of a file store (0 for memory) */
    unsigned char *mem;    /* memory store */
    pthread_mutex_t fault_lock;
    pm_atomic_int nfaults; /* fast check: any faults armed? */
    struct pm_fault *faults;
    /* volatile stores (store_volatile.c) */
    unsigned char *durable;       /* what survives a power loss */
    struct pm_power *power;
    struct pm_unflushed *unflushed, *unflushed_tail;
    /* branch compare (compare.c): a per-track hash the store offers
     * (pm_store_set_track_hash), computed next to its data; NULL: none */
    int (*track_hash)(void *ctx, uint64_t offset, uint64_t len, uint32_t track_size, uint32_t *out);
    void *track_hash_ctx;
};

pm_store *pm__store_alloc(const char *path);

/* The copy engine's fast paths (copier.c, job.c).  Thread-safe.
 * pm__store_copy_range: copy [off, off+len) from src to dst inside the
 * kernel (copy_file_range, no user-space buffer) when both are file stores
 * on buffered descriptors and neither has faults armed; returns 0, a
 * negative errno, or PM__NO_KERNEL_COPY when that path does not apply
 * (the caller then copies through its buffer; nothing was written).
 * pm__store_prefetch: ask the kernel to start reading [off, off+len) into
 * the page cache now (file stores; a no-op for others). */
#define PM__NO_KERNEL_COPY 1
int pm__store_copy_range(pm_store *src, pm_store *dst, uint64_t len, uint64_t off);
void pm__store_prefetch(pm_store *s, uint64_t len, uint64_t off);
/* pm__store_local: 1 for a local file or block device (an I/O on it is a
 * page-cache copy or one device request), 0 for every other store. */
int pm__store_local(const pm_store *s);
/* pm__store_cached: how much of [off, off+len) of a local file is in the
 * page cache (cachestat(2), which reads nothing in): PM__CACHED_NONE, _SOME
 * or _ALL; -1 for any other store, or when the kernel cannot say. */
#define PM__CACHED_NONE 0
#define PM__CACHED_SOME 1
#define PM__CACHED_ALL 2
int pm__store_cached(pm_store *s, uint64_t len, uint64_t off);
/* pm__store_read_nowait: pm_store_read from the page cache only (a local
 * file, no injected fault): -EAGAIN, and nothing said, if any of it would
 * wait for the device. */
int pm__store_read_nowait(pm_store *s, void *buf, uint64_t len, uint64_t offset);
/* pm__store_write_behind: start writing [off, off+len) back to the device
 * now, without waiting (file stores; a no-op for others).  Durability still
 * comes only from pm_store_flush. */
void pm__store_write_behind(pm_store *s, uint64_t len, uint64_t off);
/* store_ident.c (layer 0): a file's or block device's identity, whether
 * that identity is stable (not device numbers), and a regular file's (or a
 * loop device's backing file's) change stamp; 0 or a negative errno. */
int pm__file_identity(int fd, char *buf, size_t len);
int pm__identity_stable(const char *id);
int pm__file_change_stamp(int fd, char *buf, size_t len);
/* pm__store_write_wait: write [off, off+len) back and wait until it is on
 * the device (file stores; a no-op for others): bounds the dirty pages a
 * copy leaves behind.  Not a durability point either. */
void pm__store_write_wait(pm_store *s, uint64_t len, uint64_t off);
/* pm__store_evict: drop [off, off+len) from the page cache where it is
 * clean (file stores on buffered descriptors; a no-op for others), so a
 * large copy does not fill the page cache (docs/copier.md).
 * pm__store_resident: which pages of [off, off+len) are in the page cache
 * now, one byte per system page in vec (bit 0 set: cached); off a multiple
 * of the page size.  Returns the number of pages, or a negative errno
 * (not a file store on a buffered descriptor, or the query failed). */
void pm__store_evict(pm_store *s, uint64_t len, uint64_t off);
/* pm__store_sequential: the store's reads are (on = 1) or no longer are
 * (on = 0) one long sequential stream: a larger kernel read-ahead. */
void pm__store_sequential(pm_store *s, int on);
int64_t pm__store_resident(pm_store *s, uint64_t off, uint64_t len, unsigned char *vec);
/* The pid holding a flock on the file (dev, ino), or 0 if not found. */
int pm__lock_holder(uint64_t dev, uint64_t ino);

#endif
