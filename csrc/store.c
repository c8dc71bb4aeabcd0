/*
 * store.c - the bytes behind a volume: a file or block device (positional
 * I/O, fdatasync), or memory; plus injectable faults for tests.
 *
 * Layer 1 (with bitmap.c): may call errors.c and clock.c (0).
 *
 * All I/O entry points check bounds, consult the fault list (one relaxed
 * load when none is armed), then call the backend through its ops table, so
 * other backends (a crash simulator, a remote export) plug in the same way.
 */
#include <fcntl.h>
#include <stddef.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <stdio.h>
#include <sys/uio.h>
#include <unistd.h>

#include "store.h"

/* ---- file backend -------------------------------------------------------- */

#define DIRECT_ALIGN 4096u

/* The descriptor for one I/O: an O_DIRECT store sends I/O whose buffer,
 * offset or length is not aligned through its buffered twin (Linux keeps
 * the page cache coherent with direct I/O on the same file). */
static int fd_for(const pm_store *s, const void *buf, uint64_t len, uint64_t off)
{
    if (s->fd_buffered < 0)
        return s->fd;
    if (((uintptr_t)buf | len | off) % DIRECT_ALIGN != 0)
        return s->fd_buffered;
    return s->fd;
}

static int file_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    pm_store *s = ctx;
    unsigned char *p = buf;
    int fd = fd_for(s, buf, len, off);
    while (len > 0) {
        ssize_t n = pread(fd, p, len > (1u << 30) ? (1u << 30) : (size_t)len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return PM_FAIL(-errno, "%s: read of %llu bytes at %llu failed", s->path,
                           (unsigned long long)len, (unsigned long long)off);
        }
        if (n == 0) {  /* past the end of a file that shrank: reads as zeros */
            memset(p, 0, (size_t)len);
            return 0;
        }
        p += n, off += (uint64_t)n, len -= (uint64_t)n;
        if (len > 0 && fd != s->fd_buffered && s->fd_buffered >= 0 && (uint64_t)n % DIRECT_ALIGN)
            fd = s->fd_buffered;   /* a short direct transfer left us unaligned */
    }
    return 0;
}

static int file_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    pm_store *s = ctx;
    const unsigned char *p = buf;
    int fd = fd_for(s, buf, len, off);
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len > (1u << 30) ? (1u << 30) : (size_t)len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return PM_FAIL(-errno, "%s: write of %llu bytes at %llu failed", s->path,
                           (unsigned long long)len, (unsigned long long)off);
        }
        if (n == 0)    /* no progress and no error: do not loop forever */
            return PM_FAIL(-EIO, "%s: write of %llu bytes at %llu made no progress", s->path,
                           (unsigned long long)len, (unsigned long long)off);
        p += n, off += (uint64_t)n, len -= (uint64_t)n;
        if (len > 0 && fd != s->fd_buffered && s->fd_buffered >= 0 && (uint64_t)n % DIRECT_ALIGN)
            fd = s->fd_buffered;
    }
    return 0;
}

static int file_flush(void *ctx)
{
    pm_store *s = ctx;
    if (s->readonly)
        return 0;
    if (fdatasync(s->fd) < 0)
        return PM_FAIL(-errno, "%s: fdatasync failed", s->path);
    return 0;
}

static void file_close(void *ctx)
{
    pm_store *s = ctx;
    if (s->fd >= 0)
        close(s->fd);
    if (s->fd_buffered >= 0)
        close(s->fd_buffered);
}

/* Zeroes: FALLOC_FL_ZERO_RANGE (or, with PM_ZERO_PUNCH, a punched hole
 * that reads as zeroes) where the filesystem has it.  A block device takes
 * the same fallocate modes (the kernel turns them into WRITE_ZEROES or a
 * discard that guarantees zeroes) and, where the device has neither,
 * BLKZEROOUT (the kernel writes the zeroes itself, no buffer crosses user
 * space).  Else -EOPNOTSUPP and the caller writes zero buffers. */
static int file_write_zeroes(void *ctx, uint64_t len, uint64_t off, unsigned flags)
{
    pm_store *s = ctx;
    int fd = s->fd_buffered >= 0 ? s->fd_buffered : s->fd;
    int mode = (flags & PM_ZERO_PUNCH) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE;
    if (s->blockdev && !(flags & PM_ZERO_PUNCH))
        mode |= FALLOC_FL_KEEP_SIZE;
    if (fallocate(fd, mode, (off_t)off, (off_t)len) == 0)
        return 0;
    int e = errno;
    if (s->blockdev && (off | len) % 512 == 0 && (e == EOPNOTSUPP || e == EINVAL || e == ENOSYS)) {
        uint64_t range[2] = { off, len };
        if (ioctl(fd, BLKZEROOUT, range) == 0)
            return 0;
        e = errno;
    }
    return e == EOPNOTSUPP || e == ENOSYS || e == EINVAL ? -EOPNOTSUPP : -e;
}

