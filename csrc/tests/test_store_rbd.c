/* test_store_rbd.c - the RBD store's error paths that need no cluster:
 * a missing librbd (PM_E_NOLIB naming the Debian package), bad configs,
 * a missing ceph.conf.  The I/O paths run against a real one-node cluster
 * in tests/test_rbd_*.py. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

static struct pm_rbd_config good(void)
{
    struct pm_rbd_config c;
    memset(&c, 0, sizeof c);
    c.size = sizeof c;
    c.pool = "rbd";
    c.image = "img";
    c.timeout = 1;
    return c;
}

/* In a child (the library is loaded once per process): without librbd,
 * every call fails with PM_E_NOLIB and names the package. */
static void missing_library(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        setenv("PYMIRROR_LIBRBD", "/nonexistent/librbd.so.1", 1);
        int bad = 0;
        if (pm_rbd_available() != PM_E_NOLIB)
            bad |= 1;
        if (strstr(pm_last_error(), "librbd1") == NULL)
            bad |= 2;
        struct pm_rbd_config c = good();
        pm_store *s = (pm_store *)&c;
        if (pm_store_open_rbd(&c, NULL, 0, &s) != PM_E_NOLIB || s != NULL)
            bad |= 4;
        if (strstr(pm_last_error(), "install the Debian package librbd1") == NULL)
            bad |= 8;
        if (pm_rbd_create(&c, 1 << 20) != PM_E_NOLIB)
            bad |= 16;
        _exit(bad);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
}

static void bad_configs(void)
{
    pm_store *s = (pm_store *)1;
    struct pm_rbd_config c = good();
    CHECK_EQ(pm_store_open_rbd(NULL, NULL, 0, &s), -EINVAL);
    CHECK(s == NULL);
    CHECK_EQ(pm_store_open_rbd(&c, NULL, 0, NULL), -EINVAL);
    c.size = 7;
    CHECK_EQ(pm_store_open_rbd(&c, NULL, 0, &s), -EINVAL);
    CHECK(strstr(pm_last_error(), "sizeof(struct pm_rbd_config)") != NULL);
    c = good();
    c.pool = NULL;
    CHECK_EQ(pm_store_open_rbd(&c, NULL, 0, &s), -EINVAL);
    CHECK(strstr(pm_last_error(), "rbd:POOL/IMAGE") != NULL);
    c = good();
    c.image = "";
    CHECK_EQ(pm_store_open_rbd(&c, NULL, 0, &s), -EINVAL);
    c = good();
    c.qd = 257;
    CHECK_EQ(pm_store_open_rbd(&c, NULL, 0, &s), -EINVAL);
    CHECK(strstr(pm_last_error(), "queue depth 257") != NULL);
    c = good();
    c.timeout = 86401;
    CHECK_EQ(pm_store_open_rbd(&c, NULL, 0, &s), -EINVAL);
    c = good();
    CHECK_EQ(pm_store_open_rbd(&c, NULL, PM_STORE_CREATE, &s), -EINVAL);
    CHECK_EQ(pm_rbd_create(&c, 0), PM_E_GEOMETRY);
    CHECK_EQ(pm_rbd_create(NULL, 1 << 20), -EINVAL);
    c.snap = "s1";
    if (pm_rbd_available() == 0)
        CHECK_EQ(pm_rbd_create(&c, 1 << 20), -EINVAL);   /* a snapshot cannot be created */
    CHECK(s == NULL);
}

/* With librbd present: a conf file that does not exist is named. */
static void missing_conf(void)
{
    if (pm_rbd_available() != 0) {
        printf("test_store_rbd: librbd not installed: the conf check is skipped\n");
        return;
    }
    struct pm_rbd_config c = good();
    c.conf = "/nonexistent/ceph.conf";
    pm_store *s = NULL;
    int rc = pm_store_open_rbd(&c, "rbd:rbd/img?conf=/nonexistent/ceph.conf", 0, &s);
    CHECK(rc < 0);
    CHECK(s == NULL);
    CHECK(strstr(pm_last_error(), "/nonexistent/ceph.conf") != NULL);
}

int main(void)
{
    missing_library();
    bad_configs();
    missing_conf();
    return CHECK_DONE("test_store_rbd");
}
