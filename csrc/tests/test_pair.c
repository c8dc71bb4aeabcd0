/* test_pair.c - stores and pairs without Python: state machine errors,
 * exact restores, whole/partial writes to PENDING tracks, reads of PENDING
 * tracks, incremental byte counts, failing stores, and the metadata file. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pymirror.h"
#include "check.h"

#define TS 4096u
#define NT 24u
#define SIZE (NT * TS - 100)   /* a short last track */

static pm_pair *new_pair(pm_store **a, pm_store **b)
{
    pm_pair *p = NULL;
    CHECK_EQ(pm_store_create_memory(SIZE, a), 0);
    CHECK_EQ(pm_store_create_memory(SIZE, b), 0);
    CHECK_EQ(pm_pair_create(*a, *b, TS, &p), 0);
    return p;
}

static void fill(pm_pair *p, int side, unsigned char base)
{
    static unsigned char buf[TS];
    for (uint64_t t = 0; t < NT; t++) {
        memset(buf, base + (int)t, TS);
        uint64_t len = t == NT - 1 ? SIZE - t * TS : TS;
        CHECK_EQ(pm_pair_write(p, side, buf, len, t * TS, 0), 0);
    }
}

static int sides_equal(pm_pair *p)
{
    uint64_t out[NT], next;
    return pm_pair_verify(p, 0, out, NT, &next) == 0;
}

static void slow_config(struct pm_copy_config *c)
{
    pm_copy_config_default(c);
    c->rate_bytes = 1;   /* pays before copying: nothing moves until the rate is lifted */
}

static void state_machine(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_split(p), PM_E_STATE);
    CHECK(strstr(pm_last_error(), "the pair is new") != NULL);
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), PM_E_STATE);
    CHECK_EQ(pm_pair_establish(p, 1, &c), PM_E_STATE);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "x", 1, 0, 0), PM_E_STATE);
    CHECK_EQ(pm_pair_pause(p), PM_E_STATE);
    CHECK_EQ(pm_pair_state(p), PM_STATE_NEW);
    c.copiers = 0;
    CHECK_EQ(pm_pair_establish(p, 0, &c), -EINVAL);
    pm_copy_config_default(&c);
    c.batch_bytes = TS + 1;
    CHECK_EQ(pm_pair_establish(p, 0, &c), -EINVAL);
    CHECK_EQ(pm_pair_state(p), PM_STATE_NEW);
    fill(p, PM_STANDARD, 1);
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_ESTABLISHED);
    CHECK(sides_equal(p));
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), PM_E_STATE);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "x", 1, 0, 0), PM_E_READONLY);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_SPLIT);
    char buf[8];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, buf, 8, SIZE - 7), PM_E_RANGE);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, buf, 8, UINT64_MAX - 3, 0), PM_E_RANGE);
    CHECK_EQ(pm_pair_write(p, 7, buf, 1, 0, 0), -EINVAL);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void restore_cases(int incremental, int policy)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    fill(p, PM_STANDARD, 1);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    fill(p, PM_STANDARD, 100);                     /* every track changed on the standard */
    unsigned char m[TS];
    memset(m, 0xAB, TS);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, m, TS, 3 * TS, 0), 0);   /* and one on the mirror */
    slow_config(&c);
    c.read_policy = policy;
    CHECK_EQ(pm_pair_restore(p, incremental, 1, &c), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORING);
    struct pm_progress pr;
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, NT);
    /* reads see the final image at once */
    unsigned char r[TS + 10];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, r, TS + 10, 3 * TS - 5), 0);
    CHECK(r[0] == 1 + 2 && r[5] == 0xAB && r[TS + 5] == 1 + 4);
    /* whole-track write: no copy; partial: merged */
    unsigned char w[TS];
    memset(w, 0x77, TS);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, TS, 5 * TS, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, w, 10, 7 * TS + 100, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, w, 1, 0, 0), PM_E_READONLY);
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_skipped, 1);
    CHECK_EQ(pr.tracks_merged, 1);
    if (policy == PM_READ_REDIRECT)
        CHECK_EQ(pr.reads_redirected, 3);
    else
        CHECK_EQ(pr.reads_hydrated, 3);
    CHECK_EQ(pm_pair_set_rate(p, 0), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    /* final image: the mirror with the two writes laid over it */
    for (uint64_t t = 0; t < NT; t++) {
        uint64_t len = t == NT - 1 ? SIZE - t * TS : TS;
        CHECK_EQ(pm_pair_read(p, PM_STANDARD, r, len, t * TS), 0);
        for (uint64_t i = 0; i < len; i++) {
            int want = t == 3 ? 0xAB : 1 + (int)t;
            if (t == 5 || (t == 7 && i >= 100 && i < 110))
                want = 0x77;
            if (r[i] != want) {
                CHECK_EQ(r[i], want);
                break;
            }
        }
        CHECK_EQ(pm_pair_read(p, PM_MIRROR, r, len, t * TS), 0);
        CHECK_EQ(r[len - 1], t == 3 ? 0xAB : 1 + (int)t);   /* mirror untouched */
    }
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void incremental_counts(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "s", 1, 2 * TS, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "s", 1, (NT - 1) * TS + 3, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "m", 1, 2 * TS + 9, 0), 0);
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "m", 1, 9 * TS, 0), 0);
    CHECK_EQ(pm_pair_establish(p, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr;
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, 3);
    CHECK_EQ(pr.bytes_read, 2 * TS + (SIZE - (NT - 1) * TS));   /* the short last track counted short */
    CHECK_EQ(pr.bytes_written, pr.bytes_read);
    CHECK(sides_equal(p));
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void faults(void)
{
    pm_store *a, *b;
    pm_pair *p = new_pair(&a, &b);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    fill(p, PM_MIRROR, 50);
    CHECK_EQ(pm_store_inject_fault(b, PM_FAULT_READ, 6 * TS, TS, -EIO, -1), 0);
    c.retries = 2;
    CHECK_EQ(pm_pair_restore(p, 0, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, 10000), PM_E_JOB);
    struct pm_progress pr;
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.error, -EIO);
    CHECK_EQ(pr.error_track, 6);
    CHECK_EQ(pr.paused, 1);
    CHECK(pr.tracks_pending >= 1);
    unsigned char r[TS];
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, r, 10, 6 * TS), -EIO);   /* redirected read fails cleanly */
    CHECK_EQ(pm_store_clear_faults(b), 0);
    CHECK_EQ(pm_pair_resume(p), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_state(p), PM_STATE_RESTORED);
    CHECK(sides_equal(p));
    CHECK_EQ(pm_store_inject_fault(a, PM_FAULT_WRITE, 0, 1, 0, 1), -EINVAL);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
}