/* Data and holes from SEEK_DATA / SEEK_HOLE (a block device is all data). */
static int64_t file_extents(void *ctx, uint64_t off, uint64_t len, struct pm_extent *out, uint64_t max)
{
    pm_store *s = ctx;
    int fd = s->fd_buffered >= 0 ? s->fd_buffered : s->fd;
    uint64_t end = off + len;
    int64_t n = 0;
    while (off < end && (uint64_t)n < max) {
        off_t data = lseek(fd, (off_t)off, SEEK_DATA);
        if (data < 0 && errno != ENXIO)
            return -errno;                   /* no SEEK_DATA here: the caller's fallback */
        uint64_t d = data < 0 || (uint64_t)data > end ? end : (uint64_t)data;
        if (d > off) {                       /* a hole first */
            out[n++] = (struct pm_extent){ off, d - off, PM_EXTENT_HOLE, 0 };
            off = d;
            continue;
        }
        off_t hole = lseek(fd, (off_t)off, SEEK_HOLE);
        uint64_t h = hole < 0 || (uint64_t)hole > end ? end : (uint64_t)hole;
        if (h <= off)
            h = end;
        out[n++] = (struct pm_extent){ off, h - off, PM_EXTENT_DATA, 0 };
        off = h;
    }
    return n;
}

/* Which volume it is, and a stamp that changes when anyone writes it
 * (store_ident.c); st_dev:st_ino is only the fallback. */
static int file_identity(void *ctx, char *buf, size_t len)
{
    pm_store *s = ctx;
    if (pm__file_identity(s->fd, buf, len) == 0)
        return 0;
    snprintf(buf, len, "file:dev=%llu,ino=%llu", (unsigned long long)s->dev, (unsigned long long)s->ino);
    return 0;
}

static int file_change_stamp(void *ctx, char *buf, size_t len)
{
    pm_store *s = ctx;
    return pm__file_change_stamp(s->fd, buf, len);
}

/* the same callback table as a caller's own store (pymirror.h) */
static const struct pm_store_ops file_ops = {
    .size = sizeof(struct pm_store_ops),
    .read = file_read, .write = file_write, .flush = file_flush, .close = file_close,
    .write_zeroes = file_write_zeroes, .extents = file_extents, .identity = file_identity,
    .change_stamp = file_change_stamp,
};

/* ---- the copy engine's fast paths (store.h) ------------------------------ */

static int check_io(const pm_store *s, uint64_t len, uint64_t off, const char *func);

static int faults_armed(pm_store *s)
{
    return atomic_load_explicit(&s->nfaults, memory_order_acquire) != 0;
}

/* A write through the store completed (before it returns to its caller,
 * so a flush called after that sees it).  seq_cst: pairs with the loads in
 * pm_store_flush. */
static void note_written(pm_store *s)
{
    atomic_fetch_add_explicit(&s->written, 1, memory_order_seq_cst);
}

int pm__store_local(const pm_store *s)
{
    return s->ops == &file_ops;
}

void pm__store_prefetch(pm_store *s, uint64_t len, uint64_t off)
{
    if (s->ops != &file_ops || off >= s->size)
        return;
    if (len > s->size - off)
        len = s->size - off;
    int fd = s->fd_buffered >= 0 ? s->fd_buffered : s->fd;
    /* WILLNEED starts asynchronous reads of the range (block devices and
     * regular files alike); a hint, so its result does not matter.  Only
     * the data extents: "reading" a hole fills the page cache with zero
     * pages for nothing (3.5 ms per 8 MiB here), and the copier does not
     * read holes (job.c). */
    struct pm_extent ext[16];
    uint64_t end = off + len;
    while (off < end) {
        int64_t n = file_extents(s, off, end - off, ext, 16);
        if (n <= 0) {                         /* no extent query here: the whole range */
            (void)posix_fadvise(fd, (off_t)off, (off_t)(end - off), POSIX_FADV_WILLNEED);
            return;
        }
        for (int64_t i = 0; i < n; i++) {
            if (ext[i].kind == PM_EXTENT_DATA)
                (void)posix_fadvise(fd, (off_t)ext[i].offset, (off_t)ext[i].length, POSIX_FADV_WILLNEED);
            off = ext[i].offset + ext[i].length;
        }
    }
}

