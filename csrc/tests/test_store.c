/* test_store.c - stores without pairs: file stores (sparse creation, an
 * existing path, sizes, positional I/O up to a short last region, bounds,
 * read-only, O_DIRECT with unaligned I/O), memory stores, and injected
 * faults (counted, until cleared, by range and by operation). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

static char dir[] = "/tmp/pm_store_XXXXXX";

static void path_of(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

static void file_create(void)
{
    char path[128];
    path_of(path, sizeof path, "sparse.img");
    pm_store *s = NULL, *dup = (pm_store *)1;
    const uint64_t size = 256ull << 20;   /* 256 MiB, none of it allocated */
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, size, &s), 0);
    CHECK_EQ(pm_store_size(s), size);
    CHECK(strcmp(pm_store_path(s), path) == 0);
    struct stat st;
    CHECK_EQ(stat(path, &st), 0);
    CHECK_EQ(st.st_size, (long long)size);
    CHECK((uint64_t)st.st_blocks * 512 < (1u << 20));      /* sparse */
    /* creating over an existing file fails and leaves it alone */
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, 4096, &dup), -EEXIST);
    CHECK(dup == NULL);
    CHECK(strstr(pm_last_error(), path) != NULL);
    CHECK(strstr(pm_last_error(), "pm_store_open_file") == pm_last_error());
    CHECK_EQ(stat(path, &st), 0);
    CHECK_EQ(st.st_size, (long long)size);
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE | PM_STORE_READONLY, 4096, &dup), -EINVAL);
    pm_store_destroy(s);
    /* reopened without CREATE: the size comes from the file */
    CHECK_EQ(pm_store_open_file(path, 0, 12345, &s), 0);
    CHECK_EQ(pm_store_size(s), size);
    pm_store_destroy(s);
    unlink(path);

    char missing[128];
    path_of(missing, sizeof missing, "missing.img");
    CHECK_EQ(pm_store_open_file(missing, 0, 0, &s), -ENOENT);
    CHECK(strstr(pm_last_error(), missing) != NULL);
    CHECK_EQ(pm_store_open_file(missing, PM_STORE_CREATE, 0, &s), PM_E_GEOMETRY);
    CHECK_EQ(access(missing, F_OK), -1);                   /* nothing left behind */
    CHECK_EQ(pm_store_open_file("", 0, 0, &s), -ENOENT);
    CHECK_EQ(pm_store_open_file(NULL, 0, 0, &s), -EINVAL);
    CHECK(pm_store_open_file(dir, 0, 0, &s) < 0);          /* a directory */
    CHECK(s == NULL);
    /* an empty file is no volume */
    char empty[128];
    path_of(empty, sizeof empty, "empty.img");
    int fd = open(empty, O_CREAT | O_WRONLY, 0644);
    close(fd);
    CHECK_EQ(pm_store_open_file(empty, 0, 0, &s), PM_E_GEOMETRY);
    CHECK(strstr(pm_last_error(), empty) != NULL);
    unlink(empty);
    pm_store_destroy(NULL);
}

/* Write a pattern over the whole store in odd pieces, read it back in other
 * odd pieces, including the short last region. */
static void roundtrip(pm_store *s)
{
    uint64_t size = pm_store_size(s);
    unsigned char *img = malloc(size), *got = malloc(size);
    for (uint64_t i = 0; i < size; i++)
        img[i] = (unsigned char)(i * 131 + (i >> 9));
    for (uint64_t off = 0; off < size;) {
        uint64_t n = 1 + (off * 7919) % 20000;
        if (n > size - off)
            n = size - off;
        CHECK_EQ(pm_store_write(s, img + off, n, off), 0);
        off += n;
    }
    for (uint64_t off = 0; off < size;) {
        uint64_t n = 1 + (off * 104729) % 33333;
        if (n > size - off)
            n = size - off;
        CHECK_EQ(pm_store_read(s, got + off, n, off), 0);
        off += n;
    }
    CHECK(memcmp(img, got, size) == 0);
    /* the very last byte, and I/O of length zero at the end */
    unsigned char b = 0;
    CHECK_EQ(pm_store_read(s, &b, 1, size - 1), 0);
    CHECK_EQ(b, img[size - 1]);
    CHECK_EQ(pm_store_read(s, &b, 0, size), 0);
    CHECK_EQ(pm_store_write(s, &b, 0, size), 0);
    /* beyond the end, or wrapping around: PM_E_RANGE, nothing done */
    CHECK_EQ(pm_store_read(s, got, 2, size - 1), PM_E_RANGE);
    CHECK(strstr(pm_last_error(), "is beyond the volume size") != NULL);
    CHECK_EQ(pm_store_write(s, got, 1, size), PM_E_RANGE);
    CHECK_EQ(pm_store_write(s, got, 16, UINT64_MAX - 7), PM_E_RANGE);
    CHECK_EQ(pm_store_read(s, got, UINT64_MAX, 1), PM_E_RANGE);
    CHECK_EQ(pm_store_read(s, got, size, 0), 0);
    CHECK(memcmp(img, got, size) == 0);
    CHECK_EQ(pm_store_flush(s), 0);
    free(img), free(got);
}

