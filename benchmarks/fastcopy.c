/*
 * fastcopy.c - the fastest durable file copy we could write for this
 * machine, as a baseline for bench_copy.py (not part of pymirror).
 *
 *   fastcopy SRC DST [THREADS [CHUNK_MIB [MODE]]]
 *   MODE: cfr (default) | rw, with "-nowb" appended: no write-behind
 *
 * DST must exist with SRC's size (the benchmark creates it).  THREADS
 * threads each copy one contiguous stripe in CHUNK_MIB pieces, with
 * copy_file_range (cfr) or pread/pwrite through a buffer (rw); each asks
 * the kernel to read two chunks ahead (POSIX_FADV_WILLNEED) and to start
 * writing back each chunk it wrote (sync_file_range WRITE); one fdatasync
 * at the end makes the copy durable.
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

static int in_fd, out_fd, use_rw, no_wb;
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
    for (uint64_t off = s->lo; off < s->hi && !s->err; off += chunk) {
        uint64_t len = s->hi - off < chunk ? s->hi - off : chunk;
        uint64_t ahead = off + len;
        if (ahead < s->hi)
            posix_fadvise(in_fd, (off_t)ahead, (off_t)(2 * chunk), POSIX_FADV_WILLNEED);
        s->err = copy_piece(off, len, buf);
        if (!no_wb)
            sync_file_range(out_fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: fastcopy SRC DST [THREADS [CHUNK_MIB [cfr|rw]]]\n");
        return 2;
    }
    int threads = argc > 3 ? atoi(argv[3]) : 2;
    chunk = (uint64_t)(argc > 4 ? atoi(argv[4]) : 4) << 20;
    use_rw = argc > 5 && strncmp(argv[5], "rw", 2) == 0;
    no_wb = argc > 5 && strstr(argv[5], "-nowb") != NULL;
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