static void metadata(void)
{
    char dir[] = "/tmp/pm_test_XXXXXX", s_path[64], m_path[64], meta[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(s_path, sizeof s_path, "%s/s.img", dir);
    snprintf(m_path, sizeof m_path, "%s/m.img", dir);
    snprintf(meta, sizeof meta, "%s/p.meta", dir);
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_open_file(s_path, PM_STORE_CREATE, SIZE, &a), 0);
    CHECK_EQ(pm_store_open_file(m_path, PM_STORE_CREATE, SIZE, &b), 0);
    pm_store *dup;
    CHECK_EQ(pm_store_open_file(s_path, PM_STORE_CREATE, SIZE, &dup), -EEXIST);
    CHECK(dup == NULL);
    CHECK_EQ(pm_pair_create_meta(meta, NULL, b, TS, &p), -EINVAL);
    CHECK_EQ(pm_pair_create_meta(meta, a, b, TS, &p), 0);
    pm_pair *again;
    CHECK_EQ(pm_pair_create_meta(meta, a, b, TS, &again), -EEXIST);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_establish(p, 0, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "z", 1, 4 * TS, 0), 0);
    slow_config(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "w", 1, 8 * TS, PM_IO_FUA), 0);
    pm_pair_destroy(p);   /* mid-restore */
    struct pm_meta_info info;
    CHECK_EQ(pm_meta_peek(meta, &info), 0);
    CHECK_EQ(info.state, PM_STATE_RESTORING);
    CHECK(strcmp(info.standard_path, s_path) == 0);
    pm_pair *q;
    CHECK_EQ(pm_pair_open_meta(meta, b, a, &q), PM_E_FOREIGN);   /* swapped volumes */
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &q), 0);
    pm_pair *r2;
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &r2), -EBUSY);        /* one process at a time */
    CHECK_EQ(pm_pair_state(q), PM_STATE_RESTORING);
    struct pm_progress pr;
    pm_pair_progress(q, &pr);
    CHECK_EQ(pr.paused, 1);
    CHECK_EQ(pr.tracks_pending, 1);            /* track 4: restore pending; track 8 was only written */
    CHECK_EQ(pr.changed_standard, 1);          /* track 8, written during the restore */
    CHECK_EQ(pm_pair_resume(q), 0);
    CHECK_EQ(pm_pair_wait(q, -1), 0);
    char ch;
    CHECK_EQ(pm_pair_read(q, PM_STANDARD, &ch, 1, 4 * TS), 0);
    CHECK_EQ(ch, 0);
    CHECK_EQ(pm_pair_read(q, PM_STANDARD, &ch, 1, 8 * TS), 0);
    CHECK_EQ(ch, 'w');
    pm_pair_destroy(q);
    /* corrupt both slots' headers: a clear error, nothing written */
    int fd = open(meta, O_RDWR);
    unsigned char byte = 0xFF;
    CHECK_EQ(pwrite(fd, &byte, 1, 100), 1);
    CHECK_EQ(pwrite(fd, &byte, 1, 16384 + 100), 1);
    close(fd);
    CHECK_EQ(pm_meta_peek(meta, &info), PM_E_CORRUPT);
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &q), PM_E_CORRUPT);
    CHECK(strstr(pm_last_error(), "checksum") != NULL);
    fd = open(meta, O_RDWR);
    CHECK_EQ(pwrite(fd, "NOTMAGIC", 8, 0), 8);
    CHECK_EQ(pwrite(fd, "NOTMAGIC", 8, 16384), 8);
    close(fd);
    CHECK_EQ(pm_meta_peek(meta, &info), PM_E_FOREIGN);
    fd = open(meta, O_RDWR);
    CHECK_EQ(pwrite(fd, "PMIRMETA", 8, 0), 8);                   /* ours, but cut short */
    close(fd);
    CHECK_EQ(truncate(meta, 100), 0);
    CHECK_EQ(pm_meta_peek(meta, &info), PM_E_CORRUPT);
    pm_store_destroy(a);
    pm_store_destroy(b);
    unlink(s_path), unlink(m_path), unlink(meta), rmdir(dir);
}