static void file_io(void)
{
    char path[128];
    path_of(path, sizeof path, "io.img");
    pm_store *s;
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, 300000, &s), 0);   /* not a multiple of 4 KiB */
    roundtrip(s);
    pm_store_destroy(s);
    /* read-only: reads work, writes are refused with the path named */
    CHECK_EQ(pm_store_open_file(path, PM_STORE_READONLY, 0, &s), 0);
    unsigned char b[4];
    CHECK_EQ(pm_store_read(s, b, 4, 299996), 0);
    CHECK_EQ(pm_store_write(s, b, 4, 0), -EROFS);
    CHECK(strstr(pm_last_error(), path) != NULL);
    CHECK_EQ(pm_store_flush(s), 0);
    pm_store_destroy(s);
    /* a file that shrank under the store reads as zeroes past its end */
    CHECK_EQ(pm_store_open_file(path, 0, 0, &s), 0);
    CHECK_EQ(truncate(path, 100000), 0);
    unsigned char z[64];
    memset(z, 0x55, sizeof z);
    CHECK_EQ(pm_store_read(s, z, sizeof z, 99990), 0);
    for (int i = 10; i < 64; i++)
        CHECK_EQ(z[i], 0);
    pm_store_destroy(s);
    unlink(path);
}

/* Volume ownership: one writable opener at a time (flock), readers share,
 * PM_STORE_NOLOCK looks without locking; the message names the volume and
 * the holder's pid (this process). */
static void ownership(void)
{
    char path[128], pid[32];
    path_of(path, sizeof path, "owned.img");
    snprintf(pid, sizeof pid, "(pid %d)", (int)getpid());
    pm_store *s, *t = (pm_store *)1, *u, *v;
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, 65536, &s), 0);
    CHECK_EQ(pm_store_open_file(path, 0, 0, &t), PM_E_BUSY);
    CHECK(t == NULL);
    CHECK(strstr(pm_last_error(), path) != NULL);
    CHECK(strstr(pm_last_error(), "in use by another pair") != NULL);
    CHECK(strstr(pm_last_error(), pid) != NULL);
    CHECK(strcmp(pm_strerror(PM_E_BUSY), "unknown error") != 0);
    CHECK_EQ(pm_store_open_file(path, PM_STORE_READONLY, 0, &t), PM_E_BUSY);
    CHECK_EQ(pm_store_open_file(path, PM_STORE_NOLOCK, 0, &t), 0);
    pm_store_destroy(t);
    pm_store_destroy(s);                     /* the lock goes with the store */
    CHECK_EQ(pm_store_open_file(path, PM_STORE_READONLY, 0, &u), 0);
    CHECK_EQ(pm_store_open_file(path, PM_STORE_READONLY, 0, &v), 0);   /* readers share */
    CHECK_EQ(pm_store_open_file(path, 0, 0, &t), PM_E_BUSY);
    pm_store_destroy(u);
    pm_store_destroy(v);
    CHECK_EQ(pm_store_open_file(path, 0, 0, &t), 0);
    pm_store_destroy(t);
    unlink(path);
}

static void direct_io(void)
{
    char path[128];
    path_of(path, sizeof path, "direct.img");
    pm_store *s;
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE | PM_STORE_DIRECT, 1u << 20, &s), 0);
    /* aligned I/O (direct where supported) and unaligned I/O (buffered twin)
     * see one another's bytes */
    unsigned char *al = aligned_alloc(4096, 8192);
    memset(al, 0xA1, 8192);
    CHECK_EQ(pm_store_write(s, al, 8192, 4096), 0);
    unsigned char odd[100];
    memset(odd, 0xB2, sizeof odd);
    CHECK_EQ(pm_store_write(s, odd, sizeof odd, 4096 + 50), 0);
    CHECK_EQ(pm_store_read(s, al, 8192, 4096), 0);
    CHECK_EQ(al[49], 0xA1);
    CHECK_EQ(al[50], 0xB2);
    CHECK_EQ(al[149], 0xB2);
    CHECK_EQ(al[150], 0xA1);
    CHECK_EQ(pm_store_read(s, odd, sizeof odd, 4096 + 8192 - 50), 0);
    CHECK_EQ(odd[49], 0xA1);
    CHECK_EQ(odd[50], 0);
    CHECK_EQ(pm_store_flush(s), 0);
    roundtrip(s);
    free(al);
    pm_store_destroy(s);
    unlink(path);
}