void pm__store_write_behind(pm_store *s, uint64_t len, uint64_t off)
{
    if (s->ops != &file_ops || s->fd_buffered >= 0 || off >= s->size)
        return;
    /* SYNC_FILE_RANGE_WRITE queues the dirty pages for writeback and does
     * not wait for them: the final fdatasync then finds little left to do,
     * and reads and writes overlap on the device instead of taking turns */
    (void)sync_file_range(s->fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
}

void pm__store_write_wait(pm_store *s, uint64_t len, uint64_t off)
{
    if (s->ops != &file_ops || s->fd_buffered >= 0 || off >= s->size)
        return;
    /* start what is not started yet and wait until the range is on the
     * device: the copier's dirty pages stay bounded (docs/copier.md) */
    (void)sync_file_range(s->fd, (off_t)off, (off_t)len,
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
}

void pm__store_sequential(pm_store *s, int on)
{
    /* SEQUENTIAL doubles the descriptor's read-ahead window (Linux); NORMAL
     * puts the device's default back */
    if (s->ops == &file_ops && s->fd_buffered < 0)
        (void)posix_fadvise(s->fd, 0, 0, on ? POSIX_FADV_SEQUENTIAL : POSIX_FADV_NORMAL);
}

void pm__store_evict(pm_store *s, uint64_t len, uint64_t off)
{
    if (s->ops != &file_ops || s->fd_buffered >= 0 || off >= s->size)
        return;
    if (len > s->size - off)
        len = s->size - off;
    /* DONTNEED drops the range's clean pages; dirty ones (a host write
     * since) stay and are written back as usual: a cache hint, never a
     * change of the data */
    (void)posix_fadvise(s->fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
}

/* cachestat(2) (Linux 6.5): how many pages of a range are cached, counting
 * only the ones there (mincore looks up every page: 0.67 ms for 76 MiB
 * here).  Not in older headers: the number is the generic table's. */
#if defined(__linux__) && !defined(__alpha__)
#define PM_NR_CACHESTAT 451
#endif
struct pm_cachestat_range { uint64_t off, len; };
struct pm_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };
static pm_atomic_int no_cachestat;

/* How much of [off, off+len) is in the page cache: PM__CACHED_NONE, _SOME,
 * _ALL, or -1 when the kernel cannot say. */
static int cached(int fd, uint64_t off, uint64_t len)
{
#ifdef PM_NR_CACHESTAT
    if (atomic_load_explicit(&no_cachestat, memory_order_relaxed))
        return -1;
    struct pm_cachestat_range r = { off, len };
    struct pm_cachestat cs;
    if (syscall(PM_NR_CACHESTAT, fd, &r, &cs, 0) == 0) {
        long page = sysconf(_SC_PAGESIZE);           /* glibc: a variable's read */
        uint64_t pg = page > 0 ? (uint64_t)page : 4096, pages = (off + len - 1) / pg - off / pg + 1;
        return cs.nr_cache == 0 ? PM__CACHED_NONE : cs.nr_cache >= pages ? PM__CACHED_ALL : PM__CACHED_SOME;
    }
    if (errno == ENOSYS)
        atomic_store_explicit(&no_cachestat, 1, memory_order_relaxed);
#endif
    return -1;
}

/* 1: no page of [off, off+len) is cached; 0: some are, or no answer. */
static int none_cached(int fd, uint64_t off, uint64_t len)
{
    return cached(fd, off, len) == PM__CACHED_NONE;
}

int pm__store_cached(pm_store *s, uint64_t len, uint64_t off)
{
    if (s->ops != &file_ops || len == 0 || off >= s->size)
        return -1;
    if (len > s->size - off)
        len = s->size - off;
    return cached(s->fd_buffered >= 0 ? s->fd_buffered : s->fd, off, len);
}

/* Pieces asked of cachestat first: only the ones with cached pages are
 * looked at page by page (an incremental job's scattered read-ahead leaves
 * a few cached tracks in most windows). */
#define RESIDENT_PIECE (1u << 20)

int64_t pm__store_resident(pm_store *s, uint64_t off, uint64_t len, unsigned char *vec)
{
    long page = sysconf(_SC_PAGESIZE);
    if (s->ops != &file_ops || s->fd_buffered >= 0 || page <= 0 || off % (uint64_t)page || off >= s->size)
        return -EINVAL;
    if (len > s->size - off)
        len = s->size - off;
    if (len == 0)
        return 0;
    uint64_t pg = (uint64_t)page, piece = RESIDENT_PIECE > pg ? RESIDENT_PIECE / pg * pg : pg;
    int64_t pages = (int64_t)((len + pg - 1) / pg);
    if (none_cached(s->fd, off, len)) {       /* the usual case of a cold copy */
        memset(vec, 0, (size_t)pages);
        return pages;
    }
    /* mapping the range touches no page; mincore then says which of its
     * pages are in the page cache */
    unsigned char *m = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, s->fd, (off_t)off);
    if (m == MAP_FAILED)
        return -errno;
    int rc = 0, e = 0;
    for (uint64_t at = 0; at < len && rc == 0; at += piece) {
        uint64_t n = len - at < piece ? len - at : piece;
        if (none_cached(s->fd, off + at, n)) {
            memset(vec + at / pg, 0, (size_t)((n + pg - 1) / pg));
        } else if ((rc = mincore(m + at, (size_t)n, vec + at / pg)) < 0) {
            e = errno;
        }
    }
    munmap(m, (size_t)len);
    if (rc < 0)
        return -e;
    return pages;
}

int pm__store_copy_range(pm_store *src, pm_store *dst, uint64_t len, uint64_t off)
{
    /* relaxed: a stale 0 only costs one more failing attempt */
    if (src->ops != &file_ops || dst->ops != &file_ops || src->fd_buffered >= 0 || dst->fd_buffered >= 0 ||
        atomic_load_explicit(&src->no_kernel_copy, memory_order_relaxed) ||
        atomic_load_explicit(&dst->no_kernel_copy, memory_order_relaxed) ||
        faults_armed(src) || faults_armed(dst) || dst->readonly)
        return PM__NO_KERNEL_COPY;
    if (check_io(src, len, off, __func__) || check_io(dst, len, off, __func__))
        return PM__NO_KERNEL_COPY;     /* the buffered path reports it */
    uint64_t done = 0;
    while (done < len) {
        loff_t in = (loff_t)(off + done), out = (loff_t)(off + done);
        size_t chunk = len - done > (1u << 30) ? (1u << 30) : (size_t)(len - done);
        ssize_t n = copy_file_range(src->fd, &in, dst->fd, &out, chunk, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (done == 0 && (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP ||
                              errno == ENOSYS || errno == EBADF)) {
                /* not between these two (block devices, other file systems
                 * on old kernels): the buffered path from now on */
                atomic_store_explicit(&src->no_kernel_copy, 1, memory_order_relaxed);
                return PM__NO_KERNEL_COPY;
            }
            return PM_FAIL(-errno, "%s -> %s: copy of %llu bytes at %llu failed", src->path, dst->path,
                           (unsigned long long)len, (unsigned long long)off);
        }
        if (n == 0)
            break;     /* the source file ended early: the rest reads as zeros */
        done += (uint64_t)n;
        note_written(dst);
    }
    if (done < len) {
        /* past the end of a source that shrank: zeros, as file_read gives */
        static const unsigned char zeros[65536];
        while (done < len) {
            uint64_t n = len - done > sizeof zeros ? sizeof zeros : len - done;
            int rc = file_write(dst, zeros, n, off + done);
            if (rc < 0)
                return rc;
            done += n;
        }
        note_written(dst);
    }
    return 0;
}

/* ---- memory backend ------------------------------------------------------ */

static int mem_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    pm_store *s = ctx;
    memcpy(buf, s->mem + off, (size_t)len);
    return 0;
}

