/* test_store_nbd.c - the NBD store (store_nbd.c) and the URI parameters it
 * reads (store_uri.c).
 *
 * Without a server: pymirror's own parameters come out of a URI and leave
 * the rest as it was; bad values name the parameter; a libnbd that cannot be
 * loaded is PM_E_NOLIB naming the Debian package, and the next open loads
 * the real one.  With nbdkit installed (else those checks are skipped, with
 * a line saying so): threads writing and reading back their own ranges
 * through several connections with several requests in flight each, write
 * zeroes, flush, a read-only open, and a server that goes away and comes
 * back (the store connects again by itself). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pymirror.h"
#include "store_uri.h"
#include "check.h"

static void check_take(const char *uri, const char *key, int want_rc, const char *want_uri, const char *want_val)
{
    char buf[256], val[64] = "";
    snprintf(buf, sizeof buf, "%s", uri);
    int rc = pm__uri_take(buf, key, val, sizeof val);
    CHECK_EQ(rc, want_rc);
    if (rc >= 0)
        CHECK(strcmp(buf, want_uri) == 0);
    if (rc == 1)
        CHECK(strcmp(val, want_val) == 0);
    if (rc >= 0 && strcmp(buf, want_uri) != 0)
        fprintf(stderr, "  %s without %s: got %s, want %s\n", uri, key, buf, want_uri);
}

static void test_uri_parameters(void)
{
    check_take("nbd://h/x", "qd", 0, "nbd://h/x", "");
    check_take("nbd://h/x?qd=8", "qd", 1, "nbd://h/x", "8");
    check_take("nbd+unix:///?socket=/s&qd=8", "qd", 1, "nbd+unix:///?socket=/s", "8");
    check_take("nbd+unix:///?qd=8&socket=/s", "qd", 1, "nbd+unix:///?socket=/s", "8");
    check_take("nbd://h/x?a=1&qd=16&b=2", "qd", 1, "nbd://h/x?a=1&b=2", "16");
    check_take("nbd://h/x?qdx=1&xqd=2", "qd", 0, "nbd://h/x?qdx=1&xqd=2", "");
    check_take("nbd://h/x?qd=1&qd=2", "qd", -EINVAL, "", "");
    check_take("nbd://h/x?qd=8#frag", "qd", 1, "nbd://h/x#frag", "8");
    check_take("nbd://h/x?qd=", "qd", 1, "nbd://h/x", "");
    check_take("nbd://h/x?qd=12345678901234567890123456789012345678901234567890123456789012345", "qd", -EINVAL,
               "", "");

    char buf[128];
    uint64_t v = 7;
    snprintf(buf, sizeof buf, "nbd://h/x?qd=65");
    CHECK_EQ(pm__uri_take_uint(buf, "qd", 1, 64, &v), PM_E_RANGE);
    CHECK(strstr(pm_last_error(), "qd=65") != NULL);
    snprintf(buf, sizeof buf, "nbd://h/x?qd=1x");
    CHECK_EQ(pm__uri_take_uint(buf, "qd", 1, 64, &v), -EINVAL);
    snprintf(buf, sizeof buf, "nbd://h/x?qd=-1");
    CHECK_EQ(pm__uri_take_uint(buf, "qd", 1, 64, &v), -EINVAL);
    CHECK_EQ(v, 7);
    snprintf(buf, sizeof buf, "nbd://h/x?conns=3");
    CHECK_EQ(pm__uri_take_uint(buf, "conns", 1, 16, &v), 0);
    CHECK_EQ(v, 3);
}

static void test_missing_library(void)
{
    pm_store *s = NULL;
    setenv("PYMIRROR_LIBNBD", "libnbd-not-installed.so.0", 1);
    CHECK_EQ(pm_store_open_nbd("nbd+unix:///?socket=/nonexistent.sock", 0, &s), PM_E_NOLIB);
    CHECK(s == NULL);
    CHECK(strstr(pm_last_error(), "Debian package libnbd0") != NULL);
    unsetenv("PYMIRROR_LIBNBD");
    CHECK_EQ(pm_store_open_nbd("not-nbd", 0, &s), -EINVAL);
    CHECK_EQ(pm_store_open_nbd("nbd://h/x", 0x100, &s), -EINVAL);
}

/* ---- with a server ---------------------------------------------------------- */

#define SIZE (32u << 20)

static char sock_path[256], uri[512];