static void memory(void)
{
    pm_store *s = (pm_store *)1;
    CHECK_EQ(pm_store_create_memory(0, &s), PM_E_GEOMETRY);
    CHECK(s == NULL);
    CHECK_EQ(pm_store_create_memory(1, NULL), -EINVAL);
    CHECK_EQ(pm_store_create_memory(123457, &s), 0);
    CHECK(strcmp(pm_store_path(s), "") == 0);
    unsigned char z[1000];
    memset(z, 1, sizeof z);
    CHECK_EQ(pm_store_read(s, z, sizeof z, 123457 - 1000), 0);
    for (unsigned i = 0; i < sizeof z; i++)
        CHECK_EQ(z[i], 0);                                 /* zero-filled */
    roundtrip(s);
    pm_store_destroy(s);
    /* a large memory volume costs only what is touched */
    CHECK_EQ(pm_store_create_memory(16ull << 30, &s), 0);
    CHECK_EQ(pm_store_write(s, "end", 3, (16ull << 30) - 3), 0);
    char e[3];
    CHECK_EQ(pm_store_read(s, e, 3, (16ull << 30) - 3), 0);
    CHECK(memcmp(e, "end", 3) == 0);
    CHECK_EQ(pm_store_read(s, e, 3, 8ull << 30), 0);
    CHECK(e[0] == 0 && e[1] == 0 && e[2] == 0);
    pm_store_destroy(s);
}

static void faults_on(pm_store *s)
{
    unsigned char b[8192];
    memset(b, 7, sizeof b);
    /* bad rules are refused */
    CHECK_EQ(pm_store_inject_fault(s, 3, 0, 1, -EIO, 1), -EINVAL);
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_READ, 0, 1, EIO, 1), -EINVAL);
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_READ, 0, 1, 0, 1), -EINVAL);
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_READ, 0, 1, -EIO, 0), -EINVAL);
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_READ, 0, 1, -EIO, -2), -EINVAL);
    /* the next two reads touching [8192, 8192+10) fail; others do not */
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_READ, 8192, 10, -EIO, 2), 0);
    CHECK_EQ(pm_store_read(s, b, 4096, 0), 0);               /* elsewhere */
    CHECK_EQ(pm_store_read(s, b, 8192, 0), 0);               /* ends just before */
    CHECK_EQ(pm_store_read(s, b, 1, 8192 + 10), 0);          /* starts just after */
    CHECK_EQ(pm_store_write(s, b, 4096, 8192), 0);           /* writes are not reads */
    CHECK_EQ(pm_store_read(s, b, 1, 8192 + 9), -EIO);
    CHECK(strstr(pm_last_error(), "injected") != NULL);
    CHECK_EQ(pm_store_read(s, b, 4096, 4096 + 1), -EIO);     /* overlaps from below */
    CHECK_EQ(pm_store_read(s, b, 4096, 8192), 0);            /* the count is spent */
    /* until cleared, on writes */
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_WRITE, 0, 4096, -ENOSPC, -1), 0);
    for (int i = 0; i < 5; i++)
        CHECK_EQ(pm_store_write(s, b, 10, 100), -ENOSPC);
    CHECK_EQ(pm_store_read(s, b, 10, 100), 0);
    /* a failed write changed nothing */
    CHECK_EQ(b[0], 0);
    CHECK_EQ(pm_store_clear_faults(s), 0);
    CHECK_EQ(pm_store_write(s, b, 10, 100), 0);
    CHECK_EQ(pm_store_clear_faults(s), 0);                   /* clearing twice is fine */
}

static void faults(void)
{
    pm_store *s;
    CHECK_EQ(pm_store_create_memory(65536, &s), 0);
    faults_on(s);
    pm_store_destroy(s);
    char path[128];
    path_of(path, sizeof path, "faults.img");
    CHECK_EQ(pm_store_open_file(path, PM_STORE_CREATE, 65536, &s), 0);
    faults_on(s);
    /* destroy frees rules still armed */
    CHECK_EQ(pm_store_inject_fault(s, PM_FAULT_READ, 0, 1, -EIO, -1), 0);
    pm_store_destroy(s);
    unlink(path);
}

int main(void)
{
    CHECK(mkdtemp(dir) != NULL);
    file_create();
    file_io();
    ownership();
    direct_io();
    memory();
    faults();
    rmdir(dir);
    return CHECK_DONE("test_store");
}
