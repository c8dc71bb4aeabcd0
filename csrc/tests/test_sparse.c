/* test_sparse.c - holes and zero tracks cost nothing (issue 13 item 4):
 * a restore or an establish of a sparse file pair keeps the holes (st_blocks)
 * and writes zeroes where the source has zero data; host write-zeroes with
 * PM_IO_PUNCH punch both sides when mirrored; pm_pair_block_status reports
 * allocation and PENDING tracks. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

#define TS 65536u
#define NT 64u
#define SIZE ((uint64_t)TS * NT)

static char dir[] = "/tmp/pm_sparse_XXXXXX";

static long long blocks_of(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return -1;
    return (long long)st.st_blocks * 512;   /* bytes allocated */
}

static void fill_track(pm_store *s, uint64_t t, int byte)
{
    static unsigned char buf[TS];
    memset(buf, byte, TS);
    CHECK_EQ(pm_store_write(s, buf, TS, t * TS), 0);
}

static int track_is(pm_store *s, uint64_t t, int byte)
{
    static unsigned char buf[TS];
    if (pm_store_read(s, buf, TS, t * TS) != 0)
        return 0;
    for (unsigned i = 0; i < TS; i++)
        if (buf[i] != byte)
            return 0;
    return 1;
}

/* The source has data on tracks 3 and 40, explicit zeroes on track 10 (data
 * extents holding zeroes), holes elsewhere; the target is full of 0xEE. */
static void sparse_job(int restore)
{
    char spath[256], mpath[256], meta[256];
    snprintf(spath, sizeof spath, "%s/std%d", dir, restore);
    snprintf(mpath, sizeof mpath, "%s/mir%d", dir, restore);
    snprintf(meta, sizeof meta, "%s/meta%d", dir, restore);
    pm_store *s, *m;
    CHECK_EQ(pm_store_open_file(spath, PM_STORE_CREATE, SIZE, &s), 0);
    CHECK_EQ(pm_store_open_file(mpath, PM_STORE_CREATE, SIZE, &m), 0);
    pm_store *src = restore ? m : s, *dst = restore ? s : m;
    const char *dst_path = restore ? spath : mpath;
    for (uint64_t t = 0; t < NT; t++)
        fill_track(dst, t, 0xEE);
    fill_track(src, 3, 0x33);
    fill_track(src, 40, 0x40);
    fill_track(src, 10, 0);
    CHECK_EQ(pm_store_flush(s), 0);
    CHECK_EQ(pm_store_flush(m), 0);
    CHECK(blocks_of(dst_path) >= (long long)SIZE);
    pm_pair *p;
    CHECK_EQ(pm_pair_create_meta(meta, s, m, TS, &p), 0);
    struct pm_copy_config c;
    pm_copy_config_init(&c, sizeof c);
    if (restore) {
        CHECK_EQ(pm_pair_assume_established(p), 0);
        CHECK_EQ(pm_pair_split(p), 0);
        CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    } else {
        CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    }
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr = { .size = sizeof pr };
    CHECK_EQ(pm_pair_progress(p, &pr), 0);
    CHECK_EQ(pr.tracks_copied, NT);
    CHECK(pr.bytes_written <= 3 * (uint64_t)TS);        /* at most the three data tracks (the kernel copy
                                                         copies track 10's zeroes as data) */
    CHECK(pr.bytes_written >= 2 * (uint64_t)TS);
    CHECK_EQ(pr.bytes_written + pr.bytes_zeroed, SIZE);
    uint64_t diff[NT], next;
    CHECK_EQ(pm_pair_verify(p, 0, diff, NT, &next), 0);
    CHECK(track_is(dst, 3, 0x33) && track_is(dst, 40, 0x40) && track_is(dst, 10, 0) && track_is(dst, 0, 0));
    /* the holes stay holes: at most the three source tracks are allocated */
    CHECK(blocks_of(dst_path) <= 3 * (long long)TS + 65536);

    /* allocation as the stores report it: track 3 data, track 0 a hole */
    struct pm_extent e[NT];
    int64_t n = pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_ALLOCATION, 0, SIZE, e, NT);
    CHECK(n >= 3);
    CHECK_EQ(e[0].offset, 0);
    CHECK_EQ(e[0].kind, PM_EXTENT_HOLE);
    CHECK_EQ(e[0].length, 3 * (uint64_t)TS);
    CHECK_EQ(e[1].kind, PM_EXTENT_DATA);
    uint64_t covered = 0;
    for (int64_t i = 0; i < n; i++) {
        CHECK_EQ(e[i].offset, covered);
        covered += e[i].length;
        if (i > 0)
            CHECK(e[i].kind != e[i - 1].kind);           /* neighbours of one kind are merged */
    }
    CHECK_EQ(covered, SIZE);
    CHECK_EQ(pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_ALLOCATION, 0, SIZE, e, 1), 1);
    CHECK_EQ(e[0].length, 3 * (uint64_t)TS);
    n = pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_PENDING, 0, SIZE, e, NT);
    CHECK(n == 1 && e[0].kind == 0 && e[0].length == SIZE);   /* nothing pending */
    CHECK_EQ(pm_pair_block_status(p, PM_STANDARD, 7, 0, SIZE, e, NT), -EINVAL);
    CHECK_EQ(pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_PENDING, SIZE, 1, e, NT), PM_E_RANGE);
    CHECK_EQ(pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_PENDING, 0, 1, e, 0), -EINVAL);

    /* established: a punched write-zeroes reaches both sides and marks CHANGED */
    if (pm_pair_state(p) == PM_STATE_RESTORED) {
        CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
        CHECK_EQ(pm_pair_wait(p, -1), 0);
    }
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    long long sb = blocks_of(spath), mb = blocks_of(mpath);
    CHECK_EQ(pm_pair_write_zeroes(p, PM_STANDARD, TS, 40 * (uint64_t)TS, PM_IO_PUNCH), 0);
    CHECK(track_is(s, 40, 0) && track_is(m, 40, 0));
    CHECK(blocks_of(spath) <= sb - (long long)TS && blocks_of(mpath) <= mb - (long long)TS);
    CHECK_EQ(pm_pair_verify(p, 0, diff, NT, &next), 0);
    /* without the flag the zeroes stay allocated */
    sb = blocks_of(spath);
    CHECK_EQ(pm_pair_write_zeroes(p, PM_STANDARD, TS, 20 * (uint64_t)TS, 0), 0);
    CHECK(blocks_of(spath) >= sb);
    CHECK(track_is(s, 20, 0));
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write_zeroes(p, PM_STANDARD, TS, 3 * (uint64_t)TS, PM_IO_PUNCH), 0);
    pm_table *tab = pm_pair_table(p, PM_STANDARD);
    CHECK_EQ(pm_bitmap_get(pm_table_flag(tab, PM_CHANGED), 3), 1);   /* a trim is a write */
    pm_pair_destroy(p);
    pm_store_destroy(s);
    pm_store_destroy(m);
    unlink(spath), unlink(mpath), unlink(meta);
}

