/* test_evict.c - a copy's page-cache footprint (evict.c): a stream that
 * reads a file store through pm_evict_before/after leaves none of the pages
 * it brought in cached, keeps every page that was cached before it came
 * near, starts afresh after a jump backwards, and does nothing on a memory
 * store; the store's residency query and hints (store.c). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "evict.h"
#include "pymirror.h"
#include "check.h"

#define MiB (1u << 20)
#define SIZE (80u * MiB)   /* more than one window (67 MiB for 1 MiB runs): it slides */

static char dir[] = "/tmp/pm_evict_XXXXXX";

/* Cached pages of [off, off+len), or -1. */
static long long cached(pm_store *s, uint64_t off, uint64_t len)
{
    static unsigned char vec[SIZE / 4096 + 1];   /* one byte per page (4 KiB pages or larger) */
    int64_t n = pm__store_resident(s, off, len, vec);
    if (n < 0)
        return -1;
    long long c = 0;
    for (int64_t i = 0; i < n; i++)
        c += vec[i] & 1;
    return c;
}

static void read_range(pm_store *s, uint64_t off, uint64_t len, unsigned char *buf)
{
    for (uint64_t o = off; o < off + len; o += MiB)
        CHECK_EQ(pm_store_read(s, buf, MiB, o), 0);
}

static void stream(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/v.img", dir);
    pm_store *s = NULL;
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, SIZE, &s), 0);
    unsigned char *buf = malloc(MiB);
    for (uint32_t i = 0; i < MiB; i++)
        buf[i] = (unsigned char)(i * 7 + 1);
    for (uint64_t o = 0; o < SIZE; o += MiB)
        CHECK_EQ(pm_store_write(s, buf, MiB, o), 0);
    CHECK_EQ(pm_store_flush(s), 0);
    pm__store_evict(s, SIZE, 0);
    long long left = cached(s, 0, SIZE);
    CHECK(left >= 0);
    if (left != 0) {     /* tmpfs and the like keep their pages: nothing to test */
        printf("test_evict: this file system keeps its pages cached (%lld): skipped\n", left);
        pm_store_destroy(s);
        unlink(path);
        free(buf);
        return;
    }
    /* the host had [0, 4 MiB), [12, 13 MiB) and [70, 71 MiB) (past the
     * first window) cached before the copy, and the kernel's read-ahead of
     * those reads: whatever is cached now is the host's */
    read_range(s, 0, 4 * MiB, buf);
    read_range(s, 12 * MiB, MiB, buf);
    read_range(s, 70 * MiB, MiB, buf);
    static unsigned char before[SIZE / 4096 + 1], after[SIZE / 4096 + 1];
    int64_t pages = pm__store_resident(s, 0, SIZE, before);
    CHECK(pages > 0);
    long long host = 0;
    for (int64_t i = 0; i < pages; i++)
        host += before[i] & 1;
    CHECK(host >= 6 * MiB / 4096 && host < 40 * MiB / 4096);

    struct pm_evict ev;
    CHECK_EQ(pm_evict_init(&ev, s, MiB), 0);
    CHECK(ev.active);
    pm__store_sequential(s, 1);
    for (uint64_t o = 0; o < SIZE; o += MiB) {
        pm_evict_before(&ev, o, MiB);
        read_range(s, o, MiB, buf);            /* the copy */
        pm_evict_after(&ev, o, MiB);
    }
    pm_evict_flush(&ev);
    pm__store_sequential(s, 0);
    /* exactly the host's pages are cached: the copy's are dropped */
    CHECK_EQ(pm__store_resident(s, 0, SIZE, after), pages);
    long long kept = 0, extra = 0;
    for (int64_t i = 0; i < pages; i++) {
        kept += (before[i] & 1) && (after[i] & 1);
        extra += !(before[i] & 1) && (after[i] & 1);
    }
    CHECK_EQ(kept, host);
    CHECK_EQ(extra, 0);
    CHECK_EQ(cached(s, 70 * MiB, MiB), MiB / 4096);

    /* a jump back to 2 MiB starts afresh: what is cached now stays, and a
     * range not cached now is dropped after it is read */
    pm__store_evict(s, MiB, 2 * MiB);
    pm_evict_before(&ev, 2 * MiB, MiB);
    read_range(s, 2 * MiB, MiB, buf);
    pm_evict_after(&ev, 2 * MiB, MiB);
    pm_evict_flush(&ev);
    CHECK_EQ(cached(s, 2 * MiB, MiB), 0);
    CHECK_EQ(cached(s, 0, 2 * MiB), 2 * MiB / 4096);
    CHECK_EQ(cached(s, 3 * MiB, MiB), MiB / 4096);
    /* after() outside what before() learned (below the window) keeps the pages */
    pm__store_evict(s, MiB, MiB);
    read_range(s, MiB, MiB, buf);
    pm_evict_after(&ev, 0, 2 * MiB);
    CHECK_EQ(cached(s, 0, 2 * MiB), 2 * MiB / 4096);
    pm_evict_destroy(&ev);

    /* the residency query: an unaligned offset is refused; the volume's end clips */
    unsigned char one[8];
    CHECK_EQ(pm__store_resident(s, 100, 4096, one), -EINVAL);
    CHECK_EQ(pm__store_resident(s, SIZE - 4096, 1 << 20, one), 1);
    pm_store_destroy(s);
    unlink(path);
    free(buf);
}

static void memory(void)
{
    pm_store *m = NULL;
    CHECK_EQ(pm_store_create_memory(4 * MiB, &m), 0);
    struct pm_evict ev;
    CHECK_EQ(pm_evict_init(&ev, m, MiB), 0);
    CHECK(!ev.active);                       /* no page cache: no-ops */
    pm_evict_before(&ev, 0, MiB);
    pm_evict_after(&ev, 0, MiB);
    pm_evict_destroy(&ev);
    unsigned char v[4];
    CHECK_EQ(pm__store_resident(m, 0, 4096, v), -EINVAL);
    pm__store_evict(m, MiB, 0);
    pm__store_sequential(m, 1);
    pm_store_destroy(m);
}

int main(void)
{
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    stream();
    memory();
    rmdir(dir);
    return CHECK_DONE("test_evict");
}
