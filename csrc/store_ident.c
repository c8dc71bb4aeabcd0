/*
 * store_ident.c - which volume a file or block device is, and whether a
 * regular file changed, as the system can tell (docs/format.md, "Volume
 * identity and changes outside pymirror").
 *
 * Layer 0 (the floor): calls nothing of pymirror's; store.c (1) uses it for
 * the file store's identity and change_stamp callbacks.
 *
 * Identity names the volume itself, stable across reboots, re-attachments
 * and renames, never device numbers where something better exists:
 *   regular file   file:ino=N,born=SEC.NSEC   (statx birth time; without
 *                  one: file:dev=MAJ:MIN,ino=N, not stable across moves)
 *   loop device    loop:<the backing file's identity>,offset=O,size=S
 *   other disks    disk:<name in /dev/disk/by-id, wwn- names first>, else
 *                  disk:wwid=... / disk:serial=... from sysfs
 *   nothing stable blockdev:MAJ:MIN (pm__identity_stable says 0)
 * A change stamp (regular files, and a loop device's backing file):
 *   size=S,ino=N,mtime=SEC.NSEC,ctime=SEC.NSEC
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "store.h"

static int file_ident_path(int dirfd, const char *path, int flags, char *buf, size_t len)
{
    struct statx sx;
    if (statx(dirfd, path, flags, STATX_INO | STATX_BTIME, &sx) < 0)
        return -errno;
    if (sx.stx_mask & STATX_BTIME)
        snprintf(buf, len, "file:ino=%llu,born=%lld.%09u", (unsigned long long)sx.stx_ino,
                 (long long)sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec);
    else
        snprintf(buf, len, "file:dev=%u:%u,ino=%llu", sx.stx_dev_major, sx.stx_dev_minor,
                 (unsigned long long)sx.stx_ino);
    return 0;
}

/* Read a one-line sysfs attribute into buf (newline stripped); 0 or -errno. */
static int read_attr(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -errno;
    char *got = fgets(buf, (int)len, f);
    fclose(f);
    if (got == NULL)
        return -ENODATA;
    buf[strcspn(buf, "\n")] = 0;
    return buf[0] ? 0 : -ENODATA;
}

/* A loop device: its backing file's identity, offset and size. */
static int loop_ident(unsigned maj, unsigned min, int fd, char *buf, size_t len)
{
    char path[128], backing[PATH_MAX], id[PATH_MAX + 16], attr[64];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/loop/backing_file", maj, min);
    if (read_attr(path, backing, sizeof backing) < 0)
        return -ENOENT;
    if (file_ident_path(AT_FDCWD, backing, 0, id, sizeof id) < 0)
        snprintf(id, sizeof id, "file:%s", backing);   /* deleted or unreachable: its path */
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/loop/offset", maj, min);
    if (read_attr(path, attr, sizeof attr) < 0)
        snprintf(attr, sizeof attr, "0");
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0)
        size = 0;
    snprintf(buf, len, "loop:%s,offset=%s,size=%llu", id, attr, (unsigned long long)size);
    return 0;
}

/* A name under /dev/disk/by-id for the device rdev (wwn- names first). */
static int by_id(dev_t rdev, char *buf, size_t len)
{
    DIR *d = opendir("/dev/disk/by-id");
    if (d == NULL)
        return -ENOENT;
    char best[256] = "";
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        if (e->d_name[0] == '.' || fstatat(dirfd(d), e->d_name, &st, 0) < 0 ||
            !S_ISBLK(st.st_mode) || st.st_rdev != rdev)
            continue;
        int wwn = strncmp(e->d_name, "wwn-", 4) == 0;
        /* wwn- first, then the alphabetically first: the same choice each time */
        if (best[0] == 0 || (wwn && strncmp(best, "wwn-", 4) != 0) ||
            ((wwn == (strncmp(best, "wwn-", 4) == 0)) && strcmp(e->d_name, best) < 0))
            snprintf(best, sizeof best, "%s", e->d_name);
    }
    closedir(d);
    if (best[0] == 0)
        return -ENOENT;
    snprintf(buf, len, "disk:%s", best);
    return 0;
}

/* wwid or serial from sysfs (for a partition: its disk's, plus its number). */
static int sysfs_ident(unsigned maj, unsigned min, char *buf, size_t len)
{
    char base[128], path[192], val[200], part[256] = "";
    snprintf(base, sizeof base, "/sys/dev/block/%u:%u", maj, min);
    snprintf(path, sizeof path, "%s/partition", base);
    if (read_attr(path, val, sizeof val) == 0) {
        snprintf(part, sizeof part, ",part=%s", val);
        snprintf(base, sizeof base, "/sys/dev/block/%u:%u/..", maj, min);
    }
    static const char *const names[] = { "wwid", "device/wwid", "device/serial", "serial" };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", base, names[i]);
        if (read_attr(path, val, sizeof val) == 0) {
            snprintf(buf, len, "disk:%s=%s%s", strstr(names[i], "wwid") ? "wwid" : "serial", val, part);
            return 0;
        }
    }
    return -ENOENT;
}

int pm__file_identity(int fd, char *buf, size_t len)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISBLK(st.st_mode))
        return file_ident_path(fd, "", AT_EMPTY_PATH, buf, len);
    unsigned maj = major(st.st_rdev), min = minor(st.st_rdev);
    if (loop_ident(maj, min, fd, buf, len) == 0 || by_id(st.st_rdev, buf, len) == 0 ||
        sysfs_ident(maj, min, buf, len) == 0)
        return 0;
    snprintf(buf, len, "blockdev:%u:%u", maj, min);
    return 0;
}

int pm__identity_stable(const char *id)
{
    if (id == NULL || id[0] == 0 || strncmp(id, "blockdev:", 9) == 0 || strncmp(id, "store:", 6) == 0 ||
        strncmp(id, "memory:", 7) == 0)
        return 0;
    if (strncmp(id, "file:dev=", 9) == 0 || strncmp(id, "loop:file:dev=", 14) == 0)
        return 0;
    return 1;
}

static void stamp_of(const struct stat *st, char *buf, size_t len)
{
    snprintf(buf, len, "size=%lld,ino=%llu,mtime=%lld.%09ld,ctime=%lld.%09ld", (long long)st->st_size,
             (unsigned long long)st->st_ino, (long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec,
             (long long)st->st_ctim.tv_sec, st->st_ctim.tv_nsec);
}

int pm__file_change_stamp(int fd, char *buf, size_t len)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISREG(st.st_mode)) {
        stamp_of(&st, buf, len);
        return 0;
    }
    if (!S_ISBLK(st.st_mode))
        return -EOPNOTSUPP;
    /* a loop device: writes through it, or to its file, change the file's times */
    char path[128], backing[PATH_MAX];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/loop/backing_file", major(st.st_rdev), minor(st.st_rdev));
    struct stat bs;
    if (read_attr(path, backing, sizeof backing) < 0 || stat(backing, &bs) < 0 || !S_ISREG(bs.st_mode))
        return -EOPNOTSUPP;   /* a disk: its device node's times say nothing */
    stamp_of(&bs, buf, len);
    return 0;
}