/* During a restore, PENDING tracks are reported pending, and their
 * allocation is the mirror's. */
static void pending_status(void)
{
    pm_store *s, *m;
    CHECK_EQ(pm_store_create_memory(SIZE, &s), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, &m), 0);
    pm_pair *p;
    CHECK_EQ(pm_pair_create(s, m, TS, &p), 0);
    CHECK_EQ(pm_pair_assume_established(p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    struct pm_copy_config c;
    pm_copy_config_init(&c, sizeof c);
    c.rate_bytes = 1;                                     /* nothing gets copied for now */
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    static unsigned char w[2 * TS];
    memset(w, 7, sizeof w);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 2 * TS, 5 * (uint64_t)TS, 0), 0);   /* tracks 5, 6 local now */
    struct pm_extent e[8];
    int64_t n = pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_PENDING, 0, SIZE, e, 8);
    CHECK_EQ(n, 3);
    CHECK(e[0].offset == 0 && e[0].length == 5 * (uint64_t)TS && e[0].kind == 1);
    CHECK(e[1].offset == 5 * (uint64_t)TS && e[1].length == 2 * (uint64_t)TS && e[1].kind == 0);
    CHECK(e[2].offset == 7 * (uint64_t)TS && e[2].length == SIZE - 7 * (uint64_t)TS && e[2].kind == 1);
    n = pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_PENDING, 5 * (uint64_t)TS + 100, 10, e, 8);
    CHECK(n == 1 && e[0].offset == 5 * (uint64_t)TS + 100 && e[0].length == 10 && e[0].kind == 0);
    n = pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_ALLOCATION, 0, SIZE, e, 8);
    CHECK(n == 1 && e[0].kind == PM_EXTENT_DATA && e[0].length == SIZE);   /* memory: all data */
    pm_pair_set_rate(p, 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    n = pm_pair_block_status(p, PM_STANDARD, PM_CONTEXT_PENDING, 0, SIZE, e, 8);
    CHECK(n == 1 && e[0].kind == 0);
    pm_pair_destroy(p);
    pm_store_destroy(s);
    pm_store_destroy(m);
}

int main(void)
{
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    sparse_job(1);
    sparse_job(0);
    pending_status();
    rmdir(dir);
    return CHECK_DONE("test_sparse");
}