static int mem_write(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    pm_store *s = ctx;
    memcpy(s->mem + off, buf, (size_t)len);
    return 0;
}

static int mem_flush(void *ctx) { return 0; }

static void mem_close(void *ctx)
{
    pm_store *s = ctx;
    if (s->mem != NULL)
        munmap(s->mem, (size_t)s->size);
}

static int mem_write_zeroes(void *ctx, uint64_t len, uint64_t off, unsigned flags)
{
    pm_store *s = ctx;
    memset(s->mem + off, 0, (size_t)len);
    return 0;
}

static int mem_identity(void *ctx, char *buf, size_t len)
{
    snprintf(buf, len, "memory:%p", ctx);
    return 0;
}

static const struct pm_store_ops mem_ops = {
    .size = sizeof(struct pm_store_ops),
    .read = mem_read, .write = mem_write, .flush = mem_flush, .close = mem_close,
    .write_zeroes = mem_write_zeroes, .identity = mem_identity,
};

/* ---- construction -------------------------------------------------------- */

pm_store *pm__store_alloc(const char *path)
{
    pm_store *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->path = strdup(path ? path : "");
    if (s->path == NULL) {
        free(s);
        return NULL;
    }
    s->fd = -1;
    s->fd_buffered = -1;
    pthread_mutex_init(&s->fault_lock, NULL);
    return s;
}

static void close_fds(int fd, int fd_direct)
{
    close(fd);
    if (fd_direct >= 0)
        close(fd_direct);
}

/* ---- volume ownership ------------------------------------------------------
 *
 * A volume belongs to one pair at a time.  A regular file is locked with
 * flock (exclusive and non-blocking when opened writable, shared when
 * read-only) on the store's descriptor, so the lock lives exactly as long as
 * the store and also stops a second open in the same process (flock locks
 * belong to an open file description).  A block device is opened O_EXCL,
 * which Linux refuses while another exclusive opener or a mount holds it.
 */

/* The pid holding a flock on (dev, ino), from /proc/locks, or 0 if none
 * is found (another namespace, no procfs).  Lines read
 * "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->". */
int pm__lock_holder(uint64_t dev, uint64_t ino)
{
    FILE *f = fopen("/proc/locks", "re");
    if (f == NULL)
        return 0;
    char line[256];
    int pid = 0;
    while (pid == 0 && fgets(line, sizeof line, f) != NULL) {
        char kind[16], mode[16], rw[16];
        int holder;
        unsigned maj, min;
        unsigned long long node;
        if (strstr(line, "->") != NULL)
            continue;
        if (sscanf(line, "%*d: %15s %15s %15s %d %x:%x:%llu", kind, mode, rw, &holder, &maj, &min, &node) != 7)
            continue;
        if (strcmp(kind, "FLOCK") == 0 && node == ino && maj == major((dev_t)dev) &&
            min == minor((dev_t)dev) && holder > 0)
            pid = holder;
    }
    fclose(f);
    return pid;
}

