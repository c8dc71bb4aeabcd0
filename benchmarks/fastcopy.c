/*
 * fastcopy.c - the fastest durable file copy we could write for this
 * machine, as a baseline for bench_copy.py (not part of pymirror).
 *
 *   fastcopy SRC DST [THREADS [CHUNK_MIB [MODE]]]
 *   MODE: cfr (default) | rw, then any of "-nowb" (no write-behind),
 *         "-keep" (leave the copied pages cached), "-hint" (ask the kernel
 *         to read two chunks ahead with POSIX_FADV_WILLNEED instead of
 *         marking the source sequential): cfr-keep-hint is the copy of
 *         the first issue-12 runs.
 *
 * DST must exist with SRC's size (the benchmark gives it an allocated
 * one, as a restore's target is).  THREADS threads each copy one
 * contiguous stripe in CHUNK_MIB pieces, with copy_file_range (cfr) or
 * pread/pwrite through a buffer (rw).  The source is read as a sequential
 * stream (POSIX_FADV_SEQUENTIAL); each chunk's write-back is started at
 * once (sync_file_range WRITE) and waited for one chunk later; then the
 * chunk's pages are dropped from both files' page cache
 * (POSIX_FADV_DONTNEED), so the copy never fills the cache (on this
 * machine that halves a copy's speed from a few GiB on: docs/copier.md).
 * One fdatasync at the end makes the copy durable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int in_fd, out_fd, use_rw, no_wb, keep, hint;
static uint64_t chunk;

struct stripe {
    uint64_t lo, hi;
    pthread_t th;
    int err;
};

static int copy_piece(uint64_t off, uint64_t len, unsigned char *buf)
{
    while (len > 0) {
        ssize_t n;
        if (use_rw) {
            n = pread(in_fd, buf, len, (off_t)off);
            if (n > 0 && pwrite(out_fd, buf, (size_t)n, (off_t)off) != n)
                return errno ? errno : EIO;
        } else {
            loff_t a = (loff_t)off, b = (loff_t)off;
            n = copy_file_range(in_fd, &a, out_fd, &b, len, 0);
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EIO;
        off += (uint64_t)n, len -= (uint64_t)n;
    }
    return 0;
}

static void *run(void *arg)
{
    struct stripe *s = arg;
    unsigned char *buf = use_rw ? aligned_alloc(4096, chunk) : NULL;
    uint64_t prev_off = 0, prev_len = 0;
    for (uint64_t off = s->lo; off < s->hi && !s->err; off += chunk) {
        uint64_t len = s->hi - off < chunk ? s->hi - off : chunk;
        if (hint && off + len < s->hi)
            posix_fadvise(in_fd, (off_t)(off + len), (off_t)(2 * chunk), POSIX_FADV_WILLNEED);
        s->err = copy_piece(off, len, buf);
        if (!keep)
            posix_fadvise(in_fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
        if (no_wb)
            continue;
        sync_file_range(out_fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
        if (prev_len) {
            sync_file_range(out_fd, (off_t)prev_off, (off_t)prev_len,
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
            if (!keep)
                posix_fadvise(out_fd, (off_t)prev_off, (off_t)prev_len, POSIX_FADV_DONTNEED);
        }
        prev_off = off, prev_len = len;
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: fastcopy SRC DST [THREADS [CHUNK_MIB [cfr|rw[-nowb][-keep][-hint]]]]\n");
        return 2;
    }
    int threads = argc > 3 ? atoi(argv[3]) : 2;
    chunk = (uint64_t)(argc > 4 ? atoi(argv[4]) : 4) << 20;
    const char *mode = argc > 5 ? argv[5] : "cfr";
    use_rw = strncmp(mode, "rw", 2) == 0;
    no_wb = strstr(mode, "-nowb") != NULL;
    keep = strstr(mode, "-keep") != NULL;
    hint = strstr(mode, "-hint") != NULL;
    if (threads < 1 || threads > 64 || chunk == 0) {
        fprintf(stderr, "fastcopy: bad THREADS or CHUNK_MIB\n");
        return 2;
    }
    in_fd = open(argv[1], O_RDONLY);
    out_fd = open(argv[2], O_WRONLY);
    struct stat st;
    if (in_fd < 0 || out_fd < 0 || fstat(in_fd, &st) < 0) {
        perror("fastcopy: open");
        return 1;
    }
    if (!hint)
        posix_fadvise(in_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    uint64_t size = (uint64_t)st.st_size, per = (size / (uint64_t)threads + chunk - 1) / chunk * chunk;
    struct stripe s[64];
    for (int i = 0; i < threads; i++) {
        s[i].lo = per * (uint64_t)i < size ? per * (uint64_t)i : size;
        s[i].hi = per * (uint64_t)(i + 1) < size ? per * (uint64_t)(i + 1) : size;
        s[i].err = 0;
        pthread_create(&s[i].th, NULL, run, &s[i]);
    }
    int err = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(s[i].th, NULL);
        if (s[i].err)
            err = s[i].err;
    }
    if (err || fdatasync(out_fd) < 0) {
        fprintf(stderr, "fastcopy: %s\n", strerror(err ? err : errno));
        return 1;
    }
    return 0;
}
