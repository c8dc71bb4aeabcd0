/*
 * copylab.c - an experiment, not part of pymirror: one durable file copy
 * with every knob the copier could turn, to find out which ones matter at
 * 8 GiB (docs/copier.md, "Large jobs").  Used by benchmarks/copylab.py.
 *
 *   copylab SRC DST [-t THREADS] [-c CHUNK_KIB] [-u UNIT_MIB] [-m rw|cfr|direct]
 *                   [-a AHEAD_CHUNKS] [-s] [-r] [-w WINDOWS] [-e]
 *
 * DST must exist with SRC's size.  THREADS threads copy CHUNK_KIB pieces:
 * each walks one contiguous stripe (UNIT_MIB 0) or takes UNIT_MIB units
 * from a shared counter (as nbdcopy does, 128 MiB).  -m: pread/pwrite
 * through a buffer, copy_file_range, or O_DIRECT pread/pwrite.  -a: ask
 * the kernel to read AHEAD chunks ahead (POSIX_FADV_WILLNEED).  -s:
 * POSIX_FADV_SEQUENTIAL on the source.  -r: drop the source's pages once
 * read (POSIX_FADV_DONTNEED).  -w N: start each chunk's write-back
 * (sync_file_range WRITE) and wait for the chunk written N chunks before
 * (0: leave write-back to the kernel).  -e: drop the target's pages once
 * waited for.  One fdatasync at the end.  Prints the seconds taken.
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
#include <time.h>
#include <unistd.h>

static int in_fd, out_fd, mode, ahead, evict_src, windows, evict_dst;
static uint64_t chunk, unit, size, next_unit;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
enum { RW, CFR, DIRECT };

struct worker {
    uint64_t lo, hi;
    pthread_t th;
    int err;
};

static int copy_piece(uint64_t off, uint64_t len, unsigned char *buf)
{
    while (len > 0) {
        ssize_t n;
        if (mode != CFR) {
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

static int take(struct worker *w)
{
    if (unit == 0) {
        if (w->lo < w->hi)
            return 1;
        return 0;
    }
    pthread_mutex_lock(&mu);
    w->lo = next_unit < size ? next_unit : size;
    next_unit += unit;
    pthread_mutex_unlock(&mu);
    w->hi = w->lo + unit < size ? w->lo + unit : size;
    return w->lo < w->hi;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    unsigned char *buf = mode != CFR ? aligned_alloc(4096, chunk) : NULL;
    uint64_t *wo = calloc((size_t)windows + 1, sizeof *wo), *wl = calloc((size_t)windows + 1, sizeof *wl);
    uint64_t nw = 0;
    while (!w->err && take(w)) {
        for (uint64_t off = w->lo; off < w->hi && !w->err; off += chunk) {
            uint64_t len = w->hi - off < chunk ? w->hi - off : chunk;
            if (ahead && off + len < w->hi)
                posix_fadvise(in_fd, (off_t)(off + len), (off_t)(ahead * chunk), POSIX_FADV_WILLNEED);
            w->err = copy_piece(off, len, buf);
            if (evict_src)
                posix_fadvise(in_fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
            if (windows && mode != DIRECT) {
                sync_file_range(out_fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
                unsigned slot = (unsigned)(nw % (uint64_t)windows);
                if (nw >= (uint64_t)windows) {
                    sync_file_range(out_fd, (off_t)wo[slot], (off_t)wl[slot],
                                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
                    if (evict_dst)
                        posix_fadvise(out_fd, (off_t)wo[slot], (off_t)wl[slot], POSIX_FADV_DONTNEED);
                }
                wo[slot] = off, wl[slot] = len, nw++;
            }
        }
        if (unit == 0)
            w->lo = w->hi;
    }
    free(buf);
    free(wo);
    free(wl);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 2, seq = 0, opt;
    chunk = 4u << 20;
    while ((opt = getopt(argc, argv, "t:c:u:m:a:srw:e")) != -1) {
        switch (opt) {
        case 't': threads = atoi(optarg); break;
        case 'c': chunk = (uint64_t)atoi(optarg) << 10; break;
        case 'u': unit = (uint64_t)atoi(optarg) << 20; break;
        case 'm': mode = !strcmp(optarg, "cfr") ? CFR : !strcmp(optarg, "direct") ? DIRECT : RW; break;
        case 'a': ahead = atoi(optarg); break;
        case 's': seq = 1; break;
        case 'r': evict_src = 1; break;
        case 'w': windows = atoi(optarg); break;
        case 'e': evict_dst = 1; break;
        default: fprintf(stderr, "copylab: bad option\n"); return 2;
        }
    }
    if (argc - optind != 2 || threads < 1 || threads > 64 || chunk == 0) {
        fprintf(stderr, "usage: copylab SRC DST [-t N] [-c KIB] [-u MIB] [-m rw|cfr|direct] [-a N] [-s] [-r] [-w N] [-e]\n");
        return 2;
    }
    int dflag = mode == DIRECT ? O_DIRECT : 0;
    in_fd = open(argv[optind], O_RDONLY | dflag);
    out_fd = open(argv[optind + 1], O_WRONLY | dflag);
    struct stat st;
    if (in_fd < 0 || out_fd < 0 || fstat(in_fd, &st) < 0) {
        perror("copylab: open");
        return 1;
    }
    size = (uint64_t)st.st_size;
    if (seq)
        posix_fadvise(in_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t per = (size / (uint64_t)threads + chunk - 1) / chunk * chunk;
    struct worker w[64];
    for (int i = 0; i < threads; i++) {
        w[i].lo = per * (uint64_t)i < size ? per * (uint64_t)i : size;
        w[i].hi = per * (uint64_t)(i + 1) < size ? per * (uint64_t)(i + 1) : size;
        w[i].err = 0;
        pthread_create(&w[i].th, NULL, run, &w[i]);
    }
    int err = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].th, NULL);
        if (w[i].err)
            err = w[i].err;
    }
    if (err || fdatasync(out_fd) < 0) {
        fprintf(stderr, "copylab: %s\n", strerror(err ? err : errno));
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.3f\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