/* Take the volume's lock on fd (a regular file): PM_E_BUSY if held. */
static int lock_volume(int fd, const char *path, int readonly, const struct stat *st)
{
    if (flock(fd, (readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) == 0)
        return 0;
    if (errno != EWOULDBLOCK)
        return PM_FAIL(-errno, "%s: cannot lock the volume", path);
    int pid = pm__lock_holder((uint64_t)st->st_dev, (uint64_t)st->st_ino);
    if (pid > 0)
        return pm_fail("pm_store_open_file", PM_E_BUSY, "volume %s is in use by another pair (pid %d)", path, pid);
    return pm_fail("pm_store_open_file", PM_E_BUSY, "volume %s is in use by another pair", path);
}

int pm_store_open_file(const char *path, unsigned flags, uint64_t size, pm_store **out)
{
    if (out == NULL || path == NULL)
        return PM_FAIL(-EINVAL, "path and out must not be NULL");
    *out = NULL;
    if (path[0] == '\0')
        return PM_FAIL(-ENOENT, "the path is empty");
    int create = (flags & PM_STORE_CREATE) != 0;
    int readonly = (flags & PM_STORE_READONLY) != 0;
    if (create && readonly)
        return PM_FAIL(-EINVAL, "%s: cannot create a read-only store", path);
    if (create && size == 0)
        return PM_FAIL(PM_E_GEOMETRY, "%s: a new volume needs a size greater than zero", path);
    int lock = (flags & PM_STORE_NOLOCK) == 0;
    int oflags = O_CLOEXEC | (readonly ? O_RDONLY : O_RDWR);
    if (create)
        oflags |= O_CREAT | O_EXCL;
    struct stat pre;
    if (!create && lock && stat(path, &pre) == 0 && S_ISBLK(pre.st_mode))
        oflags |= O_EXCL;              /* a block device: exclusive open is its lock */
    int fd = open(path, oflags, 0644);
    if (fd < 0 && errno == EBUSY && (oflags & O_EXCL) && !create)
        return PM_FAIL(PM_E_BUSY, "volume %s is in use (mounted, or opened exclusively by another "
                       "pair or program)", path);
    if (fd < 0)
        return PM_FAIL(-errno, "%s: cannot %s", path, create ? "create" : "open");
    /* O_DIRECT: a second descriptor, so that a filesystem without it (tmpfs)
     * simply leaves the store buffered, and unaligned I/O has a way through. */
    int fd_direct = -1;
#ifdef O_DIRECT
    if (flags & PM_STORE_DIRECT)
        fd_direct = open(path, (oflags & ~(O_CREAT | O_EXCL)) | O_DIRECT);
#endif
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = -errno;
        close_fds(fd, fd_direct);
        return PM_FAIL(e, "%s: cannot stat", path);
    }
    if (lock && S_ISREG(st.st_mode)) {
        int rc = lock_volume(fd, path, readonly, &st);
        if (rc < 0) {
            close_fds(fd, fd_direct);
            if (create)
                unlink(path);
            return rc;
        }
    }
    uint64_t real = 0;
    if (create) {
        if (ftruncate(fd, (off_t)size) < 0) {  /* sparse: no blocks allocated */
            int e = -errno;
            close_fds(fd, fd_direct);
            unlink(path);
            return PM_FAIL(e, "%s: cannot set the size to %llu", path, (unsigned long long)size);
        }
        real = size;
    } else if (S_ISREG(st.st_mode)) {
        real = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &real) < 0) {
            int e = -errno;
            close_fds(fd, fd_direct);
            return PM_FAIL(e, "%s: cannot read the device size", path);
        }
    } else {
        close_fds(fd, fd_direct);
        return PM_FAIL(-EINVAL, "%s: not a regular file or block device", path);
    }
    if (real == 0) {
        close_fds(fd, fd_direct);
        return PM_FAIL(PM_E_GEOMETRY, "%s: the volume is empty (0 bytes)", path);
    }
    pm_store *s = pm__store_alloc(path);
    if (s == NULL) {
        close_fds(fd, fd_direct);
        if (create)
            unlink(path);
        return PM_FAIL(-ENOMEM, "out of memory");
    }
    s->ops = &file_ops;
    s->ctx = s;
    s->written = 1;           /* the first flush syncs whatever an earlier opener left */
    if (fd_direct >= 0) {
        s->fd = fd_direct;        /* aligned I/O goes direct */
        s->fd_buffered = fd;
    } else {
        s->fd = fd;
    }
    s->size = real;
    s->readonly = readonly;
    s->blockdev = S_ISBLK(st.st_mode);
    s->dev = (uint64_t)st.st_dev;
    s->ino = (uint64_t)st.st_ino;
    *out = s;
    return 0;
}

int pm_store_create_memory(uint64_t size, pm_store **out)
{
    if (out == NULL)
        return PM_FAIL(-EINVAL, "out must not be NULL");
    *out = NULL;
    if (size == 0)
        return PM_FAIL(PM_E_GEOMETRY, "a volume needs a size greater than zero");
    if (size > ((uint64_t)1 << 46))
        return PM_FAIL(-ENOMEM, "a memory volume of %llu bytes is too large", (unsigned long long)size);
    pm_store *s = pm__store_alloc("");
    if (s == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    /* anonymous mmap: zero-filled and lazily backed, so large scratch
     * volumes cost only what is written */
    void *m = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        pm_store_destroy(s);
        return PM_FAIL(-ENOMEM, "cannot map %llu bytes", (unsigned long long)size);
    }
    s->mem = m;
    s->ops = &mem_ops;
    s->ctx = s;
    s->size = size;
    *out = s;
    return 0;
}