/* Copy a file (the metadata as it is on disk at a "crash"). */
static void copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char buf[65536];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        CHECK_EQ(write(out, buf, (size_t)n), n);
    close(in), close(out);
}

/* Write-intent: the metadata on disk at any instant covers every track a
 * host write has touched (by its 4 MiB intent region); after an unclean
 * stop those regions count as CHANGED, so an incremental restore misses
 * nothing. */
static void write_intent_after_crash(void)
{
    char dir[] = "/tmp/pm_crash_XXXXXX", sp[64], mp[64], meta[64], snap[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(sp, sizeof sp, "%s/s.img", dir);
    snprintf(mp, sizeof mp, "%s/m.img", dir);
    snprintf(meta, sizeof meta, "%s/p.meta", dir);
    snprintf(snap, sizeof snap, "%s/crash.meta", dir);
    const uint32_t ts = 65536;            /* 64 tracks per 4 MiB region */
    pm_store *a, *b;
    pm_pair *p;
    CHECK_EQ(pm_store_open_file(sp, PM_STORE_CREATE, 512ull * ts, &a), 0);
    CHECK_EQ(pm_store_open_file(mp, PM_STORE_CREATE, 512ull * ts, &b), 0);
    CHECK_EQ(pm_pair_create_meta(meta, a, b, ts, &p), 0);
    CHECK_EQ(pm_pair_assume_established(p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "x", 1, 100ull * ts + 5, 0), 0);   /* region 1 */
    CHECK_EQ(pm_pair_write(p, PM_MIRROR, "y", 1, 400ull * ts, 0), 0);         /* mirror, region 6 */
    copy_file(meta, snap);                                   /* the power goes out here */
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "z", 1, 300ull * ts, 0), 0);        /* never happened */
    pm_pair_destroy(p);
    copy_file(snap, meta);
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &p), 0);
    pm_bitmap *cs = pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_CHANGED);
    pm_bitmap *cm = pm_table_flag(pm_pair_table(p, PM_MIRROR), PM_CHANGED);
    CHECK_EQ(pm_bitmap_count(cs), 64);                       /* all of region 1 ... */
    CHECK_EQ(pm_bitmap_get(cs, 100), 1);                     /* ... which has the written track */
    CHECK_EQ(pm_bitmap_next_set(cs, 0), 64);
    CHECK_EQ(pm_bitmap_count(cm), 64);
    CHECK_EQ(pm_bitmap_get(cm, 400), 1);
    struct pm_copy_config c;
    pm_copy_config_default(&c);
    CHECK_EQ(pm_pair_restore(p, 1, 1, &c), 0);
    CHECK_EQ(pm_pair_wait(p, -1), 0);
    struct pm_progress pr;
    pm_pair_progress(p, &pr);
    CHECK_EQ(pr.tracks_total, 128);                          /* a superset, never less */
    char ch;
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, &ch, 1, 100ull * ts + 5), 0);
    CHECK_EQ(ch, 0);                                         /* restored */
    CHECK_EQ(pm_pair_read(p, PM_STANDARD, &ch, 1, 400ull * ts), 0);
    CHECK_EQ(ch, 'y');                                       /* the mirror's change came over */
    pm_pair_destroy(p);
    /* a clean close: the precise tables alone */
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &p), 0);
    CHECK_EQ(pm_pair_split(p), 0);
    CHECK_EQ(pm_pair_write(p, PM_STANDARD, "x", 1, 100ull * ts, 0), 0);
    pm_pair_destroy(p);
    CHECK_EQ(pm_pair_open_meta(meta, a, b, &p), 0);
    CHECK_EQ(pm_bitmap_count(pm_table_flag(pm_pair_table(p, PM_STANDARD), PM_CHANGED)), 1);
    pm_pair_destroy(p);
    pm_store_destroy(a);
    pm_store_destroy(b);
    unlink(sp), unlink(mp), unlink(meta), unlink(snap), rmdir(dir);
}

int main(void)
{
    state_machine();
    restore_cases(0, PM_READ_REDIRECT);
    restore_cases(1, PM_READ_HYDRATE);
    incremental_counts();
    faults();
    metadata();
    write_intent_after_crash();
    return CHECK_DONE("test_pair");
}