static pid_t start_nbdkit(void)
{
    unlink(sock_path);
    pid_t pid = fork();
    if (pid == 0) {
        execlp("nbdkit", "nbdkit", "-f", "-U", sock_path, "memory", "32M", (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 500; i++) {
        struct stat st;
        if (stat(sock_path, &st) == 0) {
            usleep(50000);
            return pid;
        }
        usleep(10000);
    }
    return pid;
}

static void stop(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

struct worker {
    pm_store *s;
    int k, failures;
};

static void *hammer(void *arg)
{
    struct worker *w = arg;
    size_t n = 3u << 20;               /* 3 MiB: split into several requests */
    unsigned char *out = malloc(n), *in = malloc(n);
    for (int round = 0; round < 8; round++) {
        uint64_t off = (uint64_t)w->k * (SIZE / 4) + (uint64_t)round * 4096 + 123;
        for (size_t i = 0; i < n; i++)
            out[i] = (unsigned char)(i * 31 + (size_t)w->k * 7 + (size_t)round);
        if (pm_store_write(w->s, out, n, off) != 0 || pm_store_read(w->s, in, n, off) != 0 ||
            memcmp(in, out, n) != 0)
            w->failures++;
    }
    free(out);
    free(in);
    return NULL;
}

static void test_with_server(void)
{
    if (system("command -v nbdkit >/dev/null 2>&1") != 0) {
        printf("test_store_nbd: nbdkit is not installed (Debian nbdkit): server checks skipped\n");
        return;
    }
    snprintf(sock_path, sizeof sock_path, "/tmp/pm-test-nbd-%d.sock", (int)getpid());
    snprintf(uri, sizeof uri, "nbd+unix:///?socket=%s&qd=4&conns=4&timeout=5", sock_path);
    pid_t pid = start_nbdkit();
    pm_store *s = NULL;
    CHECK_EQ(pm_store_open_nbd(uri, 0, &s), 0);
    if (s == NULL) {
        fprintf(stderr, "  %s\n", pm_last_error());
        stop(pid);
        return;
    }
    CHECK_EQ(pm_store_size(s), SIZE);
    CHECK(strcmp(pm_store_path(s), uri) == 0);
    char id[300];
    CHECK_EQ(pm_store_identity(s, id, sizeof id), 0);
    char want[300];
    snprintf(want, sizeof want, "nbd::%u@%s", SIZE, sock_path);
    CHECK(strcmp(id, want) == 0);

    struct worker w[4];
    pthread_t t[4];
    for (int k = 0; k < 4; k++) {
        w[k] = (struct worker){ s, k, 0 };
        pthread_create(&t[k], NULL, hammer, &w[k]);
    }
    for (int k = 0; k < 4; k++) {
        pthread_join(t[k], NULL);
        CHECK_EQ(w[k].failures, 0);
    }
    CHECK_EQ(pm_store_flush(s), 0);

    unsigned char buf[8192];
    memset(buf, 0xAB, sizeof buf);
    CHECK_EQ(pm_store_write(s, buf, sizeof buf, 0), 0);
    CHECK_EQ(pm_store_write_zeroes(s, 4096, 2048, 0), 0);
    CHECK_EQ(pm_store_read(s, buf, sizeof buf, 0), 0);
    CHECK(buf[2047] == 0xAB && buf[2048] == 0 && buf[6143] == 0 && buf[6144] == 0xAB);
    CHECK_EQ(pm_store_read(s, buf, 16, SIZE - 8), PM_E_RANGE);       /* bounds checked before the server */

    pm_store *ro = NULL;
    CHECK_EQ(pm_store_open_nbd(uri, PM_STORE_READONLY, &ro), 0);
    CHECK_EQ(pm_store_write(ro, buf, 16, 0), -EROFS);
    pm_store_destroy(ro);

    /* the server goes away: I/O fails; it comes back: the same store works */
    stop(pid);
    CHECK(pm_store_read(s, buf, 4096, 0) < 0);
    CHECK(strstr(pm_last_error(), sock_path) != NULL);
    CHECK(pm_store_write(s, buf, 4096, 0) < 0);
    pid = start_nbdkit();
    CHECK_EQ(pm_store_write(s, buf, 4096, 0), 0);
    CHECK_EQ(pm_store_read(s, buf, 4096, 0), 0);
    CHECK_EQ(pm_store_flush(s), 0);
    pm_store_destroy(s);
    stop(pid);
    unlink(sock_path);
}

int main(void)
{
    test_uri_parameters();
    test_missing_library();
    test_with_server();
    return CHECK_DONE("test_store_nbd");
}