void pm_store_destroy(pm_store *s)
{
    if (s == NULL)
        return;
    if (s->locked && s->ops->lock != NULL)
        s->ops->lock(s->ctx, PM_LOCK_RELEASE);
    if (s->ops != NULL)
        s->ops->close(s->ctx);
    pm_store_clear_faults(s);
    pthread_mutex_destroy(&s->fault_lock);
    free(s->path);
    free(s);
}

uint64_t pm_store_size(const pm_store *s) { return s->size; }
const char *pm_store_path(const pm_store *s) { return s->path; }

/* ---- faults -------------------------------------------------------------- */

int pm_store_inject_fault(pm_store *s, int op, uint64_t offset, uint64_t len, int error, int64_t count)
{
    if ((op != PM_FAULT_READ && op != PM_FAULT_WRITE) || error >= 0 || count == 0 || count < -1)
        return PM_FAIL(-EINVAL, "bad fault: op %d, error %d, count %lld", op, error, (long long)count);
    struct pm_fault *f = calloc(1, sizeof *f);
    if (f == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    f->op = op, f->offset = offset, f->len = len, f->error = error, f->count = count;
    pthread_mutex_lock(&s->fault_lock);
    f->next = s->faults;
    s->faults = f;
    atomic_fetch_add_explicit(&s->nfaults, 1, memory_order_release);
    pthread_mutex_unlock(&s->fault_lock);
    return 0;
}

int pm_store_clear_faults(pm_store *s)
{
    pthread_mutex_lock(&s->fault_lock);
    struct pm_fault *f = s->faults;
    s->faults = NULL;
    atomic_store_explicit(&s->nfaults, 0, memory_order_release);
    pthread_mutex_unlock(&s->fault_lock);
    while (f != NULL) {
        struct pm_fault *next = f->next;
        free(f);
        f = next;
    }
    return 0;
}

/* The error of an armed fault matching this I/O, or 0. */
static int fault_hit(pm_store *s, int op, uint64_t len, uint64_t off)
{
    /* acquire pairs with the release in inject: a thread that sees the
     * count also sees the list under the lock anyway; this is a fast path */
    if (PM_LIKELY(atomic_load_explicit(&s->nfaults, memory_order_acquire) == 0))
        return 0;
    int err = 0;
    pthread_mutex_lock(&s->fault_lock);
    for (struct pm_fault *f = s->faults; f != NULL; f = f->next) {
        if (f->op == op && f->count != 0 && off < f->offset + f->len && f->offset < off + len) {
            err = f->error;
            if (f->count > 0)
                f->count--;
            break;
        }
    }
    pthread_mutex_unlock(&s->fault_lock);
    return err;
}

/* ---- I/O ----------------------------------------------------------------- */

static int check_io(const pm_store *s, uint64_t len, uint64_t off, const char *func)
{
    if (off > s->size || len > s->size - off)
        return pm_fail(func, PM_E_RANGE, "offset %llu + length %llu is beyond the volume size %llu",
                       (unsigned long long)off, (unsigned long long)len, (unsigned long long)s->size);
    return 0;
}

int pm_store_read(pm_store *s, void *buf, uint64_t len, uint64_t offset)
{
    int rc = check_io(s, len, offset, __func__);
    if (rc || len == 0)
        return rc;
    if ((rc = fault_hit(s, PM_FAULT_READ, len, offset)) != 0)
        return PM_FAIL(rc, "%s: injected fault on read at %llu", s->path[0] ? s->path : "memory",
                       (unsigned long long)offset);
    return s->ops->read(s->ctx, buf, len, offset);
}

/* A read only if it needs no wait for the device: preadv2 with RWF_NOWAIT,
 * which copies from the page cache and refuses (EAGAIN) when a page is
 * missing or still being read in.  File stores only, and only when no
 * fault is injected; anything short of the whole range is -EAGAIN too, and
 * no error message is set: the caller then reads the ordinary way, which
 * says what is wrong. */
int pm__store_read_nowait(pm_store *s, void *buf, uint64_t len, uint64_t offset)
{
#ifdef RWF_NOWAIT
    if (s->ops != &file_ops || len == 0 || len > (1u << 30) || offset > s->size || len > s->size - offset ||
        atomic_load_explicit(&s->nfaults, memory_order_acquire) != 0)
        return -EAGAIN;
    struct iovec v = { buf, (size_t)len };
    ssize_t n = preadv2(s->fd_buffered >= 0 ? s->fd_buffered : s->fd, &v, 1, (off_t)offset, RWF_NOWAIT);
    return n == (ssize_t)len ? 0 : -EAGAIN;
#else
    return -EAGAIN;
#endif
}

/* The checks every write-like call makes first: range, read-only, an
 * injected fault.  0 to go on (also for len 0, which writes nothing). */
static int write_allowed(pm_store *s, uint64_t len, uint64_t offset, const char *func)
{
    int rc = check_io(s, len, offset, func);
    if (rc || len == 0)
        return rc;
    if (s->readonly)
        return pm_fail(func, -EROFS, "%s: the volume is open read-only", s->path);
    if ((rc = fault_hit(s, PM_FAULT_WRITE, len, offset)) != 0)
        return pm_fail(func, rc, "%s: injected fault on write at %llu", s->path[0] ? s->path : "memory",
                       (unsigned long long)offset);
    return 0;
}

int pm_store_write(pm_store *s, const void *buf, uint64_t len, uint64_t offset)
{
    int rc = write_allowed(s, len, offset, __func__);
    if (rc || len == 0)
        return rc;
    rc = s->ops->write(s->ctx, buf, len, offset);
    note_written(s);          /* even a failed write may have written part */
    return rc;
}

/* A file store to which nothing was written since its last successful
 * flush has nothing to make durable: the fdatasync is skipped (a protected
 * restore's mirror at the job's final commit, a host FLUSH of an idle
 * volume).  The first flush after opening always syncs (an earlier process
 * may have left writes unsynced).  Two flushes at once both sync unless the
 * first has finished: `synced` only moves once the fdatasync returned. */
int pm_store_flush(pm_store *s)
{
    if (s->ops != &file_ops)
        return s->ops->flush(s->ctx);
    uint64_t w = atomic_load_explicit(&s->written, memory_order_seq_cst);
    if (atomic_load_explicit(&s->synced, memory_order_seq_cst) >= w)
        return 0;
    int rc = s->ops->flush(s->ctx);
    if (rc == 0) {
        uint64_t old = atomic_load_explicit(&s->synced, memory_order_seq_cst);
        while (old < w && !atomic_compare_exchange_weak_explicit(&s->synced, &old, w, memory_order_seq_cst,
                                                                 memory_order_seq_cst))
            ;
    }
    return rc;
}

int pm_store_write_zeroes(pm_store *s, uint64_t len, uint64_t offset, unsigned flags)
{
    int rc = write_allowed(s, len, offset, __func__);
    if (rc || len == 0)
        return rc;
    note_written(s);          /* counted before as well as after: a zeroing is never left uncovered */
    if (s->ops->write_zeroes != NULL) {
        rc = s->ops->write_zeroes(s->ctx, len, offset, flags);
        note_written(s);
        if (rc != -EOPNOTSUPP && rc != -ENOSYS)
            return rc < 0 ? PM_FAIL(rc, "%s: writing zeroes at %llu failed", s->path,
                                    (unsigned long long)offset) : rc;
    }
    /* fallback: write zeroes from a buffer */
    uint64_t chunk = len < (1u << 20) ? len : (1u << 20);
    unsigned char *z = calloc(1, (size_t)chunk);
    if (z == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    for (rc = 0; len > 0 && rc == 0;) {
        uint64_t n = len < chunk ? len : chunk;
        rc = s->ops->write(s->ctx, z, n, offset);
        len -= n, offset += n;
    }
    note_written(s);
    free(z);
    return rc;
}

int64_t pm_store_extents(pm_store *s, uint64_t offset, uint64_t len, struct pm_extent *out, uint64_t max)
{
    int rc = check_io(s, len, offset, __func__);
    if (rc)
        return rc;
    if (out == NULL || max == 0)
        return PM_FAIL(-EINVAL, "out must hold at least one extent");
    if (len == 0)
        return 0;
    if (s->ops->extents != NULL) {
        int64_t n = s->ops->extents(s->ctx, offset, len, out, max);
        if (n > 0)
            return n;
        if (n < 0 && n != -EOPNOTSUPP && n != -ENOSYS && n != -EINVAL)
            return PM_FAIL((int)n, "%s: the extent query failed", s->path);
    }
    out[0] = (struct pm_extent){ offset, len, PM_EXTENT_DATA, 0 };   /* unknown: all data */
    return 1;
}

int pm_store_identity(pm_store *s, char *buf, size_t len)
{
    if (buf == NULL || len == 0)
        return PM_FAIL(-EINVAL, "buf must hold at least one byte");
    buf[0] = 0;
    if (s->ops->identity != NULL && s->ops->identity(s->ctx, buf, len) == 0 && buf[0] != 0) {
        buf[len - 1] = 0;
        return 0;
    }
    if (s->path[0] != 0)
        snprintf(buf, len, "%s", s->path);
    else
        snprintf(buf, len, "store:%p", (void *)s);   /* unnamed: itself */
    return 0;
}

int pm_store_change_stamp(pm_store *s, char *buf, size_t len)
{
    if (buf == NULL || len == 0)
        return PM_FAIL(-EINVAL, "buf must hold at least one byte");
    buf[0] = 0;
    if (s->ops->change_stamp == NULL)
        return -EOPNOTSUPP;
    int rc = s->ops->change_stamp(s->ctx, buf, len);
    buf[len - 1] = 0;
    if (rc == 0 && buf[0] == 0)
        rc = -EOPNOTSUPP;
    if (rc < 0)
        buf[0] = 0;
    return rc;
}

void pm_io_complete(struct pm_io *io, int result)
{
    io->done(io, result);
}

int pm_store_submit(pm_store *s, struct pm_io *io)
{
    if (io == NULL || io->done == NULL)
        return PM_FAIL(-EINVAL, "io and its done callback must not be NULL");
    int rc = 0;
    if (io->op == PM_IO_READ || io->op == PM_IO_WRITE || io->op == PM_IO_WRITE_ZEROES) {
        if ((rc = check_io(s, io->len, io->offset, __func__)) != 0)
            return rc;
        if (io->op != PM_IO_READ && s->readonly)
            return PM_FAIL(-EROFS, "%s: the volume is open read-only", s->path);
        int fop = io->op == PM_IO_READ ? PM_FAULT_READ : PM_FAULT_WRITE;
        if ((rc = fault_hit(s, fop, io->len, io->offset)) != 0) {
            pm_io_complete(io, rc);          /* an injected fault fails the I/O, not the submit */
            return 0;
        }
    } else if (io->op != PM_IO_FLUSH) {
        return PM_FAIL(-EINVAL, "unknown I/O operation %u", io->op);
    }
    if (s->ops->submit != NULL)
        return s->ops->submit(s->ctx, io);
    /* no asynchronous path: do it now and complete before returning */
    switch (io->op) {
    case PM_IO_READ: rc = io->len ? s->ops->read(s->ctx, io->buf, io->len, io->offset) : 0; break;
    case PM_IO_WRITE:
        rc = io->len ? s->ops->write(s->ctx, io->buf, io->len, io->offset) : 0;
        note_written(s);
        break;
    case PM_IO_WRITE_ZEROES: rc = pm_store_write_zeroes(s, io->len, io->offset, io->flags); break;
    default: rc = pm_store_flush(s); break;
    }
    pm_io_complete(io, rc);
    return 0;
}

/* ---- a caller's own store ------------------------------------------------ */

/* Size of the 0.2 table (the first): size..submit. */
#define OPS_SIZE_0_2 (offsetof(struct pm_store_ops, change_stamp))

int pm_store_create_ops(const struct pm_store_ops *ops, void *ctx, uint64_t size, const char *name,
                        unsigned flags, pm_store **out)
{
    if (out == NULL || ops == NULL)
        return PM_FAIL(-EINVAL, "ops and out must not be NULL");
    *out = NULL;
    size_t osize = ops->size ? ops->size : OPS_SIZE_0_2;
    if (osize < offsetof(struct pm_store_ops, write_zeroes))
        return PM_FAIL(-EINVAL, "ops->size %zu is too small: set it to sizeof(struct pm_store_ops)", osize);
    for (size_t i = sizeof *ops; i < osize; i++)
        if (((const unsigned char *)ops)[i] != 0)
            return PM_FAIL(-E2BIG, "the store table sets callbacks this library (version %d.%d) does not know",
                           PM_VERSION_MAJOR, PM_VERSION_MINOR);
    if (ops->read == NULL || ops->write == NULL || ops->flush == NULL || ops->close == NULL)
        return PM_FAIL(-EINVAL, "read, write, flush and close are required");
    if (size == 0)
        return PM_FAIL(PM_E_GEOMETRY, "a volume needs a size greater than zero");
    if (flags & ~(unsigned)(PM_STORE_READONLY | PM_STORE_NOLOCK))
        return PM_FAIL(-EINVAL, "flags 0x%x: only PM_STORE_READONLY and PM_STORE_NOLOCK apply", flags);
    pm_store *s = pm__store_alloc(name);
    if (s == NULL)
        return PM_FAIL(-ENOMEM, "out of memory");
    memset(&s->own_ops, 0, sizeof s->own_ops);
    memcpy(&s->own_ops, ops, osize < sizeof *ops ? osize : sizeof *ops);   /* older tables: NULL = absent */
    s->own_ops.size = sizeof s->own_ops;
    s->ops = &s->own_ops;
    s->ctx = ctx;
    s->size = size;
    s->readonly = (flags & PM_STORE_READONLY) != 0;
    if (s->ops->lock != NULL && !(flags & PM_STORE_NOLOCK)) {
        int rc = s->ops->lock(ctx, s->readonly ? PM_LOCK_SHARED : PM_LOCK_EXCLUSIVE);
        if (rc < 0) {
            s->ops = NULL;                   /* the caller keeps ctx: close is not called */
            pm_store_destroy(s);
            if (rc == PM_E_BUSY)
                return PM_FAIL(PM_E_BUSY, "volume %s is in use by another pair", name ? name : "");
            return PM_FAIL(rc, "%s: cannot lock the volume", name ? name : "");
        }
        s->locked = 1;
    }
    *out = s;
    return 0;
}
